"""LLM calls for the synthesis steps: one protocol, three backends, one call cache.

    llm = make_llm(params.llm, Path("models/base"))
    outs = llm.chat(chats, Sampling(max_new_tokens=256), template_version="qfs/1", desc="qfs")

`hf` (transformers, in process, the default), `openai` (any OpenAI-compatible server) and
`vllm` (offline engine) all go through `LLM`, which plans batches and keeps every finished
call in a content-addressed SQLite cache, so a killed step resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from longctx.config import LLMConfig
from longctx.llm.base import Backend, Chat, Completion, Sampling
from longctx.llm.cache import CallCache
from longctx.llm.client import LLM, CallStats

__all__ = ["LLM", "Backend", "CallCache", "CallStats", "Chat", "Completion", "Sampling",
           "make_backend", "make_llm"]

OPENAI_BATCH_PER_WORKER = 4  # openai: a planned batch keeps every connection busy a while


def _model_path(cfg: LLMConfig, base_model_dir: Path) -> str:
    return str(base_model_dir) if cfg.model == "base" else cfg.model


def make_backend(cfg: LLMConfig, base_model_dir: Path) -> Backend:
    if cfg.backend == "hf":
        from longctx.llm.hf import HFBackend

        return HFBackend(_model_path(cfg, base_model_dir), device=cfg.device, dtype=cfg.dtype,
                         context_tokens=cfg.context_tokens,
                         trust_remote_code=cfg.trust_remote_code)
    if cfg.backend == "vllm":
        from longctx.llm.vllm import VLLMBackend

        return VLLMBackend(_model_path(cfg, base_model_dir), dtype=cfg.dtype,
                           context_tokens=cfg.context_tokens,
                           trust_remote_code=cfg.trust_remote_code)
    return _openai_backend(cfg, base_model_dir)


def _openai_backend(cfg: LLMConfig, base_model_dir: Path) -> Backend:
    """openai: llm.model 'base' asks for the model dir by its path, the name a server pinned
    with `transformers serve models/base` (what `longctx serve` runs) or `vllm serve
    models/base` answers to, and is identified by its file hashes, not by that name."""
    from longctx.llm.openai import OpenAIBackend

    model, model_identity = cfg.model, None
    if cfg.model == "base":
        from longctx.llm.hf import resolve_model

        model = str(base_model_dir)
        model_identity = resolve_model(model)[1]
    return OpenAIBackend(cfg.base_urls, model, model_identity=model_identity,
                         api_key_env=cfg.api_key_env, max_concurrency=cfg.max_concurrency,
                         max_retries=cfg.max_retries, timeout_s=cfg.timeout_s)


def _base_tokenizer_counter(base_model_dir: Path):
    """openai: callers budget with the base model's tokenizer (loaded on first use)."""
    counter = None

    def count(texts: list[str]) -> list[int]:
        nonlocal counter
        if counter is None:
            from longctx.tokens import token_counter  # the corpus step counts the same way

            counter = token_counter(base_model_dir)
        return counter(texts)

    return count


def make_llm(cfg: LLMConfig, base_model_dir: Path, cache_path: Path | None = None) -> LLM:
    """The configured backend behind the call cache (default: $LONGCTX_CACHE/llm/calls.sqlite)."""
    backend = make_backend(cfg, Path(base_model_dir))
    if cfg.backend == "openai":
        return LLM(backend, CallCache(cache_path), cfg.max_concurrency * OPENAI_BATCH_PER_WORKER,
                   tokenizer=_base_tokenizer_counter(Path(base_model_dir)))
    return LLM(backend, CallCache(cache_path), cfg.batch_size)
