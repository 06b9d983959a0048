"""Build a FAISS index over the embedding shards, and check its recall before anyone uses it.

All types use inner product, which is cosine similarity on our unit-norm vectors. Approximate
types (IVF, HNSW, IVF-PQ) are what makes millions of documents searchable on a CPU; the
recall@k self-check in the manifest says what that costs against exact search, measured on
stored vectors used as queries.

Builds are deterministic: the training sample and k-means are seeded, and the thread count is
pinned while building (HNSW insertion order depends on threads), so the same embeddings, params
and seed give the same `docs.faiss` bytes.

An IVF index larger than memory (IVF-Flat over 10M 4096-d vectors is 164 GB) keeps its
inverted lists on disk (`index.on_disk`): each embedding file goes into its own copy of the
trained, empty index, and faiss merges their lists into `docs.ivfdata` (faiss.contrib.ondisk),
which searches read through a memory map. The build then holds one embedding file, not the
index, and finds what the in-memory index finds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longctx.config import IndexConfig
from longctx.errors import LongctxError
from longctx.repro import atomic_path, sha256_file, write_json

# faiss's loader logs a failed AVX2 probe at INFO although its dynamic-dispatch wheels pick the
# best SIMD level at run time; keep that noise out of step logs
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
import faiss  # noqa: E402

log = logging.getLogger(__name__)

FORMAT = "longctx-index/1"
INDEX_FILE = "docs.faiss"
LISTS_FILE = "docs.ivfdata"  # index.on_disk: the inverted lists, next to INDEX_FILE
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- embeddings


@dataclass(frozen=True)
class Embeddings:
    """An embeddings directory, checked: its manifest and its shard files in row order."""

    root: Path
    manifest: dict
    shards: list[Path]
    counts: list[int]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def n(self) -> int:
        return sum(self.counts)

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 vectors) per shard; one shard in memory at a time."""
        start = 0
        for path, count in zip(self.shards, self.counts):
            yield start, np.load(path).astype(np.float32)
            start += count

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 vectors of the given (sorted) rows, read through memory maps."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        bounds = np.cumsum([0, *self.counts])
        for i, path in enumerate(self.shards):
            lo, hi = np.searchsorted(rows, [bounds[i], bounds[i + 1]])
            if hi > lo:
                out[lo:hi] = np.load(path, mmap_mode="r")[rows[lo:hi] - bounds[i]]
        return out


def read_embeddings(embeddings_dir: str | Path, verify: bool = True) -> Embeddings:
    """Open an embeddings dir; a missing or corrupt one is a one-line LongctxError."""
    root = Path(embeddings_dir)
    path = root / MANIFEST
    if not path.is_file():
        raise LongctxError(f"{path}: embeddings manifest not found (run the embed step)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entries = manifest["shards"]
        dim = int(manifest["dim"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LongctxError(f"{path}: corrupt embeddings manifest ({exc!r})") from None
    shards, counts = [], []
    for entry in entries:
        shard = root / entry["file"]
        if not shard.is_file():
            raise LongctxError(f"{shard}: embeddings shard missing")
        if verify and sha256_file(shard) != entry["sha256"]:
            raise LongctxError(f"{shard}: sha256 differs from {path} (corrupt shard)")
        try:
            shape = np.load(shard, mmap_mode="r").shape
        except Exception as exc:
            raise LongctxError(f"{shard}: unreadable embeddings shard ({exc})") from None
        if shape != (entry["rows"], dim):
            raise LongctxError(f"{shard}: shape {shape}, manifest says ({entry['rows']}, {dim})")
        shards.append(shard)
        counts.append(int(entry["rows"]))
    if not shards or sum(counts) == 0:
        raise LongctxError(f"{path}: no vectors to index")
    return Embeddings(root, manifest, shards, counts)


# --------------------------------------------------------------------------- index types


def check_capacity(cfg: IndexConfig, n: int, n_train: int, dim: int) -> None:
    """Refuse a type the collection cannot train, before any work is done (train_size's own
    limits are params rules: config.IndexConfig)."""
    if cfg.type in ("ivf_flat", "ivf_pq") and n < cfg.nlist:
        raise LongctxError(
            f"index.nlist={cfg.nlist}: only {n} vectors; IVF needs at least nlist training "
            f"vectors (ideally ~39*nlist = {39 * cfg.nlist}); use `index.type: flat` or a "
            "smaller index.nlist"
        )
    if cfg.type == "ivf_pq":
        if dim % cfg.pq_m:
            raise LongctxError(f"index.pq_m={cfg.pq_m} must divide the embedding dim {dim}")
        if n_train < 2**cfg.pq_bits:
            raise LongctxError(
                f"index.pq_bits={cfg.pq_bits}: PQ needs at least 2**pq_bits = {2**cfg.pq_bits} "
                f"training vectors, got {n_train}; use `index.type: flat` or smaller "
                "index.pq_bits / index.pq_m"
            )


def build_params(cfg: IndexConfig) -> dict:
    """The construction parameters that apply to `cfg.type` (recorded in the manifest)."""
    return {
        "flat": {},
        "ivf_flat": {"nlist": cfg.nlist},
        "hnsw": {"hnsw_m": cfg.hnsw_m, "ef_construction": cfg.ef_construction},
        "ivf_pq": {"nlist": cfg.nlist, "pq_m": cfg.pq_m, "pq_bits": cfg.pq_bits},
    }[cfg.type]


def search_params(cfg: IndexConfig) -> dict:
    """Query-time knobs: not all survive serialization, so load_index sets them again."""
    if cfg.type in ("ivf_flat", "ivf_pq"):
        return {"nprobe": cfg.nprobe}
    if cfg.type == "hnsw":
        return {"efSearch": cfg.ef_search}
    return {}


def apply_search_params(index: faiss.Index, params: dict) -> faiss.Index:
    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
    return index


def new_index(cfg: IndexConfig, dim: int, seed: int) -> faiss.Index:
    """An empty index of `cfg.type`, with seeded k-means for the trained types."""
    ip = faiss.METRIC_INNER_PRODUCT
    if cfg.type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif cfg.type == "ivf_flat":
        index = faiss.index_factory(dim, f"IVF{cfg.nlist},Flat", ip)
    elif cfg.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, ip)
        index.hnsw.efConstruction = cfg.ef_construction
    elif cfg.type == "ivf_pq":
        index = faiss.index_factory(dim, f"IVF{cfg.nlist},PQ{cfg.pq_m}x{cfg.pq_bits}", ip)
    else:  # pragma: no cover - config validation rejects other values
        raise LongctxError(f"index.type: unknown type {cfg.type!r}")
    if cfg.type in ("ivf_flat", "ivf_pq"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        if cfg.type == "ivf_pq":
            ivfpq = faiss.downcast_index(ivf)
            ivfpq.pq.cp.seed = seed
            # polysemous codes only serve Hamming-filtered search, which we never run, and
            # training them costs 10x the PQ k-means itself
            ivfpq.do_polysemous_training = False
    return apply_search_params(index, search_params(cfg))


@contextlib.contextmanager
def omp_threads(n: int) -> Iterator[None]:
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted seeded sample of min(size, n) distinct rows."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


# --------------------------------------------------------------------------- recall


def exact_topk(queries: np.ndarray, shards: Iterator[tuple[int, np.ndarray]], k: int):
    """Exact inner-product top-k (scores, rows) over shards, merged on a heap."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, vectors in shards:
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors)
        scores, ids = flat.search(queries, min(k, len(vectors)))
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the exact top-k ids that the index returned in its top-k."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


# --------------------------------------------------------------------------- the step


def build_index(cfg: IndexConfig, seed: int, *, embeddings: Path, index: Path) -> dict:
    """Build `index/docs.faiss` + `manifest.json` from the `embeddings` dir; returns the manifest.

    Faiss ids are embedding rows (rows.parquet maps them to documents).
    """
    emb = read_embeddings(embeddings)
    n, dim = emb.n, emb.dim
    train_rows = sample_rows(n, cfg.train_size, seed)
    check_capacity(cfg, n, len(train_rows), dim)

    with atomic_path(index) as tmp:
        tmp.mkdir()
        t0 = time.perf_counter()
        with omp_threads(cfg.build_threads):
            faiss_index = new_index(cfg, dim, seed)
            if not faiss_index.is_trained:
                log.info("training %s on %d vectors", cfg.type, len(train_rows))
                faiss_index.train(emb.take(train_rows))
            if cfg.on_disk:
                _add_on_disk(faiss_index, emb, tmp)
            else:
                for _, vectors in emb.iter_shards():
                    faiss_index.add(vectors)
        build_seconds = time.perf_counter() - t0
        k, queries, recall = _self_check(cfg, seed, emb, faiss_index)
        log.info("%s: %d vectors, built in %.1fs, recall@%d = %.4f", cfg.type, n,
                 build_seconds, k, recall)
        faiss.write_index(faiss_index, str(tmp / INDEX_FILE))
        manifest = {
            "format": FORMAT,
            "type": cfg.type,
            "metric": "inner_product",
            "params": build_params(cfg),
            "search_params": search_params(cfg),
            "dim": dim,
            "ntotal": int(faiss_index.ntotal),
            "seed": seed,
            "train_vectors": len(train_rows) if cfg.type in ("ivf_flat", "ivf_pq") else 0,
            "build_threads": cfg.build_threads,
            "recall_k": k,
            "recall_sample": len(queries),
            "recall": recall,
            "index_sha256": sha256_file(tmp / INDEX_FILE),
            **({"lists_sha256": sha256_file(tmp / LISTS_FILE)} if cfg.on_disk else {}),
            "embeddings": {
                "dir": str(embeddings),
                "manifest_sha256": sha256_file(emb.root / MANIFEST),
            },
            "faiss_version": faiss.__version__,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _self_check(cfg: IndexConfig, seed: int, emb: Embeddings, faiss_index: faiss.Index
                ) -> tuple[int, np.ndarray, float]:
    """recall@k of the index against exact search, stored vectors as queries: (k, queries,
    recall)."""
    k = min(cfg.recall_k, emb.n)
    queries = emb.take(sample_rows(emb.n, cfg.recall_sample, seed + 1))
    _, truth = exact_topk(queries, emb.iter_shards(), k)
    _, found = faiss_index.search(queries, k)
    return k, queries, recall_at_k(found, truth)


def _add_on_disk(faiss_index: faiss.Index, emb: Embeddings, out: Path) -> None:
    """Every embedding file into the trained, empty IVF `faiss_index`, its inverted lists
    merged into `out/docs.ivfdata`: one file's vectors and lists in memory at a time. Ids are
    embedding rows, as `add` gives them. The data file is named without its directory, so
    the index reads it from wherever the index dir is (load_index)."""
    from faiss.contrib.ondisk import merge_ondisk

    scratch = out / "parts"
    scratch.mkdir()
    parts = []
    for start, vectors in emb.iter_shards():
        part = faiss.clone_index(faiss_index)
        part.add_with_ids(vectors, np.arange(start, start + len(vectors), dtype=np.int64))
        parts.append(str(scratch / f"{len(parts):06d}.faiss"))
        faiss.write_index(part, parts[-1])
        del part
    merge_ondisk(faiss_index, parts, str(out / LISTS_FILE))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(faiss_index).invlists)
    lists.filename = LISTS_FILE
    for part in parts:
        Path(part).unlink()
    scratch.rmdir()


def read_manifest(index_dir: str | Path) -> dict:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise LongctxError(f"{path}: index manifest not found (run the index step)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise LongctxError(f"{path}: corrupt index manifest ({exc})") from None


def load_index(index_dir: str | Path) -> faiss.Index:
    """Read `docs.faiss` with the manifest's search parameters (nprobe, efSearch) applied."""
    manifest = read_manifest(index_dir)
    path = Path(index_dir) / INDEX_FILE
    if not path.is_file():
        raise LongctxError(f"{path}: index file missing")
    try:  # an on-disk index's lists (docs.ivfdata) are found next to it, memory-mapped
        index = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as exc:
        raise LongctxError(f"{path}: unreadable FAISS index ({exc})".splitlines()[0]) from None
    return apply_search_params(index, manifest.get("search_params", {}))
