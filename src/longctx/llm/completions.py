"""The openai backend on `/v1/completions`, for evaluation: the prompt is rendered HERE, by
the model directory's own chat template, and sent as text.

Evaluation samples are sized token-exactly in the model's tokenizer (the haystack fills the
window to the token), and `eval/run.py` checks each rendered prompt against that size. On
`/v1/chat/completions` the server would render the chat with its own template and count it
with its own tokenizer, neither of which we can see; here the template and the count are
ours, and all that is left to trust is the server's tokenizer. So each replica is probed
once, before its first request, with a prompt whose length we know, and refused, in one line
naming it, when it counts another length: it serves another model or tokenizer, or adds
tokens of its own to the text (a BOS). Every answer's `usage.prompt_tokens` is checked the
same way, so a server swapped mid-run is caught too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError, one_line
from longctx.llm.base import Chat, Completion
from longctx.llm.hf import render_chat, resolve_model
from longctx.llm.openai import OpenAIBackend, _ReplicaDown

# Digits, punctuation, accents, CJK, emoji, code and runs of whitespace: two tokenizers that
# differ at all split this differently, and a server that adds a BOS counts one more.
PROBE_TEXT = ("Tokenizer probe 2718281828, 3.14159; naïve café, Ærøskøbing, 東京タワー, "
              "Привет мир 🙂👍🏽\n\tdef f(x):  return x ** 2  # ok?\n\n  \"quoted\" <tag/> "
              "end.")


class CompletionsBackend(OpenAIBackend):
    """`OpenAIBackend` (replicas, retries, concurrency, the API key) on `/v1/completions`.
    The request's `model` is the model directory as given (`models/stage-0`): the name an
    unpinned `transformers serve` started in the project (`longctx serve --eval`) loads it
    by, and a server pinned to that directory answers to."""

    endpoint = "/completions"

    def __init__(self, base_url: str | list[str], model_dir: str | Path, *,
                 section: str = "eval", **client: Any) -> None:
        from transformers import AutoTokenizer

        path, identity = resolve_model(str(model_dir))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise LongctxError(f"{model_dir}: cannot load its tokenizer: {one_line(exc)}") \
                from None
        super().__init__(base_url, str(model_dir), section=section, **client)
        self.identity = {"backend": "openai", "endpoint": self.endpoint, "model": identity}
        self._probe = self.render([{"role": "user", "content": PROBE_TEXT}])
        self._checked = [False] * len(self.replicas.urls)
        self._locks = [threading.Lock() for _ in self.replicas.urls]

    def render(self, chat: Chat) -> str:
        return render_chat(self.tokenizer, chat)

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        # The chat template already wrote every special token: add none (as the hf backend).
        return [len(ids) for ids in
                self.tokenizer(rendered, add_special_tokens=False)["input_ids"]]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.prompt_tokens(texts)

    def check_replica(self, i: int) -> None:
        """Replica i's tokenizer probe, for a caller outside `generate` (lm-eval's
        local-completions): a replica that does not answer is one LongctxError naming it."""
        self._answer(i, None)

    def prompt_logprobs(self, i: int) -> bool:
        """Whether replica i returns the prompt's log-probabilities (`echo` with `logprobs`),
        which lm-eval's log-likelihood tasks read; `transformers serve` ignores both."""
        body = {"model": self.model, "prompt": self._probe, "max_tokens": 1,
                "temperature": 0.0, "echo": True, "logprobs": 1}
        choices = self._answer(i, body).get("choices") or [{}]
        return bool((choices[0].get("logprobs") or {}).get("token_logprobs"))

    def _answer(self, i: int, body: dict[str, Any] | None) -> dict[str, Any]:
        """Replica i's probe, then its reply to `body` (if any), as one caller's request."""
        try:
            self._ready(i)
            return {} if body is None else self._post_with_retries(i, self.endpoint, body)
        except _ReplicaDown as exc:
            raise LongctxError(f"{self.replicas.key} {self.replicas.urls[i]}: {exc}") from None

    # ------------------------------------------------------------------ OpenAIBackend hooks

    def _ready(self, i: int) -> None:
        """Probe replica i's tokenizer once (later calls return at once): LongctxError when
        it counts the probe otherwise than our tokenizer does; _ReplicaDown when it does not
        answer (in `generate`, the request then goes to another replica)."""
        with self._locks[i]:
            if self._checked[i]:
                return
            url = self.replicas.urls[i]
            body = {"model": self.model, "prompt": self._probe, "max_tokens": 1,
                    "temperature": 0.0}
            served = (self._post_with_retries(i, self.endpoint, body).get("usage") or {}) \
                .get("prompt_tokens")
            if not isinstance(served, int):
                raise LongctxError(f"{self.replicas.key} {url}: the server reports no "
                                   f"usage.prompt_tokens, so its tokenizer cannot be checked "
                                   f"against {self.model}'s; use a server that does")
            self._same_count(url, served, self._probe, "a probe prompt")
            self._checked[i] = True

    def _prompt(self, chat: Chat) -> dict[str, Any]:
        return {"prompt": self.render(chat)}

    def _parse(self, data: dict[str, Any], url: str, body: dict[str, Any]) -> Completion:
        completion = super()._parse(data, url, body)
        self._same_count(url, completion.prompt_tokens, body["prompt"], "a prompt")
        return completion

    @staticmethod
    def _text(choice: dict[str, Any]) -> str:
        return choice["text"] or ""

    def _same_count(self, url: str, served: int, prompt: str, what: str) -> None:
        ours = self.prompt_tokens([prompt])[0]
        if served != ours:
            raise LongctxError(
                f"{self.replicas.key} {url}: the server counts {served} tokens in {what} that "
                f"{self.model}'s tokenizer counts as {ours}: it serves another model or "
                f"tokenizer, or adds tokens of its own (a BOS); point {self.replicas.key} at "
                f"servers of {self.model}")
