"""Rule `corpus`: read the configured sources into one normalised, deduplicated document table.

Sources are streamed in batches of `corpus.batch_size`, so memory follows the batch and not the
corpus (a Fineweb-Edu run reads 10M documents). Every dropped document is counted with its
reason, ids are a hash of the normalised text (stable across runs and source reorderings), and
the parquet file's bytes depend only on the input, so DVC sees no change when nothing changed.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import itertools
import json
import re
import sys
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import NamedTuple
from xml.etree.ElementTree import ParseError

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from gensim.corpora.wikicorpus import extract_pages, filter_wiki
from tqdm import tqdm

from longctx import assets, repro
from longctx.config import CorpusConfig, CorpusSource
from longctx.errors import LongctxError, one_line
from longctx.inputs import expand
from longctx.tokens import token_counter

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.large_string()), ("title", pa.string()),
                    ("source", pa.string()), ("source_id", pa.string()), ("n_tokens", pa.int32())])
# Fixed bucket edges (0, 128, 256, ... 1M tokens) so histograms of different runs compare;
# counts[i] = documents with edges[i] <= n_tokens < edges[i+1], the last bucket is open.
HIST_EDGES = [0] + [2**k for k in range(7, 21)]
DROP_REASONS = ("empty", "redirect", "non_article", "duplicate", "too_short")


class Record(NamedTuple):
    text: str | None
    title: str | None
    source_id: str | None
    drop: str | None = None  # a reason the reader already knows (a non-article wiki page)


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


# --- normalisation ------------------------------------------------------------------------

_HSPACE = re.compile(r"[^\S\n]+")
_LINE_EDGE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """NFC, one newline style, single spaces, no spaces at line ends, at most one blank line:
    texts that differ only in layout get the same id."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _LINE_EDGE.sub("\n", _HSPACE.sub(" ", text))
    return _BLANK_LINES.sub("\n\n", text).strip()


def doc_id(text: str) -> str:
    """First 16 hex digits of sha256(normalised text)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# --- Wikipedia markup ------------------------------------------------------------------------

_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_WIKI_FIXES = [  # what gensim's filter_wiki leaves behind
    (re.compile(r"'{2,}"), ""),  # bold / italic quotes
    (  # gallery line -> its caption
        re.compile(r"^[ \t]*(?:(?:File|Image):[^|\n]*|[^|\n]*\.(?:jpe?g|png|gif|svg|tiff?))\|",
                   re.MULTILINE | re.IGNORECASE),
        "",
    ),
    (
        re.compile(
            r"\|(?:thumb(?:nail)?|frame(?:less)?|border|left|right|center|none|upright[^|\n]*"
            r"|\d*x?\d+px|alt=[^|\n]*)(?=[|\n]|$)",
            re.IGNORECASE,
        ),
        "",
    ),  # image options
    (re.compile(r"\([\s,;:]*\)"), ""),  # brackets emptied by removed templates
    (re.compile(r"[ \t]+([,;])"), r"\1"),  # space left before punctuation
    (re.compile(r"^[*#:;]+[ \t]*$", re.MULTILINE), ""),  # list items emptied
]


def clean_wiki(raw: str) -> str:
    """Wiki markup -> readable text: gensim's filter_wiki, then leftovers; paragraphs kept,
    headings become plain lines, sections left without content are dropped."""
    text = filter_wiki(raw)
    for pattern, repl in _WIKI_FIXES:
        text = pattern.sub(repl, text)
    kept: list[str] = []
    has_content = [False] * 7  # content seen below, per heading level (walking backwards)
    for line in reversed(text.split("\n")):
        match = _HEADING.match(line)
        if match is None:
            if line.strip():
                has_content = [True] * 7
            kept.append(line)
            continue
        level = len(match.group(1))
        if has_content[level]:
            kept.append(match.group(2))
        has_content[level:] = [False] * (7 - level)
    return "\n".join(reversed(kept))


# --- readers: each yields Records from one file ---------------------------------------------


def _read_wikipedia(path: Path) -> Iterator[Record]:
    """Pages of a MediaWiki export (.xml or .xml.bz2); only namespace 0 holds articles."""
    ns = {}

    def classify(elem, ns_path, **_):  # called by extract_pages just before it yields the page
        ns["article"] = elem.findtext(ns_path, "0") == "0"
        return True

    try:
        with (bz2.open if path.suffix == ".bz2" else open)(path, "rb") as fh:
            for title, text, page_id in extract_pages(fh, filter_articles=classify):
                if not ns["article"]:
                    yield Record(None, title, page_id, "non_article")
                elif text.lstrip()[:9].lower() == "#redirect":
                    yield Record(text, title, page_id)  # dropped downstream, no need to clean
                else:
                    yield Record(clean_wiki(text), title, page_id)
    except (OSError, EOFError, ParseError, ValueError) as exc:
        raise LongctxError(f"{path}: not a readable MediaWiki dump ({one_line(exc)})") from None


def _read_lines(path: Path) -> Iterator[Record]:
    """One document per line (the Lee corpus); the line number is the source id."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            yield Record(line, None, str(lineno))


def _read_jsonl(path: Path, src: CorpusSource) -> Iterator[Record]:
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LongctxError(f"{where}: invalid UTF-8 at byte {exc.start}") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LongctxError(f"{where}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or src.text_field not in obj:
                    keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise LongctxError(f"{where}: no key {src.text_field!r} (has: {keys})")
                text = obj[src.text_field]
                if text is not None and not isinstance(text, str):
                    kind = type(text).__name__
                    raise LongctxError(f"{where}: {src.text_field!r} is a {kind}, not a string")
                title = obj.get(src.title_field) if src.title_field else None
                source_id = obj.get(src.id_field) if src.id_field else None
                yield Record(text, _opt_str(title), _opt_str(source_id))
    except (OSError, EOFError) as exc:
        raise LongctxError(f"{path}: cannot read ({one_line(exc)})") from None


def _parquet_columns(path: Path, src: CorpusSource, key: str) -> dict[str, str]:
    """Check a file's schema before any work: field role -> column name."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise LongctxError(f"{path}: not a readable parquet file ({one_line(exc)})") from None
    names = schema.names
    if src.text_field not in names:
        raise LongctxError(
            f"{path}: no text column {src.text_field!r} ({key}.text_field); "
            f"columns: {', '.join(names)}"
        )
    kind = schema.field(src.text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind) or pa.types.is_null(kind)):
        raise LongctxError(f"{path}: column {src.text_field!r} holds {kind}, not strings")
    columns = {"text": src.text_field}
    for role, option in (("source_id", "id_field"), ("title", "title_field")):
        name = getattr(src, option)
        if name in names:
            columns[role] = name
        elif name is not None and option in src.model_fields_set:  # the default may be absent
            raise LongctxError(f"{path}: no column {name!r} ({key}.{option}); "
                               f"columns: {', '.join(names)}")
    return columns


def _read_parquet(path: Path, columns: dict[str, str], batch_size: int) -> Iterator[Record]:
    """Only the needed columns, one record batch at a time."""
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size, columns=list(columns.values())):
            values = {role: batch.column(name).to_pylist() for role, name in columns.items()}
            none = itertools.repeat(None)
            yield from (
                Record(text, _opt_str(title), _opt_str(sid))
                for text, title, sid in zip(
                    values["text"], values.get("title", none), values.get("source_id", none)
                )
            )
    except (pa.ArrowException, OSError) as exc:
        raise LongctxError(f"{path}: unreadable parquet data ({one_line(exc)})") from None


def _empty_files(paths: list[Path], fmt: str) -> list[Path]:
    """Files that hold no records, seen without reading them: 0 bytes, or a parquet footer
    counting 0 rows (an unreadable footer is left to the schema check, which names it)."""
    empty = []
    for path in paths:
        if path.stat().st_size == 0:
            empty.append(path)
        elif fmt == "parquet":
            try:
                rows = pq.read_metadata(path).num_rows
            except (pa.ArrowException, OSError):
                continue
            if rows == 0:
                empty.append(path)
    return empty


def _records(read: Callable[[], Iterator[Record]], path: Path, key: str) -> Iterator[Record]:
    """A file's records; a file that yields none (blank lines, an empty archive, a dump
    without pages) is an error naming it, not a source that silently adds nothing."""
    empty = True
    for record in read():
        empty = False
        yield record
    if empty:
        raise LongctxError(f"{key}: {path} holds no records")


def _file_readers(src: CorpusSource, key: str, batch_size: int
                  ) -> list[Callable[[], Iterator[Record]]]:
    """One reader per file of a parquet/jsonl/wikipedia source; the files are resolved and
    the empty ones named (all of them) here, before any work."""
    paths = expand(src.paths, f"{key}.paths")
    if empty := _empty_files(paths, src.format):
        names = ", ".join(map(str, empty))
        raise LongctxError(f"{key}: {names} {'holds' if len(empty) == 1 else 'hold'} no records")
    if src.format == "parquet":
        reads = [partial(_read_parquet, p, _parquet_columns(p, src, key), batch_size)
                 for p in paths]
    elif src.format == "jsonl":
        reads = [partial(_read_jsonl, p, src) for p in paths]
    else:
        reads = [partial(_read_wikipedia, p) for p in paths]
    return [partial(_records, read, p, key) for read, p in zip(reads, paths)]


def _streams(cfg: CorpusConfig) -> list[tuple[str, Callable[[], Iterator[Record]]]]:
    """(label, record stream) per source; files and schemas are checked here, before any work.
    A demo source is two streams, each read up to the source's max_documents."""
    streams = []
    for i, src in enumerate(cfg.sources):
        key = f"corpus.sources[{i}]"
        if src.format == "demo":
            files = assets.demo_corpus_files()
            parts = [("wikipedia", [partial(_read_wikipedia, files["wikipedia"])]),
                     ("lee", [partial(_read_lines, files["lee"])])]
            named = [(f"{src.label}/{part}", readers) for part, readers in parts]
        else:
            named = [(src.label, _file_readers(src, key, cfg.batch_size))]
        for label, readers in named:
            stream = partial(_limited, readers, src.max_documents)
            streams.append((label, stream))
    return streams


def _limited(readers: list[Callable[[], Iterator[Record]]], limit: int | None):
    return itertools.islice(itertools.chain.from_iterable(r() for r in readers), limit)


def _batches(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


# --- the build --------------------------------------------------------------------------------


def _screen(batch: list[Record], seen: set[int]) -> list[str | tuple[Record, str, str]]:
    """Per record: a drop reason, or (record, normalised text, id). Duplicates are found by the
    id's 64 bits, so kept ids are unique (distinct texts collide with odds ~ n^2 / 2^65)."""
    out: list[str | tuple[Record, str, str]] = []
    for rec in batch:
        text = normalize(rec.text) if isinstance(rec.text, str) else ""
        if rec.drop or not text or text[:9].lower() == "#redirect":
            out.append(rec.drop or ("redirect" if text else "empty"))
            continue
        ident = doc_id(text)
        key = int(ident, 16)
        out.append("duplicate" if key in seen else (rec, text, ident))
        seen.add(key)
    return out


class _Tally:
    """The counts behind stats.json."""

    def __init__(self, labels: Iterable[str]):
        self.sources = {label: {"read": 0, "kept": 0, "tokens": 0} for label in labels}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.lengths = array("q")

    def drop(self, label: str, reason: str) -> None:
        self.sources[label]["read"] += 1
        self.dropped[reason] += 1

    def keep(self, label: str, n_tokens: int) -> None:
        stats = self.sources[label]
        stats["read"] += 1
        stats["kept"] += 1
        stats["tokens"] += n_tokens
        self.lengths.append(n_tokens)

    def read(self) -> int:
        return sum(s["read"] for s in self.sources.values())

    def summary(self, cfg: CorpusConfig) -> dict:
        n = np.frombuffer(self.lengths, dtype=np.int64)
        bucket = np.searchsorted(HIST_EDGES, n, side="right") - 1
        return {
            "documents": int(n.size),
            "tokens": int(n.sum()),
            "read": self.read(),
            "dropped": self.dropped,
            "sources": self.sources,
            "min_tokens_filter": cfg.min_tokens,
            "n_tokens": {"min": int(n.min()), "median": float(np.median(n)),
                         "mean": round(float(n.mean()), 3), "max": int(n.max())},
            "histogram": {"edges": HIST_EDGES,
                          "counts": np.bincount(bucket, minlength=len(HIST_EDGES)).tolist()},
        }


def _flush(writer: pq.ParquetWriter, rows: list[tuple]) -> None:
    if rows:
        columns = dict(zip(SCHEMA.names, zip(*rows)))
        writer.write_table(pa.Table.from_pydict(columns, schema=SCHEMA))
        rows.clear()


def _fill(writer: pq.ParquetWriter, streams: list, count_tokens: Callable, tally: _Tally,
          cfg: CorpusConfig) -> None:
    """Screen, count and write the sources' documents, until `max_documents` are kept."""
    rows: list[tuple] = []  # written as row groups of batch_size documents
    seen: set[int] = set()
    for label, stream in streams:
        with tqdm(desc=label, unit=" docs", file=sys.stderr, mininterval=1.0) as bar:
            for batch in _batches(stream(), cfg.batch_size):
                bar.update(len(batch))
                outcomes = _screen(batch, seen)
                counts = iter(count_tokens([o[1] for o in outcomes if isinstance(o, tuple)]))
                for outcome in outcomes:
                    n = next(counts) if isinstance(outcome, tuple) else 0
                    if isinstance(outcome, str) or n < cfg.min_tokens:
                        tally.drop(label, outcome if isinstance(outcome, str) else "too_short")
                        continue
                    rec, text, ident = outcome
                    rows.append((ident, text, rec.title, label, rec.source_id, n))
                    tally.keep(label, n)
                    if len(rows) >= cfg.batch_size:
                        _flush(writer, rows)
                    if len(tally.lengths) == cfg.max_documents:
                        _flush(writer, rows)
                        return
    _flush(writer, rows)


def build_corpus(cfg: CorpusConfig, *, tokenizer: Path, docs: Path, metrics: Path) -> dict:
    """Write the document table to `docs` and its statistics to `metrics`; return them.
    Inputs are all checked first, and a failure leaves neither file behind."""
    streams = _streams(cfg)
    count_tokens = token_counter(tokenizer)
    tally = _Tally(label for label, _ in streams)
    with repro.atomic_path(docs) as tmp:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            _fill(writer, streams, count_tokens, tally, cfg)
        if not tally.lengths:
            why = ", ".join(f"{k}={v}" for k, v in tally.dropped.items() if v) or "no input"
            raise LongctxError(
                f"corpus is empty: all {tally.read()} documents read were dropped ({why}); "
                f"lower corpus.min_tokens (now {cfg.min_tokens}) or add sources"
            )
    stats = tally.summary(cfg)
    repro.write_json(metrics, stats)
    return stats
