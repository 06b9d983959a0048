"""The base model's chat template as the pack step uses it: a chat -> token ids, with the
tokens training learns flagged (every token of a long sample but the first; only the
assistant turns of a short one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from longctx.errors import LongctxError
from longctx.sequences import Tokenized
from longctx.tokens import load_tokenizer

ROLES = ("system", "user", "assistant")

Chat = list[dict[str, str]]


class ChatTokenizer:
    """The base model's tokenizer and chat template: chat -> ids, and assistant-only masks."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise LongctxError(f"{model_dir}: the tokenizer has no chat template")

    def ids(self, chat: Chat, generation_prompt: bool = False) -> list[int]:
        """Token ids of a rendered chat; transformers 5 returns a BatchEncoding, 4 a list."""
        out: Any = self.tokenizer.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=generation_prompt)
        if not isinstance(out, list):
            out = out["input_ids"]
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return list(out)

    def all_learnt(self, sample_id: str, chat: Chat) -> Tokenized:
        """Learn every token but the first, which nothing before it predicts (so the flags,
        and the stats counted from them, say exactly what training learns)."""
        ids = self.ids(chat)
        learn = np.ones(len(ids), bool)
        learn[:1] = False
        return Tokenized(sample_id, np.asarray(ids, np.int32), learn)

    def assistant_learnt(self, sample_id: str, chat: Chat) -> Tokenized:
        """Learn exactly the tokens each assistant turn adds after its generation prompt
        (its text and end-of-turn tokens); everything else is context."""
        ids = self.ids(chat)
        learn = np.zeros(len(ids), bool)
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            prompt = self.ids(chat[:i], generation_prompt=True)
            upto = self.ids(chat[:i + 1]) if i + 1 < len(chat) else ids
            if upto[:len(prompt)] != prompt or ids[:len(upto)] != upto:
                raise LongctxError(
                    f"{self.model_dir}: the model's chat template does not render a chat's "
                    f"turns as prefixes of the whole chat (sample {sample_id}, turn {i}), so "
                    "the assistant tokens cannot be told apart for the loss mask")
            learn[len(prompt):len(upto)] = True
        return Tokenized(sample_id, np.asarray(ids, np.int32), learn)

