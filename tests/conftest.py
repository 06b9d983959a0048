import os
from pathlib import Path

# Tests never download: any hub access fails fast instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root() -> Path:
    """The project checkout (where Snakefile, params.yaml and configs/ live)."""
    return ROOT


@pytest.fixture(scope="session")
def bundled_model_dir(tmp_path_factory) -> Path:
    """models/base as the base_model step writes it from the bundled GGUF (about 20 s)."""
    from longctx.base_model import prepare_base_model
    from longctx.config import BaseModelConfig

    path = tmp_path_factory.mktemp("bundled") / "base"
    prepare_base_model(BaseModelConfig(), model=path)
    return path


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """Real news articles (the Lee corpus in gensim's wheel), two per document as paragraphs:
    haystacks for evaluation samples."""
    from gensim.test.utils import datapath

    with open(datapath("lee_background.cor"), encoding="latin-1") as fh:
        lines = [line.strip() for line in fh if 60 < len(line.split()) < 300][:40]
    return ["\n\n".join(lines[i:i + 2]) for i in range(0, len(lines), 2)]
