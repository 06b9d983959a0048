"""How a stage runs on one or many processes: Accelerate set up as the params and the launch
config say (one process, DDP, FSDP2 or DeepSpeed ZeRO, DeepSpeed Ulysses context
parallelism), the batches each process reads in each step (at the positions of
positions.py), and the gradients of a step in progress, saved and restored.

The loop itself is the same code in every setup; everything that differs between them is
here, so a launch config is the only switch. The data position is a function of the step and
the process's rank alone, so resuming needs nothing but the step, and N processes read
exactly the sequences one process accumulating N times as many micro-batches would.

Gradients are reduced after every micro-batch, not once per step (DDP and FSDP2 by
accelerate's `sync_each_batch`; ZeRO-3 reduces each micro-batch itself): after any
micro-batch they are the step's partial gradient, the same whatever the process count, which
a checkpoint taken mid-step can keep and a run on another process count can take up. At the
lengths this trains at, a micro-batch computes for minutes and one more reduction of the
gradients costs well under a second; FSDP2 also holds only its shard of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longctx.config import TrainConfig
from longctx.errors import LongctxError
from longctx.sequences import SequenceTable
from longctx.train.data import ROW_KERNELS, Packed, collate, shard, to_samples
from longctx.train.launch import stop_with_launcher
from longctx.train.positions import batch_indices, micro_batches

GRADIENTS = "gradients.safetensors"  # a step's partial gradient, whole (not FSDP2's shards)
GRADIENT_SHARDS = "gradients"  # FSDP2: the partial gradient's shards (torch.distributed.checkpoint)


def deepspeed_launched() -> bool:
    """Whether `accelerate launch` started this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def setup(cfg: TrainConfig) -> Any:
    """This process's Accelerator. A launcher's process dies with its launcher (none trains
    on as an orphan), and only the main process logs progress: one log for the run, where
    the replicas speak only of trouble."""
    if "LOCAL_RANK" in os.environ:  # one of a launcher's processes
        stop_with_launcher()
    accelerator = _accelerator(cfg)
    if not accelerator.is_main_process:
        logging.getLogger("longctx").setLevel(logging.WARNING)
    return accelerator


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
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LongctxError("train.device: cuda requested but no CUDA device is visible")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda)
    deepspeed = deepspeed_launched()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    accumulation = GradientAccumulationPlugin(
        num_steps=micro_batches(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
        sync_each_batch=True)  # the partial gradient, reduced after each micro-batch
    return Accelerator(cpu=not (cuda or deepspeed), mixed_precision="bf16" if bf16 else "no",
                       gradient_accumulation_plugin=accumulation, kwargs_handlers=handlers,
                       parallelism_config=_parallelism(cfg))


def _parallelism(cfg: TrainConfig) -> Any:
    """Accelerate's ParallelismConfig for context parallelism (None without it): the data
    parallel groups shard the weights, each group of `context_parallel` processes shares
    its sequences (DeepSpeed Ulysses, variable lengths, the params' attention kernel)."""
    from accelerate.utils import DeepSpeedSequenceParallelConfig, ParallelismConfig

    if cfg.context_parallel == 1:
        return None
    data_parallel = int(os.environ.get("WORLD_SIZE", "1")) // cfg.context_parallel
    return ParallelismConfig(
        dp_shard_size=data_parallel, sp_size=cfg.context_parallel, sp_backend="deepspeed",
        sp_handler=DeepSpeedSequenceParallelConfig(
            sp_seq_length_is_variable=True, sp_attn_implementation=cfg.attention))


def prepare(accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
            cfg: TrainConfig, universal: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`accelerator.prepare`, after telling DeepSpeed what the params say: batch sizes and
    clipping (its engine steps and clips itself), gathering whole weights to save, and
    `universal`: the checkpoint to resume is a universal one (saved by another process
    count, converted). (ZeRO-3 also gathers the output projection that the chunked loss reads
    outside lm_head's forward: its parameter getter registers such reads as external
    parameters.)"""
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        rows = 1 if cfg.attention in ROW_KERNELS else cfg.batch_size  # per micro-batch
        steps = accelerator.gradient_accumulation_steps
        plugin.deepspeed_config.update({
            "train_micro_batch_size_per_gpu": rows,
            "gradient_accumulation_steps": steps,
            "train_batch_size": rows * steps * (accelerator.num_processes
                                                // cfg.context_parallel),
            "gradient_clipping": cfg.grad_clip or 0.0})
        plugin.deepspeed_config.setdefault("zero_optimization", {})[
            "stage3_gather_16bit_weights_on_model_save"] = True
        plugin.deepspeed_config["checkpoint"] = {"load_universal": universal}
    return accelerator.prepare(model, optimizer)


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def state_format(accelerator: Any) -> str:
    """How Accelerate saves this run's state: whole (one process or DDP: the main process
    writes the weights and optimizer), fsdp (each process its shards,
    torch.distributed.checkpoint) or deepspeed (each its ZeRO partitions). A checkpoint
    resumes on any process count, but only in its own format."""
    return "deepspeed" if is_deepspeed(accelerator) else "fsdp" if is_fsdp(accelerator) \
        else "whole"


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def step_batches(sequences: SequenceTable, step: int, accelerator: Any, cfg: TrainConfig,
                 pad_id: int, first: int = 0) -> list[Packed]:
    """This process's micro-batches of step `step` from micro-batch `first` on (a step resumed
    in its middle), as model inputs (the mask in the autocast dtype); under context
    parallelism its slice of every row."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mask_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    batches = [collate([to_samples(*sequences[i][:3])
                        for i in batch_indices(step, m, rank, cfg, world)],
                       cfg.attention, pad_id, mask_dtype)
               for m in range(first, accelerator.gradient_accumulation_steps)]
    if cfg.context_parallel > 1:
        batches = [shard(b, cfg.context_parallel, rank % cfg.context_parallel, pad_id)
                   for b in batches]
    return batches


# --------------------------------------------------------------------------- a step's gradient


def _named_parameters(accelerator: Any, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters by name, tied ones once: the same names for any process count."""
    return [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.requires_grad]


def save_gradients(accelerator: Any, model: nn.Module, directory: Path) -> None:
    """Write the partial gradient of the step in progress into `directory` (every process
    calls this). Reduced after each micro-batch, it is the same on every replica (DDP), or
    sharded (FSDP2: torch.distributed.checkpoint writes each process's shards, which load
    into any other sharding), or partitioned inside DeepSpeed's ZeRO-3 optimizer (gathered
    whole, one parameter at a time)."""
    from safetensors.torch import save_file

    named = _named_parameters(accelerator, model)
    if is_fsdp(accelerator):
        import torch.distributed.checkpoint as dcp

        dcp.save({n: _grad_or_zeros(p) for n, p in named},
                 checkpoint_id=str(directory / GRADIENT_SHARDS))
        return
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_get_full_grad

        whole = {n: safe_get_full_grad(p).detach().float().cpu() for n, p in named}
    else:
        whole = {n: _grad_or_zeros(p).detach().cpu() for n, p in named}
    if accelerator.is_main_process:
        save_file({n: t.contiguous() for n, t in whole.items()}, str(directory / GRADIENTS))


def _grad_or_zeros(param: nn.Parameter) -> torch.Tensor:
    """A parameter's gradient; zeros where no micro-batch reached it yet."""
    return param.grad if param.grad is not None else torch.zeros_like(param)


def load_gradients(accelerator: Any, model: nn.Module, directory: Path) -> None:
    """Put a step's partial gradient saved by `save_gradients` (by any process count) back,
    so the step's remaining micro-batches add theirs to it."""
    from safetensors.torch import load_file

    named = _named_parameters(accelerator, model)
    if is_fsdp(accelerator):
        import torch.distributed.checkpoint as dcp

        grads = {n: torch.zeros_like(p) for n, p in named}
        dcp.load(grads, checkpoint_id=str(directory / GRADIENT_SHARDS))
        for n, p in named:
            p.grad = grads[n]
        return
    whole = load_file(str(directory / GRADIENTS))
    if is_deepspeed(accelerator):
        from deepspeed.utils import safe_set_full_grad

        engine_optimizer = accelerator.deepspeed_engine_wrapped.engine.optimizer
        for n, p in named:
            safe_set_full_grad(p, whole[n].to(accelerator.device))
        # ZeRO-3 copies (not adds) the first micro-batch's gradient of a step: this is not it
        engine_optimizer.micro_step_id = max(1, engine_optimizer.micro_step_id)
        return
    for n, p in named:
        p.grad = whole[n].to(device=p.device, dtype=p.dtype)
