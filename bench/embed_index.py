"""Benchmark the retrieval half on this machine; prints ONE JSON object on stdout.

(a) embed: documents/s of `embed_corpus` (the whole step: read, tokenize, encode, write shards)
    against a plain `SentenceTransformer.encode(texts, batch_size=same)` of the same texts,
    same model, same process. Goal: ratio >= 1.0.
(b) ann: IVF-Flat and HNSW (built by longctx.retrieval.index) against exact flat search on
    synthetic clustered unit vectors: build seconds, queries/s (one batch of all queries, all
    threads) and recall@10 against exact; nprobe / efSearch are swept and the smallest value
    reaching the recall target is reported. Goal: >= 20x exact's queries/s at recall >= 0.95.

    python bench/embed_index.py                     # full: 500 docs, 100K and 1M vectors
    python bench/embed_index.py --quick             # smoke run, about a minute
    python bench/embed_index.py --sizes 100000 --dim 768 --skip-embed
"""

from __future__ import annotations

import argparse
import bz2
import json
import math
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from machine import load_average, log, machine_info

from longctx.config import EmbedConfig, IndexConfig
from longctx.retrieval.embed import doc_text, embed_corpus, load_embedder, resolve_model
from longctx.retrieval.index import apply_search_params, new_index, omp_threads, recall_at_k


def machine() -> dict:
    import sentence_transformers

    return {
        **machine_info(),
        "faiss": faiss.__version__,
        "faiss_simd": faiss.get_compile_options(),
        "sentence_transformers": sentence_transformers.__version__,
    }


# --------------------------------------------------------------------------- (a) embed


def demo_documents(n: int) -> tuple[list[tuple[str | None, str]], str]:
    """(title, text) pairs from gensim's demo corpus: Lee news articles, Wikipedia articles,
    then later 4000-character sections of the Wikipedia articles if more are needed."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    from longctx.assets import demo_corpus_files

    files = demo_corpus_files()
    lee = [(None, line.strip()) for line in files["lee"].read_text(errors="replace").splitlines()
           if line.strip()]
    wiki = []
    with bz2.open(files["wikipedia"]) as fh:
        for title, raw, _ in extract_pages(fh, filter_namespaces=("0",)):
            text = " ".join(filter_wiki(raw).split())
            if len(text) > 2000 and not raw.lstrip().lower().startswith("#redirect"):
                wiki.append((title, text))
    sections = [(f"{title} (part {i // 4000})", text[i : i + 4000])
                for title, text in wiki for i in range(4000, len(text) - 1000, 4000)]
    docs = (lee + wiki + sections)[:n]
    used_lee = min(n, len(lee))
    used_wiki = min(max(0, n - len(lee)), len(wiki))
    used_sections = len(docs) - used_lee - used_wiki
    source = (f"gensim demo corpus: {used_lee} Lee news articles, {used_wiki} Wikipedia "
              f"articles, {used_sections} later 4000-char Wikipedia sections")
    return docs, source


def synthetic_documents(n: int, seed: int = 0) -> tuple[list[tuple[str | None, str]], str]:
    rng = np.random.default_rng(seed)
    words = "the of a river city music science history energy market team school plant".split()
    docs = [(None, " ".join(rng.choice(words, size=rng.integers(50, 600)))) for _ in range(n)]
    return docs, "synthetic sentences of random common words (demo corpus unavailable)"


def write_docs(path: Path, docs: list[tuple[str | None, str]]) -> None:
    import polars as pl

    pl.DataFrame(
        {
            "id": [f"{i:016x}" for i in range(len(docs))],
            "text": [t for _, t in docs],
            "title": [h for h, _ in docs],
            "source": ["bench"] * len(docs),
            "source_id": [None] * len(docs),
            "n_tokens": [len(t.split()) for _, t in docs],
        },
        schema={"id": pl.String, "text": pl.String, "title": pl.String, "source": pl.String,
                "source_id": pl.String, "n_tokens": pl.Int64},
    ).write_parquet(path)


def bench_embed(n_docs: int, batch_size: int, max_tokens: int, repeats: int) -> dict:
    try:
        docs, source = demo_documents(n_docs)
    except Exception as exc:  # gensim or its data missing
        log(f"demo corpus unavailable ({exc}); using synthetic documents")
        docs, source = synthetic_documents(n_docs)
    n = len(docs)
    cfg = EmbedConfig(batch_size=batch_size, max_tokens=max_tokens)
    model = load_embedder(cfg.model, "cpu")
    resolve_model(cfg.model)  # hash the model files once, outside the timings
    model.encode(["warm up the kernels"] * 8, batch_size=8)
    texts = [doc_text(text, title, cfg.title_in_text) for title, text in docs]
    old_max = model.max_seq_length
    model.max_seq_length = min(old_max, max_tokens)
    tokens = [min(len(ids), model.max_seq_length)
              for ids in model.tokenizer(texts, verbose=False)["input_ids"]]

    plain_s, ours_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_docs(tmp / "docs.parquet", docs)
        for r in range(repeats):
            log(f"embed: plain SentenceTransformer.encode of {n} documents (repeat {r + 1})")
            t0 = time.perf_counter()
            plain = model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 show_progress_bar=False)
            plain_s.append(time.perf_counter() - t0)
            log(f"embed: embed_corpus of {n} documents (repeat {r + 1})")
            os.environ["LONGCTX_CACHE"] = str(tmp / f"cache-{r}")  # from scratch every time
            t0 = time.perf_counter()
            embed_corpus(cfg, docs=tmp / "docs.parquet", embeddings=tmp / f"emb-{r}")
            ours_s.append(time.perf_counter() - t0)
        model.max_seq_length = old_max
        ours = np.concatenate([np.load(p) for p in sorted((tmp / "emb-0").glob("shard-*.npy"))])
    cos = (ours.astype(np.float32) * plain).sum(axis=1)
    plain_best, ours_best = min(plain_s), min(ours_s)
    return {
        "documents": n,
        "documents_source": source,
        "model": "bundled all-MiniLM-L6-v2",
        "device": "cpu",
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "tokens_per_doc_mean": round(float(np.mean(tokens)), 1),
        "docs_truncated_fraction": round(float(np.mean([t == max_tokens for t in tokens])), 3),
        "repeats": repeats,
        "plain_encode_seconds": [round(s, 2) for s in plain_s],
        "embed_corpus_seconds": [round(s, 2) for s in ours_s],
        "plain_encode_docs_per_s": round(n / plain_best, 2),
        "embed_corpus_docs_per_s": round(n / ours_best, 2),
        "ratio": round(plain_best / ours_best, 3),
        "goal_ratio": 1.0,
        "goal_met": plain_best / ours_best >= 1.0,
        "cosine_vs_plain_min": round(float(cos.min()), 5),
        "cosine_vs_plain_mean": round(float(cos.mean()), 5),
        "note": "embed_corpus time is the whole step (parquet read, corpus sha256, "
        "tokenization, encode, float16 shards, manifest); best of repeats",
    }


# --------------------------------------------------------------------------- (b) ann


LATENT = 64  # intrinsic dimension of the synthetic collection
RANK = 16  # each cluster spreads along its own 16-d subspace of the latent space


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors from a Gaussian mixture in a shared 64-d latent space (clusters with
    graded, overlapping similarity and low intrinsic dimension, like real embeddings),
    each cluster spread along its own 16-d subspace, mapped to `dim` dims, ~10% noise."""
    rng = np.random.default_rng(seed)
    latent = min(LATENT, dim)
    proj = np.linalg.qr(rng.standard_normal((dim, latent)))[0].T.astype(np.float32)
    centres = rng.standard_normal((clusters, latent), dtype=np.float32)
    spreads = rng.standard_normal((clusters, RANK, latent), dtype=np.float32) / np.sqrt(latent)
    labels = rng.integers(clusters, size=n)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(clusters + 1))
    x = np.empty((n, dim), dtype=np.float32)
    for c in range(clusters):
        idx = order[bounds[c] : bounds[c + 1]]
        z = rng.standard_normal((len(idx), RANK), dtype=np.float32)
        noise = rng.standard_normal((len(idx), dim), dtype=np.float32)
        x[idx] = (centres[c] + z @ spreads[c]) @ proj + 0.1 * np.sqrt(latent / dim) * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def near_queries(x: np.ndarray, nq: int, seed: int) -> np.ndarray:
    """Stored vectors moved by ~10% noise: queries near, not on, the data."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), nq, replace=False)]
    q = q + 0.1 / np.sqrt(x.shape[1]) * rng.standard_normal(q.shape, dtype=np.float32)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def timed_search(index: faiss.Index, q: np.ndarray, k: int, repeats: int):
    """Queries/s of one batched search (best of `repeats`, after a small warm-up search)."""
    index.search(q[:16], k)
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return len(q) / best, out


def sweep(index, name: str, values: list[int], q, truth, k, exact_qps, target, repeats) -> dict:
    rows, chosen = [], None
    for v in values:
        apply_search_params(index, {name: v})
        qps, (_, found) = timed_search(index, q, k, repeats)
        rec = recall_at_k(found, truth)
        rows.append({name: v, "recall": round(rec, 4), "qps": round(qps, 1),
                     "speedup": round(qps / exact_qps, 2)})
        log(f"  {name}={v}: recall@{k}={rec:.4f} qps={qps:.0f} ({qps / exact_qps:.1f}x exact)")
        if rec >= target:
            chosen = rows[-1]
            break
    return {"sweep": rows, "chosen": chosen,
            "goal_met": bool(chosen and chosen["speedup"] >= 20)}


def bench_ann(n: int, args: argparse.Namespace) -> dict:
    k, dim, threads = args.k, args.dim, args.threads
    clusters = max(10, n // 1000)
    log(f"ann n={n}: generating {n} x {dim} vectors ({clusters} clusters)")
    x = clustered(n, dim, clusters, seed=0)
    q = near_queries(x, args.queries, seed=1)
    faiss.omp_set_num_threads(threads)
    result = {"n": n, "dim": dim, "queries": len(q), "k": k, "threads": threads,
              "search_batch": len(q),
              "data": f"Gaussian mixture, {clusters} clusters in a {min(LATENT, dim)}-d latent "
              f"space, each spread along a {RANK}-d subspace, ~10% isotropic noise, unit norm; "
              "queries = stored vectors + ~10% noise"}

    flat = new_index(IndexConfig(type="flat"), dim, seed=0)
    t0 = time.perf_counter()
    flat.add(x)
    exact_build = time.perf_counter() - t0
    exact_qps, (_, truth) = timed_search(flat, q, k, args.repeats)
    del flat
    result["exact"] = {"build_s": round(exact_build, 2), "qps": round(exact_qps, 1)}
    log(f"  exact: {exact_qps:.0f} qps")

    nlist = args.nlist or 2 ** round(math.log2(4 * math.sqrt(n)))
    train = min(n, args.train_per_list * nlist)
    cfg = IndexConfig(type="ivf_flat", nlist=nlist, train_size=train, build_threads=threads)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with omp_threads(threads):
        ivf = new_index(cfg, dim, seed=0)
        ivf.train(x[np.sort(rng.choice(n, train, replace=False))])
        ivf.add(x)
    ivf_build = time.perf_counter() - t0
    log(f"  ivf_flat nlist={nlist}: built in {ivf_build:.1f}s")
    result["ivf_flat"] = {"nlist": nlist, "train_size": train, "build_s": round(ivf_build, 2),
                          **sweep(ivf, "nprobe", [1, 2, 4, 8, 16, 32, 64, 128], q, truth, k,
                                  exact_qps, args.target_recall, args.repeats)}
    del ivf

    # Smaller graphs for smaller collections: at 100K an exact scan is cheap, so the graph
    # must be lean to be 20x faster; at 1M recall needs the denser graph.
    m = args.hnsw_m or (12 if n <= 200_000 else 16)
    efc = args.ef_construction or (64 if n <= 200_000 else 80)
    cfg = IndexConfig(type="hnsw", hnsw_m=m, ef_construction=efc, build_threads=threads)
    t0 = time.perf_counter()
    with omp_threads(threads):
        hnsw = new_index(cfg, dim, seed=0)
        hnsw.add(x)
    hnsw_build = time.perf_counter() - t0
    log(f"  hnsw M={m} efConstruction={efc}: built in {hnsw_build:.1f}s")
    result["hnsw"] = {"M": m, "ef_construction": efc, "build_s": round(hnsw_build, 2),
                      **sweep(hnsw, "efSearch", [16, 24, 32, 48, 64, 96, 128, 256, 512], q,
                              truth, k, exact_qps, args.target_recall, args.repeats)}
    return result


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 40 docs, 20K vectors")
    p.add_argument("--docs", type=int, default=500, help="documents for the embed benchmark")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--sizes", default="100000,1000000", help="vector counts, comma-separated")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--nlist", type=int, default=0, help="default: 4*sqrt(n), a power of 2")
    p.add_argument("--train-per-list", type=int, default=39, help="IVF training vectors/list")
    p.add_argument("--hnsw-m", type=int, default=0, help="default: 12 (n<=200K) else 16")
    p.add_argument("--ef-construction", type=int, default=0, help="default: 64 (n<=200K) else 80")
    p.add_argument("--repeats", type=int, default=2, help="search timings: best of N")
    p.add_argument("--embed-repeats", type=int, default=2, help="embed timings: best of N")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--skip-ann", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.docs, args.sizes = 40, "20000"
        args.repeats = args.embed_repeats = 1

    t0 = time.perf_counter()
    out = {"benchmark": "embed_index", "machine": machine(),
           "settings": {k: v for k, v in vars(args).items()}}
    if not args.skip_embed:
        out["embed"] = bench_embed(args.docs, args.batch_size, args.max_tokens,
                                   args.embed_repeats)
    if not args.skip_ann:
        out["ann"] = [bench_ann(int(s), args) for s in args.sizes.split(",") if s]
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average_at_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
