"""The contract every LLM backend meets: chat completion, one call at a time in law.

A backend knows nothing about caching, batch planning or progress: `LLM` (client.py) does
that once for all of them. A backend may batch, but each call's output must be a function of
(its `identity`, that call's rendered prompt, the sampling, that call's seed) and of nothing
else in the batch: then the call cache can stand in for any single call, a rerun generates
only the calls that never finished, and a step split into shards (each batching its own
calls) writes what one job writes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from longctx.errors import LongctxError
from longctx.repro import canonical_json

Chat = list[dict[str, str]]  # [{"role": "system"|"user"|"assistant", "content": "..."}]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How to decode. temperature 0 is greedy (top_p and seed then cannot matter).

    `seed` is the caller's (a step's) seed; backends never read it: `LLM` derives each call's
    own seed from it and the call's cache key (`call_seed`), so sampled text depends on
    neither what ran before nor what shares the batch.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason  # "length": max_new_tokens ran out before an end-of-turn token
    prompt_tokens: int
    completion_tokens: int


class Backend(Protocol):
    """One generator. `generate` runs ONE planned batch; it may be called many times."""

    name: str
    identity: dict[str, Any]  # JSON-able: everything besides the prompt that changes outputs
    context_tokens: int | None  # usable window (prompt + new tokens); None: the server checks

    def render(self, chat: Chat) -> str:
        """The exact prompt text the model sees (cache keys are built from it)."""
        ...

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        """Prompt lengths in tokens (or a cheap monotone proxy), for length-sorted batching."""
        ...

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        """Complete every chat; yield (index into `chats`, completion) as each finishes, in
        any order, each index once. Chat i's output depends only on its own prompt, the
        sampling and `seeds[i]` (31 bits; unused when greedy), never on the other chats."""
        ...


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from anything JSON-able: same parts, same seed, on every machine."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def call_seed(key: str) -> int:
    """A sampled call's own seed, from its cache key (which holds the caller's seed): 31 bits,
    the range every server accepts."""
    return derive_seed("call", key) % 2**31


def check_window(lengths: list[int], max_new_tokens: int, window: int | None,
                 offset: int = 0) -> None:
    """Callers budget prompts; a prompt that cannot fit is a bug worth stopping for."""
    if window is None:
        return
    for i, n in enumerate(lengths):
        if n + max_new_tokens > window:
            raise LongctxError(
                f"llm: prompt {offset + i} has {n} tokens; with max_new_tokens={max_new_tokens} "
                f"it exceeds the model's {window}-token window (budget prompts to at most "
                f"{window - max_new_tokens} tokens)"
            )
