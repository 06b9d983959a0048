"""The lm-eval model that runs a model directory, per `eval.backend`: lm-eval's own model
types, set up from the eval section as our answering engines are (engines.py).

- hf: `HFLM` in this process.
- vllm: lm-eval's `vllm` model, with the engine arguments of eval's vLLM backend
  (tensor_parallel_size, max_model_len refused below the longest sample, chunked prefill,
  KV cache dtype).
- openai: lm-eval's `local-completions` on the first replica of `eval.base_url` (lm-eval
  takes one URL), its tokenizer the local model directory (nothing downloads), the prompt
  sent as text. Its chat template is the model's, rendered here as our runner renders it
  (lm-eval would send a generation task's messages as JSON, which a completions endpoint
  refuses), and the replica is probed as our runner's are: a server whose tokenizer differs
  is refused. Log-likelihood tasks (longctx_cloze) read the prompt's log-probabilities
  (`echo`), which `transformers serve` does not return: such a server is refused for them.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from longctx.config import EvalConfig
from longctx.errors import LongctxError, one_line


def make_lm(cfg: EvalConfig, model_dir: Path, *, batch_size: int, max_length: int | None,
            seed: int, device: str, dtype: str, loglikelihood: list[str]) -> Any:
    """The lm-eval model for `model_dir`; `max_length`: the longest sample (None: the
    model's window); `loglikelihood`: the listed tasks that score by log-likelihood."""
    if cfg.backend == "vllm":
        return _vllm(cfg, model_dir, batch_size=batch_size, max_length=max_length, seed=seed)
    if cfg.backend == "openai":
        return _local_completions(cfg, model_dir, max_length=max_length, seed=seed,
                                  loglikelihood=loglikelihood)
    from lm_eval.models.huggingface import HFLM

    try:
        return HFLM(pretrained=str(model_dir), dtype=dtype, device=device,
                    batch_size=batch_size, max_length=max_length, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LongctxError(f"{model_dir}: lm-eval cannot load the model ({one_line(exc)})") \
            from None


def _vllm(cfg: EvalConfig, model_dir: Path, *, batch_size: int, max_length: int | None,
          seed: int) -> Any:
    from longctx.eval.engines import vllm_engine_args
    from longctx.llm.vllm import NEEDS_EXTRA, vllm_dtype

    args = vllm_engine_args(cfg, max_length)  # refuses a max_model_len below the samples
    if importlib.util.find_spec("vllm") is None:
        raise LongctxError(NEEDS_EXTRA.format(section="eval"))
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(pretrained=str(model_dir), dtype=vllm_dtype(cfg.dtype), batch_size=batch_size,
                seed=seed, **args)


def _local_completions(cfg: EvalConfig, model_dir: Path, *, max_length: int | None, seed: int,
                       loglikelihood: list[str]) -> Any:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from longctx.eval.engines import completions_backend
    from longctx.llm.hf import render_chat

    probe = completions_backend(cfg, model_dir)
    url = probe.replicas.urls[0]
    try:
        probe.check_replica(0)  # the tokenizer, as our runner checks every replica
        if loglikelihood and not probe.prompt_logprobs(0):
            raise LongctxError(
                f"eval.base_url {url}: the server returns no prompt log-probabilities (echo "
                f"with logprobs), which the log-likelihood task(s) {', '.join(loglikelihood)} "
                f"read; run them with eval.backend hf or vllm, or a server that returns them "
                f"(vllm serve)")
    finally:
        probe.close()

    class ChatAsText(LocalCompletionsAPI):
        """local-completions with generation tasks' chats rendered to text by our runner's
        renderer (the answer prefix opens the assistant turn), and only the task's own stop
        strings: the server stops at the model's end-of-turn token by itself, and
        `transformers serve` refuses a special token (<|im_end|>) as a stop string."""

        eos_string = None  # lm-eval would add the tokenizer's eos to every request's stops

        def apply_chat_template(self, chat_history: list[dict[str, str]],
                                add_generation_prompt: bool = True) -> str:
            return render_chat(self.tokenizer, chat_history)

        def _create_payload(self, *args: Any, **kwargs: Any) -> dict:
            payload = super()._create_payload(*args, **kwargs)
            if not payload.get("stop", True):
                del payload["stop"]  # none: an empty list is still a stop-string request
            return payload

    key = os.environ.get(cfg.api_key_env)  # in the header only: never logged or written
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    window = max_length or config.get("max_position_embeddings")  # else lm-eval's default
    return ChatAsText(model=str(model_dir), base_url=f"{url}/completions",
                      tokenizer=str(model_dir), tokenizer_backend="huggingface",
                      tokenized_requests=False, batch_size=1,
                      num_concurrent=cfg.max_concurrency, max_retries=cfg.max_retries,
                      timeout=int(cfg.timeout_s), seed=seed,
                      **({"max_length": window} if window else {}),
                      header={"Authorization": f"Bearer {key}"} if key else
                      {"Accept": "application/json"})
