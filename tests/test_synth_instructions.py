"""Rule `instructions`: parsing of list replies, filtering with reasons, seed chunks, rounds,
determinism, and one run on a real (tiny, random) transformers model."""

from __future__ import annotations

import json
import logging
import re

import pyarrow.parquet as pq
import pytest
from retrieval_data import TOPICS, write_docs, write_topic_docs
from synth_data import run_sharded, scripted_llm

from longctx.config import InstructionsConfig
from longctx.errors import LongctxError
from longctx.synth.instructions import (
    REASONS,
    first_round,
    gather_instructions,
    instruction_id,
    parse_completion,
)
from longctx.synth.tables import read_documents, read_table

POOL = [  # semantically distinct instructions (the real embedder checks near-duplicates)
    "Compare the economies of France and Germany in the 1990s.",
    "Write a timeline of the major volcanic eruptions in Iceland and Italy.",
    "Explain how honeybees and coral reefs are affected by a warming climate.",
    "Summarize what several articles say about the history of jazz in New Orleans.",
    "Which chess openings did world champions prefer before and after computers arrived?",
    "Analyse how sourdough baking spread from ancient Egypt to modern San Francisco.",
    "How did vaccines change the outcome of epidemics in the twentieth century?",
    "Describe the causes and consequences of the storming of the Bastille in 1789.",
    "Contrast the training plans of marathon runners with those of football players.",
    "What do black holes and glaciers have in common in popular science writing?",
    "Trace the rise of Bitcoin mining and its energy use across several countries.",
    "Give an overview of origami techniques used by engineers to fold satellites.",
]
COLUMNS = ["id", "instruction", "task_type", "seed_doc_id", "seed_chunk", "round", "prompt"]


def cfg(**kw) -> InstructionsConfig:
    base = {"count": 4, "per_prompt": 2, "seed_chunk_tokens": 20, "max_rounds": 2}
    return InstructionsConfig(**(base | kw))


def chunk_of(prompt: str) -> str:
    return re.search(r'"""\n(.*?)\n"""', prompt, re.DOTALL).group(1)


def from_chunk(prompt: str) -> str:
    """A reply that is a function of the prompt's seed chunk (so of the run's seed)."""
    words = chunk_of(prompt).split()
    return (f"1. Compare what several documents say about {words[0]} and {words[-1]} today.\n"
            f"2. Write a timeline of every event linked to {words[0]} or {words[-1]}.")


def generate(config, llm, seed, shards=1, **paths) -> dict:
    """The step as the DAG runs it: first-round shard jobs, then the gather."""
    return run_sharded(first_round, gather_instructions, config, llm, seed, shards=shards,
                       **paths)


def run(tmp_path, config, reply, seed=0, docs=None, name="out", cache=None, shards=1):
    docs = docs or write_topic_docs(tmp_path / "docs.parquet")
    llm = scripted_llm(reply, cache_path=cache)
    out, stats_path = tmp_path / f"{name}.parquet", tmp_path / f"{name}.json"
    stats = generate(config, llm, seed, shards, docs=docs, instructions=out, metrics=stats_path,
                     parts_dir=tmp_path / f"{name}-parts")
    assert json.loads(stats_path.read_text()) == stats
    return read_table(out, COLUMNS), stats, llm


def accounted(stats) -> bool:
    return stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"]


# --------------------------------------------------------------------------- parsing


def test_parser_strips_list_markup_and_skips_preambles():
    reply = ("Sure! Here are 6 instructions:\n\n"
             "1. **Compare the economies of France and Germany.**\n"
             '2) "Write a timeline of the French Revolution."\n\n'
             "(3) *Summarize the causes of the First World War.*\n"
             "- Instruction 4: Explain how jazz spread to Europe.\n"
             "• Describe three volcanoes.\n"
             "**6.** \u201cAnalyse coral reef bleaching.\u201d\n"
             "### Notes\n***\n")
    assert parse_completion(reply, "stop", 10) == [
        ("Compare the economies of France and Germany.", None),
        ("Write a timeline of the French Revolution.", None),
        ("Summarize the causes of the First World War.", None),
        ("Explain how jazz spread to Europe.", None),
        ("Describe three volcanoes.", None),
        ("Analyse coral reef bleaching.", None),
    ]


def test_parser_keeps_numbers_that_are_content_and_a_bare_line():
    assert parse_completion("10-year plans of 3.5 million farmers", "stop", 4) == [
        ("10-year plans of 3.5 million farmers", None)]


def test_parser_garbage_is_unparseable():
    assert parse_completion("", "stop", 4) == []
    assert parse_completion("***\n---\n\n:::\nHere are the instructions:", "stop", 4) == []


def test_parser_cut_off_last_line_and_surplus():
    assert parse_completion("1. Compare A and B.\n2. Compare C wi", "length", 4) == [
        ("Compare A and B.", None), ("Compare C wi", "truncated")]
    # a reply that ran out right after a newline lost nothing
    assert parse_completion("1. Compare A and B.\n", "length", 4) == [("Compare A and B.", None)]
    assert [r for _, r in parse_completion("a\nb\nc\nd", "stop", 2)] == [
        None, None, "surplus", "surplus"]


# --------------------------------------------------------------------------- filtering


def test_every_candidate_is_counted_once_with_its_reason(tmp_path):
    long = "Write " + " ".join(["very"] * 90) + " long things."
    reply = ("Here are 6 instructions:\n"
             f"1. {POOL[0]}\n2. Too short.\n3. {long}\n"
             "4. compare the economies of  France and Germany in the 1990s!\n"
             "5. Compare the economy of France with that of Germany during the 1990s.\n"
             "6. What are the main points of this text about volcanoes and lava flows?\n"
             "7. The first instruction is to list every volcano that erupted in 1990.\n"
             f"8. {POOL[1]}\n9. {POOL[2]}")
    rows, stats, _ = run(tmp_path, cfg(count=3, per_prompt=8, max_rounds=1), lambda p: reply)
    assert [r["instruction"] for r in rows] == [POOL[0], POOL[1]]
    assert stats["prompts"] == 1 and stats["candidates"] == 9 and stats["kept"] == 2
    assert stats["dropped"] == {"too_short": 1, "too_long": 1, "not_self_contained": 2,
                                "duplicate": 1, "near_duplicate": 1, "surplus": 1,
                                "truncated": 0}
    assert accounted(stats)
    assert [r["id"] for r in rows] == [instruction_id(POOL[0]), instruction_id(POOL[1])]
    assert stats["words"] == {"mean": 11.0, "max": 12}
    assert set(stats["task_types"]) == set(cfg().task_types)
    assert sum(stats["task_types"].values()) == 2


def test_more_rounds_run_until_count_then_stop(tmp_path):
    calls = []

    def reply(prompt):  # round 0 (3 prompts) repeats itself; later replies are all new
        calls.append(prompt)
        if len(calls) <= 3:
            return f"1. {POOL[0]}\n2. {POOL[1]}"
        return "\n".join(f"{i}. {POOL[2 * len(calls) + i - 6]}" for i in (1, 2))

    rows, stats, _ = run(tmp_path, cfg(count=4, per_prompt=2, max_rounds=5), reply)
    assert stats["rounds"] == 2 and stats["prompts"] == 3 + 2 and len(calls) == 5
    assert stats["kept"] == len(rows) == 4
    assert stats["dropped"]["duplicate"] == 4 and stats["dropped"]["surplus"] == 2
    assert [r["round"] for r in rows] == [0, 0, 1, 1]
    assert accounted(stats)


def test_fewer_than_count_after_max_rounds_warns_and_writes_them(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        rows, stats, _ = run(tmp_path, cfg(count=4, max_rounds=2),
                             lambda p: f"1. {POOL[0]}\n2. {POOL[1]}")
    assert len(rows) == 2 and stats["rounds"] == 2 and stats["count"] == 4
    assert "kept 2 of the 4" in caplog.text
    assert accounted(stats)


def test_nothing_usable_is_an_error_with_the_counts(tmp_path):
    with pytest.raises(LongctxError, match=r"no usable instruction after 2 rounds.*too_short"):
        run(tmp_path, cfg(), lambda p: "1. ok\n2. fine")
    with pytest.raises(LongctxError, match=r"2 unparseable"):
        run(tmp_path, cfg(count=1, max_rounds=2), lambda p: "***")
    assert not (tmp_path / "out.parquet").exists()


def test_empty_corpus_is_an_error_naming_the_file(tmp_path):
    docs = write_docs(tmp_path / "empty.parquet", [])
    with pytest.raises(LongctxError, match="empty.parquet"):
        run(tmp_path, cfg(), from_chunk, docs=docs)


# --------------------------------------------------------------------------- seed chunks


def long_docs(tmp_path):
    """Documents of unique words, so a chunk can only come from one document."""
    texts = [" ".join(f"{t.split()[0].lower()}{j}" for j in range(300)) for t in TOPICS]
    return write_docs(tmp_path / "long.parquet", texts[:6])


def test_every_prompt_carries_a_corpus_chunk_within_budget(tmp_path):
    docs_path = long_docs(tmp_path)
    docs = read_documents(docs_path)
    config = cfg(count=8, per_prompt=2, seed_chunk_tokens=20, dedup_similarity=1.0,
                 task_types=["comparison", "timeline"])
    rows, stats, llm = run(tmp_path, config, from_chunk, docs=docs_path)
    served = llm.backend.served
    assert len(served) == stats["prompts"] >= 6
    for prompt in served:
        chunk = chunk_of(prompt)
        assert 0 < len(chunk.split()) <= 20
        assert any(chunk in d["text"] for d in docs.values())
        assert re.search(r"asks for a (comparison|timeline) ", prompt)
    assert len({chunk_of(p) for p in served}) == len(served)  # random positions
    for row in rows:
        words = row["seed_chunk"].split()
        assert row["seed_chunk"] in docs[row["seed_doc_id"]]["text"]
        assert words[0] in row["instruction"] and words[-1] in row["instruction"]
        assert row["task_type"] in config.task_types
        assert len(words) <= 20
    assert len({r["seed_doc_id"] for r in rows}) > 1


def test_same_seed_same_bytes_other_seed_other_chunks(tmp_path):
    docs = long_docs(tmp_path)
    config = cfg(count=6, dedup_similarity=1.0)
    rows_a, _, _ = run(tmp_path, config, from_chunk, docs=docs, name="a",
                       cache=tmp_path / "c.sqlite")
    _, _, warm = run(tmp_path, config, from_chunk, docs=docs, name="b",
                     cache=tmp_path / "c.sqlite")
    rows_c, _, _ = run(tmp_path, config, from_chunk, seed=1, docs=docs, name="c")
    assert warm.backend.served == []  # all from the cache
    for ext in ("parquet", "json"):
        assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
    chunks = {r["seed_chunk"] for r in rows_a}
    assert chunks and chunks.isdisjoint({r["seed_chunk"] for r in rows_c})


# --------------------------------------------------------------------------- shard jobs


def test_three_shard_jobs_write_the_bytes_of_one(tmp_path):
    def reply(prompt):  # a function of the prompt; about half are too short to keep
        if int(re.sub(r"\D", "", chunk_of(prompt).split()[0])) % 2:
            return from_chunk(prompt)
        return "1. ok\n2. fine"

    docs = long_docs(tmp_path)
    config = cfg(count=6, dedup_similarity=1.0, max_rounds=3)
    _, one, _ = run(tmp_path, config, reply, docs=docs, name="one")
    _, three, _ = run(tmp_path, config, reply, docs=docs, name="three", shards=3)
    assert one["rounds"] > 1 and one["prompts"] > 5
    assert three == one
    for ext in ("parquet", "json"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"three.{ext}").read_bytes()
    owned = [len(pq.read_table(p)) for p in sorted((tmp_path / "three-parts").iterdir())]
    assert len(owned) == 3 and sum(owned) == 5 * 2  # 5 first-round prompts, 2 items each


def test_more_shards_than_first_round_prompts_are_refused(tmp_path):
    with pytest.raises(LongctxError, match=r"shards\.instructions=7 is more than the 6 "
                       r"first-round prompts"):
        run(tmp_path, cfg(count=8, per_prompt=2), from_chunk, shards=7)


# --------------------------------------------------------------------------- real model


def test_runs_on_a_real_transformers_model(tmp_path):
    from llm_data import build_tiny_chat_model

    from longctx.llm import LLM, CallCache
    from longctx.llm.hf import HFBackend

    model = build_tiny_chat_model(tmp_path / "m", max_positions=1024)
    llm = LLM(HFBackend(model, device="cpu"), CallCache(tmp_path / "c.sqlite"), batch_size=4)
    config = cfg(count=3, per_prompt=2, seed_chunk_tokens=16, min_words=1, max_words=1000,
                 max_new_tokens=24, temperature=0.8, max_rounds=2)
    docs = write_topic_docs(tmp_path / "docs.parquet")
    out, stats_path = tmp_path / "out.parquet", tmp_path / "stats.json"
    try:
        stats = generate(config, llm, 0, docs=docs, instructions=out, metrics=stats_path)
    except LongctxError as exc:  # gibberish may yield nothing usable: then say why
        assert re.search(r"no usable instruction after 2 rounds: \d+ candidates", str(exc))
        assert all(reason in str(exc) for reason in REASONS)
        return
    assert accounted(stats) and stats["kept"] >= 1
    assert stats["finish_reasons"]["stop"] + stats["finish_reasons"]["length"] == stats["prompts"]
    assert pq.read_schema(out).names == COLUMNS
