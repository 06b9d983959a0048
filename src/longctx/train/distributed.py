"""How a stage runs on one or many processes: Accelerate set up as the params and the launch
config say (one process, DDP, FSDP2 or DeepSpeed ZeRO, DeepSpeed Ulysses context
parallelism), and the batches each process reads in each step (at the positions of
positions.py).

The loop itself is the same code in every setup; everything that differs between them is
here, so a launch config is the only switch. The data position is a function of the step and
the process's rank alone, so resuming needs nothing but the step, and N processes read
exactly the sequences one process accumulating N times as many micro-batches would.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from longctx.config import TrainConfig
from longctx.errors import LongctxError
from longctx.sequences import SequenceTable
from longctx.train.data import ROW_KERNELS, Packed, collate, shard, to_samples
from longctx.train.launch import stop_with_launcher
from longctx.train.positions import batch_indices


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
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise LongctxError("train.device: cuda requested but no CUDA device is visible")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and cuda)
    deepspeed = deepspeed_launched()
    handlers = [InitProcessGroupKwargs(backend="gloo")] if deepspeed and not cuda else []
    return Accelerator(cpu=not (cuda or deepspeed), mixed_precision="bf16" if bf16 else "no",
                       gradient_accumulation_steps=cfg.grad_accum, kwargs_handlers=handlers,
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


def step_batches(sequences: SequenceTable, step: int, accelerator: Any, cfg: TrainConfig,
                 pad_id: int) -> list[Packed]:
    """This process's `grad_accum` micro-batches of step `step`, as model inputs (the mask in
    the autocast dtype); under context parallelism its slice of every row."""
    world, rank = accelerator.num_processes, accelerator.process_index
    mask_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    batches = [collate([to_samples(*sequences[i][:3])
                        for i in batch_indices(step, m, rank, cfg, world)],
                       cfg.attention, pad_id, mask_dtype) for m in range(cfg.grad_accum)]
    if cfg.context_parallel > 1:
        batches = [shard(b, cfg.context_parallel, rank % cfg.context_parallel, pad_id)
                   for b in batches]
    return batches
