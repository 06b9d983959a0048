"""Scatter/gather: a step's work split into shard jobs by a stable hash of an id.

A sharded step runs as `count` jobs, each owning the ids whose stable hash falls in its shard
(`Shard.owns`: sha256, never Python's salted hash), and one gather job that writes the table
the next steps read. The split is invisible in the result: a shard computes each of its rows
exactly as the whole step would (LLM calls do not depend on their batch-mates, llm/base.py),
and the gather puts the rows back in the step's own order. The gathered table and its stats
are therefore the same bytes for 1 shard and for N, and the DAG always runs a sharded step
this way (1 shard is the default), so there is one code path.

What a shard job hands its gather, the part file, is longctx.parts. This module is the
standard library only: the CLI parses `--shard` with it before any heavy import.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from longctx.errors import LongctxError

_NAME = re.compile(r"(\d+)-of-(\d+)")


@dataclass(frozen=True)
class Shard:
    """Shard `number` (1-based, as Snakemake's scatter names its items) of `count`."""

    number: int = 1
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.number <= self.count:
            raise LongctxError(f"shard {self.number}-of-{self.count}: the number must be "
                               f"between 1 and {self.count}")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """`3-of-8` (a rule's shard wildcard, a CLI argument)."""
        match = _NAME.fullmatch(text)
        if match is None:
            raise LongctxError(f"shard {text!r}: expected N-of-M, e.g. 1-of-4")
        return cls(int(match[1]), int(match[2]))

    @property
    def name(self) -> str:
        return f"{self.number}-of-{self.count}"

    def owns(self, key: str) -> bool:
        return shard_of(key, self.count) == self.number - 1


def shard_of(key: str, count: int) -> int:
    """0..count-1 for an id, the same on every machine and Python (not `hash`)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def names(count: int) -> list[str]:
    """The shard wildcards of a step split `count` ways: 1-of-N .. N-of-N."""
    return [Shard(i, count).name for i in range(1, count + 1)]


# What each sharded step (params: `shards.<step>`) splits, as its refusal names it.
SPLITS = {"embed": "embedding files (embed.shard_size documents each)",
          "instructions": "first-round prompts", "summarize": "instructions",
          "respond": "instructions",
          "long_output": "candidate documents", "niah_samples": "NIAH lengths",
          "ruler_samples": "RULER task-length pairs"}


def count_problem(step: str, count: int, items: int) -> str | None:
    """More shards than work would leave jobs with nothing to do: the problem, naming the
    key (None: the count is fine). `longctx plan` reports it before anything runs."""
    if count <= max(items, 1):
        return None
    key = f"shards.{step}"
    return f"{key}={count} is more than the {items} {SPLITS[step]} to split; lower {key}"


def check_count(shard: Shard, items: int, step: str) -> None:
    """A shard job refuses a count above its step's work (count_problem)."""
    problem = count_problem(step, shard.count, items)
    if problem is not None:
        raise LongctxError(problem)
