"""Helpers the Snakemake rules call, so the .smk files hold wiring only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

SOURCE_ROOT = "src/longctx"


def sections(config: dict[str, Any], *names: str) -> dict[str, Any]:
    """A rule's `params:`: only the sections it reads, so a change elsewhere never reruns it."""
    return {name: config.get(name) for name in names}


def code(*modules: str) -> list[str]:
    """A rule's source modules as inputs: editing one reruns the rule (and its DVC stage)."""
    return [f"{SOURCE_ROOT}/{module}" for module in modules]


def check_config(config: dict[str, Any], params_file: str | Path) -> None:
    """Refuse `--config`/`--configfile` overrides: the steps read `params_file` themselves,
    and DVC tracks that file, so a value that lives only in Snakemake's memory would make
    the two disagree about what was run."""
    on_disk = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    if config != on_disk:
        raise ValueError(
            f"snakemake's config differs from {params_file}: longctx steps read {params_file}, "
            "so edit it, switch profiles with `longctx profile NAME`, or use "
            "`dvc exp run -S key=value`, instead of --config/--configfile"
        )
