"""Rule `corpus`: sources, cleaning, filters, stable ids, deterministic bytes, bad input."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from longctx.assets import bundled_embedder
from longctx.config import CorpusConfig
from longctx.corpus import build_corpus, normalize
from longctx.errors import LongctxError

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike"]


@pytest.fixture(scope="module")
def tok_dir() -> Path:
    return bundled_embedder()  # a real fast tokenizer, offline: stands in for the base model's


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def doc(i: int, words: int = 30) -> str:
    return f"Document {i}. " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


def config(*sources: dict, **kw) -> CorpusConfig:
    return CorpusConfig.model_validate({"sources": list(sources), "min_tokens": 5, **kw})


def build(tmp_path: Path, tok_dir: Path, cfg: CorpusConfig, name: str = "out"):
    out, stats_path = tmp_path / name / "docs.parquet", tmp_path / name / "stats.json"
    stats = build_corpus(cfg, tokenizer=tok_dir, docs=out, metrics=stats_path)
    assert json.loads(stats_path.read_text()) == stats
    return pq.read_table(out).to_pylist(), stats


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 3) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def write_jsonl(path: Path, objs: list) -> None:
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")


def fineweb_rows(start: int, n: int) -> list[dict]:
    return [
        {"text": doc(i), "id": f"urn:{i}", "url": f"http://x/{i}", "score": 3.5, "title": f"T{i}"}
        for i in range(start, start + n)
    ]


WIKI_ARTICLE = """'''Widget''' is a {{lang|en|small}} ''device''.<ref>A footnote that must go.</ref>
It was built in [[Paris|the capital]] by [[Ada Lovelace]].

== History ==
The widget first appeared in 1900. Engineers praised its durable design and low price.
[[File:Widget.jpg|thumb|A widget on a table]]

== References ==
{{reflist}}

[[Category:Devices]]
"""


def wiki_page(title: str, ns: int, page_id: int, text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>{page_id}</id>"
            f"<revision><id>9{page_id}</id><text xml:space=\"preserve\">{text}</text>"
            "</revision></page>")


def write_wiki_dump(path: Path) -> None:
    pages = [
        wiki_page("Widget", 0, 12, WIKI_ARTICLE),
        wiki_page("Gadget", 0, 13, "#REDIRECT [[Widget]]"),
        wiki_page("Talk:Widget", 1, 14, "This talk page discusses the widget article at length."),
    ]
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">'
           "<siteinfo><sitename>Wikipedia</sitename></siteinfo>" + "".join(pages) + "</mediawiki>")
    path.write_bytes(bz2.compress(xml.encode("utf-8")))


def test_normalize():
    assert normalize("  a\r\nb \t\u00a0 c  \r\rd\n\n \n\n e\u0301  ") == "a\nb c\n\nd\n\né"
    assert normalize(" \n\t ") == ""


def test_parquet_streams_across_files_in_batches(tmp_path, tok_dir, tok, monkeypatch, capsys):
    data = tmp_path / "fineweb"
    data.mkdir()
    for name, start in (("b.parquet", 7), ("a.parquet", 0), ("c.parquet", 14)):
        write_parquet(data / name, fineweb_rows(start, 7))
    long_text = " ".join(WORDS * 60)  # > 512 tokens: counts must not be truncated
    write_parquet(tmp_path / "long.parquet", [{"text": long_text, "id": 99}])
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, batch_size=65536, *args, columns=None, **kw):
        calls.append(columns)
        for batch in real(self, batch_size, *args, columns=columns, **kw):
            assert batch.num_rows <= 4
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    cfg = config(
        {"format": "parquet", "paths": [str(data / "*.parquet")], "title_field": "title"},
        {"format": "parquet", "paths": [str(tmp_path / "long.parquet")], "name": "long"},
        batch_size=4,
    )
    rows, stats = build(tmp_path, tok_dir, cfg)
    assert [r["source_id"] for r in rows] == [f"urn:{i}" for i in range(21)] + ["99"]
    assert calls == [["text", "id", "title"]] * 3 + [["text", "id"]]  # only needed columns
    assert rows[0]["title"] == "T0" and rows[-1]["title"] is None
    assert [r["source"] for r in rows] == ["parquet"] * 21 + ["long"]
    assert all(r["n_tokens"] == n_tokens(tok, r["text"]) for r in rows)
    assert rows[-1]["n_tokens"] > 512
    assert pq.ParquetFile(tmp_path / "out" / "docs.parquet").metadata.num_row_groups > 1
    assert stats["sources"]["parquet"] == {
        "read": 21, "kept": 21, "tokens": sum(r["n_tokens"] for r in rows[:21])
    }
    assert "parquet" in capsys.readouterr().err  # progress bar on stderr


def test_jsonl_reads_fields_and_counts_null_text_as_empty(tmp_path, tok_dir):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"body": doc(1), "key": 7, "name": "One"}) + "\n\n"
        + json.dumps({"body": None, "key": 8}) + "\n"
        + json.dumps({"body": "   \n  ", "key": 9}) + "\n"
        + json.dumps({"body": doc(2)}) + "\n",
        encoding="utf-8",
    )
    gz = tmp_path / "more.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps({"body": doc(3), "key": "x"}) + "\n").encode()))
    src = {"format": "jsonl", "paths": [str(path), str(gz)], "text_field": "body",
           "id_field": "key", "title_field": "name"}
    rows, stats = build(tmp_path, tok_dir, config(src))
    assert [(r["source_id"], r["title"]) for r in rows] == [("7", "One"), (None, None), ("x", None)]
    assert rows[0]["text"] == doc(1) and rows[0]["source"] == "jsonl"
    assert stats["dropped"]["empty"] == 2
    assert stats["sources"]["jsonl"]["read"] == 5


def test_wikipedia_dump_is_cleaned_and_redirects_skipped(tmp_path, tok_dir):
    dump = tmp_path / "wiki.xml.bz2"
    write_wiki_dump(dump)
    rows, stats = build(tmp_path, tok_dir, config({"format": "wikipedia", "paths": [str(dump)]}))
    assert [(r["title"], r["source_id"], r["source"]) for r in rows] == [
        ("Widget", "12", "wikipedia")
    ]
    text = rows[0]["text"]
    assert text.startswith("Widget is a device.\nIt was built in the capital by Ada Lovelace.")
    assert "\n\nHistory\nThe widget first appeared in 1900." in text  # heading kept as a line
    assert "A widget on a table" in text  # image caption kept
    for markup in ("[[", "]]", "{{", "}}", "''", "<ref", "footnote", "Category", "==", "thumb",
                   "References"):  # an empty section's heading goes too
        assert markup not in text
    assert stats["dropped"]["redirect"] == 1 and stats["dropped"]["non_article"] == 1
    assert stats["sources"]["wikipedia"]["read"] == 3


def test_duplicates_dropped_keeping_the_first(tmp_path, tok_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": doc(1), "id": "a1"}, {"text": doc(2), "id": "a2"}])
    spaced = doc(1).replace(" ", "  \t") + "\n\n\n"  # equal after normalisation
    b_rows = [{"text": spaced, "id": "b1"}, {"text": doc(3), "id": "b2"}]
    write_parquet(tmp_path / "b.parquet", b_rows)
    cfg = config({"format": "jsonl", "paths": [str(tmp_path / "a.jsonl")]},
                 {"format": "parquet", "paths": [str(tmp_path / "b.parquet")]})
    rows, stats = build(tmp_path, tok_dir, cfg)
    assert [r["source_id"] for r in rows] == ["a1", "a2", "b2"]
    assert stats["dropped"]["duplicate"] == 1
    assert len({r["id"] for r in rows}) == 3


def test_min_tokens_boundary(tmp_path, tok_dir, tok):
    texts = [doc(1, words=3), doc(2, words=40)]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    src = {"format": "jsonl", "paths": [str(tmp_path / "d.jsonl")]}
    short = n_tokens(tok, texts[0])
    rows, stats = build(tmp_path, tok_dir, config(src, min_tokens=short), "keep")
    assert len(rows) == 2 and stats["dropped"]["too_short"] == 0
    rows, stats = build(tmp_path, tok_dir, config(src, min_tokens=short + 1), "drop")
    assert [r["text"] for r in rows] == [texts[1]] and stats["dropped"]["too_short"] == 1


def test_ids_are_stable_and_order_independent(tmp_path, tok_dir):
    texts = [doc(i) for i in range(6)]
    write_jsonl(tmp_path / "fwd.jsonl", [{"text": t} for t in texts])
    write_parquet(tmp_path / "rev.parquet", [{"text": " " + t + " "} for t in reversed(texts)])
    fwd_src = {"format": "jsonl", "paths": [str(tmp_path / "fwd.jsonl")]}
    rev_src = {"format": "parquet", "paths": [str(tmp_path / "rev.parquet")]}
    fwd, _ = build(tmp_path, tok_dir, config(fwd_src), "f")
    rev, _ = build(tmp_path, tok_dir, config(rev_src), "r")
    assert [r["id"] for r in fwd] == [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
    assert {r["id"]: r["text"] for r in fwd} == {r["id"]: r["text"] for r in rev}
    assert [r["id"] for r in rev] == [r["id"] for r in reversed(fwd)]


def test_same_input_gives_identical_bytes(tmp_path, tok_dir):
    write_parquet(tmp_path / "a.parquet", fineweb_rows(0, 20))
    cfg = config({"format": "parquet", "paths": [str(tmp_path / "a.parquet")]}, batch_size=6)
    build(tmp_path, tok_dir, cfg, "one")
    build(tmp_path, tok_dir, cfg, "two")
    for name in ("docs.parquet", "stats.json"):
        one, two = ((tmp_path / run / name).read_bytes() for run in ("one", "two"))
        assert hashlib.sha256(one).hexdigest() == hashlib.sha256(two).hexdigest(), name


def test_stats_and_document_caps(tmp_path, tok_dir):
    write_parquet(tmp_path / "a.parquet", fineweb_rows(0, 10) + [{"text": "tiny", "id": "t"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": doc(i, words=200)} for i in range(50, 55)])
    a = {"format": "parquet", "paths": [str(tmp_path / "a.parquet")], "max_documents": 8}
    b = {"format": "jsonl", "paths": [str(tmp_path / "b.jsonl")]}
    rows, stats = build(tmp_path, tok_dir, config(a, b, batch_size=3), "all")
    lengths = sorted(r["n_tokens"] for r in rows)
    assert stats["documents"] == len(rows) == 13
    assert stats["tokens"] == sum(lengths)
    assert stats["sources"]["parquet"]["read"] == 8 and stats["sources"]["jsonl"]["kept"] == 5
    assert stats["n_tokens"] == {"min": lengths[0], "median": float(lengths[6]),
                                 "mean": round(sum(lengths) / 13, 3), "max": lengths[-1]}
    edges, counts = stats["histogram"]["edges"], stats["histogram"]["counts"]
    assert edges[:3] == [0, 128, 256] and sum(counts) == 13
    assert counts[0] == 8 and counts[1] == 5  # 30-word docs < 128 tokens, 200-word ones above
    assert set(stats["dropped"]) >= {"empty", "redirect", "too_short", "duplicate"}
    rows, stats = build(tmp_path, tok_dir, config(a, b, batch_size=3, max_documents=10), "cap")
    assert len(rows) == 10 and [r["source"] for r in rows].count("jsonl") == 2
    assert stats["sources"]["jsonl"]["read"] == 2


def _bad_inputs(tmp: Path) -> dict:
    """name -> (source dict or config dict, fragments the message must contain)."""
    (tmp / "garbage.parquet").write_bytes(b"this is not parquet at all")
    write_parquet(tmp / "good.parquet", fineweb_rows(0, 5))
    (tmp / "cut.parquet").write_bytes((tmp / "good.parquet").read_bytes()[:-20])
    write_parquet(tmp / "nocol.parquet", [{"content": "x", "id": 1}])
    (tmp / "bad_utf8.jsonl").write_bytes(b'{"text": "ok ok ok ok ok ok"}\n{"text": "caf\xe9"}\n')
    (tmp / "bad_json.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp / "nokey.jsonl").write_text('{"text": "fine"}\n\n{"body": "x"}\n')
    (tmp / "number.jsonl").write_text('{"text": 42}\n')
    (tmp / "bad.xml.bz2").write_bytes(bz2.compress(b"<mediawiki><page>"))

    def src(fmt: str, name: str, **kw) -> dict:
        return {"format": fmt, "paths": [str(tmp / name)], **kw}

    return {
        "missing_file": (src("jsonl", "nope.jsonl"), ["nope.jsonl", "not found"]),
        "empty_glob": (src("parquet", "none-*.parquet"), ["none-*.parquet", "sources[0].paths"]),
        "garbage_parquet": (src("parquet", "garbage.parquet"), ["garbage.parquet"]),
        "truncated_parquet": (src("parquet", "cut.parquet"), ["cut.parquet"]),
        "no_text_column": (src("parquet", "nocol.parquet"),
                           ["nocol.parquet", "'text'", "columns: content, id"]),
        "no_id_column": (src("parquet", "good.parquet", id_field="doc_id"),
                         ["good.parquet", "'doc_id'", "id_field"]),
        "invalid_utf8": (src("jsonl", "bad_utf8.jsonl"), ["bad_utf8.jsonl:2", "UTF-8"]),
        "invalid_json": (src("jsonl", "bad_json.jsonl"), ["bad_json.jsonl:2", "JSON"]),
        "missing_key": (src("jsonl", "nokey.jsonl"), ["nokey.jsonl:3", "'text'", "body"]),
        "text_not_string": (src("jsonl", "number.jsonl"), ["number.jsonl:1", "int"]),
        "corrupt_wiki": (src("wikipedia", "bad.xml.bz2"), ["bad.xml.bz2"]),
        "empty_after_filter": (src("parquet", "good.parquet", min_tokens=10_000),
                               ["empty", "5 documents", "too_short=5", "corpus.min_tokens"]),
    }


BAD = [
    "missing_file", "empty_glob", "garbage_parquet", "truncated_parquet", "no_text_column",
    "no_id_column", "invalid_utf8", "invalid_json", "missing_key", "text_not_string",
    "corrupt_wiki", "empty_after_filter",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_and_leaves_nothing(tmp_path, tok_dir, case):
    src, fragments = _bad_inputs(tmp_path)[case]
    src = dict(src)
    min_tokens = src.pop("min_tokens", 5)
    out_dir = tmp_path / "out"
    with pytest.raises(LongctxError) as info:
        build_corpus(config(src, min_tokens=min_tokens), tokenizer=tok_dir,
                     docs=out_dir / "docs.parquet", metrics=out_dir / "stats.json")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def _empty_sources(tmp: Path) -> dict:
    """name -> (sources, the exact message): files named by params that hold no records."""
    write_jsonl(tmp / "good.jsonl", [{"text": doc(1)}])
    (tmp / "empty.jsonl").write_bytes(b"")
    (tmp / "blank.jsonl").write_text("\n  \n")
    (tmp / "none.jsonl.gz").write_bytes(gzip.compress(b""))
    (tmp / "pq").mkdir()
    write_parquet(tmp / "pq" / "b.parquet", fineweb_rows(0, 5))
    (tmp / "pq" / "a.parquet").write_bytes(b"")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp / "pq" / "c.parquet")

    def jsonl(*names: str) -> dict:
        return {"format": "jsonl", "paths": [str(tmp / n) for n in names]}

    return {
        "zero_bytes_beside_a_good_file": (
            [jsonl("good.jsonl", "empty.jsonl")],
            f"corpus.sources[0]: {tmp / 'empty.jsonl'} holds no records"),
        "blank_lines_in_a_later_source": (
            [jsonl("good.jsonl"), jsonl("blank.jsonl")],
            f"corpus.sources[1]: {tmp / 'blank.jsonl'} holds no records"),
        "an_empty_archive": (
            [jsonl("none.jsonl.gz")],
            f"corpus.sources[0]: {tmp / 'none.jsonl.gz'} holds no records"),
        "every_empty_parquet_of_a_glob": (  # 0 bytes, 0 rows: both named
            [{"format": "parquet", "paths": [str(tmp / "pq" / "*.parquet")]}],
            f"corpus.sources[0]: {tmp / 'pq/a.parquet'}, {tmp / 'pq/c.parquet'} hold no records"),
    }


@pytest.mark.parametrize("case", ["zero_bytes_beside_a_good_file",
                                  "blank_lines_in_a_later_source", "an_empty_archive",
                                  "every_empty_parquet_of_a_glob"])
def test_a_file_without_records_is_named(tmp_path, tok_dir, case):
    """An empty input is a mistake (a failed download, a wrong glob), not a source that
    silently adds nothing; a source whose documents were all dropped keeps its message."""
    sources, message = _empty_sources(tmp_path)[case]
    out_dir = tmp_path / "out"
    with pytest.raises(LongctxError) as info:
        build_corpus(config(*sources), tokenizer=tok_dir, docs=out_dir / "docs.parquet",
                     metrics=out_dir / "stats.json")
    assert str(info.value) == message
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_missing_tokenizer_dir(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": doc(1)}])
    cfg = config({"format": "jsonl", "paths": [str(tmp_path / "d.jsonl")]})
    with pytest.raises(LongctxError, match="no-tokenizer"):
        build_corpus(cfg, tokenizer=tmp_path / "no-tokenizer", docs=tmp_path / "o.parquet",
                     metrics=tmp_path / "s.json")
    assert not (tmp_path / "o.parquet").exists()


def test_demo_corpus(tmp_path, tok_dir):
    rows, stats = build(tmp_path, tok_dir, CorpusConfig())  # default: the demo source
    wiki = [r for r in rows if r["source"] == "demo/wikipedia"]
    lee = [r for r in rows if r["source"] == "demo/lee"]
    assert 95 <= len(wiki) <= 106 and stats["sources"]["demo/wikipedia"]["read"] == 206
    assert stats["dropped"]["redirect"] == 99 and stats["dropped"]["duplicate"] == 7  # Lee repeats
    albania = next(r for r in wiki if r["title"] == "Albania")
    assert albania["text"].startswith("Albania, officially known as the Republic of Albania")
    assert albania["n_tokens"] > 5000
    assert all("[[" not in r["text"] and "{{" not in r["text"] for r in wiki)
    assert 200 <= len(lee) <= 300 and stats["sources"]["demo/lee"]["read"] == 300
    assert rows.index(wiki[0]) < rows.index(lee[0])  # sources in order
    assert all(r["n_tokens"] >= 128 for r in rows)
