"""Offline text for the RULER tasks and the NIAH grid: the essay haystack and the QA data.

RULER downloads its essay haystack (Paul Graham's essays) and its QA sets (SQuAD v2 dev,
HotpotQA dev-distractor). Here the haystack is the project's corpus: documents concatenated in
table order, whitespace normalized, split into words; a haystack of N words is the first N
(the text repeats when N exceeds it), split into sentences by a regex instead of nltk's punkt
(which needs a download). QA comes from local SQuAD / HotpotQA files read the RULER way when
given, else from cloze questions made from the corpus paragraphs (see `corpus_qa`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


class TextSources:
    """The essay haystack and the QA data every generator draws from."""

    def __init__(self, texts: Sequence[str], *, squad: QAData | None = None,
                 hotpotqa: QAData | None = None) -> None:
        self.texts = [t for t in texts if t.strip()]
        self.words = " ".join(self.texts).split()
        if not self.words:
            raise LongctxError("no text for the essay haystack (the corpus is empty)")
        self._qa: dict[str, QAData | None] = {"qa_1": squad, "qa_2": hotpotqa}

    @classmethod
    def from_corpus(cls, docs_parquet: Path, squad_path: str | None = None,
                    hotpotqa_path: str | None = None) -> TextSources:
        """The corpus table's `text` column (table order), and the QA files when given."""
        import polars as pl

        try:
            texts = pl.read_parquet(docs_parquet, columns=["text"])["text"].to_list()
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise LongctxError(f"{docs_parquet}: cannot read the corpus `text` column "
                               f"({one_line(exc)})") from None
        return cls([t for t in texts if t],
                   squad=read_squad(squad_path) if squad_path else None,
                   hotpotqa=read_hotpotqa(hotpotqa_path) if hotpotqa_path else None)

    def essay(self, n_words: int) -> str:
        """The first n words of the corpus (cycled when n exceeds it), space separated."""
        return " ".join(islice(cycle(self.words), n_words))

    def essay_sentences(self, n_words: int) -> list[str]:
        return split_sentences(self.essay(n_words))

    def qa(self, task: str) -> QAData:
        """qa_1: the SQuAD file or corpus cloze; qa_2: the HotpotQA file or two-gold cloze."""
        data = self._qa[task]
        if data is None:
            data = self._qa[task] = corpus_qa(self.texts, two_gold=task == "qa_2")
        return data
