"""Test doubles and fixtures for the synthesis steps.

`ScriptedBackend` is a stand-in LLM for unit tests: its answer to a chat is whatever the
test's `reply(prompt_text)` function returns, and it counts the calls it really served, so
tests can tell cache hits from generations. Every step also has a test on a real model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path

from longctx.llm import LLM, CallCache, Completion
from longctx.llm.base import Chat, Sampling
from longctx.shards import Shard


def words(texts: list[str]) -> list[int]:
    """A tokenizer stand-in: one token per whitespace-separated word."""
    return [len(t.split()) for t in texts]


class ScriptedBackend:
    """Answers with `reply(user_message) -> str`; a str ending in '\\x00' is cut short
    (finish_reason 'length'), so tests can script truncated output."""

    name = "scripted"

    def __init__(self, reply: Callable[[str], str], context_tokens: int | None = None) -> None:
        self.reply = reply
        self.context_tokens = context_tokens
        self.identity = {"backend": "scripted"}
        self.served: list[str] = []  # user messages actually generated (not from the cache)

    def render(self, chat: Chat) -> str:
        return "\n".join(f"<{m['role']}>{m['content']}" for m in chat)

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        return words(rendered)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return words(texts)

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        for i, chat in enumerate(chats):
            message = chat[-1]["content"]
            self.served.append(message)
            text = self.reply(message)
            cut = text.endswith("\x00")
            text = text.rstrip("\x00")
            n = min(len(text.split()), sampling.max_new_tokens)
            yield i, Completion(text=text, finish_reason="length" if cut else "stop",
                                prompt_tokens=len(message.split()), completion_tokens=n)


def scripted_llm(reply: Callable[[str], str], cache_path: Path | None = None,
                 batch_size: int = 4, context_tokens: int | None = None) -> LLM:
    """An `LLM` over a ScriptedBackend; with `cache_path`, calls are cached there."""
    backend = ScriptedBackend(reply, context_tokens)
    return LLM(backend, CallCache(cache_path) if cache_path else None, batch_size)


def run_sharded(step: Callable, gather: Callable, cfg, *args, shards: int = 1,
                parts_dir: Path | None = None, **paths) -> dict:
    """`step` as `shards` shard jobs, then `gather` over their parts, as the DAG runs them.
    `args` follow the section `cfg` (synthesis: the llm and the seed; eval samples: the
    seed). `paths` are the step's inputs and the gather's outputs, by name; each function
    takes the ones in its signature (the gather: the outputs, `instructions` for its order,
    `cfg` where its section gives the order, and `args` too where it calls the llm)."""
    step_args = inspect.signature(step).parameters
    gather_args = inspect.signature(gather).parameters
    parts_dir = parts_dir or Path(paths["metrics"]).parent / "parts"
    parts = []
    for number in range(1, shards + 1):
        part = parts_dir / f"{number}-of-{shards}.parquet"
        step(cfg, *args, shard=Shard(number, shards), params="test", part=part,
             **{k: v for k, v in paths.items() if k in step_args})
        parts.append(part)
    given = [cfg, *args] if "llm" in gather_args else [cfg] if "cfg" in gather_args else []
    return gather(*given, params="test", parts=parts,
                  **{k: v for k, v in paths.items() if k in gather_args})
