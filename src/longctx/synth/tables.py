"""Reading and writing the synthesis tables, and what every LLM step shares.

Tables are parquet files written atomically with a fixed schema, so equal rows give equal
bytes (DVC and the reproducibility test compare hashes). Reading checks the columns a step
needs and names the file when something is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx import repro
from longctx.config import LLMConfig
from longctx.errors import LongctxError, one_line
from longctx.llm import LLM, make_llm
from longctx.parquet import open_table

log = logging.getLogger(__name__)


def write_table(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema,
                **arrays: pa.Array) -> None:
    """Rows (dicts keyed by the schema's names) -> parquet, atomically, byte-reproducibly.
    A column given in `arrays` (one value per row, e.g. vectors) is taken as it is."""
    columns = {name: arrays[name] if name in arrays else [row[name] for row in rows]
               for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    with repro.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_table(path: str | Path, columns: list[str]) -> list[dict[str, Any]]:
    """The named columns of a parquet table as row dicts; a clear error when it is unusable."""
    return open_table(path, columns).read(columns=columns).to_pylist()


def document_rows(docs_path: str | Path,
                  tokens: tuple[int, int] | None = None) -> Sequence[int]:
    """Corpus row numbers of the documents (of `tokens` = (min, max) tokens), in table order:
    what seeded draws index into. Without a range a `range` (nothing read); with one, the
    n_tokens column alone (8 bytes a document), never the ids (64 bytes) or the texts."""
    table = open_table(docs_path, ["id", "n_tokens"], made_by="the corpus step")
    if tokens is None:
        return range(table.metadata.num_rows)
    n = table.read(columns=["n_tokens"]).column("n_tokens").to_numpy()
    return np.flatnonzero((n >= tokens[0]) & (n <= tokens[1]))


def read_rows(docs_path: str | Path, rows: Iterable[int],
              columns: list[str]) -> dict[int, dict[str, Any]]:
    """`columns` of the corpus rows `rows`, by row number: one row group read at a time, and
    only those holding a wanted row."""
    table = open_table(docs_path, columns, made_by="the corpus step")
    meta = table.metadata
    starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    wanted = np.unique(np.fromiter(rows, dtype=np.int64))
    groups = np.searchsorted(starts, wanted, side="right") - 1
    found: dict[int, dict[str, Any]] = {}
    for g in np.unique(groups):
        group = table.read_row_group(int(g), columns=columns)
        at = wanted[groups == g]
        for row, values in zip(at, group.take(pa.array(at - starts[g])).to_pylist()):
            found[int(row)] = values
    return found


def read_instructions(path: str | Path) -> dict[str, str]:
    """{id: instruction} of instructions.parquet, in table order."""
    return {r["id"]: r["instruction"] for r in read_table(path, ["id", "instruction"])}


def check_instruction_ids(ids: Iterable[str], known: Container[str], table: str | Path,
                          instructions: str | Path, rerun: str) -> None:
    """Every instruction_id of `table` names an instruction of `instructions` (else the
    table is from an older run: `rerun` is the step that writes it)."""
    for iid in ids:
        if iid not in known:
            raise LongctxError(f"{table}: instruction_id {iid!r} is not in {instructions} "
                               f"(rerun {rerun})")


def read_documents(docs_path: str | Path, ids: list[str] | None = None) -> dict[str, dict]:
    """Documents by id ({"title", "text", "n_tokens"}); only `ids` when given."""
    import polars as pl

    docs_path = Path(docs_path)
    columns = ["id", "title", "text", "n_tokens"]
    if not docs_path.is_file():
        raise LongctxError(f"{docs_path}: documents file not found")
    frame = pl.scan_parquet(docs_path).select(columns)
    if ids is not None:
        frame = frame.filter(pl.col("id").is_in(list(dict.fromkeys(ids))))
    try:
        rows = frame.collect().to_dicts()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise LongctxError(f"{docs_path}: cannot read documents ({one_line(exc)})") from None
    found = {row.pop("id"): row for row in rows}
    if ids is not None:
        missing = [i for i in dict.fromkeys(ids) if i not in found]
        if missing:
            raise LongctxError(f"{docs_path}: no document with id {missing[0]!r} "
                               f"({len(missing)} missing); rerun the steps after corpus")
    return found


@contextmanager
def open_llm(cfg: LLMConfig, base_model_dir: str | Path, job: str) -> Iterator[LLM]:
    """The configured generator behind the call cache of `job` (a file of its own:
    $LONGCTX_CACHE/llm/<job>.sqlite); logs the job's call totals."""
    llm = make_llm(cfg, Path(base_model_dir), repro.cache_root() / "llm" / f"{job}.sqlite")
    try:
        yield llm
    finally:
        t = llm.total
        log.info("llm total: %d calls, %d cached, %d generated, %d output tokens in %.1fs "
                 "(%.2f prompts/s, %.1f tokens/s)", t.calls, t.hits, t.misses,
                 t.completion_tokens, t.seconds, t.misses / max(t.seconds, 1e-9),
                 t.completion_tokens / max(t.seconds, 1e-9))
        llm.close()


def mean_max(values: list[int]) -> dict[str, float]:
    """{mean (2 decimals), max} of token counts; zeros for none, so stats files compare."""
    return {"mean": round(sum(values) / len(values), 2) if values else 0.0,
            "max": max(values, default=0)}


def count_reasons(reasons: list[str | None], known: tuple[str, ...]) -> dict[str, int]:
    """{reason: n} over every known reason (zeros included, so stats files compare)."""
    counts = dict.fromkeys(known, 0)
    for reason in reasons:
        if reason is not None:
            counts[reason] += 1
    return counts
