"""Which sequences each optimizer step reads: arithmetic on the step, the micro-batch and the
process's rank alone, so resuming needs nothing but the step. It imports no torch, so
`longctx plan` counts a stage's sequences by the very rule the loop reads them by.
"""

from __future__ import annotations

from longctx.config import TrainConfig


def sequences_per_step(cfg: TrainConfig, world: int) -> int:
    """Sequences one optimizer step reads over all processes (a context-parallel group
    shares its sequences)."""
    return cfg.batch_size * cfg.grad_accum * world // cfg.context_parallel


def batch_indices(step: int, micro: int, rank: int, cfg: TrainConfig, world: int) -> list[int]:
    """Which sequences micro-batch `micro` of step `step` reads on process `rank`: the data
    position is a function of the step, so resuming needs nothing but the step. The
    `context_parallel` consecutive processes of a group read the same sequences."""
    replicas, replica = world // cfg.context_parallel, rank // cfg.context_parallel
    first = ((step * cfg.grad_accum + micro) * replicas + replica) * cfg.batch_size
    return list(range(first, first + cfg.batch_size))
