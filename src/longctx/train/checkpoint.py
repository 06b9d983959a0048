"""Resumable training state: what a killed stage restarts from without losing finished steps.

A checkpoint is a directory `checkpoints/stage-<k>/<run>/step-<n>/` holding Accelerate's
state (weights, optimizer moments, every process's RNG states) and `trainer.json` (the step,
the data position, the logged history). `<run>` is a fingerprint of everything the stage's
result depends on (params, schedule, training data, initial weights, the training code), so a
stage rerun with other inputs never resumes from a stale state. Checkpoints are written under
a temporary name and renamed when complete: a kill while saving leaves the previous one usable.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "trainer.json"
PREFIX = "step-"


def _step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer.json written last), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob(f"{PREFIX}*")
             if p.is_dir() and p.name[len(PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    dirs = _step_dirs(run_dir)
    return dirs[-1] if dirs else None


def save(accelerator: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every process calls this (each saves its own RNG state); the main process finishes the
    checkpoint and keeps only the newest `keep`."""
    final = run_dir / f"{PREFIX}{state['step']:08d}"
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True),
                                      encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint: step %d -> %s", state["step"], final)
    return final


def load(accelerator: Any, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states; returns the trainer state."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def clear_others(stage_dir: Path, keep_run: str) -> None:
    """Drop checkpoints of earlier runs of the stage (other inputs): they can never resume."""
    if stage_dir.is_dir():
        for other in stage_dir.iterdir():
            if other.is_dir() and other.name != keep_run:
                shutil.rmtree(other, ignore_errors=True)
