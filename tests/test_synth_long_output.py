"""Rule long_output: long documents as targets, with back-translated writing instructions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from llm_data import build_tiny_chat_model
from retrieval_data import doc_id, write_docs
from synth_data import run_sharded, scripted_llm, words

from longctx.config import LongOutputConfig
from longctx.errors import LongctxError
from longctx.synth.long_output import (
    LONG_OUTPUT_SCHEMA,
    REASONS,
    clean_instruction,
    gather_long_output,
    long_output,
    sample_id,
)

SMALL = {"min_tokens": 50, "max_tokens": 200, "count": 3, "excerpt_tokens": 40,
         "max_new_tokens": 16}


def document(d: int, n_words: int) -> str:
    """`n_words` words in paragraphs of 10; every paragraph starts with a marker d<d>p<i>."""
    paragraphs = [" ".join([f"d{d}p{i}"] + [f"w{d}x{i}x{j}" for j in range(1, 10)])
                  for i in range(n_words // 10)]
    return "\n\n".join(paragraphs)


def write_corpus(tmp: Path, lengths: list[int]) -> tuple[Path, list[str]]:
    texts = [document(d, n) for d, n in enumerate(lengths)]
    return write_docs(tmp / "docs.parquet", texts, [None] * len(texts)), texts


def excerpt_of(message: str) -> str:
    return re.search(r'"""\n(.*)\n"""', message, re.DOTALL).group(1)


def doc_of(message: str) -> int:
    return int(re.search(r"d(\d+)p0", message).group(1))


def echo(message: str) -> str:
    return f'Instruction: "Write an article about topic d{doc_of(message)} in detail."'


def run(tmp: Path, llm, docs: Path, seed: int = 3, shards: int = 1,
        **cfg) -> tuple[dict, list[dict]]:
    stats = run_sharded(long_output, gather_long_output, LongOutputConfig(**{**SMALL, **cfg}),
                        llm, seed, shards=shards, docs=docs,
                        long_output=tmp / "long_output.parquet", metrics=tmp / "stats.json")
    return stats, pq.read_table(tmp / "long_output.parquet").to_pylist()


def test_candidates_are_a_seeded_sample_of_documents_in_range(tmp_path):
    docs, _ = write_corpus(tmp_path, [10, 60, 100, 150, 200, 250, 50, 210, 80])
    eligible = {doc_id(i) for i in (1, 2, 3, 4, 6, 8)}
    chosen = set()
    for seed in range(8):
        stats, rows = run(tmp_path, scripted_llm(echo), docs, seed=seed)
        ids = [r["doc_id"] for r in rows]
        assert len(ids) == 3 and set(ids) <= eligible and ids == sorted(ids)
        assert (stats["documents"], stats["eligible"], stats["candidates"]) == (9, 6, 3)
        chosen.add(tuple(ids))
    assert len(chosen) > 1  # the choice depends on the seed
    _, again = run(tmp_path, scripted_llm(echo), docs, seed=0)
    _, first = run(tmp_path, scripted_llm(echo), docs, seed=0)
    assert again == first
    stats, rows = run(tmp_path, scripted_llm(echo), docs, count=100)
    assert {r["doc_id"] for r in rows} == eligible and stats["candidates"] == 6


def test_document_rows_and_read_rows_touch_only_what_is_drawn(tmp_path):
    import pyarrow.parquet as pq

    from longctx.synth.tables import document_rows, read_rows

    docs, texts = write_corpus(tmp_path, [30, 120, 80, 300, 60] * 20)
    pq.write_table(pq.read_table(docs), docs, row_group_size=7)  # 15 row groups
    rows = document_rows(docs, (50, 200))
    assert list(rows) == [i for i, t in enumerate(texts) if 50 <= len(t.split()) <= 200]
    assert document_rows(docs) == range(100)  # no range: nothing read
    got = read_rows(docs, [99, 3, 42, 3, 0], ["id", "text"])
    assert sorted(got) == [0, 3, 42, 99]
    assert all(got[r] == {"id": doc_id(r), "text": texts[r]} for r in got)


def test_long_documents_show_start_and_end_short_ones_whole(tmp_path):
    docs, texts = write_corpus(tmp_path, [160, 30])  # halves of 20 + the gap would be 41
    llm = scripted_llm(echo)
    stats, rows = run(tmp_path, llm, docs, min_tokens=10)
    prompts = {doc_of(m): m for m in llm.backend.served}
    long_excerpt = excerpt_of(prompts[0])
    assert long_excerpt.startswith("d0p0 ") and "d0p15 " in long_excerpt  # first, last para
    assert "[...]" in long_excerpt and "d0p7 " not in long_excerpt
    assert words([long_excerpt])[0] <= SMALL["excerpt_tokens"]
    assert excerpt_of(prompts[1]) == texts[1]
    assert "about 200 words" in prompts[0] and "about 100 words" in prompts[1]
    by_doc = {r["doc_id"]: r for r in rows}
    for i, text in enumerate(texts):  # the target is the whole raw document
        assert by_doc[doc_id(i)]["target"] == text
        assert by_doc[doc_id(i)]["target_tokens"] == len(text.split())
    assert stats["target_tokens"] == {"sum": 190, "mean": 95.0, "max": 160}


@pytest.mark.parametrize("raw, clean, at_end", [
    ('Instruction: "Write an article about volcanoes."', "Write an article about volcanoes.",
     True),
    ('**Instruction:** Write a long essay on jazz.', "Write a long essay on jazz.", True),
    ("  \u201cWrite a report on bees.\u201d  ", "Write a report on bees.", True),
    ("Write a story about chess.\n\nThis instruction asks for a story.",
     "Write a story about chess.", False),
    ("**Instruction:**\n\n'Write a guide to sourdough.'", "Write a guide to sourdough.", True),
    ("Write about 'bees'", "Write about 'bees'", True),
    ("Here's a sample request:\nWrite a story about a baker.\nHope it helps",
     "Write a story about a baker.", False),
    ("The text is about oceans.\n\nIt has 1000 words.", "The text is about oceans.", False),
])
def test_clean_instruction_finds_the_writing_instruction_in_chatter(raw, clean, at_end):
    assert clean_instruction(raw) == (clean, at_end)


def test_reasons_are_counted_and_rows_keep_the_cleaned_instruction(tmp_path):
    docs, _ = write_corpus(tmp_path, [60] * 9)
    replies = {0: echo("d0p0"), 1: "**\n", 2: "Write an article about\x00", 3: "Write it.",
               4: "I'm ready to help you with your article. What topic do you have in mind?",
               5: "Write a report on volcanoes in Iceland.\nI hope this helps, and if\x00",
               6: "Write an article about the Austronesian" + " Austronesian" * 12,
               7: "Write an instruction that asks an AI assistant to write this text.",
               8: "Write a 300-word summary of the excerpt above."}  # the prompt echoed
    stats, rows = run(tmp_path, scripted_llm(lambda m: replies[doc_of(m)]), docs, count=9)
    assert [r["reason"] for r in rows] == [None, "empty", "truncated", "too_short",
                                           "not_an_instruction", None, "repetitive",
                                           "not_self_contained", "not_self_contained"]
    assert rows[5]["instruction"] == "Write a report on volcanoes in Iceland."  # cut after it
    good = rows[0]
    assert good["instruction"] == "Write an article about topic d0 in detail."
    assert good["id"] == sample_id(doc_id(0), good["instruction"])
    assert good["kept"] and good["finish_reason"] == "stop"
    assert rows[2]["finish_reason"] == "length"
    assert stats["kept"] == 2 and stats["dropped"] == {"empty": 1, "truncated": 1,
                                                       "not_an_instruction": 1,
                                                       "not_self_contained": 2,
                                                       "repetitive": 1,
                                                       "too_short": 1}
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"]
    assert json.loads((tmp_path / "stats.json").read_text()) == stats
    assert pq.read_table(tmp_path / "long_output.parquet").schema == LONG_OUTPUT_SCHEMA


def test_window_too_small_for_the_excerpt_fails_before_any_call(tmp_path):
    docs, _ = write_corpus(tmp_path, [100])
    llm = scripted_llm(echo, context_tokens=120)
    with pytest.raises(LongctxError, match="long_output.excerpt_tokens"):
        run(tmp_path, llm, docs)
    assert llm.backend.served == [] and not (tmp_path / "long_output.parquet").exists()
    stats, _ = run(tmp_path, scripted_llm(echo, context_tokens=1000), docs)
    assert stats["kept"] == 1


def test_no_eligible_document_writes_an_empty_table(tmp_path, caplog):
    docs, _ = write_corpus(tmp_path, [10, 20])
    llm = scripted_llm(echo)
    stats, rows = run(tmp_path, llm, docs)
    assert rows == [] and llm.backend.served == []
    assert pq.read_table(tmp_path / "long_output.parquet").schema == LONG_OUTPUT_SCHEMA
    assert (stats["eligible"], stats["candidates"], stats["kept"]) == (0, 0, 0)
    assert set(stats["dropped"]) == set(REASONS)
    assert "no document" in caplog.text


def test_reruns_are_byte_identical(tmp_path):
    docs, _ = write_corpus(tmp_path, [60, 120, 180, 90])
    outs = []
    for name in ("one", "two"):
        out = tmp_path / name
        out.mkdir()
        llm = scripted_llm(echo, cache_path=tmp_path / "cache.sqlite")
        run(out, llm, docs)
        outs.append([(out / f).read_bytes() for f in ("long_output.parquet", "stats.json")])
        llm.close()
    assert outs[0] == outs[1]
    assert llm.backend.served == []  # the second run came from the cache


def test_runs_on_a_real_transformers_model(tmp_path):
    from longctx.llm import LLM, CallCache
    from longctx.llm.hf import HFBackend

    docs, _ = write_corpus(tmp_path, [60, 100, 20])
    model = build_tiny_chat_model(tmp_path / "tiny", max_positions=1024)
    llm = LLM(HFBackend(model), CallCache(tmp_path / "c.sqlite"), batch_size=4)
    stats, rows = run(tmp_path, llm, docs, excerpt_tokens=300, max_new_tokens=8)
    llm.close()
    assert pq.read_table(tmp_path / "long_output.parquet").schema == LONG_OUTPUT_SCHEMA
    assert [r["doc_id"] for r in rows] == [doc_id(0), doc_id(1)]
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["candidates"] == 2
