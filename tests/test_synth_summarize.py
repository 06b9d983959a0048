"""Rule `summarize`: query-focused summaries of every chunk, merged level by level until an
instruction's summaries fit the budget; resumable after a kill with identical output."""

import json
import re

import polars as pl
import pyarrow.parquet as pq
import pytest
from llm_data import Killed, build_tiny_chat_model, kill_on_call
from retrieval_data import doc_id, write_docs
from synth_data import run_sharded, scripted_llm, words

from longctx.config import SummarizeConfig
from longctx.errors import LongctxError
from longctx.llm import LLM, CallCache
from longctx.llm.base import derive_seed
from longctx.synth.prompts import VERSIONS
from longctx.synth.summarize import SCHEMA, gather_summaries, summarize
from longctx.tokens import split_chunks

SEED = 7


def two_chunks(tag: str) -> str:
    """16 words in two 8-word paragraphs: two chunks at chunk_tokens=12."""
    return f"{tag}a one two three four five six seven.\n\n{tag}b one two three four five six."


def parse(message: str) -> tuple[str, list[str]]:
    """('qfs', [chunk]) or ('merge', notes) from a prompt's user message."""
    if "Document excerpt:" in message:
        return "qfs", [message.split('"""\n', 1)[1].split('\n"""', 1)[0]]
    notes = message.split("documents:\n", 1)[1].split("\n\nCombine", 1)[0]
    return "merge", notes.split("\n\n")


def reply(message: str) -> str:
    """5-word summaries; chunks saying 'irrelevant' / 'blank' / 'cutoff' script bad answers."""
    kind, parts = parse(message)
    if kind == "merge":
        return f"merged {len(parts)} notes here ok"
    chunk = parts[0]
    if "irrelevant" in chunk:
        return ' "Nothing relevant." '
    if "blank" in chunk:
        return "  \n"
    if "cutoff" in chunk:
        return f"about {chunk.split()[0]} was cut\x00"
    if "looping" in chunk:
        return "The excerpt is: " * 12
    return f"about {chunk.split()[0]} a b c"


def write_inputs(root, instructions, docs, ranking, extra_retrieved=()):
    """instructions.parquet, retrieved.parquet (ranking: doc indices per instruction) and
    docs.parquet under `root`; returns the three paths."""
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"{i:016x}" for i in range(len(instructions))]
    pl.DataFrame({"id": ids, "instruction": instructions}).write_parquet(root / "inst.parquet")
    retrieved_ids = ids[:len(ranking)] + list(extra_retrieved)
    ranked = [[doc_id(d) for d in r] for r in ranking] + [[] for _ in extra_retrieved]
    pl.DataFrame({"instruction_id": retrieved_ids, "doc_ids": ranked,
                  "scores": [[1.0] * len(r) for r in ranked]},
                 schema={"instruction_id": pl.String, "doc_ids": pl.List(pl.String),
                         "scores": pl.List(pl.Float32)}).write_parquet(root / "ret.parquet")
    write_docs(root / "docs.parquet", docs)
    return {"instructions": root / "inst.parquet", "retrieved": root / "ret.parquet",
            "docs": root / "docs.parquet"}


def run(cfg, llm, inputs, out_dir, seed=SEED, shards=1):
    stats = run_sharded(summarize, gather_summaries, cfg, llm, seed, shards=shards, **inputs,
                        summaries=out_dir / "summaries.parquet",
                        metrics=out_dir / "summaries.json")
    rows = pq.read_table(out_dir / "summaries.parquet").to_pylist()
    assert stats == json.loads((out_dir / "summaries.json").read_text())
    return rows, stats


def outputs(out_dir):
    return [(out_dir / name).read_bytes() for name in ("summaries.parquet", "summaries.json")]


def at(rows, level):
    return [r for r in rows if r["level"] == level]


# A recursion that needs two merge levels: 6 kept chunk summaries of 5 words (30 > 12), merged
# in pairs (5 words + 1 marker each, 12 per group) into 3 (15 > 12), then 2 (5 + carried 5).
RECURSE_DOCS = [two_chunks("p"), "Some irrelevant filler here.", two_chunks("q"), two_chunks("r")]
RECURSE_CFG = SummarizeConfig(chunk_tokens=12, budget_tokens=12, max_new_tokens=16)


@pytest.fixture
def recurse_inputs(tmp_path):
    return write_inputs(tmp_path / "in", ["Compare the facts."], RECURSE_DOCS, [[0, 1, 2, 3]])


def test_irrelevant_blank_and_cut_off_answers(tmp_path):
    docs = ["Alpha facts here.", "Some irrelevant filler.", "A blank page.", "A cutoff story.",
            "A looping model."]
    inputs = write_inputs(tmp_path / "in", ["Tell me everything."], docs, [[0, 1, 2, 3, 4]])
    rows, stats = run(SummarizeConfig(chunk_tokens=50), scripted_llm(reply), inputs, tmp_path)
    assert [(r["doc_id"], r["kept"], r["reason"], r["final"]) for r in rows] == [
        (doc_id(0), True, None, True), (doc_id(1), False, "nothing_relevant", False),
        (doc_id(2), False, "empty", False), (doc_id(3), True, None, True),
        (doc_id(4), False, "repetitive", False)]
    assert rows[0]["summary"] == "about Alpha a b c" and rows[0]["n_tokens"] == 5
    assert rows[3]["finish_reason"] == "length" and stats["truncated"] == 1
    assert stats["per_level"][0]["dropped"] == {"empty": 1, "nothing_relevant": 1,
                                                "repetitive": 1, "over_budget": 0}
    assert (stats["final_summaries"], stats["levels"], stats["summaries"]) == (2, 1, 5)


@pytest.mark.parametrize("answer", [
    "NOTHING RELEVANT", "nothing relevant.", "'Nothing Relevant'",
    "**NOTHING RELEVANT** - the excerpt is about cats",
    "The excerpt is about trains, but it does not contain the information requested.",
    "There is no relevant information in this excerpt.",
    "This excerpt is not relevant to the instruction.",
])
def test_nothing_relevant_answers_in_any_wording_are_dropped(tmp_path, answer):
    inputs = write_inputs(tmp_path / "in", ["Tell me."], ["Some text."], [[0]])
    rows, stats = run(SummarizeConfig(), scripted_llm(lambda m: answer), inputs, tmp_path)
    assert [(r["reason"], r["final"]) for r in rows] == [("nothing_relevant", False)]
    assert stats["instructions_without_summaries"] == 1


def test_a_summary_that_merely_mentions_relevance_is_kept(tmp_path):
    answer = "Trains are relevant to trade: the railway cut freight costs by half."
    inputs = write_inputs(tmp_path / "in", ["Tell me."], ["Some text."], [[0]])
    rows, _ = run(SummarizeConfig(), scripted_llm(lambda m: answer), inputs, tmp_path)
    assert [(r["kept"], r["final"]) for r in rows] == [(True, True)]


def test_documents_are_chunked_and_summarised_in_rank_then_chunk_order(tmp_path):
    long_doc = " ".join(f"Sentence {i} has five words." for i in range(12))  # 60 words
    docs = [long_doc, "Short second document."]
    inputs = write_inputs(tmp_path / "in", ["Summarise them."], docs, [[1, 0]])
    llm = scripted_llm(reply)
    cfg = SummarizeConfig(chunk_tokens=12, budget_tokens=10_000)
    rows, stats = run(cfg, llm, inputs, tmp_path)
    chunks = split_chunks(long_doc, 12, words)
    assert len(chunks) == 6 and all(n <= 12 for n in words(chunks))
    assert [(r["doc_id"], r["chunk"], r["position"]) for r in rows] == \
        [(doc_id(1), 0, 0)] + [(doc_id(0), c, c + 1) for c in range(6)]
    served = [parse(m)[1][0] for m in llm.backend.served]
    assert sorted(served) == sorted(["Short second document."] + [c.strip() for c in chunks])
    assert rows[1]["summary"] == f"about {chunks[0].split()[0]} a b c"
    assert (stats["chunks"], stats["chunk_reads_left_out"], stats["documents"]) == (7, 0, 2)
    texts = {doc_id(i): text for i, text in enumerate(docs)}
    parts = {doc_id(0): chunks, doc_id(1): [docs[1]]}
    for r in rows:  # offsets give back each chunk exactly (what pack rebuilds prompts from)
        assert texts[r["doc_id"]][r["char_start"]:r["char_end"]] == parts[r["doc_id"]][r["chunk"]]
    assert [(r["char_start"], r["char_end"]) for r in rows[1:3]] == \
        [(0, len(chunks[0])), (len(chunks[0]), len(chunks[0]) + len(chunks[1]))]

    capped = SummarizeConfig(chunk_tokens=12, budget_tokens=10_000, max_chunks_per_document=2)
    rows, stats = run(capped, scripted_llm(reply), inputs, tmp_path / "capped")
    assert [(r["doc_id"], r["chunk"]) for r in rows] == [(doc_id(1), 0), (doc_id(0), 0),
                                                         (doc_id(0), 1)]
    assert (stats["chunks"], stats["chunk_reads_left_out"]) == (3, 4)


def test_recursion_merges_until_the_budget_fits(tmp_path, recurse_inputs):
    llm = scripted_llm(reply)
    rows, stats = run(RECURSE_CFG, llm, recurse_inputs, tmp_path)
    assert [r["reason"] for r in at(rows, 0)] == [None, None, "nothing_relevant"] + [None] * 4
    level1, level2 = at(rows, 1), at(rows, 2)
    assert [r["children"] for r in level1] == [[0, 1], [3, 4], [5, 6]]  # position 2 dropped
    assert [r["summary"] for r in level1] == ["merged 2 notes here ok"] * 3
    assert all(r["doc_id"] is None and r["chunk"] is None and r["char_start"] is None
               and r["char_end"] is None for r in level1 + level2)
    assert [(r["children"], r["finish_reason"]) for r in level2] == [([0, 1], "stop"),
                                                                     ([2], "carried")]
    assert level2[1]["summary"] == level1[2]["summary"]
    assert [(r["level"], r["position"]) for r in rows if r["final"]] == [(2, 0), (2, 1)]
    assert sum(r["n_tokens"] for r in rows if r["final"]) <= RECURSE_CFG.budget_tokens
    assert [p["calls"] for p in stats["per_level"]] == [7, 3, 1]
    assert (stats["levels"], stats["carried"], stats["summaries"]) == (3, 1, 12)
    assert stats["final_tokens"] == {"mean": 5.0, "max": 5}


def test_merge_prompts_notes_fit_chunk_tokens(tmp_path, recurse_inputs):
    """Each note's [i] marker counts too, so a merge prompt is never longer than a chunk's."""
    def answer(message):
        merge = parse(message)[0] == "merge"
        return "merged notes ok" if merge else reply(message).replace(" a b", "")

    llm = scripted_llm(answer)
    run(RECURSE_CFG, llm, recurse_inputs, tmp_path)
    notes = [parse(m)[1] for m in llm.backend.served if parse(m)[0] == "merge"]
    assert [len(n) for n in notes] == [3, 3]  # 3-word summaries: 3 x (3 + 1 marker) = 12
    assert all(len("\n\n".join(n).split()) <= RECURSE_CFG.chunk_tokens for n in notes)


def test_max_levels_cuts_the_lowest_ranked_summaries(tmp_path, recurse_inputs):
    cfg = RECURSE_CFG.model_copy(update={"max_levels": 1})
    rows, stats = run(cfg, scripted_llm(reply), recurse_inputs, tmp_path)
    assert [(r["kept"], r["reason"], r["final"]) for r in at(rows, 1)] == [
        (True, None, True), (True, None, True), (False, "over_budget", False)]
    assert sum(r["n_tokens"] for r in rows if r["final"]) <= cfg.budget_tokens
    assert (stats["levels"], stats["over_budget"]) == (2, 1)


def test_no_progress_cuts_at_once(tmp_path, recurse_inputs):
    """7-word summaries cannot be paired within 12 tokens: merging would change nothing."""
    llm = scripted_llm(lambda m: "a long summary of seven words each")
    rows, stats = run(RECURSE_CFG, llm, recurse_inputs, tmp_path)
    assert stats["levels"] == 1 and len(llm.backend.served) == 7
    assert [r["final"] for r in rows] == [True] + [False] * 6
    assert stats["over_budget"] == 6


def test_failed_merges_lose_their_children(tmp_path, recurse_inputs):
    def answer(message):
        return "" if parse(message)[0] == "merge" else reply(message)

    rows, stats = run(RECURSE_CFG, scripted_llm(answer), recurse_inputs, tmp_path)
    assert [r["reason"] for r in at(rows, 1)] == ["empty"] * 3
    assert not any(r["final"] for r in rows)
    assert (stats["failed_merges"], stats["lost_in_failed_merges"]) == (3, 6)
    assert stats["instructions_without_summaries"] == 1


def test_instructions_without_documents_or_relevant_chunks(tmp_path):
    docs = ["Useful facts.", "Some irrelevant text."]
    inputs = write_inputs(tmp_path / "in", ["First task.", "Second task.", "Third task."], docs,
                          [[0, 1], [1]])  # the third instruction has no retrieved row
    rows, stats = run(SummarizeConfig(), scripted_llm(reply), inputs, tmp_path)
    assert [r["instruction_id"] for r in rows] == [f"{0:016x}", f"{0:016x}", f"{1:016x}"]
    assert stats["instructions_without_summaries"] == 2
    assert stats["dropped"]["nothing_relevant"] == 2


def test_window_check_fails_before_any_call(tmp_path, recurse_inputs):
    llm = scripted_llm(reply, context_tokens=100)
    cfg = SummarizeConfig(chunk_tokens=90, max_new_tokens=16)
    with pytest.raises(LongctxError, match=r"summarize\.chunk_tokens: 90 .* 100-token window"):
        run(cfg, llm, recurse_inputs, tmp_path)
    assert llm.backend.served == [] and not (tmp_path / "summaries.parquet").exists()


def test_window_check_is_not_stricter_than_needed(tmp_path):
    """At the smallest window it allows, the longest prompt passes the LLM's own check."""
    doc = " ".join(["word"] * 40)
    inputs = write_inputs(tmp_path / "in", ["Tell me."], [doc], [[0]])
    cfg = SummarizeConfig(chunk_tokens=40, max_new_tokens=16)
    with pytest.raises(LongctxError) as info:
        run(cfg, scripted_llm(reply, context_tokens=60), inputs, tmp_path)
    around = int(re.search(r"\+ (\d+) prompt tokens", str(info.value)).group(1))
    window = 40 + around + 16  # the smallest window chunk_tokens 40 is allowed
    rows, _ = run(cfg, scripted_llm(reply, context_tokens=window), inputs, tmp_path)
    assert len(rows) == 1
    with pytest.raises(LongctxError, match="summarize.chunk_tokens"):
        run(cfg, scripted_llm(reply, context_tokens=window - 1), inputs, tmp_path)


def test_same_seed_same_bytes_one_call_per_level(tmp_path, recurse_inputs):
    cfg = RECURSE_CFG.model_copy(update={"temperature": 0.7, "top_p": 0.9})
    llm = scripted_llm(reply)
    calls = []
    chat = llm.chat

    def spy(chats, sampling, template_version, desc="llm"):
        calls.append((desc, template_version, sampling.seed, len(chats)))
        return chat(chats, sampling, template_version, desc=desc)

    llm.chat = spy
    run(cfg, llm, recurse_inputs, tmp_path / "a")
    assert calls == [
        ("qfs level 0", VERSIONS["qfs"], derive_seed(SEED, "summarize", 0), 7),
        ("merge level 1", VERSIONS["merge"], derive_seed(SEED, "summarize", 1), 3),
        ("merge level 2", VERSIONS["merge"], derive_seed(SEED, "summarize", 2), 1)]
    run(cfg, scripted_llm(reply), recurse_inputs, tmp_path / "b")
    assert outputs(tmp_path / "a") == outputs(tmp_path / "b")


def test_output_schema(tmp_path, recurse_inputs):
    run(RECURSE_CFG, scripted_llm(reply), recurse_inputs, tmp_path)
    assert pq.read_schema(tmp_path / "summaries.parquet").remove_metadata() == SCHEMA


def test_unknown_instruction_in_retrieved_names_the_file(tmp_path):
    inputs = write_inputs(tmp_path / "in", ["Tell me."], ["Text."], [[0]],
                          extra_retrieved=["ffffffffffffffff"])
    with pytest.raises(LongctxError, match=r"ret\.parquet.*'ffffffffffffffff'"):
        run(SummarizeConfig(), scripted_llm(reply), inputs, tmp_path)




def test_killed_run_resumes_from_the_cache_with_identical_output(tmp_path, recurse_inputs,
                                                                 monkeypatch):
    run(RECURSE_CFG, scripted_llm(reply, tmp_path / "ref.sqlite", batch_size=2),
        recurse_inputs, tmp_path / "ref")

    cache, out = tmp_path / "run.sqlite", tmp_path / "run"
    llm = scripted_llm(reply, cache, batch_size=2)
    kill_on_call(monkeypatch, llm.backend, 6)  # level 0: 4 batches; level 1: the 2nd batch
    with pytest.raises(Killed):
        run(RECURSE_CFG, llm, recurse_inputs, out)
    before = list(llm.backend.served)
    assert len(before) == 7 + 2  # level 0 and level 1's first batch, all stored
    assert not out.exists() or not any(out.iterdir())

    again = scripted_llm(reply, cache, batch_size=2)
    run(RECURSE_CFG, again, recurse_inputs, out)
    assert again.total.hits == 9
    assert len(again.backend.served) == 11 - 9  # level 1's last merge + level 2's merge
    assert not set(before) & set(again.backend.served)
    assert outputs(out) == outputs(tmp_path / "ref")


TINY_DOCS = [  # ~140 bytes: 3 chunks each at 60 byte-level tokens
    ("Volcanoes erupt when magma rises. Lava flows bury towns. Ash clouds darken the sky for "
     "days. Farmers return to rich soil years later."),
    ("Honeybees collect nectar. They dance to share directions. The hive makes honey in wax "
     "cells. Queens lay thousands of eggs each summer."),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "chat")


def test_real_model_run_is_consistent_and_resumes_identically(tmp_path, tiny_model,
                                                              monkeypatch):
    from longctx.llm.hf import HFBackend

    def hf_llm(cache):
        return LLM(HFBackend(tiny_model, context_tokens=512), CallCache(cache), batch_size=2)

    inputs = write_inputs(tmp_path / "in", ["Compare volcanoes and bees.", "Explain nature."],
                          TINY_DOCS, [[0, 1], [1, 0]])
    cfg = SummarizeConfig(chunk_tokens=60, budget_tokens=16, max_new_tokens=8)
    reference = hf_llm(tmp_path / "ref.sqlite")
    rows, stats = run(cfg, reference, inputs, tmp_path / "ref")
    assert pq.read_schema(tmp_path / "ref" / "summaries.parquet").remove_metadata() == SCHEMA
    assert 4 <= stats["chunks"] <= 6  # 2-3 chunks per document
    for level in stats["per_level"]:
        assert level["kept"] + sum(level["dropped"].values()) == level["summaries"]
    assert stats["summaries"] == len(rows) == sum(p["summaries"] for p in stats["per_level"])
    for iid in {r["instruction_id"] for r in rows}:
        assert sum(r["n_tokens"] for r in rows if r["final"] and r["instruction_id"] == iid) \
            <= cfg.budget_tokens
    assert all(r["kept"] for r in rows if r["final"])

    cache, out = tmp_path / "run.sqlite", tmp_path / "run"
    killed = hf_llm(cache)
    kill_on_call(monkeypatch, killed.backend, 3)
    with pytest.raises(Killed):
        run(cfg, killed, inputs, out)
    monkeypatch.undo()
    resumed = hf_llm(cache)
    calls = kill_on_call(monkeypatch, resumed.backend, 0)  # counts, never kills
    run(cfg, resumed, inputs, out)
    # the two batches finished before the kill, besides repeats within a run (gibberish
    # summaries make equal merge prompts)
    assert resumed.total.hits == reference.total.hits + 4
    assert len(calls) == reference.total.batches - 2
    assert outputs(out) == outputs(tmp_path / "ref")


def test_groups_of_instructions_give_the_rows_of_one_group(tmp_path):
    docs = [two_chunks("p"), "Some irrelevant filler here.", two_chunks("q"), two_chunks("r")]
    ranking = [[0, 1, 2, 3], [2, 0], [3], [1, 3, 0], [2]]
    inputs = write_inputs(tmp_path / "in", [f"Compare the facts {i}." for i in range(5)], docs,
                          ranking)
    run(RECURSE_CFG, scripted_llm(reply), inputs, tmp_path / "one")
    llm = scripted_llm(reply)
    calls = []
    chat = llm.chat

    def spy(chats, sampling, template_version, desc="llm"):
        calls.append((desc, len(chats)))
        return chat(chats, sampling, template_version, desc=desc)

    llm.chat = spy
    cfg = RECURSE_CFG.model_copy(update={"instructions_per_group": 2})
    run(cfg, llm, inputs, tmp_path / "groups")
    assert outputs(tmp_path / "groups") == outputs(tmp_path / "one")
    level0 = [n for desc, n in calls if desc == "qfs level 0"]
    assert level0 == [7 + 4, 2 + 5, 2]  # a call per group: its instructions' chunks alone
