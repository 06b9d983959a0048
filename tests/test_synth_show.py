"""`longctx show`: an instruction's story from the synthesis tables, whatever has run so far."""

from __future__ import annotations

import pyarrow as pa
import pytest
from retrieval_data import doc_id, write_docs

from longctx.cli import main
from longctx.errors import LongctxError
from longctx.synth.show import show
from longctx.synth.tables import write_table

S = pa.string()
INSTRUCTIONS = pa.schema([("id", S), ("instruction", S), ("task_type", S), ("seed_doc_id", S),
                          ("seed_chunk", pa.large_string()), ("round", pa.int32()),
                          ("prompt", pa.int32())])
RETRIEVED = pa.schema([("instruction_id", S), ("doc_ids", pa.list_(S)),
                       ("scores", pa.list_(pa.float32()))])
SUMMARIES = pa.schema([("instruction_id", S), ("level", pa.int32()), ("position", pa.int32()),
                       ("doc_id", S), ("chunk", pa.int32()), ("children", pa.list_(pa.int32())),
                       ("summary", pa.large_string()), ("n_tokens", pa.int32()),
                       ("finish_reason", S), ("kept", pa.bool_()), ("reason", S),
                       ("final", pa.bool_())])
RESPONSES = pa.schema([("instruction_id", S), ("response", pa.large_string()),
                       ("finish_reason", S), ("n_tokens", pa.int32()), ("kept", pa.bool_()),
                       ("reason", S)])


def summary(level, position, text, doc=None, chunk=None, children=(), kept=True, reason=None,
            final=False):
    return {"instruction_id": "abc123", "level": level, "position": position, "doc_id": doc,
            "chunk": chunk, "children": list(children), "summary": text,
            "n_tokens": len(text.split()), "finish_reason": "stop", "kept": kept,
            "reason": reason, "final": final}


@pytest.fixture
def synth(tmp_path):
    write_docs(tmp_path / "docs.parquet",
               ["Volcanoes erupt lava and ash over towns.", "Bees make honey in hives."],
               ["Volcano", None])
    d = tmp_path / "synth"
    write_table(d / "instructions.parquet", [
        {"id": "abc123", "instruction": "Compare volcanoes and bees.", "task_type": "comparison",
         "seed_doc_id": doc_id(0), "seed_chunk": "Volcanoes erupt", "round": 0, "prompt": 1},
        {"id": "abd999", "instruction": "Other.", "task_type": "timeline",
         "seed_doc_id": doc_id(1), "seed_chunk": "Bees", "round": 0, "prompt": 2},
    ], INSTRUCTIONS)
    return tmp_path


def test_prints_what_has_run_so_far(synth):
    text = show("abc1", synth / "synth", synth / "docs.parquet")
    assert "Instruction abc123  [comparison]" in text and "Compare volcanoes and bees." in text
    assert "Inspired by a chunk of" in text and "(Volcano)" in text
    assert text.endswith("(retrieve has not run yet)")


def test_prints_documents_summaries_by_level_and_the_response(synth, tmp_path):
    d = synth / "synth"
    write_table(d / "retrieved.parquet", [
        {"instruction_id": "abc123", "doc_ids": [doc_id(1), doc_id(0)], "scores": [0.8, 0.5]},
    ], RETRIEVED)
    write_table(d / "summaries.parquet", [
        summary(0, 0, "Bees make honey.", doc=doc_id(1), chunk=0),
        summary(0, 1, "NOTHING RELEVANT", doc=doc_id(0), chunk=0, kept=False,
                reason="nothing_relevant"),
        summary(1, 0, "Bees make honey; volcanoes do not.", children=[0], final=True),
    ], SUMMARIES)
    write_table(d / "responses.parquet", [
        {"instruction_id": "abc123", "response": "Bees build, volcanoes destroy.",
         "finish_reason": "stop", "n_tokens": 6, "kept": True, "reason": None},
    ], RESPONSES)
    text = show("abc123", d, synth / "docs.parquet")
    assert f"   1  0.8000  {doc_id(1)}  Bees make honey in hives.  (5 tokens)" in text
    assert "Volcano  (7 tokens)" in text
    assert "level 0 #1  doc 2 (Volcano), chunk 0  [dropped: nothing_relevant" in text
    assert "level 1 #0  merges level-0 #0  [kept, FINAL" in text
    assert "Summaries (1 final):" in text
    assert "Response [kept, finish stop, 6 tokens]:" in text
    assert text.rstrip().endswith("Bees build, volcanoes destroy.")


def test_unknown_or_ambiguous_ids_are_clear_errors(synth, capsys):
    with pytest.raises(LongctxError, match="matches no instruction .*abc123"):
        show("zzz", synth / "synth", synth / "docs.parquet")
    with pytest.raises(LongctxError, match="'ab' matches several instructions"):
        show("ab", synth / "synth", synth / "docs.parquet")
    assert main(["show", "zzz", "--synth", str(synth / "synth"),
                 "--docs", str(synth / "docs.parquet")]) == 1
    assert "longctx show: error:" in capsys.readouterr().err
