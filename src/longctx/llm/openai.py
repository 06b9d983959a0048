"""A client for any OpenAI-compatible `/v1/chat/completions` server (vLLM, SGLang, TGI,
llama.cpp, `longctx serve`), using only the standard library.

Up to `max_concurrency` requests are in flight; 5xx, 429, timeouts and connection errors are
retried with exponential backoff and jitter, then reported as one LongctxError. The API key
is read from the environment variable NAMED in params, and lives only in the request header:
it is never logged and never part of the identity (so never in the call cache).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from longctx.errors import LongctxError
from longctx.llm.base import Chat, Completion, Sampling
from longctx.repro import canonical_json

log = logging.getLogger(__name__)

RETRY_STATUS = {408, 409, 425, 429}  # plus every 5xx
FINISH = {"stop": "stop", "eos": "stop", "eos_token": "stop", "stop_sequence": "stop",
          "length": "length", "max_tokens": "length"}


class _Retryable(Exception):
    """A failure worth another try (the message says what happened)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend:
    name = "openai"
    context_tokens = None  # the server knows its window; it answers 400 if a prompt is too long

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 8, max_retries: int = 4, timeout_s: float = 300.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._api_key = os.environ.get(api_key_env) or None
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="llm-http")
        self.identity = {"backend": "openai", "base_url": self.base_url, "model": model}

    # ------------------------------------------------------------------ protocol

    def render(self, chat: Chat) -> str:
        """The server applies its own template; what we control is the messages themselves."""
        return canonical_json([{"role": m["role"], "content": m["content"]} for m in chat])

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        return [len(r) for r in rendered]  # characters: enough to group similar lengths

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        """Every chat in flight at once (the pool bounds it); each yielded as it finishes."""
        futures = {self._pool.submit(self._complete, chat, sampling, seed): i
                   for i, (chat, seed) in enumerate(zip(chats, seeds))}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for f in futures:
                f.cancel()  # after a failure, do not start the rest

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ one request

    def _complete(self, chat: Chat, sampling: Sampling, seed: int) -> Completion:
        body = {"model": self.model, "messages": chat, "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p, "n": 1}
        if not sampling.greedy:
            body["seed"] = seed
        data = self._post_with_retries("/chat/completions", body)
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=choice["message"]["content"] or "",
                finish_reason=FINISH.get(choice.get("finish_reason") or "stop", "stop"),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise LongctxError(f"llm.base_url {self.base_url}: unexpected response shape "
                               f"({type(exc).__name__}: {exc}): {str(data)[:200]}") from None

    def _post_with_retries(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(path, body)
            except _Retryable as exc:
                last = str(exc)
                if attempt == self.max_retries:
                    break
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                delay = exc.retry_after if exc.retry_after is not None else delay
                delay = min(self.max_backoff_s, delay) * random.uniform(0.5, 1.0)  # jitter
                log.warning("llm.base_url %s: %s; retry %d/%d in %.1fs", self.base_url, last,
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise LongctxError(f"llm.base_url {self.base_url}: unreachable after {self.max_retries} "
                           f"retries (last error: {last})")

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _snippet(exc.read())
            if exc.code >= 500 or exc.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {detail}", _retry_after(exc.headers)) from None
            hint = " (check llm.api_key_env)" if exc.code in (401, 403) else ""
            raise LongctxError(f"llm.base_url {self.base_url}: HTTP {exc.code} for model "
                               f"{self.model!r}{hint}: {detail}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
            reason = getattr(exc, "reason", exc)  # URLError wraps the socket error
            kind = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
            raise _Retryable(f"{kind}: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Retryable(f"response is not JSON: {_snippet(raw)}") from None


def _snippet(raw: bytes, limit: int = 300) -> str:
    return raw.decode("utf-8", "replace").strip().replace("\n", " ")[:limit]


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("Retry-After")) if headers else None
    except (TypeError, ValueError):
        return None
