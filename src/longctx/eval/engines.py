"""The engine that answers evaluation prompts, per `eval.backend`, for one model directory:
the synthesis backends (llm/), set up from the eval section.

- hf: transformers in this process, its window the longest sample (the grid deliberately
  goes past a stage's trained length).
- vllm: the offline engine, split over `tensor_parallel_size` GPUs, its `max_model_len` the
  longest sample unless set (and refused below it), chunked prefill and the KV cache dtype
  from the params. The same engine arguments serve lm-eval's `vllm` model.
- openai: `/v1/completions` of the servers at `eval.base_url`, the prompt rendered here by the
  model's chat template (llm/completions.py), so the token-exact length check still holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from longctx.config import EvalConfig
from longctx.errors import LongctxError
from longctx.llm.base import Backend


def vllm_engine_args(cfg: EvalConfig, longest: int | None) -> dict[str, Any]:
    """vLLM engine arguments (`vllm.LLM(**args)`) from the eval section; `longest`: the
    longest sample, prompt and answer, in tokens (None: no samples, the model's own window).
    An engine shorter than a sample would refuse it only once loaded, so it is refused now."""
    window = cfg.max_model_len
    if window is not None and longest is not None and window < longest:
        raise LongctxError(f"eval.max_model_len: {window} is below the longest sample "
                           f"({longest} tokens, prompt and answer): raise it or leave it unset")
    return {"tensor_parallel_size": cfg.tensor_parallel_size,
            "max_model_len": window if window is not None else longest,
            "enable_chunked_prefill": cfg.enable_chunked_prefill,
            "kv_cache_dtype": cfg.kv_cache_dtype}


def completions_backend(cfg: EvalConfig, model_dir: Path):
    """The openai backend on /v1/completions for `model_dir`, its client from the params."""
    from longctx.llm.completions import CompletionsBackend

    return CompletionsBackend(cfg.base_url, model_dir, api_key_env=cfg.api_key_env,
                              max_concurrency=cfg.max_concurrency,
                              max_retries=cfg.max_retries, timeout_s=cfg.timeout_s)


def answer_backend(cfg: EvalConfig, model_dir: Path, longest: int) -> Backend:
    """The backend that answers `model_dir`'s prompts; `longest`: the longest sample."""
    if cfg.backend == "hf":
        from longctx.llm.hf import HFBackend

        return HFBackend(model_dir, device=cfg.device, dtype=cfg.dtype, context_tokens=longest)
    if cfg.backend == "vllm":
        from longctx.llm.vllm import VLLMBackend

        args = vllm_engine_args(cfg, longest)
        return VLLMBackend(model_dir, dtype=cfg.dtype, context_tokens=args.pop("max_model_len"),
                           section="eval", **args)
    return completions_backend(cfg, model_dir)


def batch_size(cfg: EvalConfig) -> int:
    """Uncached calls handed to the backend at a time: a generate call's prompts (hf, vllm),
    or enough requests to keep every connection busy a while (openai, as in synthesis)."""
    from longctx.llm import OPENAI_BATCH_PER_WORKER

    if cfg.backend == "openai":
        return cfg.max_concurrency * OPENAI_BATCH_PER_WORKER
    return cfg.batch_size
