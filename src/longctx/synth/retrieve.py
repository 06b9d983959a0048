"""Rule `retrieve`: the top-k documents for every instruction.

Each instruction is embedded as a query by the same model, query prefix and token limit as
the documents (the `Retriever` reads them from the embeddings manifest), all queries in large
batches, and the FAISS index returns the best documents. Hits below `min_score` are dropped,
and an instruction left without any is kept with an empty list (counted), so the tables stay
aligned with instructions.parquet. Each row keeps its query vector: pack searches again with
it to fill long samples, without loading the embedder (7B parameters at the paper's scale)
and with the very vector retrieve searched with.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from longctx import repro
from longctx.config import RetrieveConfig
from longctx.errors import LongctxError
from longctx.retrieval.search import Retriever
from longctx.synth.tables import read_table, write_table

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("instruction_id", pa.string()),
    ("doc_ids", pa.list_(pa.string())),
    ("scores", pa.list_(pa.float32())),
    ("query", pa.list_(pa.float32())),  # the instruction's query vector, as searched
])


def retrieve(cfg: RetrieveConfig, *, instructions: str | Path, index: str | Path,
             embeddings: str | Path, retrieved: str | Path, metrics: str | Path) -> dict:
    """Search `index` (over `embeddings`) for every instruction of `instructions`; write
    `retrieved` (one row per instruction, best hit first) and its stats to `metrics`."""
    queries = read_table(instructions, ["id", "instruction"])
    retriever = Retriever(index, embeddings, device=cfg.device, batch_size=cfg.batch_size)
    t0 = time.perf_counter()
    vectors = retriever.embed_queries([row["instruction"] for row in queries])
    hits = retriever.search_vectors(vectors, cfg.top_k)
    seconds = time.perf_counter() - t0
    log.info("retrieve: %d queries in %.1fs (%.1f queries/s)", len(queries), seconds,
             len(queries) / max(seconds, 1e-9))

    rows, below = [], 0
    for row, found in zip(queries, hits):
        kept = [h for h in found if cfg.min_score is None or h.score >= cfg.min_score]
        below += len(found) - len(kept)
        rows.append({"instruction_id": row["id"], "doc_ids": [h.doc_id for h in kept],
                     "scores": [h.score for h in kept]})
    write_table(retrieved, rows, SCHEMA, query=vector_column(vectors))

    counts = np.array([len(r["doc_ids"]) for r in rows])
    scores = np.array([s for r in rows for s in r["scores"]], dtype=np.float32)
    stats = {
        "instructions": len(rows),
        "top_k": cfg.top_k,
        "min_score": cfg.min_score,
        "hits": int(counts.sum()),
        "dropped_below_min_score": below,
        "instructions_without_documents": int((counts == 0).sum()),
        "documents_per_instruction": round(float(counts.mean()), 3) if len(rows) else 0.0,
        "distinct_documents": len({d for r in rows for d in r["doc_ids"]}),
        "score": _summary(scores),
        "top1_score": _summary(np.array([r["scores"][0] for r in rows if r["scores"]])),
    }
    repro.write_json(metrics, stats)
    return stats


def vector_column(vectors: np.ndarray) -> pa.Array:
    """float32 vectors (n x dim) as a list<float32> column, without a Python list per row."""
    n, dim = vectors.shape
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * dim)
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.astype(np.float32).ravel()))


def query_vectors(retrieved: str | Path, instruction_ids: list[str]) -> np.ndarray:
    """The query vectors retrieve searched with, for `instruction_ids`, in their order."""
    import pyarrow.compute as pc

    from longctx.parquet import open_table

    table = open_table(retrieved, ["instruction_id", "query"], made_by="retrieve").read(
        columns=["instruction_id", "query"])
    at = pc.index_in(pa.array(instruction_ids, pa.string()), value_set=table["instruction_id"])
    if at.null_count:
        missing = pc.filter(pa.array(instruction_ids), pc.is_null(at))[0].as_py()
        raise LongctxError(f"{retrieved}: no query vector for instruction {missing!r}; "
                           "rerun retrieve")
    rows = table["query"].combine_chunks().take(at)
    dim = len(rows[0]) if len(rows) else 0
    return rows.flatten().to_numpy().reshape(len(rows), dim)


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    return {"min": round(float(values.min()), 4), "mean": round(float(values.mean()), 4),
            "max": round(float(values.max()), 4)}
