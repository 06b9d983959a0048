"""Atomic writes, content hashes and manifests: what makes every artifact reproducible.

A step writes each output to a temporary sibling and renames it into place only when the
output is complete, so a killed step never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _tmp_sibling(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path (file or directory) that replaces `dest` on success only."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(dest)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"{dest}: the step finished without writing its output")
    _remove(dest)
    os.replace(tmp, dest)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, keys sorted, so equal content gives equal bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_dir(path: str | Path) -> dict[str, str]:
    """sha256 of every file under a directory, by relative path (sorted)."""
    root = Path(path)
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def canonical_json(obj: Any) -> str:
    """One spelling per JSON-able value: sorted keys, no whitespace, non-ASCII escaped (so any
    string, even one with a lone surrogate from bad input, hashes). Every hash of a value in
    longctx (fingerprints, LLM cache keys, derived seeds) is taken over this text; anything
    not JSON-able is refused rather than hashed by an unstable repr."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def fingerprint(obj: Any, chars: int = 16) -> str:
    """A stable hex hash of a JSON-able value (config sections, cache keys and names), its
    first `chars` hex digits (64: the whole sha256)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:chars]


def cache_root() -> Path:
    """Where resumable work survives a killed step (not a declared output): $LONGCTX_CACHE or
    ./cache. Entries are content-addressed, so a stale entry is never reused by mistake."""
    return Path(os.environ.get("LONGCTX_CACHE", "cache"))
