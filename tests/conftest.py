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
