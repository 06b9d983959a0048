"""A client for OpenAI-compatible `/v1/chat/completions` servers (vLLM, SGLang, TGI,
llama.cpp, `transformers serve`): one server, or several replicas of the same model, using
only the standard library. (`completions.py` is the same client on `/v1/completions`, with
the prompt rendered by the model's own chat template, for evaluation.)

Up to `max_concurrency` requests are in flight, each on the live replica with the fewest
requests in flight (ties taken in turn). 5xx, 429 and timeouts are retried on the same
replica with exponential backoff and jitter (it is busy, not gone); a connection that nothing
answers (refused, reset: the process died) moves the request to another replica at once. A
replica that fails either way is skipped for `dead_s` seconds, then tried again with a real
request; when every replica is down, one LongctxError names them all with their last error.

The API key is read from the environment variable NAMED in params, and lives only in the
request header: it is never logged and never part of the identity (so never in the call cache).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import threading
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
DEAD_S = 30.0  # how long a failed replica is skipped before a request tries it again


class _Retryable(Exception):
    """A failure worth another try (the message says what happened). `gone`: no server
    answered at all (refused, reset), so another replica should take the request now."""

    def __init__(self, message: str, retry_after: float | None = None,
                 gone: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.gone = gone


class _ReplicaDown(Exception):
    """This replica failed the request for good; the message says how."""


class Replicas:
    """Which replica takes the next request, and which are down.

    The least busy live replica is chosen, so a slow one gets fewer requests and a dead one
    none; ties go round in turn, so even one request at a time reaches every replica. A
    replica marked down comes back after `dead_s` (a real request probes it) or as soon as a
    request it was already serving succeeds. Thread-safe: the pool's workers share it.
    """

    def __init__(self, urls: list[str], dead_s: float = DEAD_S, key: str = "llm.base_url") -> None:
        if not urls:
            raise ValueError("no replica URLs")
        self.urls = urls
        self.key = key  # the params key that lists them, for the messages
        self.dead_s = dead_s
        self.served = [0] * len(urls)  # requests answered, per replica
        self._busy = [0] * len(urls)
        self._dead_until = [0.0] * len(urls)
        self._why = [""] * len(urls)
        self._turn = 0
        self._lock = threading.Lock()

    def acquire(self) -> int:
        """A replica for one request (release it after), or the error naming all of them."""
        with self._lock:
            live = self._live()
            if not live:
                raise LongctxError(self._all_down())
            n = len(self.urls)
            i = min(live, key=lambda j: (self._busy[j], (j - self._turn) % n))
            self._turn = (i + 1) % n
            self._busy[i] += 1
            return i

    def release(self, i: int, answered: bool) -> None:
        with self._lock:
            self._busy[i] -= 1
            if answered:
                self.served[i] += 1
                if self._dead_until[i]:
                    log.info("%s %s answers again", self.key, self.urls[i])
                self._dead_until[i] = 0.0

    def mark_down(self, i: int, why: str) -> None:
        with self._lock:
            self._dead_until[i] = time.monotonic() + self.dead_s
            self._why[i] = why
            left = len(self._live())
        if len(self.urls) > 1:
            log.warning("%s %s is down (%s); %d of %d replicas left for %.0fs", self.key,
                        self.urls[i], why, left, len(self.urls), self.dead_s)

    def down(self) -> dict[str, str]:
        """The replicas skipped now, each with why."""
        with self._lock:
            live = set(self._live())
            return {u: w for j, (u, w) in enumerate(zip(self.urls, self._why)) if j not in live}

    def others_live(self, i: int) -> bool:
        with self._lock:
            return any(j != i for j in self._live())

    def _live(self) -> list[int]:
        now = time.monotonic()
        return [j for j, until in enumerate(self._dead_until) if until <= now]

    def _all_down(self) -> str:
        if len(self.urls) == 1:
            return f"{self.key} {self.urls[0]}: {self._why[0]}"
        return f"{self.key}: every replica is down: " + "; ".join(
            f"{url} ({why})" for url, why in zip(self.urls, self._why))


class OpenAIBackend:
    """The `openai` backend: `base_url` is one URL or a list of replicas of one model.

    `identity` (what the call cache keys on) holds the served model, never a URL: replicas
    serve the same weights, so which one answered -- or on which host and port a server runs
    today, which a cluster job changes every run -- must not throw cached calls away. The
    model is its name, or, when the caller knows the weights (`model_identity`: the base
    model's file hashes when llm.model is 'base'), those, so retraining models/base changes
    the keys even though the served name stays the same. What the identity cannot see is the
    server's own setup (its dtype, its chat template): serve every replica the same way.
    """

    name = "openai"
    endpoint = "/chat/completions"  # completions.py: /completions, the prompt rendered by us
    context_tokens = None  # the server knows its window; it answers 400 if a prompt is too long

    def __init__(self, base_url: str | list[str], model: str, *, model_identity: Any = None,
                 api_key_env: str = "OPENAI_API_KEY", max_concurrency: int = 8,
                 max_retries: int = 4, timeout_s: float = 300.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, dead_s: float = DEAD_S,
                 section: str = "llm") -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.section = section  # the params section it is configured in, for the messages
        self.replicas = Replicas([u.rstrip("/") for u in urls], dead_s, f"{section}.base_url")
        self.model = model
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._api_key = os.environ.get(api_key_env) or None
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="llm-http")
        self.identity = {"backend": "openai",
                         "model": model if model_identity is None else model_identity}

    # ------------------------------------------------------------------ protocol

    def render(self, chat: Chat) -> str:
        """The server applies its own template; what we control is the messages themselves."""
        return canonical_json([{"role": m["role"], "content": m["content"]} for m in chat])

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        return [len(r) for r in rendered]  # characters: enough to group similar lengths

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        """Every chat is one request with its own seed; each is yielded as it finishes, so
        `LLM` stores it at once and a straggler holds nothing else back."""
        if len(seeds) != len(chats):
            raise ValueError(f"{len(seeds)} seeds for {len(chats)} chats")
        futures = {self._pool.submit(self._complete, chat, sampling, seed): i
                   for i, (chat, seed) in enumerate(zip(chats, seeds))}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        finally:
            for future in futures:
                future.cancel()  # after a failure (or an early stop), start no more of them

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if len(self.replicas.urls) > 1:
            log.info("%s: requests answered per replica: %s", self.section, ", ".join(
                f"{u} {n}" for u, n in zip(self.replicas.urls, self.replicas.served)))

    # ------------------------------------------------------------------ one request

    def _body(self, chat: Chat, sampling: Sampling, seed: int) -> dict[str, Any]:
        """One call's request (the completions backend sends a rendered prompt instead)."""
        body = {"model": self.model, **self._prompt(chat), "max_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature, "top_p": sampling.top_p}
        if not sampling.greedy:
            body["seed"] = seed
        return body

    def _prompt(self, chat: Chat) -> dict[str, Any]:
        return {"messages": chat}  # the server renders them with its own chat template

    def _ready(self, i: int) -> None:
        """Before a request goes to replica i: nothing to check here (the completions
        backend probes each replica's tokenizer once)."""

    def _complete(self, chat: Chat, sampling: Sampling, seed: int) -> Completion:
        """One chat, on whichever replica is live; a replica that fails hands it on."""
        body = self._body(chat, sampling, seed)
        while True:  # ends: each failure marks a replica down, and none left raises
            i = self.replicas.acquire()
            answered = False
            try:
                self._ready(i)
                data = self._post_with_retries(i, self.endpoint, body)
                answered = True
            except _ReplicaDown as exc:
                self.replicas.mark_down(i, str(exc))
                continue
            finally:
                self.replicas.release(i, answered)
            return self._parse(data, self.replicas.urls[i], body)

    def _parse(self, data: dict[str, Any], url: str, body: dict[str, Any]) -> Completion:
        """The reply as a Completion (`body`, the request, for subclasses that check it)."""
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=self._text(choice),
                finish_reason=FINISH.get(choice.get("finish_reason") or "stop", "stop"),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise LongctxError(f"{self.replicas.key} {url}: unexpected response shape "
                               f"({type(exc).__name__}: {exc}): {str(data)[:200]}") from None

    @staticmethod
    def _text(choice: dict[str, Any]) -> str:
        return choice["message"]["content"] or ""

    def _post_with_retries(self, i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """The replica's own retries; _ReplicaDown when they are spent, or at once when
        nothing answers and another replica is live (the last one left keeps retrying: it
        may be restarting)."""
        url, last = self.replicas.urls[i], ""
        for attempt in range(self.max_retries + 1):
            try:
                return self._post(url, path, body)
            except _Retryable as exc:
                last = str(exc)
                if exc.gone and self.replicas.others_live(i):
                    raise _ReplicaDown(last) from None
                if attempt == self.max_retries:
                    break
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                delay = exc.retry_after if exc.retry_after is not None else delay
                delay = min(self.max_backoff_s, delay) * random.uniform(0.5, 1.0)  # jitter
                log.warning("%s %s: %s; retry %d/%d in %.1fs", self.replicas.key, url, last,
                            attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise _ReplicaDown(f"unreachable after {self.max_retries} retries (last error: {last})")

    def _post(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = _snippet(exc.read())
            if exc.code >= 500 or exc.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code}: {detail}", _retry_after(exc.headers)) from None
            hint = f" (check {self.section}.api_key_env)" if exc.code in (401, 403) else ""
            raise LongctxError(f"{self.replicas.key} {url}: HTTP {exc.code} for model "
                               f"{self.model!r}{hint}: {detail}") from None
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
            reason = getattr(exc, "reason", exc)  # URLError wraps the socket error
            kind = type(reason).__name__ if isinstance(reason, BaseException) else "URLError"
            gone = not isinstance(reason, TimeoutError)  # refused, reset, unresolvable: not slow
            raise _Retryable(f"{kind}: {reason}", gone=gone) from None
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
