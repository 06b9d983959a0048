"""pack's token spill: samples' tokens on disk while packing, read back the same."""

import numpy as np
import pytest

from longctx.pack.spill import Spill, spill_beside
from longctx.sequences import Tokenized


def sample(i: int, n: int) -> Tokenized:
    rng = np.random.default_rng(i)
    return Tokenized(f"s{i}", rng.integers(0, 2**31 - 1, n, dtype=np.int32), rng.random(n) < 0.3)


def test_samples_read_back_whole_in_any_order(tmp_path):
    made = [sample(i, n) for i, n in enumerate([5, 1, 300, 0, 77, 2])]
    with spill_beside(tmp_path / "out" / "sequences.parquet") as spill:
        handles = [spill.add(s) for s in made]
        assert [(h.id, len(h), h.learnt) for h in handles] == [
            (s.id, len(s), int(s.learn.sum())) for s in made]
        for i in [4, 0, 2, 3, 5, 1, 2]:
            back = spill.load(handles[i])
            assert back.id == made[i].id
            assert back.ids.dtype == np.int32 and back.learn.dtype == np.bool_
            np.testing.assert_array_equal(back.ids, made[i].ids)
            np.testing.assert_array_equal(back.learn, made[i].learn)
        with pytest.raises(RuntimeError, match="after load"):
            spill.add(made[0])
    assert not (tmp_path / "out").exists()  # the spill and the parent it made are gone


def test_a_killed_runs_spill_is_cleared_and_a_failed_one_leaves_nothing(tmp_path):
    out = tmp_path / "sequences.parquet"
    stale = tmp_path / "sequences.parquet.spill"
    stale.mkdir()
    (stale / "ids.int32").write_bytes(b"\x01" * 40)  # a killed pack's tokens
    with pytest.raises(ValueError, match="boom"), spill_beside(out) as spill:
        handle = spill.add(sample(1, 3))
        assert handle.start == 0  # the stale tokens are not in front
        np.testing.assert_array_equal(spill.load(handle).ids, sample(1, 3).ids)
        raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_sample_whose_flags_disagree_is_refused(tmp_path):
    spill = Spill(tmp_path)
    bad = Tokenized("x", np.zeros(3, np.int32), np.zeros(2, np.bool_))
    with pytest.raises(ValueError, match="sample x: 3 ids but 2 learn flags"):
        spill.add(bad)
    spill.close()
