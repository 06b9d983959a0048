"""`LLM`: what every synthesis step calls. Looks up each call, batches the rest, reports.

Each call is looked up in the cache by itself; only the calls never finished are generated,
planned into batches of similar length (sorted by prompt length, then key). Each call has
its own seed (`call_seed`, from its key), and backends make a call's output independent of
its batch-mates (base.py), so which calls happen to share a batch -- after a kill, after a
params change that adds calls, in one job or in shards -- never changes a completion. Each
completion is stored the moment the backend yields it: a killed step loses only unfinished
calls, and its rerun returns exactly what an uninterrupted run returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from longctx.errors import LongctxError
from longctx.llm.base import Backend, Chat, Completion, Sampling, call_seed, check_window
from longctx.llm.cache import CallCache, call_key

log = logging.getLogger(__name__)


@dataclass
class CallStats:
    """Counts over unique calls (identical requests in one `chat` are made once)."""

    calls: int = 0
    hits: int = 0  # taken from the cache
    misses: int = 0  # generated
    batches: int = 0  # generated batches
    completion_tokens: int = 0  # generated tokens (misses only)
    seconds: float = 0.0  # spent in backend.generate

    def add(self, other: CallStats) -> None:
        for field in self.__dataclass_fields__:
            setattr(self, field, getattr(self, field) + getattr(other, field))


def plan_batches(lengths: list[int], keys: list[str], batch_size: int) -> list[list[int]]:
    """Indices cut into batches of similar length; depends only on (lengths, keys)."""
    order = sorted(range(len(keys)), key=lambda i: (lengths[i], keys[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class LLM:
    """A backend plus the call cache. `batch_size` is the number of uncached calls handed to
    the backend at a time."""

    def __init__(self, backend: Backend, cache: CallCache | None, batch_size: int,
                 tokenizer: Any = None) -> None:
        self.backend = backend
        self.cache = cache
        self.batch_size = batch_size
        self._tokenizer = tokenizer  # callable texts -> counts, for backends without one
        self.last = CallStats()  # the latest `chat` call
        self.total = CallStats()  # since construction

    @property
    def identity(self) -> dict[str, Any]:
        return self.backend.identity

    @property
    def context_tokens(self) -> int | None:
        return self.backend.context_tokens

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Token counts in the generator's tokenizer (openai: the base model's), for budgets."""
        if hasattr(self.backend, "count_tokens"):
            return self.backend.count_tokens(texts)
        if self._tokenizer is None:
            raise LongctxError(f"llm.backend {self.backend.name!r}: no tokenizer to count with")
        return self._tokenizer(texts)

    def chat(self, chats: list[Chat], sampling: Sampling, template_version: str,
             desc: str = "llm") -> list[Completion]:
        """Complete every chat (results in input order), generating only uncached calls."""
        if not chats:
            return []
        rendered = [self.backend.render(c) for c in chats]
        keys = [call_key(self.identity, r, sampling, template_version) for r in rendered]
        first = {}  # unique key -> index of its first chat
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        uniq = list(first.values())
        lengths = self.backend.prompt_tokens([rendered[i] for i in uniq])
        for j, i in enumerate(uniq):  # before any work, naming the caller's index
            check_window([lengths[j]], sampling.max_new_tokens, self.context_tokens, offset=i)

        done = self.cache.get_many(list(first)) if self.cache is not None else {}
        stats = CallStats(calls=len(uniq), hits=len(done))
        missing = [j for j, i in enumerate(uniq) if keys[i] not in done]
        bar = tqdm(total=len(uniq), initial=stats.hits, desc=desc, unit="call", disable=None)
        for batch in plan_batches([lengths[j] for j in missing],
                                  [keys[uniq[j]] for j in missing], self.batch_size):
            members = [uniq[missing[b]] for b in batch]
            for key, completion in self._generate(members, keys, chats, sampling, desc, stats):
                done[key] = completion
                bar.update(1)
            bar.set_postfix(cached=stats.hits, tok_s=f"{_rate(stats):.1f}")
        bar.close()

        self.last = stats
        self.total.add(stats)
        log.info("%s: %d calls, %d cached, %d generated in %d batches (%.1fs, %.2f calls/s, "
                 "%.1f output tokens/s)", desc, stats.calls, stats.hits, stats.misses,
                 stats.batches, stats.seconds, stats.misses / max(stats.seconds, 1e-9),
                 _rate(stats))
        return [done[k] for k in keys]

    def _generate(self, members: list[int], keys: list[str], chats: list[Chat],
                  sampling: Sampling, desc: str,
                  stats: CallStats) -> Iterator[tuple[str, Completion]]:
        """One batch through the backend; each completion stored as it arrives."""
        seeds = [call_seed(keys[i]) for i in members]
        t0 = time.perf_counter()
        seen = set()
        for position, completion in self.backend.generate([chats[i] for i in members],
                                                          sampling, seeds):
            stats.seconds += time.perf_counter() - t0
            key = keys[members[position]]
            if self.cache is not None:
                self.cache.put(key, completion, desc)
            seen.add(position)
            stats.misses += 1
            stats.completion_tokens += completion.completion_tokens
            yield key, completion
            t0 = time.perf_counter()  # the caller's time between calls is not the backend's
        stats.batches += 1
        if len(seen) != len(members):
            raise RuntimeError(f"backend {self.backend.name!r} completed {len(seen)} of "
                               f"{len(members)} calls")

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
        if hasattr(self.backend, "close"):
            self.backend.close()


def _rate(stats: CallStats) -> float:
    return stats.completion_tokens / max(stats.seconds, 1e-9)
