"""The local files a params file points the steps at, resolved in one place.

A corpus glob, a SQuAD file, a chat dataset, a local model directory or an accelerate config
named in params is read by a step, so it is an input of that step's rule (and a DVC
dependency): edit the file and exactly the rules that read it rerun. The steps and the DAG
resolve these names with the same functions, so both see the same files.

Not files, and so not inputs: `bundled` (the assets inside pinned pip packages), hub ids (pin
them with a revision: `base_model.revision`; a hub snapshot's directory is named by its
commit) and URLs. Globs expand when the DAG is built: a file added later that matches is seen
by the next `snakemake` run, and by DVC after `longctx dvc-export`.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

from longctx.config import BUNDLED, Params
from longctx.errors import ConfigError
from longctx.hub import looks_like_path


def expand(patterns: list[str], key: str) -> list[Path]:
    """Files named by `patterns` (each glob's matches sorted), in order, each once; a pattern
    that names no file is an error naming `key`."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ConfigError(f"{key}: {pattern!r} matches no file")
        elif Path(pattern).is_file():
            matches = [pattern]
        else:
            raise ConfigError(f"{pattern}: file not found ({key})")
        files.update(dict.fromkeys(map(Path, matches)))
    return list(files)


def local_source(value: str | None, key: str) -> Path | None:
    """The local file or directory a model-or-path value names; None for `bundled`, a hub id
    or a URL. A value that can only be a path (./x, /x, a/b/c) must exist."""
    if value is None or value == BUNDLED or "://" in value:
        return None
    path = Path(value).expanduser()
    if path.exists():
        return path
    if looks_like_path(value):
        raise ConfigError(f"{key}: {value!r}: no such file or directory")
    return None  # a hub id


def files_under(path: Path) -> list[Path]:
    """A directory stands for its files (its mtime misses edits inside it); hidden entries
    (.git, .cache) and __pycache__ are not part of what a step reads."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts))


def _corpus(p: Params) -> list[Path]:
    return [f for i, src in enumerate(p.corpus.sources) if src.format != "demo"
            for f in expand(src.paths, f"corpus.sources[{i}].paths")]


def file_named(value: str | None, key: str) -> list[Path]:
    """A value that names a file (never a hub id): it must be there."""
    if value is None:
        return []
    if not Path(value).expanduser().is_file():
        raise ConfigError(f"{key}: {value}: file not found")
    return [Path(value).expanduser()]


def _llm(p: Params) -> list[Path | None]:
    if p.llm.backend == "openai" or p.llm.model == "base":  # a served name; models/base
        return []
    return [local_source(p.llm.model, "llm.model")]


NAMED_BY: dict[str, Callable[[Params], list[Path | None]]] = {
    "corpus": _corpus,
    "base_model": lambda p: [local_source(p.base_model.source, "base_model.source")],
    "embed": lambda p: [local_source(p.embed.model, "embed.model")],
    "instructions": lambda p: [local_source(p.instructions.dedup_model,
                                            "instructions.dedup_model")],
    "llm": _llm,
    "pack": lambda p: file_named(p.pack.short_path if p.pack.short_source == "file" else None,
                                 "pack.short_path"),
    "train": lambda p: file_named(p.train.accelerate_config, "train.accelerate_config"),
    "ruler": lambda p: (file_named(p.ruler.squad_path, "ruler.squad_path")
                        + file_named(p.ruler.hotpotqa_path, "ruler.hotpotqa_path")),
}


def named_files(params: Params, *sections: str) -> list[Path]:
    """Every local file the given params sections name, directories as their files, sorted
    and each once."""
    found: set[Path] = set()
    for section in sections:
        for path in NAMED_BY.get(section, lambda _: [])(params):
            if path is not None:
                found.update(files_under(path))
    return sorted(found)
