"""Where a model named in params lives: a local directory, or a hub id in the local cache.

Shared by every step that loads a model, so "never download unless allowed" and the error
messages are the same everywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from longctx.errors import LongctxError


def resolve_device(device: str) -> str:
    """'auto' -> cuda, else mps, else cpu."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def looks_like_path(model: str) -> bool:
    """A hub id is `name` or `org/name`; anything else the user wrote is a local path."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or os.sep != "/" and os.sep in model
    )


def hub_snapshot(model: str, key: str) -> Path:
    """The local snapshot of hub id `model` (its directory name is the commit): from the local
    Hugging Face cache, downloaded only when HF_HUB_OFFLINE is unset. `key` names the params
    key in errors."""
    from huggingface_hub import snapshot_download

    cached = cached_snapshot(model)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise LongctxError(
            f"{key}: {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    try:
        return Path(snapshot_download(model))
    except Exception as exc:
        raise LongctxError(f"{key}: cannot fetch {model!r}: {exc}") from None


def cached_snapshot(model: str) -> Path | None:
    """The local snapshot of hub id `model`, or None: never downloads, whatever the
    environment says (`longctx plan` reads model sizes before anything runs)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        return None
