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
    """A rule's source modules as inputs: editing one reruns the rule (and its DVC stage).
    A package name stands for its modules (a directory's mtime misses edits inside it)."""
    paths = []
    for module in modules:
        path = Path(SOURCE_ROOT) / module
        found = sorted(path.glob("*.py")) if path.is_dir() else [path]
        paths += [p.as_posix() for p in found]
    return paths


def stage_indices(config: dict[str, Any]) -> list[int]:
    """0..K-1 for the K entries of stages.schedule (the default schedule when the params file
    leaves the section out): one pack and one train_stage job each."""
    from longctx.config import validate_params

    return list(range(len(validate_params(config, "params.yaml").stages.schedule)))


def eval_models(config: dict[str, Any]) -> list[str]:
    """The evaluated models, in order: the base model, then every stage (`base`, `stage-<k>`)."""
    return ["base"] + [f"stage-{k}" for k in stage_indices(config)]


def model_dir(name: str) -> str:
    """Where an evaluated model's weights live (the outputs of base_model and train_stage)."""
    return "models/base" if name == "base" else f"models/{name}"


def lmeval_tasks(config: dict[str, Any]) -> list[str]:
    """lmeval.tasks (its default when the section is left out): none means no eval_lmeval
    jobs, and longctx_ruler makes the RULER samples an input of each."""
    from longctx.config import validate_params

    return validate_params(config, "params.yaml").lmeval.tasks


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
