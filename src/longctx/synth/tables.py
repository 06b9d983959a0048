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

import pyarrow as pa
import pyarrow.compute as pc
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


class SortedIds(Sequence):
    """Document ids in sorted order, held as one Arrow string array (~20 bytes an id, where
    a list of Python strings holds ~70: 10M ids are 200 MB, not 700): what seeded draws
    (random.choice, random.sample) index into, one id at a time."""

    def __init__(self, ids: pa.Array) -> None:
        self.ids = ids.take(pc.sort_indices(ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not isinstance(i, int):
            raise TypeError(f"SortedIds takes one position, not {type(i).__name__}")
        return self.ids[i].as_py()


def document_ids(docs_path: str | Path,
                 tokens: tuple[int, int] | None = None) -> SortedIds:
    """The ids of the documents (of `tokens` = (min, max) tokens), sorted: the corpus' ids
    and lengths only, never its texts. Duplicate ids are refused."""
    columns = ["id"] if tokens is None else ["id", "n_tokens"]
    table = open_table(docs_path, columns, made_by="corpus").read(columns=columns)
    ids = table["id"]
    if tokens is not None:
        n = table["n_tokens"]
        ids = ids.filter(pc.and_(pc.greater_equal(n, tokens[0]), pc.less_equal(n, tokens[1])))
    ids = SortedIds(ids.combine_chunks())
    sorted_ids = ids.ids  # equal neighbours once sorted (a hash set of 10M ids is GBs)
    if len(ids) > 1 and pc.any(pc.equal(sorted_ids[1:], sorted_ids[:-1])).as_py():
        raise LongctxError(f"{docs_path}: duplicate document ids (rerun corpus)")
    return ids


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
