"""vLLM's offline engine: the fast local backend on GPUs (the `vllm` extra).

We render and tokenize prompts ourselves with the model's chat template (exactly as the hf
backend does) and hand vLLM token ids, so both backends see the same prompt and the cache key
means the same thing. vLLM batches continuously inside one `generate`; each request carries
its call's own seed (vLLM seeds a generator per request), so a sampled call does not depend
on its batch-mates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError
from longctx.llm.base import Chat, Completion, Sampling, check_window
from longctx.llm.hf import eos_token_ids, render_chat, resolve_model

NEEDS_EXTRA = "{section}.backend 'vllm' needs the vllm extra: pip install 'longctx[vllm]'"


def vllm_dtype(dtype: str) -> str:
    """auto: bfloat16 (vLLM runs on GPUs), else as given."""
    return "bfloat16" if dtype == "auto" else dtype


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str | Path, *, dtype: str = "auto",
                 context_tokens: int | None = None, trust_remote_code: bool = False,
                 seed: int = 0, section: str = "llm", **engine_args: Any) -> None:
        try:
            import vllm
        except ImportError:
            raise LongctxError(NEEDS_EXTRA.format(section=section)) from None
        from transformers import GenerationConfig

        path, identity = resolve_model(str(model))
        self.dtype = vllm_dtype(dtype)
        self.engine = vllm.LLM(
            model=str(path), dtype=self.dtype, seed=seed, trust_remote_code=trust_remote_code,
            max_model_len=context_tokens, **engine_args,
        )
        self.tokenizer = self.engine.get_tokenizer()
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            generation_config = None
        self.eos_ids = eos_token_ids(self.tokenizer, generation_config)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.context_tokens = context_tokens or config.get("max_position_embeddings")
        self.identity = {"backend": "vllm", "model": identity, "dtype": self.dtype}
        if engine_args:  # eval's: a KV cache in fp8, another split or prefill, other numerics
            self.identity["engine"] = dict(sorted(engine_args.items()))

    def render(self, chat: Chat) -> str:
        return render_chat(self.tokenizer, chat)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        return [len(ids) for ids in self._encode(rendered)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.prompt_tokens(texts)

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self._encode([self.render(c) for c in chats])
        check_window([len(x) for x in ids], sampling.max_new_tokens, self.context_tokens)
        params = [
            SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                           max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos_ids,
                           seed=None if sampling.greedy else seed)
            for seed in seeds
        ]
        outputs = self.engine.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params,
                                       use_tqdm=False)
        for i, (prompt_ids, out) in enumerate(zip(ids, outputs)):
            best = out.outputs[0]
            yield i, Completion(
                text=best.text,
                finish_reason="length" if best.finish_reason == "length" else "stop",
                prompt_tokens=len(prompt_ids),
                completion_tokens=len(best.token_ids),
            )
