"""Offline text for the RULER tasks and the NIAH grid: the essay haystack and the QA data.

RULER downloads its essay haystack (Paul Graham's essays) and its QA sets (SQuAD v2 dev,
HotpotQA dev-distractor). Here the haystack is the project's corpus: documents concatenated in
table order, whitespace normalized, split into words; a haystack of N words is the first N
(the text repeats when N exceeds it), split into sentences by a regex instead of nltk's punkt
(which needs a download). QA comes from local SQuAD / HotpotQA files read the RULER way when
given, else from cloze questions made from the corpus paragraphs (see `corpus_qa`).

The corpus is streamed in table order and read only as far as a sample needs: the essay's
longest haystack, and for cloze QA a prefix holding `qa_pool_words(length)` paragraph words.
So memory does not grow with the corpus (10M documents are terabytes as Python word lists),
only with the longest length asked for.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import cycle, islice
from pathlib import Path
from typing import Any

from longctx.errors import LongctxError, one_line

# A sentence ends at . ! or ? (and any closing quotes/brackets) before whitespace and an
# upper-case letter, digit or opening quote, except after a common abbreviation or an initial
# ("Dr. Smith", "J. Smith", "U.S. Army").
_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")
_ENDS_SENTENCE = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
_OPENER = re.compile(r"[\"'\u201c\u2018(\[]?[A-Z0-9]")
_ABBREV = re.compile(
    r"(?:^|[\s(])(?:[A-Z]|(?:[A-Za-z]\.)+[A-Za-z]|Mr|Mrs|Ms|Dr|Prof|St|Jr|Sr|Mt|No|vs|etc|Inc"
    r"|Ltd|Co|Gen|Col|Lt|Sgt|Rev|Fig|approx|ca|c)\.$")
_PARAGRAPH = re.compile(r"\n\s*\n")
PARAGRAPH_WORDS = (40, 300)  # corpus paragraphs kept as QA documents
# Cloze QA reads the corpus until its paragraphs hold this many words (~10K paragraphs), or
# twice the sample length (each word is at least a token, so a sample can always be filled):
# a distractor pool between RULER's SQuAD dev (1,204 paragraphs) and HotpotQA dev (~66K).
QA_POOL_WORDS = 1_000_000
READ_BATCH = 64  # corpus rows decoded at a time
SENTENCE_WORDS = (6, 60)  # a usable cloze sentence (QA here, HellaSwag-style in lmeval)
BLANK = "___"
CLOZE_QUESTION = 'What fills the blank "{blank}" in this sentence from the documents: "{sentence}"'
# Cloze answers, best first: a year, another number, a capitalised multi-word name.
_SPANS = (re.compile(r"\b(?:1[0-9]{3}|20[0-9]{2})\b"), re.compile(r"\b\d+(?:[.,]\d+)*\d\b"),
          re.compile(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)+\b"))


def ends_sentence(text: str) -> bool:
    """Whether `text` ends as a sentence does (. ! or ?, then any closing quotes or brackets),
    rather than cut off mid-sentence."""
    return bool(_ENDS_SENTENCE.search(text))


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, stripped; joining them with spaces gives back normalized text."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        head = text[start:m.end()].strip()
        if not _OPENER.match(text, m.end()) or _ABBREV.search(head):
            continue
        out.append(head)
        start = m.end()
    if tail := text[start:].strip():
        out.append(tail)
    return out


@dataclass(frozen=True)
class QAPair:
    """A question, its accepted answers and its documents (indices into QAData.docs)."""

    query: str
    outputs: tuple[str, ...]
    context: tuple[int, ...]  # gold documents: always in the prompt
    more_context: tuple[int, ...] = ()  # preferred distractors (SQuAD: the same article)


@dataclass(frozen=True)
class QAData:
    docs: tuple[str, ...]
    pairs: tuple[QAPair, ...]
    source: str  # for messages: the file, or "the corpus"


# --------------------------------------------------------------------------- files


def _load_json(path: str | Path, what: str, key: str) -> Any:
    """The parsed file; an empty one is named as such (json's own error says "line 1 column
    1 (char 0)")."""
    try:
        if Path(path).stat().st_size == 0:
            raise LongctxError(f"{key}: {path} holds no records (0 bytes)")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LongctxError(f"{path}: cannot read the {what} json ({one_line(exc)})") from None


def _field(record: Any, key: str, kind: type | tuple[type, ...], path: str | Path,
           where: str) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise LongctxError(f"{path}: {where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise LongctxError(f"{path}: {where}.{key}: expected {getattr(kind, '__name__', kind)}, "
                           f"got {type(value).__name__}")
    return value


def read_squad(path: str | Path, key: str = "ruler.squad_path") -> QAData:
    """A SQuAD v2 json file as RULER reads it: the docs are the unique paragraphs (sorted),
    each answerable question's gold doc its paragraph and its preferred distractors the other
    paragraphs of its article; unanswerable (is_impossible) questions are skipped."""
    data = _field(_load_json(path, "SQuAD", key), "data", list, path, "top level")
    if not data:
        raise LongctxError(f"{key}: {path} holds no records ('data' is an empty list)")
    articles = []
    for i, article in enumerate(data):
        paragraphs = _field(article, "paragraphs", list, path, f"data[{i}]")
        rows = []
        for j, p in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            rows.append((_field(p, "context", str, path, where),
                         _field(p, "qas", list, path, where), where))
        articles.append(rows)
    docs = sorted({context for rows in articles for context, _, _ in rows})
    index = {c: k for k, c in enumerate(docs)}
    pairs = []
    for rows in articles:
        article_docs = [index[context] for context, _, _ in rows]
        for context, qas, where in rows:
            gold = index[context]
            for k, qa in enumerate(qas):
                at = f"{where}.qas[{k}]"
                if not isinstance(qa, dict):
                    raise LongctxError(f"{path}: {at}: not an object")
                if qa.get("is_impossible", False):
                    continue
                question = _field(qa, "question", str, path, at)
                answers = _field(qa, "answers", list, path, at)
                texts = tuple(_field(a, "text", str, path, f"{at}.answers[{m}]")
                              for m, a in enumerate(answers))
                if not texts:
                    raise LongctxError(f"{path}: {at}: an answerable question without answers")
                more = tuple(d for d in article_docs if d != gold)
                pairs.append(QAPair(question, texts, (gold,), more))
    if not pairs:
        raise LongctxError(f"{path}: no answerable questions in the SQuAD file")
    return QAData(tuple(docs), tuple(pairs), str(path))


def read_hotpotqa(path: str | Path, key: str = "ruler.hotpotqa_path") -> QAData:
    """A HotpotQA dev-distractor json file as RULER reads it: docs are "title\\nparagraph"
    (unique, sorted) and each question's gold docs are all its context paragraphs."""
    data = _load_json(path, "HotpotQA", key)
    if not isinstance(data, list):
        raise LongctxError(f"{path}: expected a list of HotpotQA records at the top level")
    if not data:
        raise LongctxError(f"{key}: {path} holds no records (an empty list)")

    def doc(entry: Any, where: str) -> str:
        if (not isinstance(entry, list) or len(entry) != 2 or not isinstance(entry[0], str)
                or not isinstance(entry[1], list)
                or not all(isinstance(s, str) for s in entry[1])):
            raise LongctxError(f"{path}: {where}: expected [title, [sentences]]")
        return f"{entry[0]}\n{''.join(entry[1])}"

    records = []
    for i, record in enumerate(data):
        where = f"record {i}"
        question = _field(record, "question", str, path, where)
        answer = _field(record, "answer", str, path, where)
        context = _field(record, "context", list, path, where)
        records.append((question, answer, [doc(e, f"{where}.context[{k}]")
                                           for k, e in enumerate(context)]))
    docs = sorted({d for _, _, ds in records for d in ds})
    index = {d: k for k, d in enumerate(docs)}
    pairs = tuple(QAPair(q, (a,), tuple(index[d] for d in ds)) for q, a, ds in records)
    if not pairs:
        raise LongctxError(f"{path}: no questions in the HotpotQA file")
    return QAData(tuple(docs), pairs, str(path))


# --------------------------------------------------------------------------- corpus QA


def paragraphs(text: str) -> list[str]:
    """The blank-line separated paragraphs of a document with 40..300 words, whitespace
    normalized (headings and very long paragraphs make poor QA documents)."""
    out = []
    for block in _PARAGRAPH.split(text):
        words = block.split()
        if PARAGRAPH_WORDS[0] <= len(words) <= PARAGRAPH_WORDS[1]:
            out.append(" ".join(words))
    return out


def cloze(paragraph: str) -> tuple[str, str] | None:
    """(question, answer) blanking a year, number or name in the paragraph's first sentence
    that has one (occurring once in it, and not a name opening the sentence); None if none."""
    for sentence in split_sentences(paragraph):
        if not SENTENCE_WORDS[0] <= len(sentence.split()) <= SENTENCE_WORDS[1]:
            continue
        for pattern in _SPANS:
            for match in pattern.finditer(sentence):
                span = match.group()
                if sentence.count(span) != 1 or (pattern is _SPANS[2] and match.start() == 0):
                    continue
                blanked = sentence[:match.start()] + BLANK + sentence[match.end():]
                return CLOZE_QUESTION.format(blank=BLANK, sentence=blanked), span
    return None


def corpus_qa(texts: Sequence[str], two_gold: bool) -> QAData:
    """QA pairs made from the corpus: one cloze question per paragraph that has one.

    qa_1 (SQuAD-style): the gold document is the question's paragraph; the other paragraphs
    of its document are the preferred distractors (as SQuAD's same-article paragraphs).
    qa_2 (`two_gold`): the gold documents are the question's paragraph and the next (or
    previous) paragraph of the same document -- a stand-in for HotpotQA's two gold
    paragraphs, not real multi-hop reasoning. Questions alternate between documents (the
    first paragraph of each document, then the second, ...) so consecutive samples differ.
    """
    docs: dict[str, int] = {}  # paragraph -> index (a repeated paragraph is one document)
    per_doc: list[list[QAPair]] = []
    for text in texts:
        kept = paragraphs(text)
        ids = [docs.setdefault(p, len(docs)) for p in kept]
        pairs = []
        for k, gold in enumerate(ids):
            made = cloze(kept[k])
            if made is None:
                continue
            question, answer = made
            if two_gold:
                if len(ids) < 2:
                    continue
                partner = ids[k + 1] if k + 1 < len(ids) else ids[k - 1]
                if partner == gold:
                    continue
                pairs.append(QAPair(question, (answer,), (gold, partner)))
            else:
                more = tuple(dict.fromkeys(i for i in ids if i != gold))
                pairs.append(QAPair(question, (answer,), (gold,), more))
        per_doc.append(pairs)
    interleaved = [pairs[j] for j in range(max(map(len, per_doc), default=0))
                   for pairs in per_doc if j < len(pairs)]
    if not interleaved:
        raise LongctxError(
            f"the corpus has no paragraph of {PARAGRAPH_WORDS[0]}-{PARAGRAPH_WORDS[1]} words "
            f"with a year, number or name to ask about{' (and a second paragraph)' * two_gold}; "
            "give a SQuAD / HotpotQA file instead")
    return QAData(tuple(docs), tuple(interleaved), "the corpus")


# --------------------------------------------------------------------------- sources


def qa_pool_words(length: int) -> int:
    """Paragraph words cloze QA reads for a sample of `length` tokens (see QA_POOL_WORDS)."""
    return max(QA_POOL_WORDS, 2 * length)


def corpus_texts(docs_parquet: Path) -> Iterator[str]:
    """The corpus table's `text` column in table order, decoded READ_BATCH rows at a time
    and one row group after another (a batch would otherwise reach into the next group): a
    reader that stops early never decodes the rest of the file."""
    import pyarrow as pa

    from longctx.parquet import open_table

    table = open_table(docs_parquet, ["text"], "the corpus step")
    try:
        for group in range(table.num_row_groups):
            for batch in table.iter_batches(batch_size=READ_BATCH, row_groups=[group],
                                            columns=["text"]):
                yield from batch.column(0).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise LongctxError(f"{docs_parquet}: cannot read the corpus `text` column "
                           f"({one_line(exc)})") from None


class _Prefix:
    """The non-blank texts of a stream, read on demand and kept once read."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._source = iter(texts)
        self.texts: list[str] = []
        self.words: list[str] = []  # the words of texts[:self._worded]
        self._worded = 0
        self._pool: list[int] = []  # cumulative paragraph words of texts[:len(self._pool)]

    def read_one(self) -> bool:
        """Append the next non-blank text; False when the stream is exhausted."""
        for text in self._source:
            if text and text.strip():
                self.texts.append(text)
                return True
        return False

    def _has(self, i: int) -> bool:
        return i < len(self.texts) or self.read_one()

    def words_upto(self, n: int) -> list[str]:
        """The words, read until there are at least n of them (or the texts run out)."""
        while len(self.words) < n and self._has(self._worded):
            self.words.extend(self.texts[self._worded].split())
            self._worded += 1
        return self.words

    def pool(self, n_words: int) -> list[str]:
        """The shortest prefix of whole texts whose QA paragraphs hold >= n_words words (or
        all of them)."""
        while (not self._pool or self._pool[-1] < n_words) and self._has(len(self._pool)):
            held = sum(len(p.split()) for p in paragraphs(self.texts[len(self._pool)]))
            self._pool.append((self._pool[-1] if self._pool else 0) + held)
        return self.texts[:min(bisect_left(self._pool, n_words) + 1, len(self._pool))]


class TextSources:
    """The essay haystack and the QA data every generator draws from, read lazily from a
    stream of texts (a list, or `corpus_texts` of the corpus table)."""

    def __init__(self, texts: Iterable[str], *, squad: QAData | None = None,
                 hotpotqa: QAData | None = None, source: str | None = None) -> None:
        """`source` names the texts' file in errors."""
        self._prefix = _Prefix(texts)
        if not self._prefix.read_one():
            raise LongctxError(
                f"{source}: no text for the essay haystack (every `text` is empty or blank)"
                if source else "no text for the essay haystack (the corpus is empty)")
        self._source = source
        self._files: dict[str, QAData | None] = {"qa_1": squad, "qa_2": hotpotqa}
        self._qa: dict[tuple[str, int], QAData] = {}

    @classmethod
    def from_corpus(cls, docs_parquet: Path, squad_path: str | None = None,
                    hotpotqa_path: str | None = None) -> TextSources:
        """The corpus table's `text` column (table order, streamed), and the QA files when
        given."""
        squad = read_squad(squad_path) if squad_path else None
        hotpotqa = read_hotpotqa(hotpotqa_path) if hotpotqa_path else None
        return cls(corpus_texts(docs_parquet), squad=squad, hotpotqa=hotpotqa,
                   source=str(docs_parquet))

    def essay(self, n_words: int) -> str:
        """The first n words of the corpus (cycled when n exceeds it), space separated."""
        return " ".join(islice(cycle(self._prefix.words_upto(n_words)), n_words))

    def essay_sentences(self, n_words: int) -> list[str]:
        return split_sentences(self.essay(n_words))

    def qa(self, task: str, length: int = 0) -> QAData:
        """qa_1: the SQuAD file or corpus cloze; qa_2: the HotpotQA file or two-gold cloze,
        from the corpus prefix that a sample of `length` tokens reads."""
        data = self._files[task]
        if data is not None:
            return data
        texts = self._prefix.pool(qa_pool_words(length))
        key = (task, len(texts))
        if key not in self._qa:
            try:
                self._qa[key] = corpus_qa(texts, two_gold=task == "qa_2")
            except LongctxError as exc:
                if self._source is None:
                    raise
                raise LongctxError(f"{self._source}: {exc} (read: its first {len(texts)} "
                                   "texts)") from None
        return self._qa[key]
