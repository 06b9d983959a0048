"""Retriever end to end on the 20-topic corpus with the real bundled MiniLM."""

from __future__ import annotations

import pytest
from retrieval_data import TOPICS, doc_id, topic_id, write_docs, write_topic_docs

from longctx.config import EmbedConfig, IndexConfig
from longctx.errors import LongctxError
from longctx.retrieval.embed import embed_corpus
from longctx.retrieval.index import build_index
from longctx.retrieval.search import Hit, Retriever, format_hits, search_command


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """docs, embeddings and a flat and an HNSW index over the topic corpus."""
    root = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGCTX_CACHE", str(root / "cache"))
        docs = write_topic_docs(root / "docs.parquet")
        embed_corpus(EmbedConfig(shard_size=8), docs=docs, embeddings=root / "emb")
        build_index(IndexConfig(type="flat"), 0, embeddings=root / "emb", index=root / "flat")
        build_index(IndexConfig(type="hnsw", hnsw_m=8), 0, embeddings=root / "emb",
                    index=root / "hnsw")
    return root


QUERIES = {
    "how do volcanoes erupt lava": "Volcano",
    "openings and checkmate in chess": "Chess",
    "bees making honey": "Honeybees",
    "proof of work mining on a blockchain": "Bitcoin",
    "ice carving valleys as the climate warms": "Glaciers",
}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_topic_query_ranks_its_document_first(built, kind):
    retriever = Retriever(built / kind, built / "emb", built / "docs.parquet")
    results = retriever.search(list(QUERIES), k=5)
    assert [hits[0].doc_id for hits in results] == [topic_id(t) for t in QUERIES.values()]
    for hits in results:
        assert len(hits) == 5 and len({h.doc_id for h in hits}) == 5
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert results[0][0].score > results[0][1].score + 0.1  # clearly, not by a hair


def test_search_command_prints_rank_score_id_and_label(built):
    text = search_command("sourdough starter and crusty bread", 3, built / "flat",
                          built / "emb", built / "docs.parquet")
    lines = text.splitlines()
    assert len(lines) == 3
    rank, score, ident, *label = lines[0].split()
    assert (rank, ident) == ("1", topic_id("Sourdough"))
    assert 0 < float(score) <= 1
    # Sourdough is document 9, which has no title: its first words are printed instead
    assert " ".join(label) == " ".join(TOPICS["Sourdough"].split()[:12]) + " ..."
    text = search_command("lava", 1, built / "flat", built / "emb", built / "docs.parquet")
    assert text.split(maxsplit=3)[3] == "Volcano"  # document 0 has a title


def test_format_hits_without_labels():
    assert format_hits([], {}) == "(no results)"
    assert format_hits([Hit("ab", 0.5, 0)], {}) == "  1  0.5000  ab"


class CountingIndex:
    """Wraps a faiss index to record the k of every search."""

    def __init__(self, index):
        self.index, self.ntotal, self.d, self.ks = index, index.ntotal, index.d, []

    def search(self, x, k):
        self.ks.append(k)
        return self.index.search(x, k)


def test_passages_aggregate_to_documents(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    filler = " ".join(["the committee met again on tuesday to discuss the budget"] * 6)
    volcano = TOPICS["Volcano"]
    eruption = "The volcano erupted, and glowing lava and grey ash poured down its slopes."
    texts = [
        filler + " " + volcano,  # the volcano passage comes after the filler ones
        " ".join([volcano] * 10),
        " ".join([eruption] * 10),
        *list(TOPICS.values())[1:6],
    ]
    docs = write_docs(tmp_path / "docs.parquet", texts)
    embed_corpus(EmbedConfig(text="passages", max_tokens=24), docs=docs,
                 embeddings=tmp_path / "emb")
    build_index(IndexConfig(), 0, embeddings=tmp_path / "emb", index=tmp_path / "index")

    retriever = Retriever(tmp_path / "index", tmp_path / "emb", docs)
    retriever.index = CountingIndex(retriever.index)
    k = 4
    assert retriever.rows_per_doc * k < 20  # the first fetch holds only volcano passages
    hits = retriever.search(["volcano eruption with lava and ash"], k=k)[0]
    assert len(retriever.index.ks) > 1  # so it had to fetch again to find 4 documents
    assert len(hits) == k and len({h.doc_id for h in hits}) == k
    assert {h.doc_id for h in hits[:3]} == {doc_id(0), doc_id(1), doc_id(2)}
    best = {h.doc_id: h.passage for h in hits}
    assert best[doc_id(0)] > 0  # its best passage is the volcano one, not the first
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # every document can come back, and never more documents than exist
    assert len(retriever.search(["volcano"], k=8)[0]) == 8
    assert len(retriever.search(["volcano"], k=50)[0]) == 8


def test_index_from_other_embeddings_is_refused(built, tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    embed_corpus(EmbedConfig(max_tokens=64), docs=built / "docs.parquet",
                 embeddings=tmp_path / "emb")
    with pytest.raises(LongctxError, match="built from other embeddings"):
        Retriever(built / "flat", tmp_path / "emb", built / "docs.parquet")
