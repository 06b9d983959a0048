"""The transformers backend: real batched `generate` in this process (the default).

Batches are left-padded (a decoder continues from the last column), and `LLM` hands over
batches of similar length. On CPU, where compute grows with every token including padding,
the prompts are also prefilled one at a time without padding and their KV caches joined into
the batch's cache, so only decoding runs batched. The model's own
generation_config is reduced to its special tokens: decoding is exactly what `Sampling` says
(no hidden repetition penalty or top-k from a checkpoint), the same as on an OpenAI server.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError, one_line
from longctx.hub import hub_snapshot, looks_like_path, resolve_device
from longctx.llm.base import Chat, Completion, Sampling, check_window
from longctx.repro import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "longctx_manifest.json"  # written by base_model.prepare_base_model
_NOT_MODEL_FILES = {"README.md", ".gitattributes", MANIFEST}


# --------------------------------------------------------------------------- model identity


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # memoized per (path, size, mtime): a rewritten file is rehashed


def resolve_model(model: str) -> tuple[Path, dict[str, Any]]:
    """The local directory of `model` and its identity (file hashes, or hub revision).

    A directory written by the base_model step carries its file hashes in its manifest, so
    nothing is rehashed; another local directory is hashed (once per process while its files
    are unchanged); a hub id is found in the local Hugging Face cache (downloaded only if
    HF_HUB_OFFLINE is not set) and identified by its snapshot commit.
    """
    local = Path(model).expanduser()
    if local.is_dir():
        manifest = local / MANIFEST
        if manifest.is_file():
            files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        else:
            files = {
                p.relative_to(local).as_posix(): _file_sha256(p, *_stamp(p))
                for p in sorted(local.rglob("*"))
                if p.is_file() and p.name not in _NOT_MODEL_FILES and ".git" not in p.parts
            }
        return local, {"files": files}
    if looks_like_path(model):
        raise LongctxError(f"llm.model: local model directory {model!r} does not exist")
    path = hub_snapshot(model, "llm.model")
    return path, {"hub_id": model, "revision": path.name}  # snapshots are named by commit


def resolve_dtype(dtype: str, device: str) -> str:
    """auto: bfloat16 on GPUs, float32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


def eos_token_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """Every id that ends a turn: the tokenizer's eos and the checkpoint's (e.g. <|im_end|>)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def render_chat(tokenizer: Any, chat: Chat) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise LongctxError(f"llm.model: tokenizer {tokenizer.name_or_path!r} has no chat template")
    if chat and chat[-1]["role"] == "assistant":  # an answer prefix: the model continues it
        return tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- sampling


def per_call_sampler(sampling: Sampling, seeds: list[int]) -> Any:
    """Temperature and top-p as transformers applies them, then Gumbel noise drawn from each
    row's own generator, for `generate` to take the argmax of: argmax(log p + Gumbel) is a
    sample from p (the Gumbel-max trick), and row i's noise comes only from `seeds[i]` and
    its step count, where transformers' own sampling draws every row from one shared stream
    (so a call's text would depend on its batch-mates)."""
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    class GumbelNoise(LogitsProcessor):
        def __init__(self) -> None:
            self.generators: list[Any] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            import torch

            if not self.generators:  # the first step: one generator per row, on its device
                self.generators = [torch.Generator(scores.device).manual_seed(s) for s in seeds]
            noise = torch.stack([torch.rand(scores.shape[1], generator=g, device=scores.device)
                                 for g in self.generators])
            tiny = torch.finfo(noise.dtype).tiny
            return scores.float() - torch.log(-torch.log(noise.clamp_(min=tiny)))

    warpers = [TemperatureLogitsWarper(sampling.temperature)]
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return LogitsProcessorList([*warpers, GumbelNoise()])


# --------------------------------------------------------------------------- the backend


def _generation_config(path: Path, config: Any) -> Any:
    """What `from_pretrained` gives a model as its generation_config, without its weights:
    the checkpoint's generation_config.json, or else the one derived from its config."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return GenerationConfig.from_model_config(config)


class HFBackend:
    """transformers `generate` on one device; `model` is a local dir or a hub id.

    The tokenizer (prompts are rendered, counted and keyed with it) loads at once; the
    weights on the first generation, so a step whose calls are all cached never loads them.
    """

    name = "hf"

    def __init__(self, model: str | Path, *, device: str = "auto", dtype: str = "auto",
                 context_tokens: int | None = None, trust_remote_code: bool = False) -> None:
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        self.source = str(model)
        self.path, identity = resolve_model(self.source)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                self.path, trust_remote_code=trust_remote_code)
            self.config = AutoConfig.from_pretrained(
                self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise LongctxError(f"llm.model {self.source!r}: cannot load: {one_line(exc)}") from None
        # CPU compute grows with every token, padding included; a GPU prefers one big batch
        self.unpadded_prefill = self.device == "cpu"

        self.tokenizer.padding_side = "left"
        checkpoint_generation = _generation_config(self.path, self.config)
        self.eos_ids = eos_token_ids(self.tokenizer, checkpoint_generation)
        if not self.eos_ids:
            raise LongctxError(f"llm.model {self.source!r}: no eos token: generation cannot stop")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.eos_ids[0])
        # Only the special tokens survive from the checkpoint's decoding defaults.
        self.generation_config = GenerationConfig(
            bos_token_id=checkpoint_generation.bos_token_id,
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        window = getattr(self.config, "max_position_embeddings", None)
        self.context_tokens = context_tokens or window
        self.identity = {"backend": "hf", "model": identity, "dtype": self.dtype}

    @functools.cached_property
    def model(self) -> Any:
        """The weights, safetensors only, loaded on first use."""
        import torch
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(
                self.path, config=self.config, dtype=getattr(torch, self.dtype),
                use_safetensors=True, trust_remote_code=self.trust_remote_code)
        except OSError as exc:
            raise LongctxError(f"llm.model {self.source!r}: cannot load: {one_line(exc)}") from None
        model.to(self.device).eval()
        model.generation_config = self.generation_config
        return model

    def render(self, chat: Chat) -> str:
        return render_chat(self.tokenizer, chat)

    def prompt_tokens(self, rendered: list[str]) -> list[int]:
        return [len(ids) for ids in self._encode(rendered)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return self.prompt_tokens(texts)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # The chat template already wrote every special token: add none (no double BOS).
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def generate(self, chats: list[Chat], sampling: Sampling,
                 seeds: list[int]) -> Iterator[tuple[int, Completion]]:
        import torch

        ids = self._encode([self.render(c) for c in chats])
        lengths = [len(x) for x in ids]
        check_window(lengths, sampling.max_new_tokens, self.context_tokens)
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if self.unpadded_prefill and min(lengths) < max(lengths):
            batch["cache"] = self._prefill_unpadded(ids)
        options: dict[str, Any] = {"do_sample": False}
        if not sampling.greedy:  # the argmax of per-row noised scores: a sample per row
            options["logits_processor"] = per_call_sampler(sampling, seeds)
        with torch.inference_mode():
            out = self.model.generate(**batch, max_new_tokens=sampling.max_new_tokens, **options)
        new_tokens = out[:, batch["input_ids"].shape[1]:].tolist()
        yield from enumerate(self._completion(row, n) for row, n in zip(new_tokens, lengths))

    def _prefill_unpadded(self, ids: list[list[int]]) -> Any:
        """The batch's KV cache for all but each prompt's last token, computed prompt by
        prompt (no compute spent on padding) and left-padded with zeros, which the attention
        mask hides. `generate` then starts from the last column, the same for every row."""
        import torch
        from transformers import DynamicCache

        width = max(map(len, ids)) - 1
        rows: list[list[tuple[Any, Any]]] = []
        with torch.inference_mode():
            for x in ids:
                if len(x) > 1:
                    out = self.model(input_ids=torch.tensor([x[:-1]], device=self.device),
                                     use_cache=True, logits_to_keep=1)
                    rows.append([(layer.keys, layer.values) for layer in out.cache.layers])
                else:
                    rows.append([])
        template = next(r for r in rows if r)
        layers = []
        for i, (k0, v0) in enumerate(template):
            keys, values = [], []
            for row in rows:
                k, v = row[i] if row else (k0[:, :, :0], v0[:, :, :0])
                pad = width - k.shape[2]
                keys.append(torch.nn.functional.pad(k, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(v, (0, 0, pad, 0)))
            layers.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _completion(self, row: list[int], prompt_tokens: int) -> Completion:
        stop = next((i for i, tok in enumerate(row) if tok in self.eos_ids), None)
        kept = row if stop is None else row[:stop]
        return Completion(
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            finish_reason="length" if stop is None else "stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept) + (stop is not None),  # the end-of-turn token counts
        )
