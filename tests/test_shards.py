"""Scatter/gather: shards split the ids between them, and the gather takes only every part of
one split, made with the params it is given, back into the step's order."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx.config import ShardsConfig
from longctx.errors import LongctxError
from longctx.parts import PART_KEY, read_parts, write_part
from longctx.shards import SPLITS, Shard, check_count, names, shard_of

SCHEMA = pa.schema([("instruction_id", pa.string()), ("value", pa.int64())])
IDS = [f"{i:016x}" for i in range(0, 4000, 7)]  # 572 ids


def test_every_id_belongs_to_exactly_one_shard_and_shards_share_the_work():
    for count in (1, 2, 3, 8):
        shards = [Shard(n, count) for n in range(1, count + 1)]
        owners = [[s.number for s in shards if s.owns(i)] for i in IDS]
        assert all(len(o) == 1 for o in owners)
        sizes = [sum(o == [s.number] for o in owners) for s in shards]
        assert min(sizes) > 0.7 * len(IDS) / count  # a hash, not a range: balanced
    assert [shard_of(i, 3) for i in IDS[:50]] == [shard_of(i, 3) for i in IDS[:50]]


def test_shard_names_are_snakemakes_and_bad_ones_are_refused():
    assert names(3) == ["1-of-3", "2-of-3", "3-of-3"]
    assert Shard.parse("2-of-3") == Shard(2, 3) and Shard(2, 3).name == "2-of-3"
    with pytest.raises(LongctxError, match="expected N-of-M"):
        Shard.parse("2/3")
    with pytest.raises(LongctxError, match="between 1 and 3"):
        Shard.parse("4-of-3")


def test_more_shards_than_work_is_refused_naming_the_key():
    check_count(Shard(1, 3), 3, "respond")
    with pytest.raises(LongctxError, match=r"shards\.respond=4 is more than the 3 instructions"):
        check_count(Shard(1, 4), 3, "respond")


def split(tmp_path, count, ids=IDS, params="p1", context=None, counters=None):
    """Rows (id, position in ids) written as `count` parts; returns their paths."""
    paths = []
    for number in range(1, count + 1):
        shard = Shard(number, count)
        rows = [{"instruction_id": i, "value": k} for k, i in enumerate(ids) if shard.owns(i)]
        path = tmp_path / f"{shard.name}.parquet"
        write_part(path, rows, SCHEMA, shard, params=params, context=context or {"m": 1},
                   counters=counters or {"n": len(rows)})
        paths.append(path)
    return paths


def test_gather_puts_rows_back_in_the_steps_order_and_sums_counters(tmp_path):
    order = IDS[::-1]
    for count in (1, 3):
        got = read_parts(split(tmp_path / str(count), count), SCHEMA, "p1",
                         key="instruction_id", order=order, rerun="respond")
        assert [r["instruction_id"] for r in got.rows] == order
        assert got.counters == {"n": len(IDS)} and got.context == {"m": 1}
    by_key = read_parts(split(tmp_path / "k", 3), SCHEMA, "p1", key="instruction_id",
                        order=None, rerun="respond")
    assert [r["instruction_id"] for r in by_key.rows] == sorted(IDS)


def test_a_part_file_carries_its_shard_in_its_own_metadata(tmp_path):
    (path, _) = split(tmp_path, 2)
    assert b'"shard":[1,2]' in pq.read_schema(path).metadata[PART_KEY]


@pytest.mark.parametrize("problem", ["missing", "twice", "other split", "other params",
                                     "other context", "stray id", "not a part"])
def test_gather_refuses_what_is_not_one_whole_split(tmp_path, problem):
    parts = split(tmp_path / "a", 3)
    order = IDS
    if problem == "missing":
        parts = parts[:2]
    elif problem == "twice":
        parts = [parts[0], parts[0], parts[2]]
    elif problem == "other split":
        parts = [*parts[:2], split(tmp_path / "b", 4)[2]]
    elif problem == "other params":
        parts = [*parts[:2], split(tmp_path / "b", 3, params="p2")[2]]
    elif problem == "other context":
        parts = [*parts[:2], split(tmp_path / "b", 3, context={"m": 2})[2]]
    elif problem == "stray id":
        order = IDS[1:]
    else:
        pq.write_table(SCHEMA.empty_table(), parts[1])
    messages = {"missing": "not every shard of one split", "twice": "not every shard",
                "other split": "not every shard", "other params": "made with other params",
                "other context": "another model, sampling or template",
                "stray id": "not among the ids", "not a part": "not a shard part"}
    with pytest.raises(LongctxError, match=messages[problem]):
        read_parts(parts, SCHEMA, "p1", key="instruction_id", order=order, rerun="respond")


def test_every_shards_key_says_what_it_splits():
    assert set(SPLITS) == set(ShardsConfig.model_fields) - {"default"}
