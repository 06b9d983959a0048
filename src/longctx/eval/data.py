"""The evaluation samples: generated once for all models, cached per (tokenizer, task, length),
in shard jobs split by (task, length) unit and gathered into one table.

Every evaluated model shares the base model's tokenizer, so one samples table serves the base
model and every stage. Each (task, length) unit is cached under `cache/eval/` by a key over
everything that determines it (tokenizer files, generator code, seed, the unit's settings,
the source texts), so adding a length to the params generates only that length.

A shard (longctx.shards) owns the units whose name, `task@length` (the NIAH grid's:
`niah@length`), hashes to it, and generates those alone: a unit is what the cache holds, and
within one the haystack search of each sample starts from the size of the one before
(`ruler.fit`'s guess), so a unit cut in two would not give the same samples. The gather puts
the units back in the params' order (tasks, then lengths), each unit's samples in their own,
so the table is the same bytes for 1 shard and for N.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from longctx.config import NiahConfig, RulerConfig
from longctx.eval.niah import TASK as NIAH
from longctx.eval.samples import SCHEMA as SAMPLES_SCHEMA
from longctx.eval.samples import (
    ChatMeasure,
    EvalSample,
    read_samples,
    sample_from_row,
    sample_row,
    write_samples,
)
from longctx.parts import read_parts, write_part
from longctx.repro import cache_root, fingerprint, sha256_file
from longctx.shards import Shard, check_count

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")
_GENERATOR_CODE = ("samples.py", "niah.py", "ruler")  # under src/longctx/eval/
# A shard's part: its samples (sample_row), each with the unit it belongs to.
PART_SCHEMA = pa.schema([("unit", pa.string()), *SAMPLES_SCHEMA])
Unit = tuple[str, int]  # (task, length): what a shard owns and the cache holds


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


def unit_name(unit: Unit) -> str:
    """`task@length`: a unit's shard key, and its name in the log."""
    return f"{unit[0]}@{unit[1]}"


def niah_units(cfg: NiahConfig) -> list[Unit]:
    """The NIAH grid's units, one per length (its depths and trials inside), in order."""
    return [(NIAH, length) for length in cfg.lengths]


def ruler_units(cfg: RulerConfig) -> list[Unit]:
    """Every (task, length) of the RULER params, tasks first, in the params' order."""
    return [(task, length) for task in cfg.tasks for length in cfg.lengths]


def _write_shard(units: list[Unit], make: Callable[[Unit], list[EvalSample]],
                 context: dict[str, Any], *, shard: Shard, step: str, params: str,
                 part: Path, cache_dir: Path | None) -> int:
    """The samples of every unit `shard` owns, from the cache or made, in the params' order,
    to `part`; returns their number. A unit another shard owns costs nothing here."""
    check_count(shard, len(units), step)
    cache_dir = cache_dir or cache_root() / "eval"
    rows: list[dict[str, Any]] = []
    for unit in units:
        name = unit_name(unit)
        if shard.owns(name):
            made = _cached(cache_dir, context | {"task": unit[0], "length": unit[1]},
                           lambda unit=unit: make(unit), name)
            rows += [sample_row(s) | {"unit": name} for s in made]
    write_part(part, rows, PART_SCHEMA, shard, params=params, context=context)
    return len(rows)


def _gather(units: list[Unit], *, params: str, parts: list[Path], samples: Path,
            rerun: str) -> int:
    """Every shard's samples, in the params' unit order, to `samples`; returns their number."""
    got = read_parts(parts, PART_SCHEMA, params, key="unit", order=list(map(unit_name, units)),
                     rerun=rerun)
    write_samples(samples, [sample_from_row(row) for row in got.rows])
    return len(got.rows)


def niah_shard(cfg: NiahConfig, seed: int, *, shard: Shard, params: str, model: Path,
               docs: Path, part: Path, cache_dir: Path | None = None) -> int:
    """The NIAH lengths `shard` owns (each: depths x trials), in `model`'s tokenizer from the
    texts of `docs` -> `part`; returns the number of samples."""
    from longctx.eval.niah import niah_grid
    from longctx.eval.ruler.sources import TextSources

    measure = ChatMeasure(model)
    sources = _lazy(lambda: TextSources.from_corpus(docs))
    context = _context(model, docs, seed, {"depths": cfg.depths, "trials": cfg.trials,
                                           "max_new_tokens": cfg.max_new_tokens})
    return _write_shard(
        niah_units(cfg),
        lambda unit: niah_grid([unit[1]], cfg.depths, cfg.trials, seed, measure, sources(),
                               max_new_tokens=cfg.max_new_tokens),
        context, shard=shard, step="niah_samples", params=params,
        part=part, cache_dir=cache_dir)


def gather_niah(cfg: NiahConfig, *, params: str, parts: list[Path], samples: Path
                ) -> dict[str, Any]:
    """The shards' NIAH samples (lengths, then depths and trials) -> `samples`; returns counts
    for the log."""
    n = _gather(niah_units(cfg), params=params, parts=parts, samples=samples,
                rerun="niah_samples")
    return {"samples": n, "lengths": len(cfg.lengths)}


def ruler_shard(cfg: RulerConfig, seed: int, *, shard: Shard, params: str, model: Path,
                docs: Path, part: Path, cache_dir: Path | None = None) -> int:
    """The RULER (task, length) units `shard` owns, in `model`'s tokenizer from the texts of
    `docs` -> `part`; returns the number of samples."""
    from longctx.eval import ruler
    from longctx.eval.ruler.sources import TextSources

    measure = ChatMeasure(model)
    sources = _lazy(lambda: TextSources.from_corpus(docs, cfg.squad_path, cfg.hotpotqa_path))
    qa_files = {name: sha256_file(path) for name, path in
                (("squad", cfg.squad_path), ("hotpotqa", cfg.hotpotqa_path)) if path}
    context = _context(model, docs, seed, {"samples": cfg.samples, "qa_files": qa_files})
    return _write_shard(
        ruler_units(cfg),
        lambda unit: ruler.generate(unit[0], unit[1], cfg.samples, seed, measure, sources()),
        context, shard=shard, step="ruler_samples",
        params=params, part=part, cache_dir=cache_dir)


def gather_ruler(cfg: RulerConfig, *, params: str, parts: list[Path], samples: Path
                 ) -> dict[str, Any]:
    """The shards' RULER samples (tasks, then lengths, then index) -> `samples`; returns counts
    for the log."""
    n = _gather(ruler_units(cfg), params=params, parts=parts, samples=samples,
                rerun="ruler_samples")
    return {"samples": n, "tasks": len(cfg.tasks), "lengths": len(cfg.lengths)}


def _lazy(make: Callable[[], Any]) -> Callable[[], Any]:
    """Read the source texts only if some unit is not cached."""
    box: list[Any] = []

    def get() -> Any:
        if not box:
            box.append(make())
        return box[0]
    return get
