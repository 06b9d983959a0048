"""build_index / load_index on random clustered vectors: types, recall, determinism, errors."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from retrieval_data import clustered_vectors, write_embeddings

from longctx.config import IndexConfig
from longctx.errors import LongctxError
from longctx.repro import sha256_file
from longctx.retrieval import index as index_mod
from longctx.retrieval.index import build_index, load_index

N, DIM = 4000, 32


@pytest.fixture(scope="module")
def vectors():
    return clustered_vectors(N, DIM, clusters=40)


@pytest.fixture(scope="module")
def emb(tmp_path_factory, vectors):
    return write_embeddings(tmp_path_factory.mktemp("emb") / "embeddings", vectors, 1000)


CONFIGS = {
    "flat": IndexConfig(type="flat"),
    "ivf_flat": IndexConfig(type="ivf_flat", nlist=32, nprobe=8, train_size=2000),
    "hnsw": IndexConfig(type="hnsw", hnsw_m=16, ef_construction=64, ef_search=64),
}


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_types_reach_high_recall_and_reload_with_search_params(kind, emb, vectors, tmp_path):
    cfg = CONFIGS[kind].model_copy(update={"recall_sample": 200})
    manifest = build_index(cfg, 7, embeddings=emb, index=tmp_path / "index")

    assert manifest == json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert (manifest["type"], manifest["dim"], manifest["ntotal"]) == (kind, DIM, N)
    assert manifest["recall_k"] == 10 and manifest["recall_sample"] == 200
    assert manifest["embeddings"]["manifest_sha256"] == sha256_file(emb / "manifest.json")
    assert manifest["index_sha256"] == sha256_file(tmp_path / "index" / "docs.faiss")
    if kind == "flat":
        assert manifest["recall"] == 1.0
    else:
        assert 0.9 <= manifest["recall"] <= 1.0

    index = load_index(tmp_path / "index")
    assert index.ntotal == N
    if kind == "ivf_flat":
        assert manifest["search_params"] == {"nprobe": 8}
        assert faiss.extract_index_ivf(index).nprobe == 8
        assert manifest["train_vectors"] == 2000
    if kind == "hnsw":
        assert manifest["search_params"] == {"efSearch": 64}
        assert faiss.downcast_index(index).hnsw.efSearch == 64
    # a stored vector finds itself first (ids are embedding rows)
    queries = vectors[[5, 1234, 3999]].astype(np.float16).astype(np.float32)
    _, ids = index.search(queries, 1)
    assert ids[:, 0].tolist() == [5, 1234, 3999]


def test_ivf_pq_builds_and_compresses(emb, tmp_path):
    cfg = IndexConfig(type="ivf_pq", nlist=16, nprobe=16, pq_m=8, pq_bits=6, recall_sample=100)
    manifest = build_index(cfg, 1, embeddings=emb, index=tmp_path / "index")
    assert manifest["params"] == {"nlist": 16, "pq_m": 8, "pq_bits": 6}
    assert 0.2 < manifest["recall"] < 1.0  # lossy codes, but far better than chance (10/4000)
    size = (tmp_path / "index" / "docs.faiss").stat().st_size
    assert size < N * DIM * 4 / 4  # 6 bytes of code per vector instead of 128 of floats


@pytest.mark.parametrize("kind", ["flat", "ivf_flat", "hnsw"])
def test_two_builds_are_byte_identical(kind, emb, tmp_path):
    cfg = CONFIGS[kind].model_copy(update={"recall_sample": 20})
    build_index(cfg, 3, embeddings=emb, index=tmp_path / "a")
    build_index(cfg, 3, embeddings=emb, index=tmp_path / "b")
    a = (tmp_path / "a" / "docs.faiss").read_bytes()
    assert a == (tmp_path / "b" / "docs.faiss").read_bytes()
    manifest = (tmp_path / "a" / "manifest.json").read_bytes()  # no timings: DVC hashes match
    assert manifest == (tmp_path / "b" / "manifest.json").read_bytes()
    if kind == "ivf_flat":  # the seed really drives k-means
        build_index(cfg, 4, embeddings=emb, index=tmp_path / "c")
        assert a != (tmp_path / "c" / "docs.faiss").read_bytes()


IVF = {"ivf_flat": CONFIGS["ivf_flat"],
       "ivf_pq": IndexConfig(type="ivf_pq", nlist=16, nprobe=16, pq_m=8, pq_bits=6)}


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq"])
def test_on_disk_lists_find_what_the_in_memory_index_finds(kind, emb, vectors, tmp_path):
    cfg = IVF[kind].model_copy(update={"recall_sample": 100})
    memory = build_index(cfg, 5, embeddings=emb, index=tmp_path / "memory")
    on_disk = cfg.model_copy(update={"on_disk": True})
    disk = build_index(on_disk, 5, embeddings=emb, index=tmp_path / "disk")
    assert disk["recall"] == memory["recall"] and disk["ntotal"] == N
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == \
        ["docs.faiss", "docs.ivfdata", "manifest.json"]  # the per-file parts are gone
    assert disk["lists_sha256"] == sha256_file(tmp_path / "disk" / "docs.ivfdata")
    build_index(on_disk, 5, embeddings=emb, index=tmp_path / "again")
    for name in ("docs.faiss", "docs.ivfdata", "manifest.json"):
        assert (tmp_path / "disk" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()

    (tmp_path / "disk").rename(tmp_path / "moved")  # the lists are found next to the index
    queries = vectors[::37].astype(np.float16).astype(np.float32)
    found = [load_index(tmp_path / d).search(queries, 10) for d in ("memory", "moved")]
    assert np.array_equal(found[0][1], found[1][1])
    assert np.allclose(found[0][0], found[1][0])


def test_on_disk_is_for_ivf_only():
    with pytest.raises(ValueError, match="on_disk.*only IVF lists"):
        IndexConfig(type="hnsw", on_disk=True)


def test_collection_too_small_for_ivf(tmp_path):
    emb = write_embeddings(tmp_path / "emb", clustered_vectors(100, DIM, 5), 64)
    out = tmp_path / "index"
    too_small = r"index\.nlist=1024: only 100 vectors.*index\.type: flat"
    with pytest.raises(LongctxError, match=too_small):
        build_index(IndexConfig(type="ivf_flat"), 0, embeddings=emb, index=out)
    with pytest.raises(LongctxError, match=r"index\.pq_m=5 must divide the embedding dim 32"):
        build_index(IndexConfig(type="ivf_pq", nlist=4, pq_m=5), 0, embeddings=emb, index=out)
    with pytest.raises(LongctxError, match=r"index\.pq_bits=8: .* 256 training vectors, got 100"):
        build_index(IndexConfig(type="ivf_pq", nlist=4, pq_m=8), 0, embeddings=emb, index=out)
    assert not out.exists()


def test_missing_or_corrupt_embeddings(tmp_path):
    out = tmp_path / "index"
    with pytest.raises(LongctxError, match="manifest.json: embeddings manifest not found"):
        build_index(IndexConfig(), 0, embeddings=tmp_path / "nothing", index=out)

    emb = write_embeddings(tmp_path / "emb", clustered_vectors(50, DIM, 5), 20)
    shard = emb / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LongctxError, match="shard-00001.npy: sha256 differs"):
        build_index(IndexConfig(), 0, embeddings=emb, index=out)

    shard.unlink()
    with pytest.raises(LongctxError, match="shard-00001.npy: embeddings shard missing"):
        build_index(IndexConfig(), 0, embeddings=emb, index=out)

    (emb / "manifest.json").write_text("{not json")
    with pytest.raises(LongctxError, match="corrupt embeddings manifest"):
        build_index(IndexConfig(), 0, embeddings=emb, index=out)
    assert not out.exists()


def test_failed_build_leaves_previous_index_untouched(emb, tmp_path, monkeypatch):
    out = tmp_path / "index"
    build_index(CONFIGS["flat"].model_copy(update={"recall_sample": 10}), 0, embeddings=emb,
                index=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(index, path):
        open(path, "wb").write(b"half an ind")  # a partial file, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(index_mod.faiss, "write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        build_index(CONFIGS["hnsw"], 0, embeddings=emb, index=out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp dir left


def test_load_index_errors(tmp_path):
    with pytest.raises(LongctxError, match="index manifest not found"):
        load_index(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(LongctxError, match="docs.faiss: index file missing"):
        load_index(tmp_path)
