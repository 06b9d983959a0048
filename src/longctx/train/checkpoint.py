"""Resumable training state: when it is saved, and what a killed stage restarts from without
losing finished steps.

`Checkpointer` decides when: every `train.checkpoint_every` steps but the last (the stage's
model is written right after it, and its checkpoints deleted: a model-sized write plus the
optimizer's, for nothing), and whenever a process received SIGTERM (save, then stop) or
SIGUSR1 (save and go on, e.g. SLURM's `--signal=USR1@120` before a time limit). `Signals`
turns those signals into a flag the loop reads between steps, all processes together.

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
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from longctx import repro
from longctx.config import Params
from longctx.train.preflight import Plan, identity

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


def run_name(params: Params, plan: Plan, world: int) -> str:
    """The fingerprint `<run>` of everything the stage's result depends on: a checkpoint of
    other inputs is never resumed. (Logging and checkpointing settings change no weight.)"""
    cfg = params.train
    return repro.fingerprint({
        "train": cfg.model_dump(mode="json", exclude={"log_every", "checkpoint_every",
                                                      "keep_checkpoints"}),
        "stage": params.stages.schedule[plan.stage].model_dump(mode="json"),
        "planned": plan.planned.__dict__, "rope_scaling": params.stages.rope_scaling,
        "seed": params.seed, "world": world,
        "sequences": repro.sha256_file(plan.sequences_path),
        "init": identity(plan.init),
        "code": {f.name: repro.sha256_file(f) for f in sorted(Path(__file__).parent.glob("*.py"))}})


class Checkpointer:
    """When a stage's state is saved, and where it resumes from (torchtitan's checkpointer,
    on Accelerate's state): every process calls each method, in step."""

    def __init__(self, accelerator: Any, root: Path, run: str, *, stage: int, every: int,
                 keep: int):
        self.accelerator, self.root, self.run = accelerator, root, run
        self.run_dir = root / run
        self.stage, self.every, self.keep = stage, every, keep

    def resume(self) -> tuple[int, list[dict[str, float]]]:
        """(step, logged history) of the newest checkpoint of this run, restoring weights,
        optimizer and RNG states; (0, []) and the stage's stale runs cleared when none."""
        path = latest(self.run_dir)
        if path is None:
            if self.accelerator.is_main_process:
                clear_others(self.root, self.run)
            return 0, []
        state = load(self.accelerator, path)
        log.info("stage %d: resuming at step %d from %s", self.stage, state["step"], path)
        return state["step"], state["history"]

    def maybe_save(self, step: int, *, last: bool, signal: int,
                   history: list[dict[str, float]]) -> Path | None:
        """Save after step `step` if it is due (every `every` steps, but not the `last`: the
        stage's model follows at once) or a signal asked for it (`signal` != 0)."""
        due = step % self.every == 0 and not last
        if not (due or signal):
            return None
        return save(self.accelerator, self.run_dir,
                    {"step": step, "history": history, "stage": self.stage}, self.keep)

    def finish(self) -> None:
        """The stage's model is out: its resumable state is spent (the next stage starts
        with a fresh optimizer), so it is deleted rather than left taking disk."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class Signals:
    """SIGTERM: save a checkpoint, then stop. SIGUSR1: save and go on (e.g. SLURM's
    `--signal=USR1@120` before a time limit). Handlers only set a flag; the loop acts on it
    between steps, all processes together."""

    SAVE, STOP = 1, 2  # by strength: a STOP and a SAVE together stop
    CODES = {signal.SIGUSR1: SAVE, signal.SIGTERM: STOP}

    def __init__(self) -> None:
        self._received: list[int] = []  # appended by the handler, popped by take()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self._received.append(self.CODES[signum])

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def take(self, accelerator: Any) -> int:
        """The strongest signal any process received since the last call (0: none). Popped
        one by one: a signal handled meanwhile (say as the collective returns) is kept for
        the next call, where resetting a flag after the collective would lose it."""
        codes = []
        while self._received:
            codes.append(self._received.pop())
        mine = torch.tensor(max(codes, default=0), device=accelerator.device)
        return int(accelerator.reduce(mine, "max"))
