"""The eval sources stream the corpus: only the prefix a sample needs is read, and the samples
are the ones a whole-corpus reading gives (the reading before streaming, kept here as the
reference)."""

from __future__ import annotations

from itertools import cycle, islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longctx.errors import LongctxError
from longctx.eval import ruler
from longctx.eval.niah import niah_grid
from longctx.eval.ruler import sources
from longctx.eval.ruler.sources import TextSources, corpus_qa, split_sentences

HEAD_DOCS, HEAD_WORDS = 300, 100  # the readable head: 300 documents of 100 words


def head_text(i: int) -> str:
    return (f"Report {i} was filed in {1800 + i} by Clerk Anna Hale. " * 10).strip()


def corpus_with_a_broken_tail(path) -> None:
    """A corpus table whose second row group's `text` pages are garbage: reading it fails,
    so a reader that gets past the head fails loudly."""
    texts = [head_text(i) for i in range(HEAD_DOCS)] + ["tail " * 1000] * 100
    table = pa.table({"id": [str(i) for i in range(len(texts))],
                      "text": pa.array(texts, pa.large_string())})
    pq.write_table(table, path, row_group_size=HEAD_DOCS, compression="zstd")
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = column.dictionary_page_offset or column.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + column.total_compressed_size] = b"\xff" * column.total_compressed_size
    path.write_bytes(bytes(raw))


def test_only_the_prefix_a_sample_needs_is_read(tmp_path, monkeypatch):
    path = tmp_path / "docs.parquet"
    corpus_with_a_broken_tail(path)
    src = TextSources.from_corpus(path)
    head = " ".join(head_text(i) for i in range(HEAD_DOCS)).split()
    assert src.essay(HEAD_DOCS * HEAD_WORDS) == " ".join(head)  # the whole head, no further
    monkeypatch.setattr(sources, "QA_POOL_WORDS", 2000)
    data = src.qa("qa_1", 512)
    assert len(data.docs) == 20  # 2000 words of 100-word paragraphs: the first 20 documents
    assert data.source == "the corpus" and data.pairs
    with pytest.raises(LongctxError, match=rf"{path}: cannot read the corpus `text` column"):
        src.essay(HEAD_DOCS * HEAD_WORDS + 1)


def test_a_corpus_without_text_is_named(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array(["", "  \n", None], pa.large_string())}), path)
    with pytest.raises(LongctxError, match=rf"^{path}: no text for the essay haystack"):
        TextSources.from_corpus(path)
    pq.write_table(pa.table({"text": pa.array(["A heading.", "Two words."], pa.large_string())}),
                   path)
    with pytest.raises(LongctxError, match=rf"^{path}: the corpus has no paragraph of 40-300 "
                                           r"words .* \(read: its first 2 texts\)$"):
        TextSources.from_corpus(path).qa("qa_1")
    pq.write_table(pa.table({"body": ["words"]}), path)
    with pytest.raises(LongctxError, match=rf"{path}: missing column\(s\) text"):
        TextSources.from_corpus(path)


class WholeCorpus:
    """The reading before streaming: every text joined into one word list, cloze QA made from
    every document."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = [t for t in texts if t.strip()]
        self.words = " ".join(self.texts).split()

    def essay(self, n_words: int) -> str:
        return " ".join(islice(cycle(self.words), n_words))

    def essay_sentences(self, n_words: int) -> list[str]:
        return split_sentences(self.essay(n_words))

    def qa(self, task: str, length: int = 0):
        return corpus_qa(self.texts, two_gold=task == "qa_2")


def small_corpus() -> list[str]:
    """Short documents of 2-3 paragraphs with years and names, some blank rows between."""
    texts = []
    for i in range(40):
        paras = [f"In {1900 + i} the mill at Lower Brook {i} was rebuilt by Thomas Reed after a "
                 f"fire{' in spring' * k}. The work took {i + 2} years and the whole valley "
                 "helped with stone, timber and labour. Records of the rebuilding are kept in "
                 "the parish hall, where visitors may read them on the first day of each "
                 "month." for k in range(2)]
        paras.append(f"Section {i}.")  # too short to be a QA document
        texts.append("\n\n".join(paras) if i % 7 else "   ")
    return texts


def both_readings(tmp_path) -> tuple[WholeCorpus, TextSources]:
    texts = small_corpus()
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": pa.array(texts, pa.large_string())}), path,
                   row_group_size=8)
    return WholeCorpus(texts), TextSources.from_corpus(path)


def words_measure(prompt: str, answer_prefix: str) -> int:
    """A stand-in for the tokenizer: the identity of the samples does not depend on it."""
    return len(prompt.split()) + len(answer_prefix.split())


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multiquery",
                                  "qa_1", "qa_2"])
def test_ruler_samples_equal_the_whole_corpus_readings(tmp_path, task):
    whole, streamed = both_readings(tmp_path)
    for length in (300, 5000):  # within the corpus, and cycling it (~3,700 words)
        assert (ruler.generate(task, length, 3, 5, words_measure, streamed)
                == ruler.generate(task, length, 3, 5, words_measure, whole))


def test_niah_samples_equal_the_whole_corpus_readings(tmp_path):
    whole, streamed = both_readings(tmp_path)
    assert (niah_grid([200, 5000], [0, 40, 100], 2, 3, words_measure, streamed)
            == niah_grid([200, 5000], [0, 40, 100], 2, 3, words_measure, whole))
