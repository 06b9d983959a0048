"""The sequences file, the contract between the pack step and training.

`data/pack/stage-<k>/sequences.parquet` holds one row per training sequence: its kind, token
ids, a learn flag per token (whether training learns to produce that token), and the length
and id of every sample packed into it, in order. Sequence i sits in row i, ROW_GROUP rows per
row group, so a reader holds one group in memory however long the file is. pack writes it
(`SequenceWriter`), training and `longctx pack-show` read it (`SequenceTable`); this module
imports nothing heavier than pyarrow and numpy, so a change to how pack makes samples never
reaches the training step's code inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx import repro
from longctx.errors import LongctxError
from longctx.parquet import open_table

ROW_GROUP = 64  # sequences per parquet row group: a reader fetches one sequence cheaply
SCHEMA = pa.schema([
    ("sequence", pa.int32()), ("kind", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("learn", pa.list_(pa.bool_())), ("sample_lengths", pa.list_(pa.int32())),
    ("sample_ids", pa.list_(pa.string())),
])


@dataclass
class Tokenized:
    """One sample: token ids and per-token learn flags (numpy, compact at 1M-token lengths)."""

    id: str
    ids: np.ndarray  # int32
    learn: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.ids)


# --------------------------------------------------------------------------- writing


def write_sequences(path: str | Path, rows: Iterable[tuple[str, list[Tokenized]]]) -> None:
    """sequences.parquet atomically from (kind, samples) rows, in order, as they come."""
    rows, start = iter(rows), 0
    with repro.atomic_path(path) as tmp, \
            pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        for group in iter(lambda: list(islice(rows, ROW_GROUP)), []):  # ROW_GROUP at a time
            writer.write_table(_batch(group, start), row_group_size=ROW_GROUP)
            start += len(group)


def _batch(rows: list[tuple[str, list[Tokenized]]], start: int) -> pa.Table:
    lengths = [sum(len(s) for s in samples) for _, samples in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = np.concatenate([s.ids for _, samples in rows for s in samples]).astype(np.int32)
    learn = np.concatenate([s.learn for _, samples in rows for s in samples]).astype(bool)
    return pa.Table.from_arrays([
        pa.array(range(start, start + len(rows)), pa.int32()),
        pa.array([kind for kind, _ in rows], pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(learn, pa.bool_())),
        pa.array([[len(s) for s in samples] for _, samples in rows], pa.list_(pa.int32())),
        pa.array([[s.id for s in samples] for _, samples in rows], pa.list_(pa.string())),
    ], schema=SCHEMA)


# --------------------------------------------------------------------------- reading


class Sequence(NamedTuple):
    input_ids: list[int]
    learn: list[bool]
    sample_lengths: list[int]
    kind: str


class SequenceTable:
    """sequences.parquet by index, one row group in memory at a time (training reads the
    rows in order, so consecutive reads hit the cached group)."""

    COLUMNS = SCHEMA.names

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open_table(self.path, self.COLUMNS, made_by="the pack step")
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(g).num_rows
                                        for g in range(meta.num_row_groups)])
        self._cached: tuple[int, dict[str, list]] | None = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _row(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"{self.path}: no sequence {i} (it has {len(self)})")
        group = int(np.searchsorted(self._starts, i, side="right")) - 1
        if self._cached is None or self._cached[0] != group:
            table = self._file.read_row_group(group, columns=self.COLUMNS)
            self._cached = (group, table.to_pydict())
        data = self._cached[1]
        row = {c: data[c][i - int(self._starts[group])] for c in self.COLUMNS}
        _check_row(row, i, f"{self.path}: sequence {i}")
        return row

    def __getitem__(self, i: int) -> Sequence:
        row = self._row(i)
        return Sequence(row["input_ids"], row["learn"], row["sample_lengths"], row["kind"])

    def __iter__(self) -> Iterator[Sequence]:
        return (self[i] for i in range(len(self)))

    def _sample_lengths(self) -> list[list[int]]:
        return self._file.read(columns=["sample_lengths"])["sample_lengths"].to_pylist()

    def longest(self) -> int:
        """Tokens of the longest sequence, from the small sample_lengths column alone."""
        return max(map(sum, self._sample_lengths()), default=0)

    def most_samples(self) -> int:
        """Samples in the most packed sequence (1: every sequence holds one sample)."""
        return max(map(len, self._sample_lengths()), default=0)

    def sample_ids(self, i: int) -> list[str]:
        return self._row(i)["sample_ids"]

    def targets(self, indices: Iterable[int]) -> tuple[int, int]:
        """(target tokens, tokens) of the sequences `indices`: every learnt token but each
        sample's first (nothing before it in the sample predicts it), and every token. What
        a training step divides its loss by, counted here by every process alike."""
        learnt = tokens = 0
        for i in indices:
            row = self._row(i)
            learn = np.asarray(row["learn"], dtype=bool)
            starts = np.cumsum([0] + row["sample_lengths"][:-1])
            learnt += int(learn.sum()) - int(learn[starts].sum())
            tokens += len(learn)
        return learnt, tokens


def _check_row(row: dict[str, Any], i: int, where: str) -> None:
    if row["sequence"] != i:
        raise LongctxError(f"{where}: row holds sequence {row['sequence']}")
    n = len(row["input_ids"])
    if len(row["learn"]) != n or sum(row["sample_lengths"]) != n \
            or len(row["sample_ids"]) != len(row["sample_lengths"]) \
            or min(row["sample_lengths"], default=0) < 1:
        raise LongctxError(f"{where}: {n} tokens, {len(row['learn'])} learn flags, sample "
                           f"lengths {row['sample_lengths'][:8]} and "
                           f"{len(row['sample_ids'])} sample ids disagree")


def read_sequences(path: str | Path) -> SequenceTable:
    return SequenceTable(path)
