"""Rule `train_stage`: one stage of progressive context extension, under Accelerate.

Stage k starts from stage k-1's final weights (stage 0 from the base model) with the stage's
RoPE base and length written into the config, and a fresh optimizer. The loop is plain:
per optimizer step, `train.global_batch` sequences over all processes in micro-batches, each
loss a SUM over its target tokens divided by the step's target tokens, so every
token weighs the same however tokens fall into micro-batches (and the gradient mean over
processes of DDP, FSDP2 or DeepSpeed is undone by the factor `world`). The logits of a long
sequence are never materialised whole (chunked cross-entropy), activations are recomputed in
the backward pass, bf16 autocast on GPU, fp32 on CPU.

Every check that can fail (schedule, data, initial weights) runs before the model loads.
Resumable state goes to `checkpoints/stage-<k>/` every `checkpoint_every` steps (but the last,
which the stage's model follows at once) and on SIGTERM (then stop) or SIGUSR1 (then go on),
at the end of the micro-batch a signal arrives in; a rerun, on any process count, resumes
from the newest one with the same weights, optimizer, data position (inside a step too) and
RNG states, so a killed-and-resumed stage ends with the weights of an uninterrupted one. Once the
stage's model is written, its checkpoints are deleted (the next stage starts with a fresh
optimizer; they would only take disk).

`train_stage` reads top to bottom, as nanoGPT's train.py does, and this module holds the loop
and the model; the rest sits beside it, one concern each: preflight.py (the checks, before
the model loads) -> distributed.py (Accelerate, DDP, FSDP2 or DeepSpeed as the launch config
says; which sequences each process reads) -> per step `train_step`, metrics.py (the record:
dvclive, progress bar, log) and `Checkpointer.maybe_save` (checkpoint.py: when to save, and
resuming) -> the stage's model dir (longctx.base_model's format), then its checkpoints
deleted. loss.py is the model's loss, data.py its inputs, rope.py the schedule.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longctx.base_model import write_model_dir
from longctx.config import Params, TrainConfig
from longctx.errors import LongctxError
from longctx.llm.base import derive_seed
from longctx.tokens import load_tokenizer
from longctx.train import distributed, preflight
from longctx.train.checkpoint import Checkpointer, Position, Signals, run_name
from longctx.train.data import Packed
from longctx.train.loss import LossModel
from longctx.train.metrics import Metrics, StepStats
from longctx.train.positions import micro_batches, round_size, step_sequences
from longctx.train.preflight import Plan
from longctx.train.rope import stage_config

log = logging.getLogger(__name__)


class TrainingInterrupted(LongctxError):
    """SIGTERM arrived: the state was saved and the stage stopped; a rerun resumes it."""


def lr_factor(step: int, steps: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based) as a share of `cfg.lr`: linear
    warmup to 1, then cosine or linear decay to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = steps - cfg.warmup_steps - 1
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps) if decay_steps > 0 else 1.0
    shape = (0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine"
             else 1 - progress)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def train_stage(params: Params, *, stage: int, base: Path, init: Path, sequences: Path,
                model: Path, live: Path, checkpoints: Path,
                on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train stage `stage` from the weights in `init` on `sequences` (the stage's
    sequences.parquet) and write its model dir `model`, its dvclive dir `live` and, on the
    way, resumable state under `checkpoints`; returns the run's summary. `base` is the base
    model dir, whose length and RoPE base the schedule grows from. `on_step(n)` is called
    after optimizer step n (progress hooks, tests)."""
    from accelerate.utils import set_seed

    cfg = params.train
    plan = preflight.plan(params, stage, Path(base), Path(init), Path(sequences))
    accelerator = distributed.setup(cfg)
    world = accelerator.num_processes
    preflight.check_process(plan, cfg, accelerator.device, world)
    checkpointer = Checkpointer(accelerator, Path(checkpoints), run_name(params, plan), cfg,
                                stage=stage, margin_s=_signal_margin(params))
    universal = checkpointer.find()
    set_seed(derive_seed(params.seed, "train", stage) % 2**32)

    tokenizer = load_tokenizer(plan.init)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    net = _load_model(plan, params)
    net, optimizer = distributed.prepare(accelerator, net, _optimizer(net, cfg), cfg, universal)
    at, history = checkpointer.resume(net)
    _log_plan(plan, cfg, world)
    metrics = Metrics(Path(live), history, main=accelerator.is_main_process,
                      device=accelerator.device, stage=stage, step=at.step, steps=plan.steps,
                      log_every=cfg.log_every)
    rounds = round_size(cfg, world)

    def save(position: Position, received: int) -> None:
        """A checkpoint if one is due or a signal asked for it; SIGTERM then stops."""
        checkpointer.maybe_save(net, position, last=position.step == plan.steps,
                                signal=received, history=history)
        if received == Signals.STOP:
            metrics.close()
            raise TrainingInterrupted(
                f"stage {stage}: stopped by SIGTERM {position.describe(plan.steps, cfg)}; "
                f"state saved in {checkpointer.run_dir}; rerun the same command to resume")

    def between(micro: int, loss_sum: torch.Tensor) -> None:
        """After micro-batch `micro` of the step from `at`: a signal saves the step so far."""
        if received := signals.take(accelerator):
            done = at.loss_sum + float(accelerator.reduce(loss_sum, "sum"))
            save(Position(at.step, (micro + 1) * rounds, done), received)

    with Signals() as signals:
        while at.step < plan.steps:
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(at.step, plan.steps, cfg)
            first = at.done // rounds  # a step resumed in its middle: its next micro-batch
            batches = distributed.step_batches(plan.sequences, at.step, accelerator, cfg,
                                               pad_id, first)
            targets = plan.sequences.targets(step_sequences(at.step, cfg))
            stats = train_step(net, optimizer, accelerator, batches, lr, cfg, targets,
                               first=first, loss_before=at.loss_sum, between=between)
            at = Position(at.step + 1)
            history.append(metrics.log(at.step, lr, stats, time.perf_counter() - t0))
            if on_step is not None:
                on_step(at.step)
            save(at, signals.take(accelerator))
            checkpointer.check_margin(stats.longest_micro_s)
    metrics.close()

    summary = {"steps": at.step, "tokens": sum(r["train/learnt_tokens"] for r in history),
               "final_loss": history[-1]["train/loss"] if history else None}
    _save_model(accelerator, net, tokenizer, Path(model), params, plan, summary)
    metrics.end({"stage/length": plan.planned.length, "stage/rope_theta": plan.planned.rope_theta,
                 "stage/steps": at.step, "stage/learnt_tokens": summary["tokens"]})
    checkpointer.finish()
    _shut_down(accelerator)
    return {**summary, "length": plan.planned.length, "rope_theta": plan.planned.rope_theta}


def _signal_margin(params: Params) -> int | None:
    """Under SLURM, the seconds between the profile's SIGUSR1 and the time limit (a job's
    signal, `--signal=USR1@margin`, comes from cluster.signal_margin_s); None elsewhere."""
    return params.cluster.signal_margin_s if "SLURM_JOB_ID" in os.environ else None


def _shut_down(accelerator: Any) -> None:
    """Every process done, then the DeepSpeed engine (its hooks and in-flight gathers) goes
    before the process group: a gloo group torn down under pending work, or left to the
    interpreter's exit, aborts the process ("terminate called without an active exception")
    after a finished stage."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    accelerator.end_training()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, accelerator: Any,
               batches: list[Packed], lr: float, cfg: TrainConfig, targets: tuple[int, int],
               *, first: int = 0, loss_before: float = 0.0,
               between: Callable[[int, torch.Tensor], None] | None = None) -> StepStats:
    """One optimizer step over this process's micro-batches, `first` on (a step resumed in
    its middle, whose partial gradient is restored and whose loss so far is `loss_before`).
    `targets`: the step's (target tokens, tokens) over every process. Each micro-batch's
    summed loss is divided by the step's target tokens, so every token weighs the same; the
    factors undo the mean that the gradient sync (over processes) and Accelerate's backward
    (over micro-batches) take. `between(micro, this process's loss sum)` runs after each
    micro-batch but the last, on every process (it may save a checkpoint there, or stop)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    learnt, tokens = targets
    micro_batches = accelerator.gradient_accumulation_steps
    scale = accelerator.num_processes * micro_batches / max(learnt, 1)
    accelerator.step = first  # accelerate's micro-batch count: the step's last one steps
    loss_sum = torch.zeros((), device=accelerator.device)
    longest = 0.0
    for micro, batch in enumerate(batches, start=first):
        started = time.perf_counter()
        with accelerator.accumulate(model):
            total, _ = model(*batch.model_inputs(accelerator.device))
            accelerator.backward(total * scale)  # (backward divides by micro_batches)
        loss_sum += total.detach()
        longest = max(longest, time.perf_counter() - started)
        if between is not None and micro + 1 < micro_batches:
            between(micro, loss_sum)
    grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                 if cfg.grad_clip else None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = (loss_before + float(accelerator.reduce(loss_sum, "sum"))) / max(learnt, 1)
    return StepStats(loss=loss, learnt=learnt, tokens=tokens, longest_micro_s=longest,
                     grad_norm=None if grad_norm is None else float(grad_norm))


def _log_plan(plan: Plan, cfg: TrainConfig, world: int) -> None:
    """The stage as it will run: one line, so a log says what each stage trained."""
    planned = plan.planned
    log.info("stage %d: length %d, RoPE base %g (%s), %d steps of %d sequences, %d process(es)"
             " accumulating %d micro-batches%s", plan.stage, planned.length, planned.rope_theta,
             "derived" if planned.derived else "given", plan.steps, cfg.global_batch, world,
             micro_batches(cfg, world),
             f", context parallel {cfg.context_parallel}" if cfg.context_parallel > 1 else "")


def _load_model(plan: Plan, params: Params) -> LossModel:
    """The initial weights in fp32 (masters; autocast computes in bf16) with the stage's
    length and RoPE base in the config, wrapped to return the chunked loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = params.train
    config = stage_config(AutoConfig.from_pretrained(plan.init), plan.planned,
                          params.stages.rope_scaling)
    config.use_cache = False
    lm = AutoModelForCausalLM.from_pretrained(plan.init, config=config, dtype=torch.float32,
                                              attn_implementation=cfg.attention)
    if cfg.activation_checkpointing:
        lm.activation_checkpointing_enable({"use_reentrant": False})
    lm.train()
    return LossModel(lm, cfg.loss_chunk_tokens, cfg.loss)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on norms and biases (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def _aliases(module: nn.Module) -> dict[str, str]:
    """Each parameter name that is another name's parameter (tied weights) -> that name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _save_model(accelerator: Any, model: nn.Module, tokenizer: Any, out_dir: Path,
                params: Params, plan: Plan, summary: dict) -> None:
    """The stage's HF dir (weights in train.save_dtype, its RoPE base and length in
    config.json, the tokenizer and chat template) with a manifest, written atomically."""
    state = accelerator.get_state_dict(model)  # gathers sharded weights (FSDP) on main
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    dtype = getattr(torch, params.train.save_dtype)
    lm = accelerator.unwrap_model(model).lm
    weights = {name.removeprefix("lm."): t.to(dtype) for name, t in state.items()}
    for alias, name in _aliases(lm).items():  # tied embeddings: saved once, as from_pretrained
        if alias in weights:                   # expects (a cast or a gather made two copies)
            weights[alias] = weights[name]
    lm.config.dtype = dtype
    lm.config.use_cache = True
    planned = plan.planned
    write_model_dir(out_dir, lm, tokenizer, params.train.save_dtype, {
        "stage": {"index": plan.stage, "length": planned.length,
                  "rope_theta": planned.rope_theta, "derived": planned.derived},
        "trained_from": {"dir": str(plan.init), "identity": preflight.identity(plan.init)},
        "steps": summary["steps"], "learnt_tokens": summary["tokens"],
    }, state_dict=weights)
    accelerator.wait_for_everyone()
    log.info("stage %d: model -> %s", plan.stage, out_dir)
