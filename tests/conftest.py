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
