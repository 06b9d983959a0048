"""`LLM`: what every synthesis step calls. Plans batches, consults the call cache, reports.

Determinism under kills: the batches are planned over ALL requested calls (sorted by prompt
length, then key) before the cache is consulted, so a batch always has the same members
whether or not its neighbours were cached. A batch is either taken whole from the cache or
generated whole and stored in one transaction. A killed and restarted step therefore
regenerates exactly the batches that had not finished, with the same members and the same
derived seed -- its results equal an uninterrupted run's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from longctx.errors import LongctxError
from longctx.llm.base import Backend, Chat, Completion, Sampling, check_window, derive_seed
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
    """A backend plus the call cache. `batch_size` is the number of calls per generate."""

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
        """Complete every chat (results in input order), generating only uncached batches."""
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

        stats = CallStats(calls=len(uniq))
        cached = self.cache.get_many(list(first)) if self.cache is not None else {}
        done: dict[str, Completion] = {}
        bar = tqdm(total=len(uniq), desc=desc, unit="call", disable=None)
        for batch in plan_batches(lengths, [keys[i] for i in uniq], self.batch_size):
            members = [uniq[j] for j in batch]
            bkeys = [keys[i] for i in members]
            if all(k in cached for k in bkeys):
                done.update((k, cached[k]) for k in bkeys)
                stats.hits += len(bkeys)
            else:
                done.update(self._generate(members, bkeys, chats, sampling, desc, stats))
            bar.update(len(members))
            bar.set_postfix(cached=stats.hits, tok_s=f"{_rate(stats):.1f}")
        bar.close()

        self.last = stats
        self.total.add(stats)
        log.info("%s: %d calls, %d cached, %d generated in %d batches (%.1fs, %.2f calls/s, "
                 "%.1f output tokens/s)", desc, stats.calls, stats.hits, stats.misses,
                 stats.batches, stats.seconds, stats.misses / max(stats.seconds, 1e-9),
                 _rate(stats))
        return [done[k] for k in keys]

    def _generate(self, members: list[int], bkeys: list[str], chats: list[Chat],
                  sampling: Sampling, desc: str, stats: CallStats) -> list[tuple[str, Completion]]:
        if not sampling.greedy:  # sampled text depends only on who is in the batch
            sampling = replace(sampling, seed=derive_seed(sampling.seed, bkeys))
        t0 = time.perf_counter()
        outs = self.backend.generate([chats[i] for i in members], sampling)
        stats.seconds += time.perf_counter() - t0
        if len(outs) != len(members):
            raise RuntimeError(f"backend returned {len(outs)} completions for {len(members)}")
        items = list(zip(bkeys, outs))
        if self.cache is not None:
            self.cache.put_many(items, desc)  # the whole batch, one transaction
        stats.misses += len(members)
        stats.batches += 1
        stats.completion_tokens += sum(c.completion_tokens for c in outs)
        return items

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
