"""The evaluation samples: generated once for all models, cached per (tokenizer, task, length).

Every evaluated model shares the base model's tokenizer, so one samples table serves the base
model and every stage. Each (task, length) unit is cached under `cache/eval/` by a key over
everything that determines it (tokenizer files, generator code, seed, the unit's settings,
the source texts), so adding a length to the params generates only that length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from longctx.config import NiahConfig, RulerConfig
from longctx.eval.samples import ChatMeasure, EvalSample, read_samples, write_samples
from longctx.repro import cache_root, fingerprint, sha256_file

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")
_GENERATOR_CODE = ("samples.py", "niah.py", "ruler")  # under src/longctx/eval/


def tokenizer_identity(model_dir: Path) -> dict[str, str]:
    """Hashes of the files that decide how prompts are rendered and counted."""
    return {name: sha256_file(model_dir / name) for name in _TOKENIZER_FILES
            if (model_dir / name).is_file()}


def code_identity() -> str:
    """The generators' source: a changed template must not reuse cached samples."""
    here = Path(__file__).parent
    files: list[Path] = []
    for name in _GENERATOR_CODE:
        path = here / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return fingerprint({p.relative_to(here).as_posix(): sha256_file(p) for p in files})


def _cached(cache_dir: Path, key: dict[str, Any], make: Callable[[], list[EvalSample]],
            label: str) -> list[EvalSample]:
    path = cache_dir / f"{fingerprint(key)}.parquet"
    if path.is_file():
        log.info("%s: cached (%s)", label, path.name)
        return read_samples(path)
    samples = make()
    write_samples(path, samples)
    log.info("%s: %d samples generated", label, len(samples))
    return samples


def _context(model_dir: Path, docs: Path, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {"tokenizer": tokenizer_identity(model_dir), "code": code_identity(),
            "docs": sha256_file(docs), "seed": seed, **extra}


def build_niah(cfg: NiahConfig, seed: int, *, model: Path, docs: Path, samples: Path,
               cache_dir: Path | None = None) -> dict[str, Any]:
    """The NIAH grid (lengths x depths x trials), in `model`'s tokenizer from the texts of
    `docs` -> `samples`; returns counts for the log."""
    from longctx.eval.niah import niah_grid
    from longctx.eval.ruler.sources import TextSources

    cache_dir = cache_dir or cache_root() / "eval"
    measure = ChatMeasure(model)
    sources = _lazy(lambda: TextSources.from_corpus(docs))
    context = _context(model, docs, seed, {"depths": cfg.depths, "trials": cfg.trials,
                                           "max_new_tokens": cfg.max_new_tokens})
    generated: list[EvalSample] = []
    for length in cfg.lengths:
        generated += _cached(
            cache_dir, context | {"task": "niah", "length": length},
            lambda length=length: niah_grid([length], cfg.depths, cfg.trials, seed, measure,
                                            sources(), max_new_tokens=cfg.max_new_tokens),
            f"niah@{length}")
    write_samples(samples, generated)
    return {"samples": len(generated), "lengths": len(cfg.lengths)}


def build_ruler(cfg: RulerConfig, seed: int, *, model: Path, docs: Path, samples: Path,
                cache_dir: Path | None = None) -> dict[str, Any]:
    """Every (task, length) of the RULER params, in `model`'s tokenizer from the texts of
    `docs` -> `samples`; returns counts for the log."""
    from longctx.eval import ruler
    from longctx.eval.ruler.sources import TextSources

    cache_dir = cache_dir or cache_root() / "eval"
    measure = ChatMeasure(model)
    sources = _lazy(lambda: TextSources.from_corpus(docs, cfg.squad_path, cfg.hotpotqa_path))
    qa_files = {name: sha256_file(path) for name, path in
                (("squad", cfg.squad_path), ("hotpotqa", cfg.hotpotqa_path)) if path}
    context = _context(model, docs, seed, {"samples": cfg.samples, "qa_files": qa_files})
    generated: list[EvalSample] = []
    for task in cfg.tasks:
        for length in cfg.lengths:
            generated += _cached(
                cache_dir, context | {"task": task, "length": length},
                lambda task=task, length=length: ruler.generate(
                    task, length, cfg.samples, seed, measure, sources()),
                f"{task}@{length}")
    write_samples(samples, generated)
    return {"samples": len(generated), "tasks": len(cfg.tasks), "lengths": len(cfg.lengths)}


def _lazy(make: Callable[[], Any]) -> Callable[[], Any]:
    """Read the source texts only if some unit is not cached."""
    box: list[Any] = []

    def get() -> Any:
        if not box:
            box.append(make())
        return box[0]
    return get
