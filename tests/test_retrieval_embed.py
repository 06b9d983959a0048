"""embed_corpus and its shard jobs with the real bundled MiniLM on tiny corpora: layout,
files, resume, 1 shard == N shards, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from retrieval_data import TOPICS, doc_id, write_docs, write_topic_docs

from longctx.assets import bundled_embedder
from longctx.config import EmbedConfig
from longctx.errors import LongctxError
from longctx.repro import sha256_file
from longctx.retrieval import embed
from longctx.retrieval.embed import embed_corpus, embed_shard, encode, load_embedder
from longctx.retrieval.embed_parts import embed_params, gather_embeddings
from longctx.shards import Shard


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own resume cache."""
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def model():
    return load_embedder("bundled", "cpu")


def load_vectors(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return np.concatenate([np.load(out / s["file"]) for s in manifest["shards"]])


def test_first_tokens_manifest_and_shards(tmp_path):
    docs = write_topic_docs(tmp_path / "docs.parquet")
    out = tmp_path / "emb"
    manifest = embed_corpus(EmbedConfig(shard_size=8, query_prefix="q: "), docs=docs,
                            embeddings=out)

    assert manifest == json.loads((out / "manifest.json").read_text())
    assert (manifest["rows"], manifest["documents"], manifest["dim"]) == (20, 20, 384)
    assert manifest["text"]["mode"] == "first_tokens"
    assert manifest["text"]["max_tokens"] == 256  # min(max_tokens 256, MiniLM's 256)
    assert manifest["query_prefix"] == "q: "
    assert manifest["corpus"]["sha256"] == sha256_file(docs)
    weights = bundled_embedder() / "model.safetensors"
    assert manifest["model"]["name"] == "bundled"
    assert manifest["model"]["files"]["model.safetensors"] == sha256_file(weights)
    assert [s["rows"] for s in manifest["shards"]] == [8, 8, 4]
    for entry in manifest["shards"]:
        shard = np.load(out / entry["file"])
        assert shard.dtype == np.float16 and shard.shape == (entry["rows"], 384)
        assert entry["sha256"] == sha256_file(out / entry["file"])
    vectors = load_vectors(out).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)

    rows = pl.read_parquet(out / "rows.parquet")
    assert rows["row"].to_list() == list(range(20))
    assert rows["doc_id"].to_list() == [doc_id(i) for i in range(20)]
    assert set(rows["passage"]) == {0} and set(rows["token_start"]) == {0}


def test_first_tokens_truncates_on_tokens_with_title_and_prefix(tmp_path, model):
    long_text = " ".join(["the river floods the valley every spring"] * 40)
    docs = write_docs(tmp_path / "docs.parquet", [long_text, "short text"], ["Floods", None])
    cfg = EmbedConfig(max_tokens=24, passage_prefix="passage: ")
    manifest = embed_corpus(cfg, docs=docs, embeddings=tmp_path / "emb")

    prefix_tokens = len(model.tokenizer("passage: ", add_special_tokens=False)["input_ids"])
    window = 24 - 2 - prefix_tokens  # [CLS] and [SEP] and the prefix count in the budget
    assert manifest["text"]["window"] == window

    full = "Floods\n" + long_text
    offsets = model.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    cut = full[: offsets["offset_mapping"][window - 1][1]]
    expected = model.encode(["passage: " + cut], normalize_embeddings=True)[0]
    got = load_vectors(tmp_path / "emb")[0].astype(np.float32)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    untruncated = model.encode(["passage: " + full], normalize_embeddings=True)[0]
    assert np.abs(untruncated - expected).max() > 1e-2  # the cut really changed the text


def test_passages_map_rows_to_documents(tmp_path, model):
    texts = [
        " ".join(f"sentence number {i} talks about the weather" for i in range(30)),
        "a short one",
        " ".join(f"chapter {i} of a long story about ships" for i in range(12)),
    ]
    docs = write_docs(tmp_path / "docs.parquet", texts)
    cfg = EmbedConfig(text="passages", max_tokens=32, shard_size=7)
    manifest = embed_corpus(cfg, docs=docs, embeddings=tmp_path / "emb")
    window = manifest["text"]["window"]
    assert window == 30 and manifest["text"]["stride"] == 30

    rows = pl.read_parquet(tmp_path / "emb" / "rows.parquet")
    lengths = [len(model.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    expected = [math.ceil(n / window) for n in lengths]
    counts = rows.group_by("doc_id", maintain_order=True).len()["len"].to_list()
    assert counts == expected and manifest["rows"] == sum(expected) == rows.height
    assert manifest["documents"] == 3
    first = rows.filter(pl.col("doc_id") == doc_id(0))
    assert first["passage"].to_list() == list(range(expected[0]))
    assert first["token_start"].to_list() == [p * window for p in range(expected[0])]
    assert first["n_tokens"].to_list()[:-1] == [window] * (expected[0] - 1)
    assert load_vectors(tmp_path / "emb").shape == (sum(expected), 384)


def test_passages_stride_and_max_passages(tmp_path):
    text = " ".join(f"line {i} of the log file" for i in range(40))
    docs = write_docs(tmp_path / "docs.parquet", [text])
    cfg = EmbedConfig(text="passages", max_tokens=32, passage_stride=10, max_passages=4)
    embed_corpus(cfg, docs=docs, embeddings=tmp_path / "emb")
    rows = pl.read_parquet(tmp_path / "emb" / "rows.parquet")
    assert rows["token_start"].to_list() == [0, 10, 20, 30]
    assert rows["n_tokens"].to_list() == [30] * 4


def test_encode_sorts_by_length_and_restores_order(model, monkeypatch):
    texts = ["tiny", "a much longer sentence about the ocean and its many waves", "mid size text"]
    seen = []
    original = type(model).encode

    def spy(self, batch, **kw):
        seen.append(list(batch))
        return original(self, batch, **kw)

    monkeypatch.setattr(type(model), "encode", spy)
    out = encode(model, texts, batch_size=2, prefix="q: ")
    assert seen == [[f"q: {texts[1]}", f"q: {texts[2]}"], ["q: tiny"]]  # longest first
    monkeypatch.undo()
    one_by_one = np.stack([encode(model, [t], 1, "q: ")[0] for t in texts])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_resume_after_kill_encodes_only_missing_shards(tmp_path, monkeypatch):
    docs = write_topic_docs(tmp_path / "docs.parquet")
    cfg = EmbedConfig(shard_size=4, batch_size=3)  # 5 shards

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache-a"))
    embed_corpus(cfg, docs=docs, embeddings=tmp_path / "uninterrupted")

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache-b"))
    calls = []
    real_encode = embed.encode

    def dies_after_two_shards(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # like a kill in the middle of shard 3
        calls.append(args[1])
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(embed, "encode", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        embed_corpus(cfg, docs=docs, embeddings=tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
    cached = sorted(p.name for p in (tmp_path / "cache-b" / "embed").rglob("*.npy"))
    assert cached == ["shard-00000.npy", "shard-00001.npy"]

    calls.clear()
    monkeypatch.setattr(embed, "encode", lambda *a, **k: calls.append(a[1]) or real_encode(*a, **k))
    manifest = embed_corpus(cfg, docs=docs, embeddings=tmp_path / "resumed")
    assert len(calls) == 3  # shards 2, 3 and 4 only
    assert [len(c) for c in calls] == [4, 4, 4]
    assert calls[0][0] == "Marathon\n" + TOPICS["Marathon"]  # document 8 starts shard 2
    assert _files(tmp_path / "resumed") == _files(tmp_path / "uninterrupted")
    assert manifest["rows"] == 20


def test_two_runs_from_scratch_are_byte_identical(tmp_path, monkeypatch):
    docs = write_topic_docs(tmp_path / "docs.parquet")
    cfg = EmbedConfig(text="passages", max_tokens=16, shard_size=16, batch_size=5)
    for run in ("one", "two"):
        monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / f"cache-{run}"))
        embed_corpus(cfg, docs=docs, embeddings=tmp_path / run)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_a_change_that_alters_vectors_misses_the_cache(tmp_path, cache):
    docs = write_topic_docs(tmp_path / "docs.parquet")
    short = embed_corpus(EmbedConfig(max_tokens=8), docs=docs, embeddings=tmp_path / "short")
    longer = embed_corpus(EmbedConfig(max_tokens=12), docs=docs,  # same rows
                          embeddings=tmp_path / "longer")
    assert short["shards"][0]["sha256"] != longer["shards"][0]["sha256"]
    assert len(list((cache / "embed").iterdir())) == 2
    again = embed_corpus(EmbedConfig(max_tokens=8, query_prefix="q: "), docs=docs,
                         embeddings=tmp_path / "again")
    assert again["shards"] == short["shards"]  # the query prefix does not touch documents
    assert len(list((cache / "embed").iterdir())) == 2


def test_bad_inputs_are_one_line_errors(tmp_path):
    out = tmp_path / "emb"
    with pytest.raises(LongctxError, match="missing.parquet: documents file not found"):
        embed_corpus(EmbedConfig(), docs=tmp_path / "missing.parquet", embeddings=out)

    no_title = tmp_path / "no_title.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), no_title)
    with pytest.raises(LongctxError, match="no_title.parquet: missing column.*title"):
        embed_corpus(EmbedConfig(), docs=no_title, embeddings=out)

    empty = write_docs(tmp_path / "empty.parquet", [])
    with pytest.raises(LongctxError, match="empty.parquet: contains zero documents"):
        embed_corpus(EmbedConfig(), docs=empty, embeddings=out)

    docs = write_topic_docs(tmp_path / "docs.parquet")
    with pytest.raises(LongctxError, match="embed.model: local embedder path './no/such/model'"):
        embed_corpus(EmbedConfig(model="./no/such/model"), docs=docs, embeddings=out)
    with pytest.raises(LongctxError, match="embed.passage_prefix"):
        embed_corpus(EmbedConfig(max_tokens=4, passage_prefix="a long prefix here"), docs=docs,
                     embeddings=out)
    assert not out.exists()
    assert not list(tmp_path.glob(".emb*"))  # no temporary leftovers either


# --------------------------------------------------------------------------- shard jobs


def _small_row_groups(docs, rows_per_group=3):
    """The corpus rewritten in row groups smaller than a vector file, so shards start and
    stop inside row groups."""
    table = pq.read_table(docs)
    pq.write_table(table, docs, row_group_size=rows_per_group)
    return docs


def _embed_in_shards(cfg, docs, root, count):
    params = embed_params(cfg)
    parts = []
    for number in range(1, count + 1):
        parts.append(root / f"part-{number}")
        embed_shard(cfg, shard=Shard(number, count), params=params, docs=docs, part=parts[-1])
    return parts, gather_embeddings(params=params, parts=parts, embeddings=root / "emb")


@pytest.mark.parametrize("text", ["first_tokens", "passages"])
def test_three_shard_jobs_write_the_bytes_of_one_and_embed_only_their_own(tmp_path, text,
                                                                          monkeypatch):
    docs = _small_row_groups(write_topic_docs(tmp_path / "docs.parquet"))
    cfg = EmbedConfig(text=text, max_tokens=12, shard_size=4, batch_size=3)  # 5 files
    embed_corpus(cfg, docs=docs, embeddings=tmp_path / "whole")

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cold"))
    encoded = []
    real_encode = embed.encode
    monkeypatch.setattr(embed, "encode", lambda *a, **k: encoded.append(a[1]) or
                        real_encode(*a, **k))
    parts, manifest = _embed_in_shards(cfg, docs, tmp_path, 3)

    assert _files(tmp_path / "emb") == _files(tmp_path / "whole")
    assert manifest["documents"] == 20 and len(manifest["shards"]) == 5
    files = [sorted(p.name for p in part.glob("shard-*")) for part in parts]
    assert files == [["shard-00000.npy"], ["shard-00001.npy", "shard-00002.npy"],
                     ["shard-00003.npy", "shard-00004.npy"]]
    firsts = [t[0].split("\n")[0] for t in encoded]  # each file encoded once, by its owner
    assert firsts == list(TOPICS)[::4]
    part_rows = pl.read_parquet(parts[1] / "rows.parquet")
    assert part_rows["doc_id"].unique(maintain_order=True).to_list() == \
        [doc_id(i) for i in range(4, 12)]


def test_shard_and_gather_refusals(tmp_path):
    docs = write_topic_docs(tmp_path / "docs.parquet")
    cfg = EmbedConfig(shard_size=8)  # 3 files
    with pytest.raises(LongctxError, match=r"shards\.embed=4 is more than the 3 embedding files"):
        embed_shard(cfg, shard=Shard(1, 4), params=embed_params(cfg), docs=docs,
                    part=tmp_path / "p")
    assert not (tmp_path / "p").exists()

    parts, _ = _embed_in_shards(cfg, docs, tmp_path, 3)
    out = tmp_path / "again"
    with pytest.raises(LongctxError, match=r"\(1-of-3, 3-of-3\) are not every shard"):
        gather_embeddings(params=embed_params(cfg), parts=[parts[0], parts[2]], embeddings=out)
    other = embed_params(EmbedConfig(shard_size=8, batch_size=3))
    with pytest.raises(LongctxError, match="part-1: made with other params.*shard 1-of-3"):
        gather_embeddings(params=other, parts=parts, embeddings=out)
    with pytest.raises(LongctxError, match="nothing: not an embeddings part"):
        gather_embeddings(params=embed_params(cfg), parts=[tmp_path / "nothing"],
                          embeddings=out)
    assert not out.exists()
