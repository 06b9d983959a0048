"""The call cache behind `LLM`: reruns are free, kills lose no finished batch, and a resumed
run returns exactly what an uninterrupted run would."""

import sqlite3

import pytest
from llm_data import PROMPTS, Killed, build_tiny_chat_model, complete, kill_on_call, user

from longctx.llm import LLM, CallCache, Sampling
from longctx.llm.cache import call_key
from longctx.llm.client import plan_batches
from longctx.llm.hf import HFBackend

CHATS = [user(p) for p in PROMPTS] + [user(f"question number {i}") for i in range(5)]  # 13
GREEDY = Sampling(max_new_tokens=6)
SAMPLED = Sampling(max_new_tokens=6, temperature=1.0, seed=7)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    return HFBackend(build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat"))


def make(backend, path, batch_size=4):
    return LLM(backend, CallCache(path), batch_size=batch_size)




def test_second_call_is_all_hits_with_identical_completions(backend, tmp_path):
    llm = make(backend, tmp_path / "c.sqlite")
    first = llm.chat(CHATS, GREEDY, "t/1", desc="test")
    assert (llm.last.hits, llm.last.misses, llm.last.batches) == (0, 13, 4)
    again = make(backend, tmp_path / "c.sqlite")  # a new process: the file is the memory
    assert again.chat(CHATS, GREEDY, "t/1") == first
    assert (again.last.hits, again.last.misses, again.last.batches) == (13, 0, 0)


def test_results_come_back_in_input_order(backend, tmp_path):
    llm = make(backend, tmp_path / "c.sqlite", batch_size=3)
    outs = llm.chat(CHATS, GREEDY, "t/1")
    alone = [complete(backend, [c], GREEDY)[0] for c in CHATS]
    assert [o.prompt_tokens for o in outs] == [a.prompt_tokens for a in alone]
    assert outs == alone


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_killed_run_resumes_with_only_unfinished_batches(backend, tmp_path, monkeypatch,
                                                         sampling):
    reference = make(backend, tmp_path / "ref.sqlite").chat(CHATS, sampling, "t/1")

    path = tmp_path / "killed.sqlite"
    calls = kill_on_call(monkeypatch, backend, 2)
    with pytest.raises(Killed):
        make(backend, path).chat(CHATS, sampling, "t/1")
    assert len(CallCache(path)) == 4  # batch 1 stored whole, batch 2 not at all
    monkeypatch.undo()

    resumed = make(backend, path)
    calls = kill_on_call(monkeypatch, backend, 0)  # counts calls, never kills
    outs = resumed.chat(CHATS, sampling, "t/1")
    assert calls == [4, 4, 1]  # batches 2..4 generated; batch 1 came from the cache
    assert (resumed.last.hits, resumed.last.misses) == (4, 9)
    assert outs == reference


def test_what_changes_the_output_changes_the_key(backend, tmp_path):
    llm = make(backend, tmp_path / "c.sqlite")
    llm.chat(CHATS[:4], GREEDY, "t/1")
    llm.chat(CHATS[:4], SAMPLED, "t/1")
    variants = [
        (GREEDY, "t/2"),  # prompt template changed
        (Sampling(max_new_tokens=7), "t/1"),
        (Sampling(max_new_tokens=6, temperature=0.5, seed=7), "t/1"),
        (Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7), "t/1"),
        (Sampling(max_new_tokens=6, temperature=1.0, seed=8), "t/1"),  # seed
    ]
    for sampling, version in variants:
        llm.chat(CHATS[:4], sampling, version)
        assert (llm.last.hits, llm.last.misses) == (0, 4), (sampling, version)
    # greedy decoding ignores seed and top_p, so they do not invalidate greedy work
    llm.chat(CHATS[:4], Sampling(max_new_tokens=6, top_p=0.5, seed=99), "t/1")
    assert (llm.last.hits, llm.last.misses) == (4, 0)


def test_only_uncached_calls_are_generated_and_equal_an_uncached_run(backend, tmp_path,
                                                                    monkeypatch):
    """Each call is looked up by itself: a batch that is partly cached generates only its
    missing calls, in a batch of their own, and (a call's output being its own) they come out
    exactly as in the run that made them among other batch-mates, greedy and sampled."""
    path = tmp_path / "c.sqlite"
    for sampling in (GREEDY, SAMPLED):
        full = make(backend, path).chat(CHATS, sampling, "t/1")
        keys = [call_key(backend.identity, backend.render(c), sampling, "t/1") for c in CHATS]
        lengths = backend.prompt_tokens([backend.render(c) for c in CHATS])
        second = [keys[i] for i in plan_batches(lengths, keys, 4)[1]]
        with sqlite3.connect(path) as db:  # forget half of the second batch
            db.executemany("DELETE FROM calls WHERE key = ?", [(k,) for k in second[:2]])
        llm = make(backend, path)
        calls = kill_on_call(monkeypatch, backend, 0)  # counts calls, never kills
        assert llm.chat(CHATS, sampling, "t/1") == full
        monkeypatch.undo()
        assert (llm.last.hits, llm.last.misses, calls) == (11, 2, [2])


def test_duplicate_requests_are_made_once(backend, tmp_path):
    llm = make(backend, tmp_path / "c.sqlite")
    outs = llm.chat([CHATS[0], CHATS[1], CHATS[0]], GREEDY, "t/1")
    assert outs[0] == outs[2]
    assert llm.last.calls == 2 and llm.last.misses == 2


def test_a_prompt_too_long_fails_before_any_work(tmp_path, monkeypatch):
    small = HFBackend(build_tiny_chat_model(tmp_path / "small", max_positions=64))
    calls = kill_on_call(monkeypatch, small, 0)
    llm = make(small, tmp_path / "c.sqlite")
    from longctx.errors import LongctxError

    with pytest.raises(LongctxError, match="prompt 2 has"):
        llm.chat([user("a"), user("b"), user("x" * 80)], GREEDY, "t/1")
    assert calls == []


def test_plan_is_length_sorted_and_deterministic():
    lengths, keys = [5, 1, 3, 1, 9], ["e", "b", "c", "a", "d"]
    assert plan_batches(lengths, keys, 2) == [[3, 1], [2, 0], [4]]
