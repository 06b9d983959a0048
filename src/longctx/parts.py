"""The part file: what one shard job of a sharded step (longctx.shards) hands its gather.

A part is a parquet table of the shard's rows, in the step's own schema, with what the gather
must check in its schema metadata: which shard of how many it is, a fingerprint of the params
it was made with, the context every part shares (sampling, model, template) and additive
counters. The gather refuses parts that are not every shard of one split, or that were made
with other params, and puts the rows back in the step's own order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from longctx import repro
from longctx.errors import LongctxError
from longctx.parquet import open_table
from longctx.shards import Shard

PART_KEY = b"longctx.part"


def write_part(path: str | Path, rows: list[dict[str, Any]], schema: pa.Schema, shard: Shard,
               *, params: str, context: dict[str, Any],
               counters: dict[str, int] | None = None) -> None:
    """One shard's rows and what its gather checks, atomically."""
    info = {"shard": [shard.number, shard.count], "params": params, "context": context,
            "counters": counters or {}}
    columns = {name: [row[name] for row in rows] for name in schema.names}
    table = pa.Table.from_pydict(columns, schema=schema)
    table = table.replace_schema_metadata({PART_KEY: repro.canonical_json(info).encode()})
    with repro.atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


@dataclass
class Gathered:
    rows: list[dict[str, Any]]  # every part's rows, in the step's order
    context: dict[str, Any]  # what every part shares
    counters: dict[str, int]  # summed over the parts


def read_parts(paths: list[str | Path], schema: pa.Schema, params: str, *, key: str,
               order: list[str] | list[int] | None, rerun: str) -> Gathered:
    """Every part of one step, checked (all shards of one split, made with these `params`,
    sharing one context) and merged: rows ordered by the position of their `key` in `order`
    (the step's own order; None: by key), a shard's rows kept in its order."""
    tables, infos = [], []
    for path in paths:
        table = open_table(path, schema.names, made_by=rerun).read(columns=schema.names)
        infos.append(_part_info(path, pq.read_schema(path).metadata, params, rerun))
        tables.append(table)
    check_split(paths, infos, rerun)
    merged = pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()
    if order is None:
        order = sorted(set(merged.column(key).to_pylist()))
    position = pc.index_in(merged.column(key), value_set=pa.array(order, schema.field(key).type))
    if position.null_count:
        stray = merged.column(key).filter(pc.is_null(position))[0].as_py()
        raise LongctxError(f"{rerun} parts: {key} {stray!r} is not among the ids this gather "
                           f"orders by (a part from older inputs: rerun {rerun})")
    rows = merged.take(pc.sort_indices(position)).to_pylist()  # a stable sort
    counters: dict[str, int] = {}
    for info in infos:
        for name, value in info["counters"].items():
            counters[name] = counters.get(name, 0) + value
    return Gathered(rows, infos[0]["context"] if infos else {}, counters)


def _part_info(path: str | Path, metadata: dict | None, params: str, rerun: str) -> dict:
    raw = (metadata or {}).get(PART_KEY)
    if raw is None:
        raise LongctxError(f"{path}: not a shard part (no {PART_KEY.decode()} metadata); "
                           f"rerun {rerun}")
    info = json.loads(raw)
    check_made_with(path, info, params, rerun)
    return info


def check_made_with(path: str | Path, info: dict, params: str, rerun: str) -> None:
    """A part made with other params than the gather's is stale: refused, naming the shard."""
    if info["params"] != params:
        raise LongctxError(f"{path}: made with other params than params.yaml's; rerun {rerun} "
                           f"for shard {info['shard'][0]}-of-{info['shard'][1]}")


def check_split(paths: list[str | Path], infos: list[dict], rerun: str) -> None:
    """The parts are shards 1..N of one N-way split, each once, and agree on their context."""
    counts = {info["shard"][1] for info in infos}
    numbers = sorted(info["shard"][0] for info in infos)
    if len(counts) != 1 or numbers != list(range(1, len(infos) + 1)) or counts != {len(infos)}:
        found = ", ".join(f"{i['shard'][0]}-of-{i['shard'][1]}" for i in infos)
        raise LongctxError(f"{rerun}: the parts given ({found or 'none'}) are not every shard "
                           f"of one split; rerun {rerun} for the missing shards")
    for path, info in zip(paths[1:], infos[1:]):
        if info["context"] != infos[0]["context"]:
            raise LongctxError(f"{path}: made with another model, sampling or template than "
                               f"{paths[0]}; rerun {rerun}")
