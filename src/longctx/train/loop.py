"""Rule `train_stage`: one stage of progressive context extension, under Accelerate.

Stage k starts from stage k-1's final weights (stage 0 from the base model) with the stage's
RoPE base and length written into the config, and a fresh optimizer. The loop is plain:
per optimizer step, `grad_accum` micro-batches per process, each loss a SUM over its target
tokens divided by the step's token count over all micro-batches and processes, so every
token weighs the same however tokens fall into micro-batches (and the gradient mean over
processes of DDP, FSDP2 or DeepSpeed is undone by the factor `world`). The logits of a long
sequence are never materialised whole (chunked cross-entropy), activations are recomputed in
the backward pass, bf16 autocast on GPU, fp32 on CPU.

Every check that can fail (schedule, data, initial weights) runs before the model loads.
Resumable state goes to `checkpoints/stage-<k>/` every `checkpoint_every` steps (but the last,
which the stage's model follows at once) and on SIGTERM (then stop) or SIGUSR1 (then go on); a
rerun resumes from the newest one with the same weights, optimizer, data position and RNG
states, so a killed-and-resumed stage ends with the weights of an uninterrupted one. Once the
stage's model is written, its checkpoints are deleted (the next stage starts with a fresh
optimizer; they would only take disk).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longctx import repro
from longctx.base_model import MANIFEST, write_model_dir
from longctx.config import Params, StagesConfig, TrainConfig
from longctx.errors import LongctxError
from longctx.llm.base import derive_seed
from longctx.train import checkpoint
from longctx.train.data import ROW_KERNELS, Packed, collate, shard, to_samples
from longctx.train.launch import stop_with_launcher
from longctx.train.loss import IGNORE_INDEX, chunked_cross_entropy, liger_cross_entropy
from longctx.train.rope import ScheduledStage, Stage, base_rope, schedule, stage_config

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


def stage_schedule(stages: StagesConfig, base_config: Any) -> list[ScheduledStage]:
    """Every stage's (length, RoPE base) from the params and the base model's config."""
    length, theta = base_rope(base_config)
    return schedule([Stage(s.length, s.rope_theta) for s in stages.schedule],
                    stages.base_length or length, theta, stages.rope_growth,
                    key="stages.schedule")


class LossModel(nn.Module):
    """A causal LM whose forward returns (summed loss, target tokens) through the chunked
    cross-entropy (or Liger's). Wrapping the LM (rather than calling its parts from the loop)
    keeps the output projection inside the module DDP/FSDP prepare, so sharded weights are
    gathered."""

    def __init__(self, lm: nn.Module, chunk_tokens: int, loss: str = "chunked"):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.loss = loss
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP auto-wrap
        self.config = lm.config  # read by DeepSpeed's Ulysses setup (heads, attention kernel)

    def forward(self, input_ids, position_ids, attention_mask, targets):
        hidden = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids,
                                       attention_mask=attention_mask,
                                       use_cache=False).last_hidden_state
        weight = self.lm.get_output_embeddings().weight
        if self.loss == "liger":
            return liger_cross_entropy(hidden, weight, targets)
        return chunked_cross_entropy(hidden, weight, targets, self.chunk_tokens)


class _Signals:
    """SIGTERM: save a checkpoint, then stop. SIGUSR1: save and go on (e.g. SLURM's
    `--signal=USR1@120` before a time limit). Handlers only set a flag; the loop acts on it
    between steps, all processes together."""

    CODES = {signal.SIGUSR1: 1, signal.SIGTERM: 2}

    def __init__(self) -> None:
        self._received: list[int] = []  # appended by the handler, popped by take()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
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


def _check_init(init_dir: Path, stage: int, planned: list[ScheduledStage]) -> None:
    """Stage k > 0 must start from stage k-1 as scheduled now, not from a stale run."""
    if stage == 0:
        return
    manifest = _read_manifest(init_dir)
    previous = planned[stage - 1]
    trained = manifest.get("stage") or {}
    if (trained.get("index"), trained.get("length"), trained.get("rope_theta")) != (
            stage - 1, previous.length, previous.rope_theta):
        raise LongctxError(
            f"{init_dir}: trained as stage {trained.get('index')} at length "
            f"{trained.get('length')} / RoPE base {trained.get('rope_theta')}, but stage "
            f"{stage - 1} is now scheduled at {previous.length} / {previous.rope_theta:g}; "
            f"rerun stage {stage - 1} first")


def _read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise LongctxError(f"{path}: not found (a model dir written by longctx is expected)")
    return json.loads(path.read_text(encoding="utf-8"))


def _identity(model_dir: Path) -> str:
    """A content hash of a model dir: its manifest's (which lists every file's sha256) when
    longctx wrote it, else every file's."""
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        return repro.sha256_file(manifest)
    return repro.fingerprint(repro.sha256_dir(model_dir))


def _check_data(sequences: Any, path: Path, planned: ScheduledStage, steps: int,
                per_step: int, key: str) -> None:
    need = steps * per_step
    if len(sequences) < need:
        raise LongctxError(
            f"{path}: {len(sequences)} sequences, but {steps} steps x {per_step} sequences per "
            f"step (batch_size x grad_accum x processes / context_parallel) need {need}; set "
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


def _deepspeed() -> bool:
    """Whether `accelerate launch` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _check_context_parallel(cfg: TrainConfig, model_config: Any, sequences: Any,
                            path: Path) -> None:
    """Context parallelism that cannot run fails before the model loads."""
    n = cfg.context_parallel
    if n == 1:
        return
    if not _deepspeed():
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


def _accelerator(cfg: TrainConfig):
    """Accelerate for this process: the GPU when there is one, bf16 autocast there; gradient
    accumulation by Accelerate's own `accumulate` (DDP's no_sync, FSDP2's gradient-sync switch,
    DeepSpeed's accumulation boundary). Under `accelerate launch` with a DeepSpeed config on a
    machine without GPUs, DeepSpeed runs on the CPU with gloo (tests, smoke runs).

    `train.context_parallel` N > 1: DeepSpeed's Ulysses sequence parallelism (accelerate's
    ParallelismConfig(sp_size=N)): N consecutive processes share each sequence, each holding
    1/N of its tokens; around attention an all-to-all trades the sequence slices for whole
    sequences of 1/N of the heads. (torch's ring attention, ParallelismConfig(cp_size), has
    no CPU path to test on, and keeps no sample boundaries at all.)"""
    from accelerate import Accelerator
    from accelerate.utils import (DeepSpeedSequenceParallelConfig, InitProcessGroupKwargs,
                                  ParallelismConfig)

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LongctxError("train.device: cuda requested but no CUDA device is visible")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda)
    deepspeed = _deepspeed()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    parallelism = None
    if cfg.context_parallel > 1:
        data_parallel = int(os.environ.get("WORLD_SIZE", "1")) // cfg.context_parallel
        parallelism = ParallelismConfig(
            dp_shard_size=data_parallel, sp_size=cfg.context_parallel, sp_backend="deepspeed",
            sp_handler=DeepSpeedSequenceParallelConfig(
                sp_seq_length_is_variable=True, sp_attn_implementation=cfg.attention))
    return Accelerator(cpu=not (cuda or deepspeed), mixed_precision="bf16" if bf16 else "no",
                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
                       parallelism_config=parallelism)


def _prepare(accelerator: Any, model: LossModel, optimizer: torch.optim.Optimizer,
             cfg: TrainConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare`, after telling DeepSpeed what the params say: batch sizes and
    clipping (its engine steps and clips itself) and gathering whole weights to save. (ZeRO-3
    also gathers the output projection that the chunked loss reads outside lm_head's forward:
    its parameter getter registers such reads as external parameters.)"""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        rows = 1 if cfg.attention in ROW_KERNELS else cfg.batch_size  # per micro-batch
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": rows,
            "gradient_accumulation_steps": cfg.grad_accum,
            "train_batch_size": rows * cfg.grad_accum * (accelerator.num_processes
                                                         // cfg.context_parallel),
            "gradient_clipping": cfg.grad_clip or 0.0})
        plugin.deepspeed_config.setdefault("zero_optimization", {})[
            "stage3_gather_16bit_weights_on_model_save"] = True
    return accelerator.prepare(model, optimizer)


def _load_model(init_dir: Path, planned: ScheduledStage, stages: StagesConfig,
                cfg: TrainConfig) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = stage_config(AutoConfig.from_pretrained(init_dir), planned, stages.rope_scaling)
    config.use_cache = False
    lm = AutoModelForCausalLM.from_pretrained(init_dir, config=config, dtype=torch.float32,
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


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Live:
    """dvclive on the main process: loss, lr, grad norm, tokens/s and memory per step. A
    resumed run replays the checkpoint's history first, so the curve has no gap or repeat."""

    def __init__(self, live_dir: Path, history: list[dict[str, float]], enabled: bool):
        self.live = None
        if not enabled:
            return
        from dvclive import Live

        self.live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
        for record in history:
            self.log(record)

    def log(self, record: dict[str, float]) -> None:
        if self.live is not None:
            for name, value in record.items():
                if name != "step":
                    self.live.log_metric(name, value)
            self.live.next_step()

    def end(self, summary: dict[str, float]) -> None:
        if self.live is not None:
            for name, value in summary.items():
                self.live.log_metric(name, value, plot=False)
            self.live.end()


def _batch_indices(step: int, micro: int, rank: int, cfg: TrainConfig, world: int) -> list[int]:
    """Which sequences micro-batch `micro` of step `step` reads on process `rank`: the data
    position is a function of the step, so resuming needs nothing but the step. The
    `context_parallel` consecutive processes of a group read the same sequences."""
    replicas, replica = world // cfg.context_parallel, rank // cfg.context_parallel
    first = ((step * cfg.grad_accum + micro) * replicas + replica) * cfg.batch_size
    return list(range(first, first + cfg.batch_size))


def train_stage(params: Params, stage: int, base_dir: Path, init_dir: Path, sequences_path: Path,
                out_dir: Path, live_dir: Path, checkpoint_root: Path,
                on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train stage `stage` and write its model dir; returns the run's summary. `on_step(n)`
    is called after optimizer step n (progress hooks, tests)."""
    from accelerate.utils import set_seed
    from transformers import AutoConfig, AutoTokenizer

    from longctx.sequences import read_sequences

    cfg, key = params.train, f"stages.schedule[{stage}]"
    if not 0 <= stage < len(params.stages.schedule):
        raise LongctxError(f"stage {stage}: stages.schedule has {len(params.stages.schedule)} "
                           "stages")
    stage_cfg = params.stages.schedule[stage]
    base_config = AutoConfig.from_pretrained(base_dir)
    planned_all = stage_schedule(params.stages, base_config)
    planned = planned_all[stage]
    _check_init(Path(init_dir), stage, planned_all)
    sequences = read_sequences(sequences_path)
    _check_context_parallel(cfg, base_config, sequences, Path(sequences_path))

    if "LOCAL_RANK" in os.environ:  # one of a launcher's processes
        stop_with_launcher()
    accelerator = _accelerator(cfg)
    if not accelerator.is_main_process:  # one log for the run: replicas speak only of trouble
        logging.getLogger("longctx").setLevel(logging.WARNING)
    _check_kernels(cfg, accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = cfg.batch_size * cfg.grad_accum * world // cfg.context_parallel  # sequences
    _check_data(sequences, Path(sequences_path), planned, stage_cfg.steps, per_step, key)
    run = repro.fingerprint({
        "train": cfg.model_dump(mode="json", exclude={"log_every", "checkpoint_every",
                                                      "keep_checkpoints"}),
        "stage": stage_cfg.model_dump(mode="json"), "planned": planned.__dict__,
        "rope_scaling": params.stages.rope_scaling, "seed": params.seed, "world": world,
        "sequences": repro.sha256_file(sequences_path),
        "init": _identity(Path(init_dir)),
        "code": {f.name: repro.sha256_file(f) for f in sorted(Path(__file__).parent.glob("*.py"))}})
    run_dir = Path(checkpoint_root) / run
    set_seed(derive_seed(params.seed, "train", stage) % 2**32)

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = _load_model(Path(init_dir), planned, params.stages, cfg)
    optimizer = _optimizer(model, cfg)
    model, optimizer = _prepare(accelerator, model, optimizer, cfg)
    mask_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32

    step, history = 0, []
    resume = checkpoint.latest(run_dir)
    if resume is not None:
        state = checkpoint.load(accelerator, resume)
        step, history = state["step"], state["history"]
        log.info("stage %d: resuming at step %d from %s", stage, step, resume)
    elif accelerator.is_main_process:
        checkpoint.clear_others(Path(checkpoint_root), run)
    live = _Live(Path(live_dir), history, accelerator.is_main_process)
    log.info("stage %d: length %d, RoPE base %g (%s), %d steps of %d sequences, %d process(es)"
             "%s", stage, planned.length, planned.rope_theta,
             "derived" if planned.derived else "given", stage_cfg.steps, per_step, world,
             f", context parallel {cfg.context_parallel}" if cfg.context_parallel > 1 else "")

    from tqdm import tqdm

    bar = tqdm(total=stage_cfg.steps, initial=step, desc=f"train stage {stage}", unit="step",
               disable=not accelerator.is_main_process or None)
    with _Signals() as signals:
        while step < stage_cfg.steps:
            t0 = time.perf_counter()
            lr = cfg.lr * lr_factor(step, stage_cfg.steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches: list[Packed] = [
                collate([to_samples(*sequences[i][:3])
                         for i in _batch_indices(step, m, rank, cfg, world)],
                        cfg.attention, pad_id, mask_dtype) for m in range(cfg.grad_accum)]
            if cfg.context_parallel > 1:  # this process's slice of every row
                batches = [shard(b, cfg.context_parallel, rank % cfg.context_parallel, pad_id)
                           for b in batches]
            counts = torch.tensor([sum(int((b.targets != IGNORE_INDEX).sum()) for b in batches),
                                   sum(int((b.segments >= 0).sum()) for b in batches)],
                                  device=accelerator.device)
            learnt, tokens = (int(x) for x in accelerator.reduce(counts, "sum"))
            loss_sum = torch.zeros((), device=accelerator.device)
            for batch in batches:
                with accelerator.accumulate(model):  # syncs gradients on the last micro-batch
                    total, _ = model(*batch.model_inputs(accelerator.device))
                    # backward divides by grad_accum (as DeepSpeed's engine does): undone
                    accelerator.backward(total * world * cfg.grad_accum / max(learnt, 1))
                loss_sum += total.detach()
            grad_norm = (accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip else None)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            loss = float(accelerator.reduce(loss_sum, "sum")) / max(learnt, 1)
            seconds = time.perf_counter() - t0
            record = {"step": step, "train/loss": round(loss, 6), "train/lr": lr,
                      "train/learnt_tokens": learnt,
                      "perf/tokens_per_s": round(tokens / seconds, 1),
                      "perf/memory_gib": round(_memory_gib(accelerator.device), 3)}
            if grad_norm is not None:
                record["train/grad_norm"] = round(float(grad_norm), 6)
            history.append(record)
            live.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['perf/tokens_per_s']:.0f}")
            if step % cfg.log_every == 0:
                log.info("stage %d step %d/%d: loss %.4f, lr %.3g%s, %.0f tokens/s, %.2f GiB",
                         stage, step, stage_cfg.steps, loss, lr,
                         f", grad norm {record['train/grad_norm']:.4g}" if grad_norm is not None
                         else "", record["perf/tokens_per_s"], record["perf/memory_gib"])
            if on_step is not None:
                on_step(step)

            received = signals.take(accelerator)
            # not after the last step: the stage's weights are saved next, and its checkpoints
            # deleted (a model-sized write plus the optimizer's, for nothing)
            due = step % cfg.checkpoint_every == 0 and step < stage_cfg.steps
            if due or received:
                checkpoint.save(accelerator, run_dir, {"step": step, "history": history,
                                                       "stage": stage}, cfg.keep_checkpoints)
            if received == _Signals.CODES[signal.SIGTERM]:
                bar.close()
                raise TrainingInterrupted(
                    f"stage {stage}: stopped by SIGTERM after step {step} of {stage_cfg.steps}; "
                    f"state saved in {run_dir}; rerun the same command to resume")
    bar.close()

    summary = {"steps": step, "tokens": sum(r["train/learnt_tokens"] for r in history),
               "final_loss": history[-1]["train/loss"] if history else None}
    _save_model(accelerator, model, tokenizer, Path(out_dir), params, stage, planned, summary,
                Path(init_dir))
    live.end({"stage/length": planned.length, "stage/rope_theta": planned.rope_theta,
              "stage/steps": step, "stage/learnt_tokens": summary["tokens"]})
    if accelerator.is_main_process:  # the stage's weights are out: its resumable state is spent
        shutil.rmtree(run_dir, ignore_errors=True)
    accelerator.end_training()
    return {**summary, "length": planned.length, "rope_theta": planned.rope_theta}


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
                params: Params, stage: int, planned: ScheduledStage, summary: dict,
                init_dir: Path) -> None:
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
    write_model_dir(out_dir, lm, tokenizer, params.train.save_dtype, {
        "stage": {"index": stage, "length": planned.length, "rope_theta": planned.rope_theta,
                  "derived": planned.derived},
        "trained_from": {"dir": str(init_dir), "identity": _identity(init_dir)},
        "steps": summary["steps"], "learnt_tokens": summary["tokens"],
    }, state_dict=weights)
    accelerator.wait_for_everyone()
    log.info("stage %d: model -> %s", stage, out_dir)
