"""Tiny fixtures shared by the retrieval tests: a 20-topic corpus and fake embedding dirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from longctx.repro import sha256_file

TOPICS = {
    "Volcano": "Volcanoes erupt when magma rises through the crust; lava flows and ash clouds "
    "bury nearby towns.",
    "Photosynthesis": "Plants turn sunlight, water and carbon dioxide into sugar and oxygen "
    "inside their chloroplasts.",
    "Chess": "In chess the opening moves fight for the centre; castling protects the king from "
    "checkmate.",
    "Jazz": "Jazz musicians improvise over chord changes, swinging the rhythm on saxophone and "
    "trumpet.",
    "French Revolution": "In 1789 Parisians stormed the Bastille and the monarchy of Louis XVI "
    "fell to the revolution.",
    "Black holes": "A black hole bends spacetime so strongly that not even light escapes past "
    "its event horizon.",
    "Honeybees": "Honeybees collect nectar from flowers, dance to share directions and make "
    "honey in the hive.",
    "Bitcoin": "Bitcoin is a cryptocurrency whose blockchain ledger is secured by miners "
    "solving proof of work.",
    "Marathon": "Marathon runners train for months to race 42 kilometres, pacing themselves "
    "and drinking water.",
    "Sourdough": "Sourdough bread rises with a wild yeast starter; bakers knead the dough and "
    "bake a crusty loaf.",
    "Immune system": "White blood cells and antibodies defend the body against viruses and "
    "bacteria.",
    "Plate tectonics": "Continental plates drift slowly on the mantle, colliding to build "
    "mountains and causing earthquakes.",
    "Football": "The striker scored a goal in the final minute and the football fans cheered in "
    "the stadium.",
    "Python": "Python programmers write functions, import modules and debug exceptions in "
    "their code.",
    "Coral reefs": "Coral reefs in warm shallow seas shelter colourful fish and bleach when the "
    "ocean heats.",
    "Vaccines": "Vaccines train immunity with a harmless antigen so a later infection is "
    "fought off quickly.",
    "Rainforest": "The Amazon rainforest is dense tropical jungle full of parrots, jaguars and "
    "tall trees.",
    "Origami": "Origami artists fold a single square of paper into cranes and flowers without "
    "cutting.",
    "Wine": "Winemakers crush grapes and ferment the juice in oak barrels to age red wine.",
    "Glaciers": "Glaciers are rivers of ice that carve valleys and retreat as the climate warms.",
}


def doc_id(i: int) -> str:
    return f"{i:016x}"


def write_docs(path: Path, texts: list[str], titles: list[str | None] | None = None) -> Path:
    """A corpus parquet with the columns the corpus step writes."""
    n = len(texts)
    pl.DataFrame(
        {
            "id": [doc_id(i) for i in range(n)],
            "text": texts,
            "title": titles if titles is not None else [None] * n,
            "source": ["test"] * n,
            "source_id": [None] * n,
            "n_tokens": [len(t.split()) for t in texts],
        },
        schema={"id": pl.String, "text": pl.String, "title": pl.String, "source": pl.String,
                "source_id": pl.String, "n_tokens": pl.Int64},
    ).write_parquet(path)
    return path


def write_topic_docs(path: Path) -> Path:
    """The 20-topic corpus: titles on even documents only (odd ones print their first words)."""
    titles = [t if i % 2 == 0 else None for i, t in enumerate(TOPICS)]
    return write_docs(path, list(TOPICS.values()), titles)


def topic_id(title: str) -> str:
    return doc_id(list(TOPICS).index(title))


def clustered_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit-norm vectors from a Gaussian mixture (what real embeddings look like to an index)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(out: Path, vectors: np.ndarray, shard_size: int) -> Path:
    """An embeddings dir in the embed step's format (shards + manifest) from given vectors."""
    out.mkdir(parents=True)
    shards = []
    for i, start in enumerate(range(0, len(vectors), shard_size)):
        name = f"shard-{i:05d}.npy"
        part = vectors[start : start + shard_size].astype(np.float16)
        np.save(out / name, part)
        shards.append({"file": name, "rows": len(part), "sha256": sha256_file(out / name)})
    manifest = {"dim": vectors.shape[1], "rows": len(vectors), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out
