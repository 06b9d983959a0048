"""Rule retrieve on the 20-topic corpus with the real bundled MiniLM and a flat index."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from retrieval_data import topic_id, write_topic_docs

from longctx.config import EmbedConfig, IndexConfig, RetrieveConfig
from longctx.errors import LongctxError
from longctx.retrieval.embed import embed_corpus
from longctx.retrieval.index import build_index
from longctx.synth.retrieve import query_vectors, retrieve
from longctx.synth.tables import read_table, write_table

INSTRUCTIONS = pa.schema([("id", pa.string()), ("instruction", pa.string())])
ASKED = {
    "i-volcano": ("Compare how lava flows and ash clouds from volcanoes bury towns.", "Volcano"),
    "i-bees": ("Explain how honeybees share directions to nectar and make honey.", "Honeybees"),
    "i-chess": ("Describe castling and the fight for the centre in chess openings.", "Chess"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieve")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGCTX_CACHE", str(root / "cache"))
        docs = write_topic_docs(root / "docs.parquet")
        embed_corpus(EmbedConfig(shard_size=8), docs=docs, embeddings=root / "emb")
        build_index(IndexConfig(type="flat"), 0, embeddings=root / "emb", index=root / "index")
    rows = [{"id": key, "instruction": text} for key, (text, _) in ASKED.items()]
    write_table(root / "instructions.parquet", rows, INSTRUCTIONS)
    return root


def run(built, tmp_path, **cfg):
    stats = retrieve(RetrieveConfig(**cfg), instructions=built / "instructions.parquet",
                     index=built / "index", embeddings=built / "emb",
                     retrieved=tmp_path / "retrieved.parquet", metrics=tmp_path / "stats.json")
    rows = read_table(tmp_path / "retrieved.parquet", ["instruction_id", "doc_ids", "scores"])
    return rows, stats


def test_each_instruction_gets_its_topic_first_and_k_documents(built, tmp_path):
    rows, stats = run(built, tmp_path, top_k=4)
    assert [r["instruction_id"] for r in rows] == list(ASKED)
    for row, (_, topic) in zip(rows, ASKED.values()):
        assert row["doc_ids"][0] == topic_id(topic)
        assert len(row["doc_ids"]) == 4 == len(set(row["doc_ids"]))
        assert row["scores"] == sorted(row["scores"], reverse=True)
    assert stats["hits"] == 12 and stats["documents_per_instruction"] == 4.0
    assert json.loads((tmp_path / "stats.json").read_text()) == stats


def test_the_query_vectors_searched_are_kept_for_pack(built, tmp_path):
    from longctx.retrieval.search import Retriever

    rows, _ = run(built, tmp_path, top_k=3)
    retriever = Retriever(built / "index", built / "emb")
    asked = ["i-chess", "i-volcano"]
    kept = query_vectors(tmp_path / "retrieved.parquet", asked)
    assert kept.shape == (2, 384) and kept.dtype == np.float32
    assert np.allclose(kept, retriever.embed_queries([ASKED[k][0] for k in asked]), atol=1e-5)
    again = retriever.search_vectors(kept, 3)  # the same hits without the embedder
    assert [[h.doc_id for h in hits] for hits in again] == \
        [r["doc_ids"] for r in rows if r["instruction_id"] in asked][::-1]
    with pytest.raises(LongctxError, match="no query vector for instruction 'nope'"):
        query_vectors(tmp_path / "retrieved.parquet", ["nope"])


def test_min_score_drops_weak_hits_and_counts_them(built, tmp_path):
    rows, stats = run(built, tmp_path, top_k=5, min_score=0.3)
    assert all(s >= 0.3 for r in rows for s in r["scores"])
    assert all(r["doc_ids"] for r in rows)  # the matching topic scores well above 0.3
    assert stats["dropped_below_min_score"] == 15 - stats["hits"] > 0
    rows, stats = run(built, tmp_path, top_k=2, min_score=0.99)
    assert stats["instructions_without_documents"] == 3 and rows[0]["doc_ids"] == []


def test_same_inputs_give_identical_bytes(built, tmp_path):
    run(built, tmp_path / "a", top_k=3)
    run(built, tmp_path / "b", top_k=3)
    for name in ("retrieved.parquet", "stats.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_missing_instruction_column_is_a_clear_error(built, tmp_path):
    bad = tmp_path / "bad.parquet"
    write_table(bad, [{"id": "x"}], pa.schema([("id", pa.string())]))
    with pytest.raises(LongctxError, match=r"bad\.parquet: missing column\(s\) instruction"):
        retrieve(RetrieveConfig(), instructions=bad, index=built / "index",
                 embeddings=built / "emb", retrieved=tmp_path / "r.parquet",
                 metrics=tmp_path / "s.json")
    assert not (tmp_path / "r.parquet").exists()
