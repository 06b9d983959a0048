"""`longctx serve`: a small OpenAI-compatible server around the transformers backend.

It lets the `openai` backend (and any OpenAI client) use a local model directory, and it is
the real endpoint the HTTP client is tested against. Standard library only; requests are
answered one generate at a time (a lock), so it suits one user or a test, not production --
point `llm.base_url` at vLLM/SGLang/TGI for that.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.llm.base import Backend, Sampling

log = logging.getLogger(__name__)


class _ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _sampling(body: dict[str, Any]) -> Sampling:
    """OpenAI request fields -> Sampling (OpenAI's defaults: temperature 1, top_p 1)."""
    if body.get("stream"):
        raise _ApiError(400, "stream=true is not supported by this server")
    if body.get("n", 1) != 1:
        raise _ApiError(400, "only n=1 is supported")

    def get(key: str, default: Any) -> Any:
        return default if body.get(key) is None else body[key]

    try:
        return Sampling(
            max_new_tokens=int(get("max_completion_tokens", get("max_tokens", 256))),
            temperature=float(get("temperature", 1.0)),
            top_p=float(get("top_p", 1.0)),
            seed=int(get("seed", random.randrange(2**31))),
        )
    except (TypeError, ValueError) as exc:
        raise _ApiError(400, f"bad sampling parameters: {exc}") from None


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _ApiError(400, "`messages` must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise _ApiError(400, "each message needs a `role` and a string `content`")
    return [{"role": str(m["role"]), "content": m["content"]} for m in messages]


def make_handler(backend: Backend, model_name: str, api_key: str | None) -> type:
    lock = threading.Lock()  # one generate at a time: the model is not re-entrant

    class Handler(BaseHTTPRequestHandler):
        server_version = "longctx-serve"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _reply(self, status: int, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, exc: _ApiError) -> None:
            self._reply(exc.status, {"error": {"message": str(exc), "type": exc.kind,
                                               "code": exc.status}})

        def _authorize(self) -> None:
            given = self.headers.get("Authorization") or ""
            if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise _ApiError(401, "invalid or missing API key", "authentication_error")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                self._authorize()
                if self.path.rstrip("/") != "/v1/models":
                    raise _ApiError(404, f"no route GET {self.path}")
                self._reply(200, {"object": "list", "data": [
                    {"id": model_name, "object": "model", "owned_by": "longctx"}]})
            except _ApiError as exc:
                self._error(exc)

        def do_POST(self) -> None:  # noqa: N802
            try:
                self._authorize()
                if self.path.rstrip("/") != "/v1/chat/completions":
                    raise _ApiError(404, f"no route POST {self.path}")
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                except ValueError:
                    raise _ApiError(400, "body is not JSON") from None
                if not isinstance(body, dict):
                    raise _ApiError(400, "body must be a JSON object")
                if body.get("model") not in (None, model_name):
                    raise _ApiError(404, f"the model `{body.get('model')}` does not exist",
                                    "not_found_error")
                chat, sampling = _messages(body), _sampling(body)
                with lock:
                    try:
                        _, done = next(backend.generate([chat], sampling, [sampling.seed]))
                    except LongctxError as exc:  # e.g. the prompt does not fit the window
                        raise _ApiError(400, str(exc)) from None
                self._reply(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model_name,
                    "choices": [{"index": 0, "finish_reason": done.finish_reason,
                                 "message": {"role": "assistant", "content": done.text}}],
                    "usage": {"prompt_tokens": done.prompt_tokens,
                              "completion_tokens": done.completion_tokens,
                              "total_tokens": done.prompt_tokens + done.completion_tokens},
                })
            except _ApiError as exc:
                self._error(exc)
            except Exception as exc:  # a server stays up; the client sees a 500 and retries
                log.exception("generate failed")
                self._error(_ApiError(500, f"{type(exc).__name__}: {exc}", "server_error"))

    return Handler


def make_server(model_dir: str | Path | None, host: str = "127.0.0.1", port: int = 8000, *,
                model_name: str = "base", api_key: str | None = None, device: str = "auto",
                dtype: str = "auto", context_tokens: int | None = None,
                backend: Backend | None = None) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0 picks a free port: `server.server_port`)."""
    if backend is None:
        from longctx.llm.hf import HFBackend

        backend = HFBackend(model_dir, device=device, dtype=dtype, context_tokens=context_tokens)
        backend.model  # the weights load now, not on the first request
    server = ThreadingHTTPServer((host, port), make_handler(backend, model_name, api_key))
    server.daemon_threads = True
    return server


def serve_forever(model_dir: str | Path, host: str = "127.0.0.1", port: int = 8000,
                  **kwargs: Any) -> None:
    server = make_server(model_dir, host, port, **kwargs)
    name = kwargs.get("model_name", "base")
    log.info("serving %s as %r on http://%s:%d/v1", model_dir, name, host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
