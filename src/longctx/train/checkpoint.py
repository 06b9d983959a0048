"""Resumable training state: when it is saved, and what a killed stage restarts from without
losing finished work.

`Checkpointer` decides when: every `train.checkpoint_every` steps but the last (the stage's
model is written right after it, and its checkpoints deleted: a model-sized write plus the
optimizer's, for nothing), and whenever a process received SIGTERM (save, then stop) or
SIGUSR1 (save and go on, e.g. SLURM's `--signal=USR1@120` before a time limit). `Signals`
turns those signals into a flag the loop reads after every micro-batch, all processes
together: a step of many long micro-batches is interrupted at the next micro-batch's end,
and its checkpoint keeps the step's partial gradient and how many of its sequences are done.

A checkpoint is a directory `checkpoints/stage-<k>/<run>/step-<n>[-<done>]/` holding
Accelerate's state (weights, optimizer moments, every process's RNG states), the partial
gradient of a step in progress (`-<done>`: sequences of step n+1 done), and `trainer.json`
(the step, the data position, the logged history, the layout it was saved with). `<run>` is
a fingerprint of everything the stage's result depends on (params, schedule, training data,
initial weights, the training code), but not of how the work is laid out over processes and
machines: the global batch (`train.global_batch`) is the invariant, so a run resumes on
another process count and ends where it would have (to float rounding: sums are reduced in
another order). FSDP2 states are sharded by torch.distributed.checkpoint, which loads them
into any other sharding; a DeepSpeed checkpoint from another process count is converted to
DeepSpeed's universal format first. A checkpoint of another global batch or strategy is
refused in one line, and kept. Checkpoints are written under a temporary name and renamed when
complete: a kill while saving leaves the previous one usable.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx import repro
from longctx.config import Params, TrainConfig
from longctx.errors import LongctxError
from longctx.train import distributed
from longctx.train.positions import round_size
from longctx.train.preflight import Plan, identity

log = logging.getLogger(__name__)

STATE_FILE = "trainer.json"
PREFIX = "step-"
UNIVERSAL = "universal"  # a DeepSpeed checkpoint converted for another process count
# how a run is laid out over processes, not what it computes: kept out of the fingerprint
LAYOUT_KEYS = {"processes", "nodes", "rendezvous", "rendezvous_timeout_s", "batch_size",
               "global_batch", "context_parallel", "accelerate_config", "device"}


@dataclass(frozen=True)
class Position:
    """Where a run is: `step` optimizer steps done, and `done` sequences of the next one
    (0: at a step's boundary), their summed loss `loss_sum`."""

    step: int
    done: int = 0
    loss_sum: float = 0.0

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.step:08d}" + (f"-{self.done:08d}" if self.done else "")

    def __str__(self) -> str:
        return f"step {self.step}" + (f" + {self.done} sequences of the next" if self.done
                                      else "")

    def describe(self, steps: int, cfg: TrainConfig) -> str:
        """Where a stopped run stands, for its message."""
        if not self.done:
            return f"after step {self.step} of {steps}"
        return (f"in step {self.step + 1} of {steps}, after {self.done} of its "
                f"{cfg.global_batch} sequences")


def _position(path: Path) -> tuple[int, int] | None:
    """(step, done) of a checkpoint dir's name, None if it is not one."""
    parts = path.name.removeprefix(PREFIX).split("-") if path.name.startswith(PREFIX) else []
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def _step_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints (trainer.json written last), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir()
             if p.is_dir() and _position(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_position)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, if any."""
    dirs = _step_dirs(run_dir)
    return dirs[-1] if dirs else None


def save(accelerator: Any, model: Any, run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    """Every process calls this (each saves its own RNG state, or shards); the main process
    finishes the checkpoint and keeps only the newest `keep`."""
    at = Position(state["step"], state["done"])
    final = run_dir / at.name
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if at.done:
        distributed.save_gradients(accelerator, model, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True),
                                      encoding="utf-8")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _step_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    log.info("checkpoint: %s -> %s", at, final)
    return final


def clear_others(stage_dir: Path, keep_run: str) -> None:
    """Drop checkpoints of earlier runs of the stage (other inputs): they can never resume."""
    if stage_dir.is_dir():
        for other in stage_dir.iterdir():
            if other.is_dir() and other.name != keep_run:
                shutil.rmtree(other, ignore_errors=True)


def run_name(params: Params, plan: Plan) -> str:
    """The fingerprint `<run>` of everything the stage's result depends on: a checkpoint of
    other inputs is never resumed. (Logging and checkpointing settings change no weight, and
    the layout over processes only the order sums are reduced in.)"""
    cfg = params.train
    return repro.fingerprint({
        "train": cfg.model_dump(mode="json", exclude={"log_every", "checkpoint_every",
                                                      "keep_checkpoints", *LAYOUT_KEYS}),
        "stage": params.stages.schedule[plan.stage].model_dump(mode="json"),
        "planned": plan.planned.__dict__, "rope_scaling": params.stages.rope_scaling,
        "seed": params.seed,
        "sequences": repro.sha256_file(plan.sequences_path),
        "init": identity(plan.init),
        "code": {f.name: repro.sha256_file(f) for f in sorted(Path(__file__).parent.glob("*.py"))}})


def layout(accelerator: Any, cfg: TrainConfig) -> dict[str, Any]:
    """How this run is laid out: a checkpoint records it, a resumed run checks it."""
    return {"world": accelerator.num_processes, "global_batch": cfg.global_batch,
            "format": distributed.state_format(accelerator)}


class Checkpointer:
    """When a stage's state is saved, and where it resumes from (torchtitan's checkpointer,
    on Accelerate's state): every process calls each method, in step. `find` runs before
    the model is prepared (a DeepSpeed checkpoint of another process count is converted
    then), `resume` after."""

    def __init__(self, accelerator: Any, root: Path, run: str, cfg: TrainConfig, *,
                 stage: int, margin_s: int | None = None):
        self.accelerator, self.root, self.run, self.cfg = accelerator, root, run, cfg
        self.run_dir = root / run
        self.stage, self.margin_s = stage, margin_s
        self.layout = layout(accelerator, cfg)
        self.found: Path | None = None
        self.save_s: float | None = None  # the last save's seconds
        self.warned = False

    def find(self) -> bool:
        """Pick the newest checkpoint of this run and check that it can resume here: the
        same global batch and state format (else one line, and it is kept). Returns whether it
        is a DeepSpeed checkpoint of another process count, converted to the universal
        format (`distributed.prepare` must then load it so)."""
        path = latest(self.run_dir)
        if path is None:
            if self.accelerator.is_main_process:
                clear_others(self.root, self.run)
            return False
        self.found = path
        saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        for key, now in self.layout.items():
            then = saved.get("layout", {}).get(key)
            if key != "world" and then != now:
                raise LongctxError(
                    f"{path}: saved with {key} {then}, but this run has {now}: set it back "
                    f"to resume the stage (the checkpoint is kept), or delete {self.run_dir} "
                    "to train it from the start")
        world = saved["layout"]["world"]
        converted = distributed.is_deepspeed(self.accelerator) and world != self.layout["world"]
        if converted:
            self._to_universal(path, world)
        return converted

    def _to_universal(self, path: Path, world: int) -> None:
        """DeepSpeed's own converter (ds_to_universal) turns the ZeRO partitions of a
        checkpoint saved by another process count into per-parameter files any count loads."""
        from accelerate.utils import MODEL_NAME  # the tag save_state gives DeepSpeed's engine

        target = path / UNIVERSAL / MODEL_NAME
        if self.accelerator.is_main_process and not target.is_dir():
            log.info("stage %d: %s was saved by %d processes: converting it to DeepSpeed's "
                     "universal checkpoint", self.stage, path, world)
            tmp = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                 str(path / MODEL_NAME), "--output_folder", str(tmp)],
                capture_output=True, text=True)
            if done.returncode != 0:
                raise LongctxError(f"{path}: DeepSpeed's universal conversion failed: "
                                   f"{done.stderr.strip().splitlines()[-1:]}")
            tmp.rename(target)
        self.accelerator.wait_for_everyone()

    def resume(self, model: Any) -> tuple[Position, list[dict[str, float]]]:
        """The position and logged history of the checkpoint `find` picked, restoring
        weights, optimizer, RNG states and a step's partial gradient; (step 0, []) when none.
        A step stopped in its middle by another process count resumes in its middle where
        the sequences done split into this count's micro-batch rounds, else from its start
        (the weights are the step's own start: nothing is lost but its finished share)."""
        path = self.found
        if path is None:
            return Position(0), []
        universal = path / UNIVERSAL
        self.accelerator.load_state(str(universal if universal.is_dir() else path))
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        at = Position(state["step"], state["done"], state["loss_sum"])
        if at.done % round_size(self.cfg, self.accelerator.num_processes):
            if self.accelerator.is_main_process:
                log.warning("stage %d: %s was saved by %d processes; its %d sequences done "
                            "do not split into this run's rounds of micro-batches: step %d "
                            "starts over", self.stage, path, state["layout"]["world"],
                            at.done, at.step + 1)
            at = Position(at.step)
        elif at.done:
            distributed.load_gradients(self.accelerator, model, path)
        log.info("stage %d: resuming at %s from %s", self.stage, at, path)
        return at, state["history"]

    def maybe_save(self, model: Any, at: Position, *, last: bool, signal: int,
                   history: list[dict[str, float]]) -> Path | None:
        """Save at `at` if it is due (a step's end every `train.checkpoint_every` steps, but
        not the `last`: the stage's model follows at once) or a signal asked for it
        (`signal` != 0, after any micro-batch)."""
        due = not at.done and at.step % self.cfg.checkpoint_every == 0 and not last
        if not (due or signal):
            return None
        started = time.perf_counter()
        path = save(self.accelerator, model, self.run_dir,
                    {"step": at.step, "done": at.done, "loss_sum": at.loss_sum,
                     "history": history, "stage": self.stage, "layout": self.layout},
                    self.cfg.keep_checkpoints)
        self.save_s = time.perf_counter() - started
        return path

    def check_margin(self, micro_s: float) -> None:
        """Warn once when the time between SLURM's signal and its kill (`margin_s`) is
        shorter than what a signal costs here: the rest of a micro-batch (`micro_s`, the
        longest seen) and a save (the last one's time). SLURM would kill the job mid-save;
        the previous checkpoint survives, but the work since is lost."""
        if self.margin_s is None or self.save_s is None or self.warned:
            return
        need = micro_s + self.save_s
        if need > self.margin_s:
            self.warned = True
            log.warning("stage %d: cluster.signal_margin_s %d s is shorter than a micro-batch "
                        "(%.0f s) plus a checkpoint save (%.0f s): SLURM may kill the job "
                        "before its checkpoint is written; raise it to at least %d",
                        self.stage, self.margin_s, micro_s, self.save_s, math.ceil(need * 1.5))

    def finish(self) -> None:
        """The stage's model is out: its resumable state is spent (the next stage starts
        with a fresh optimizer), so it is deleted rather than left taking disk."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.run_dir, ignore_errors=True)


class Signals:
    """SIGTERM: save a checkpoint, then stop. SIGUSR1: save and go on (e.g. SLURM's
    `--signal=USR1@120` before a time limit). Handlers only set a flag; the loop acts on it
    after every micro-batch, all processes together."""

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
