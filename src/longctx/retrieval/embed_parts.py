"""The embeddings directory, and the part directories its shard jobs hand the gather.

The corpus is embedded in files of `embed.shard_size` consecutive documents (the unit of
resume and of batching: a file's texts are always batched together, so its bytes do not
depend on how the work is split). `shards.embed` jobs each own a contiguous range of those
files (`file_range`) and write a part directory: the files, named by their place in the
whole corpus, the rows they hold (one parquet row group per file) and `part.json`, the
part's shard, params fingerprint and context (model, layout, corpus). The gather checks the
parts are one whole split made with these params (longctx.parts) and assembles
`data/embeddings`: the files linked, not copied, and rows.parquet streamed one file's rows
at a time, so neither the gather nor a shard job holds the corpus's vectors or rows. The
result is the same bytes for 1 shard and for N.

`data/embeddings` holds the vector files, rows.parquet (embedding row -> document id,
passage, token range) and manifest.json; longctx.retrieval.index reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from longctx.config import EmbedConfig
from longctx.errors import LongctxError
from longctx.parts import check_made_with, check_split
from longctx.repro import atomic_path, fingerprint, sha256_file, write_json
from longctx.shards import Shard

FORMAT = "longctx-embeddings/1"
ROWS_FILE = "rows.parquet"
MANIFEST = "manifest.json"
PART_FILE = "part.json"
RERUN = "embed"
PART_ROWS = pa.schema([("doc_id", pa.string()), ("passage", pa.int32()),
                       ("token_start", pa.int32()), ("n_tokens", pa.int32())])
ROWS = pa.schema([("row", pa.int64()), *PART_ROWS])


def embed_params(cfg: EmbedConfig) -> str:
    """What an embed part is checked against at gather: the embed section its rules pass."""
    return fingerprint(cfg.model_dump(mode="json"))


def shard_name(i: int) -> str:
    """Vector file i of the corpus (documents i*shard_size onwards)."""
    return f"shard-{i:05d}.npy"


def vector_files(documents: int, cfg: EmbedConfig) -> int:
    """How many vector files a corpus of `documents` makes: one per embed.shard_size
    documents, the last one partial (what shards.embed splits)."""
    return -(-documents // cfg.shard_size)


def file_range(files: int, shard: Shard) -> range:
    """The vector files shard `shard` owns: a contiguous 1/count of them, in corpus order."""
    return range((shard.number - 1) * files // shard.count, shard.number * files // shard.count)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- a shard's part


class PartWriter:
    """Adds vector files and their rows to a part directory being written (`write_part`)."""

    def __init__(self, root: Path, info: dict) -> None:
        self.root, self.info = root, info
        self.rows = pq.ParquetWriter(root / ROWS_FILE, PART_ROWS)

    def add(self, index: int, vectors: Path, rows: dict[str, list], documents: int) -> None:
        """Vector file `index` of the corpus (already written, e.g. in the cache), its rows."""
        name = shard_name(index)
        link_or_copy(vectors, self.root / name)
        table = pa.Table.from_pydict(rows, schema=PART_ROWS)
        self.rows.write_table(table, row_group_size=max(1, table.num_rows))
        self.info["files"].append({"file": name, "rows": table.num_rows,
                                   "documents": documents,
                                   "sha256": sha256_file(self.root / name)})


@contextlib.contextmanager
def write_part(part: Path, shard: Shard, params: str, context: dict) -> Iterator[PartWriter]:
    """A part directory, file by file; it appears whole when the block ends (a killed job
    leaves no part, and the files it finished stay in the embed cache)."""
    info = {"shard": [shard.number, shard.count], "params": params, "context": context,
            "files": []}
    with atomic_path(Path(part)) as tmp:
        tmp.mkdir()
        writer = PartWriter(tmp, info)
        try:
            yield writer
        finally:
            writer.rows.close()
        write_json(tmp / PART_FILE, info)


@dataclass(frozen=True)
class Part:
    root: Path
    info: dict

    @property
    def files(self) -> list[dict]:
        return self.info["files"]


def read_part(root: Path, params: str) -> Part:
    path = Path(root) / PART_FILE
    if not path.is_file():
        raise LongctxError(f"{root}: not an embeddings part (no {PART_FILE}); rerun {RERUN}")
    info = json.loads(path.read_text(encoding="utf-8"))
    check_made_with(root, info, params, RERUN)
    return Part(Path(root), info)


def read_parts(roots: list[str | Path], params: str) -> list[Part]:
    """Every part of one split, checked, in shard order, their files following each other."""
    parts = sorted((read_part(Path(r), params) for r in roots),
                   key=lambda p: p.info["shard"][0])
    check_split([p.root for p in parts], [p.info for p in parts], RERUN)
    expected = 0
    for part in parts:
        names = [f["file"] for f in part.files]
        if names != [shard_name(i) for i in range(expected, expected + len(names))]:
            raise LongctxError(f"{part.root}: its files do not follow the previous part's "
                               f"(expected {shard_name(expected)} first); rerun {RERUN}")
        expected += len(names)
    return parts


# --------------------------------------------------------------------------- the gather


def gather_embeddings(*, params: str, parts: list[str | Path], embeddings: str | Path) -> dict:
    """`embeddings` (vector files, rows.parquet, manifest.json) from every shard's part;
    returns the manifest written."""
    checked = read_parts(parts, params)
    context = checked[0].info["context"]
    files = [(part, entry) for part in checked for entry in part.files]
    with atomic_path(Path(embeddings)) as tmp:
        tmp.mkdir()
        for part, entry in files:
            link_or_copy(part.root / entry["file"], tmp / entry["file"])
        rows = _write_rows(checked, tmp / ROWS_FILE)
        manifest = {
            "format": FORMAT, **context,
            "documents": sum(entry["documents"] for _, entry in files), "rows": rows,
            "shards": [{k: entry[k] for k in ("file", "rows", "sha256")} for _, entry in files],
            "rows_file": {"file": ROWS_FILE, "sha256": sha256_file(tmp / ROWS_FILE)},
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _write_rows(parts: list[Part], path: Path) -> int:
    """rows.parquet: every part's rows with their global row number, one row group per
    vector file (whatever the split), one row group in memory at a time."""
    start = 0
    with pq.ParquetWriter(path, ROWS) as writer:
        for part in parts:
            table = pq.ParquetFile(part.root / ROWS_FILE)
            for group in range(table.num_row_groups):
                rows = table.read_row_group(group)
                number = pa.array(np.arange(start, start + rows.num_rows, dtype=np.int64))
                writer.write_table(rows.add_column(0, "row", number).cast(ROWS),
                                   row_group_size=max(1, rows.num_rows))
                start += rows.num_rows
    return start
