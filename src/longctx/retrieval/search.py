"""Query the index: the top-k documents for each query, as the retrieve step and the CLI see it.

Queries are embedded by the same model, prefix and token limit as the documents (all read from
the embeddings manifest, and the model's file hashes are checked), so query and document
vectors live in the same space. In passages mode a document scores as its best passage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from longctx.errors import LongctxError
from longctx.repro import sha256_file
from longctx.retrieval.embed import encode, load_embedder, resolve_model
from longctx.retrieval.embed_parts import ROWS_FILE
from longctx.retrieval.index import MANIFEST, load_index, read_embeddings, read_manifest

SNIPPET_WORDS = 12


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    passage: int  # the best-scoring passage of the document (0 in first_tokens mode)


class Retriever:
    """An index, its row -> document map and the query embedder, opened together."""

    def __init__(
        self,
        index_dir: str | Path,
        embeddings_dir: str | Path,
        docs_path: str | Path | None = None,
        device: str = "auto",
        batch_size: int = 64,
    ):
        self.docs_path = Path(docs_path) if docs_path is not None else None
        self.batch_size = batch_size
        emb = read_embeddings(embeddings_dir, verify=False)
        self.manifest = emb.manifest
        index_manifest = read_manifest(index_dir)
        if index_manifest["embeddings"]["manifest_sha256"] != sha256_file(emb.root / MANIFEST):
            raise LongctxError(
                f"{index_dir}: built from other embeddings than {embeddings_dir}; rerun the "
                "index step"
            )
        self.index = load_index(index_dir)
        rows = pq.read_table(emb.root / ROWS_FILE, columns=["doc_id", "passage"])
        if rows.num_rows != self.index.ntotal:
            raise LongctxError(
                f"{emb.root / ROWS_FILE}: {rows.num_rows} rows but the index holds "
                f"{self.index.ntotal} vectors"
            )
        # rows -> document numbers, so aggregation works on integers; the names stay one
        # Arrow array (a numpy array of Python strings is ~4x the memory at 10M documents)
        codes = rows.column("doc_id").combine_chunks().dictionary_encode()
        self.doc_names = codes.dictionary
        self.row_doc = codes.indices.to_numpy()
        self.row_passage = rows.column("passage").to_numpy()
        self.rows_per_doc = math.ceil(rows.num_rows / max(1, len(self.doc_names)))
        self.embeddings_dir, self.device = Path(embeddings_dir), device
        self._model = None

    @property
    def model(self):
        """The query embedder, loaded on first use: a search with given vectors never loads
        it (pack fills with the vectors retrieve kept)."""
        if self._model is None:
            model = self.manifest["model"]
            _, identity = resolve_model(model["name"])
            if identity["files"] != model["files"]:
                raise LongctxError(
                    f"embed.model: {model['name']!r} differs from the model that embedded "
                    f"{self.embeddings_dir} (file hashes); rerun the embed step"
                )
            self._model = load_embedder(
                model["name"], self.device, self.manifest.get("trust_remote_code", False)
            )
        return self._model

    def embed_queries(self, queries: list[str]) -> np.ndarray:
        return encode(
            self.model, queries, self.batch_size, self.manifest.get("query_prefix", ""),
            max_tokens=self.manifest["text"]["max_tokens"],
        )

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Top-k distinct documents per query, best first (search_vectors)."""
        return self.search_vectors(self.embed_queries(queries), k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-k distinct documents per query vector, best first.

        Several rows can belong to one document, so more rows than k are fetched, and a
        query whose candidates cover fewer than k documents is searched again with twice
        as many, until k documents come back or the index has no more to give.
        """
        if k < 1:
            raise LongctxError(f"k must be positive, got {k}")
        if vectors.ndim != 2 or vectors.shape[1] != self.index.d:
            raise LongctxError(f"query vectors of shape {vectors.shape} for an index of "
                               f"{self.index.d}-d vectors (rerun retrieve)")
        ntotal = self.index.ntotal
        hits: list[list[Hit] | None] = [None] * len(vectors)
        todo = np.arange(len(vectors))
        fetch = min(ntotal, k * self.rows_per_doc)
        while len(todo):
            scores, rows = self.index.search(vectors[todo], fetch)
            again = []
            for q, s, r in zip(todo, scores, rows):
                found = self._aggregate(s, r, k)
                exhausted = fetch >= ntotal or (r < 0).any()
                if len(found) < k and not exhausted:
                    again.append(q)
                else:
                    hits[q] = found
            todo, fetch = np.asarray(again, dtype=np.int64), min(ntotal, fetch * 2)
        return hits  # type: ignore[return-value]

    def _aggregate(self, scores: np.ndarray, rows: np.ndarray, k: int) -> list[Hit]:
        """Rows come best first, so a document's first row is its best passage."""
        out: list[Hit] = []
        seen: set[int] = set()
        for score, row in zip(scores, rows):
            if row < 0:
                break
            doc = int(self.row_doc[row])
            if doc in seen:
                continue
            seen.add(doc)
            out.append(Hit(self.doc_names[doc].as_py(), float(score),
                           int(self.row_passage[row])))
            if len(out) == k:
                break
        return out

    def describe(self, doc_ids: list[str]) -> dict[str, str]:
        """A printable label per document: its title, or else its first words."""
        if self.docs_path is None or not doc_ids:
            return {}
        if not self.docs_path.is_file():
            raise LongctxError(f"{self.docs_path}: documents file not found")
        import polars as pl

        wanted = list(dict.fromkeys(doc_ids))
        table = (
            pl.scan_parquet(self.docs_path)
            .filter(pl.col("id").is_in(wanted))
            .select("id", "title", "text")
            .collect()
        )
        return {
            row["id"]: label(row["title"], row["text"]) for row in table.iter_rows(named=True)
        }


def label(title: str | None, text: str | None) -> str:
    if title and title.strip():
        return " ".join(title.split())
    words = (text or "").split()
    return " ".join(words[:SNIPPET_WORDS]) + (" ..." if len(words) > SNIPPET_WORDS else "")


def format_hits(hits: list[Hit], labels: dict[str, str]) -> str:
    """One line per hit: rank, score, document id, title or first words."""
    if not hits:
        return "(no results)"
    return "\n".join(
        f"{rank:>3}  {hit.score:.4f}  {hit.doc_id}  {labels.get(hit.doc_id, '')}".rstrip()
        for rank, hit in enumerate(hits, 1)
    )


def search_command(
    query: str, k: int, index_dir: str | Path, embeddings_dir: str | Path, docs_path: str | Path
) -> str:
    """What `longctx search "query"` prints."""
    retriever = Retriever(index_dir, embeddings_dir, docs_path)
    hits = retriever.search([query], k)[0]
    return format_hits(hits, retriever.describe([h.doc_id for h in hits]))
