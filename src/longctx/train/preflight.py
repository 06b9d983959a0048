"""The checks before a stage trains: whatever can fail does so before the model loads.

A stage that fails after minutes of model loading (or hours of training) for a reason that
was knowable at the start wastes a GPU allocation, so every check that can be made early is
made here: the schedule as the params and the base model's config define it, the initial
weights (stage k must start from stage k-1 as scheduled now, not from a stale run), the
sequences (enough of them, none longer than the stage), the attention and loss kernels, and
context parallelism. `plan` runs before any process group exists; `check_process` needs this
process's device and the process count, so it runs once Accelerate is set up (still before
the model loads). The content identity of a model dir (its manifest's hash) is read here too:
the checkpoint's run fingerprint and the stage's manifest record it.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longctx import repro
from longctx.base_model import MANIFEST
from longctx.config import Params, StagesConfig, TrainConfig
from longctx.errors import LongctxError
from longctx.sequences import SequenceTable
from longctx.train.distributed import deepspeed_launched
from longctx.train.positions import micro_batches, sequences_per_step
from longctx.train.rope import ScheduledStage, Stage, base_rope, schedule


@dataclass(frozen=True)
class Plan:
    """A stage as checked: what the rest of the run reads instead of re-deriving it."""

    stage: int
    planned: ScheduledStage  # the stage's length and RoPE base, as scheduled now
    steps: int  # optimizer steps
    init: Path  # the weights it starts from
    sequences: SequenceTable
    sequences_path: Path

    @property
    def key(self) -> str:
        """The params key of the stage, for error messages."""
        return f"stages.schedule[{self.stage}]"


def stage_schedule(stages: StagesConfig, base_config: Any) -> list[ScheduledStage]:
    """Every stage's (length, RoPE base) from the params and the base model's config."""
    length, theta = base_rope(base_config)
    return schedule([Stage(s.length, s.rope_theta) for s in stages.schedule],
                    stages.base_length or length, theta, stages.rope_growth,
                    key="stages.schedule")


def plan(params: Params, stage: int, base: Path, init: Path, sequences: Path) -> Plan:
    """The checks that need no process group (so a launcher's processes all fail alike and
    at once): the stage exists, the schedule holds against the base model's length, the
    initial weights are the previous stage's, context parallelism can run on this data."""
    from transformers import AutoConfig

    from longctx.sequences import read_sequences

    if not 0 <= stage < len(params.stages.schedule):
        raise LongctxError(f"stage {stage}: stages.schedule has {len(params.stages.schedule)} "
                           "stages")
    base_config = AutoConfig.from_pretrained(base)
    planned_all = stage_schedule(params.stages, base_config)
    _check_init(init, stage, planned_all)
    rows = read_sequences(sequences)
    _check_context_parallel(params.train, base_config, rows, sequences)
    return Plan(stage=stage, planned=planned_all[stage],
                steps=params.stages.schedule[stage].steps, init=init, sequences=rows,
                sequences_path=sequences)


def check_process(plan: Plan, cfg: TrainConfig, device: torch.device, world: int) -> None:
    """The checks that need this process's device (kernels) or the process count (that the
    global batch splits over it), made before the model loads."""
    _check_kernels(cfg, device)
    micro_batches(cfg, world)
    _check_data(plan.sequences, plan.sequences_path, plan.planned, plan.steps,
                sequences_per_step(cfg), plan.key)


def _check_init(init_dir: Path, stage: int, planned: list[ScheduledStage]) -> None:
    """Stage k > 0 must start from stage k-1 as scheduled now, not from a stale run."""
    if stage == 0:
        return
    manifest = read_manifest(init_dir)
    previous = planned[stage - 1]
    trained = manifest.get("stage") or {}
    if (trained.get("index"), trained.get("length"), trained.get("rope_theta")) != (
            stage - 1, previous.length, previous.rope_theta):
        raise LongctxError(
            f"{init_dir}: trained as stage {trained.get('index')} at length "
            f"{trained.get('length')} / RoPE base {trained.get('rope_theta')}, but stage "
            f"{stage - 1} is now scheduled at {previous.length} / {previous.rope_theta:g}; "
            f"rerun stage {stage - 1} first")


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest longctx writes into every model dir (what it is, how it was trained)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise LongctxError(f"{path}: not found (a model dir written by longctx is expected)")
    return json.loads(path.read_text(encoding="utf-8"))


def identity(model_dir: Path) -> str:
    """A content hash of a model dir: its manifest's (which lists every file's sha256) when
    longctx wrote it, else every file's."""
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        return repro.sha256_file(manifest)
    return repro.fingerprint(repro.sha256_dir(model_dir))


def _check_data(sequences: Any, path: Path, planned: ScheduledStage, steps: int,
                per_step: int, key: str) -> None:
    """Enough sequences for every step (none is read twice), none longer than the stage."""
    need = steps * per_step
    if len(sequences) < need:
        raise LongctxError(
            f"{path}: {len(sequences)} sequences, but {steps} steps x {per_step} sequences per "
            f"step (train.global_batch) need {need}; set "
            f"{key}.sequences to at least {need} (samples repeat) or lower {key}.steps")
    longest = sequences.longest()
    if longest > planned.length:
        raise LongctxError(f"{path}: a sequence of {longest} tokens exceeds the stage length "
                           f"{planned.length} (repack: rerun the pack step)")


def _check_kernels(cfg: TrainConfig, device: torch.device) -> None:
    """An attention or loss kernel that cannot train here fails before the model loads."""
    gpu_extra = "(the `gpu` extra: pip install 'longctx[gpu]')"
    if cfg.attention == "flex_attention" and device.type == "cpu":
        raise LongctxError("train.attention: flex_attention has no backward pass on CPU (torch "
                           f"{torch.__version__}); train with sdpa there")
    if cfg.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise LongctxError(f"train.attention: flash_attention_2 needs the flash-attn package "
                           f"{gpu_extra}; or use flex_attention or sdpa")
    if cfg.loss == "liger" and (device.type != "cuda"
                                or importlib.util.find_spec("liger_kernel") is None):
        raise LongctxError(f"train.loss: liger needs a CUDA GPU and liger-kernel {gpu_extra}; "
                           "`chunked` does the same in plain torch")


def _check_context_parallel(cfg: TrainConfig, model_config: Any, sequences: Any,
                            path: Path) -> None:
    """Context parallelism that cannot run fails before the model loads."""
    n = cfg.context_parallel
    if n == 1:
        return
    if not deepspeed_launched():
        raise LongctxError(f"train.context_parallel: {n} needs DeepSpeed (its Ulysses sequence "
                           "parallelism): set train.accelerate_config to a DeepSpeed config, "
                           "e.g. configs/accelerate/zero3.yaml")
    text = model_config.get_text_config()
    heads, kv = text.num_attention_heads, text.num_key_value_heads
    if heads % n or (kv % n and n % kv):
        raise LongctxError(f"train.context_parallel: {n} must divide the model's {heads} "
                           f"attention heads, and divide or be a multiple of its {kv} "
                           "key/value heads")
    if cfg.attention == "sdpa" and (most := sequences.most_samples()) > 1:
        raise LongctxError(
            f"{path}: sequences pack up to {most} samples, which sdpa "
            "cannot keep apart under train.context_parallel (sequence parallelism drops the "
            "mask); use train.attention: flash_attention_2, or a mixture of long samples "
            "only (long_output: 0, short: 0)")
