"""Which sequences each optimizer step reads: arithmetic on the step, the micro-batch and the
process's rank alone, so resuming needs nothing but the step (and, inside a step, how many of
its sequences are done). It imports no torch, so `longctx plan` counts a stage's sequences by
the very rule the loop reads them by.

Step s reads sequences [s x G, (s+1) x G), G = train.global_batch, whatever the process
count: the processes take turns through them, one micro-batch of `batch_size` sequences each
per round, so after any round the sequences done are a prefix of the step's. A run that
stops mid-step therefore resumes on another process count wherever that prefix splits into
the new count's rounds.
"""

from __future__ import annotations

from longctx.config import TrainConfig
from longctx.errors import LongctxError


def replicas(cfg: TrainConfig, world: int) -> int:
    """Data-parallel replicas: the processes, a context-parallel group counting once."""
    return world // cfg.context_parallel


def sequences_per_step(cfg: TrainConfig) -> int:
    """Sequences one optimizer step reads over all processes: the global batch."""
    return cfg.global_batch


def step_sequences(step: int, cfg: TrainConfig) -> range:
    """The sequences step `step` (0-based) reads, over all processes."""
    return range(step * cfg.global_batch, (step + 1) * cfg.global_batch)


def micro_batches(cfg: TrainConfig, world: int) -> int:
    """Micro-batches each process accumulates per optimizer step: the global batch over the
    sequences one round of micro-batches reads (the params check that it divides)."""
    per_round = round_size(cfg, world)
    if cfg.global_batch % per_round:
        raise LongctxError(f"train.global_batch: {cfg.global_batch} sequences do not split "
                           f"into rounds of {per_round} (batch_size {cfg.batch_size} x "
                           f"{replicas(cfg, world)} replicas of this run's {world} processes): "
                           f"make it a multiple of {per_round}, or run on another count")
    return cfg.global_batch // per_round


def round_size(cfg: TrainConfig, world: int) -> int:
    """Sequences one round of micro-batches (one per replica) reads."""
    return cfg.batch_size * replicas(cfg, world)


def batch_indices(step: int, micro: int, rank: int, cfg: TrainConfig, world: int) -> list[int]:
    """Which sequences micro-batch `micro` of step `step` reads on process `rank`: round
    `micro` of the step's sequences, the replica's share of it. The `context_parallel`
    consecutive processes of a group read the same sequences."""
    replica = rank // cfg.context_parallel
    first = step_sequences(step, cfg).start + micro * round_size(cfg, world) \
        + replica * cfg.batch_size
    return list(range(first, first + cfg.batch_size))
