"""Long samples: an instruction with its retrieved documents (raw, not the summaries) -> the
response, fitted to the stage's length L.

Documents are added best first while the sample fits; the first one that does not fit whole
is cut on a paragraph/line/sentence/word boundary (when `min_cut_tokens` are left for it) and
closes the sample, and a sample whose own documents leave room is filled with further
documents from a fresh search. Sizes are estimated per document block, then the whole sample
is tokenised once and, while it is over L, its last document shrinks or goes. The response is
never cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from longctx.config import PackConfig
from longctx.llm.base import derive_seed
from longctx.pack.chat import Chat, ChatTokenizer
from longctx.pack.spill import Spill, Spilled
from longctx.sequences import Tokenized
from longctx.synth.tables import (
    check_instruction_ids,
    read_documents,
    read_instructions,
    read_table,
)
from longctx.tokens import Counter, split_chunks

SEP = "\n\n"
SHRINK_SLACK = 8  # tokens taken off beyond the overflow when a verified sample is too long


def _block(number: int, title: str | None, text: str) -> str:
    head = f"Document {number}: {title}" if title else f"Document {number}:"
    return f"{head}\n{text}"


def long_chat(cfg: PackConfig, instruction: str, documents: list[tuple[str | None, str]],
              response: str) -> Chat:
    """[user: the documents (title, text) in the given order + the instruction, assistant]."""
    parts = [_block(i, title, text) for i, (title, text) in enumerate(documents, 1)]
    instruction = instruction.strip()
    if not parts:
        user = instruction
    elif cfg.instruction_position == "end":
        user = SEP.join(parts) + SEP + instruction
    else:
        user = instruction + SEP + SEP.join(parts)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


@dataclass
class _Doc:
    doc_id: str
    title: str | None
    text: str  # the whole text, or the prefix kept when cut
    full: str
    cut: bool
    filled: bool


@dataclass
class _Fit:
    """A long sample being assembled: its documents best first and an estimate of its size."""

    instruction_id: str
    instruction: str
    response: str
    used: int  # tokens: exact without documents, plus each document's block estimate
    docs: list[_Doc] = field(default_factory=list)
    closed: bool = False  # a document did not fit whole: no more are added


class _LongFitter:
    """Fits instructions' documents into the stage length L (see the module docstring)."""

    def __init__(self, cfg: PackConfig, chat: ChatTokenizer, count: Counter, length: int,
                 seed: int) -> None:
        self.cfg, self.chat, self.count, self.length, self.seed = cfg, chat, count, length, seed

    def _cost(self, number: int, title: str | None, text: str) -> int:
        return self.count([_block(number, title, text) + SEP])[0]

    def add(self, fit: _Fit, candidates: list[str], docs: dict[str, dict], filled: bool) -> None:
        """Whole documents best first while they fit; the first that does not is cut (when
        min_cut_tokens are left for its text) and closes the sample."""
        for doc_id in candidates:
            if fit.closed:
                return
            doc = docs[doc_id]
            title = (doc.get("title") or "").strip() or None
            text = (doc.get("text") or "").strip()
            if not text:
                continue
            number = len(fit.docs) + 1
            room = self.length - fit.used
            cost = self._cost(number, title, text)
            if cost <= room:
                fit.docs.append(_Doc(doc_id, title, text, text, False, filled))
                fit.used += cost
                continue
            fit.closed = True
            budget = room - self._cost(number, title, "")
            if budget >= self.cfg.min_cut_tokens:
                piece = (split_chunks(text, budget, self.count) or [""])[0].rstrip()
                if piece:
                    fit.docs.append(_Doc(doc_id, title, piece, text, True, filled))
                    fit.used += self._cost(number, title, piece)

    def ordered(self, fit: _Fit) -> list[_Doc]:
        """The documents in the configured presentation order (they were chosen best first)."""
        docs = list(fit.docs)
        if self.cfg.document_order == "reversed":
            docs.reverse()
        elif self.cfg.document_order == "shuffled":
            random.Random(derive_seed(self.seed, "documents", fit.instruction_id)).shuffle(docs)
        return docs

    def finish(self, fit: _Fit) -> Tokenized:
        """Tokenise the sample whole; while it is over L, shrink or drop its last document."""
        while True:
            chat = long_chat(self.cfg, fit.instruction,
                             [(d.title, d.text) for d in self.ordered(fit)], fit.response)
            sample = self.chat.all_learnt(fit.instruction_id, chat)
            over = len(sample) - self.length
            if over <= 0 or not fit.docs:
                return sample
            last = fit.docs[-1]
            budget = self.count([last.text])[0] - over - SHRINK_SLACK
            piece = ""
            if budget >= self.cfg.min_cut_tokens:
                piece = (split_chunks(last.full, budget, self.count) or [""])[0].rstrip()
            if piece:
                last.text, last.cut = piece, True
            else:
                fit.docs.pop()


def long_samples(cfg: PackConfig, chat: ChatTokenizer, count: Counter, length: int,
                 seed: int, paths: dict[str, Path], spill: Spill) -> tuple[list[Spilled], dict]:
    """Every kept response as a long sample fitted to `length`; (samples, stats)."""
    texts = read_instructions(paths["instructions"])
    ranked = {}
    for row in read_table(paths["retrieved"], ["instruction_id", "doc_ids"]):
        ranked[row["instruction_id"]] = list(row["doc_ids"] or [])
    kept = [r for r in read_table(paths["responses"], ["instruction_id", "response", "kept"])
            if r["kept"]]
    check_instruction_ids([r["instruction_id"] for r in kept], texts, paths["responses"],
                          paths["instructions"], "respond")
    docs = read_documents(paths["docs"], [d for r in kept
                                          for d in ranked.get(r["instruction_id"], [])])
    fitter = _LongFitter(cfg, chat, count, length, seed)
    reasons: list[str | None] = []
    fits: list[_Fit] = []
    for row in tqdm(kept, desc="pack long: documents", unit="sample", disable=None):
        iid = row["instruction_id"]
        bare = chat.ids(long_chat(cfg, texts[iid], [], row["response"]))
        if len(bare) > length:
            reasons.append("too_long")
            continue
        fit = _Fit(iid, texts[iid], row["response"], len(bare))
        fitter.add(fit, ranked.get(iid, []), docs, filled=False)
        fits.append(fit)
    hungry = [f for f in fits if not f.closed and f.used < length]
    if hungry:
        _fill(cfg, fitter, hungry, docs, paths)
    samples = []
    documents = {"whole": 0, "cut": 0, "filled": 0, "samples_filled": 0}
    for fit in tqdm(fits, desc="pack long: verify", unit="sample", disable=None):
        sample = fitter.finish(fit)
        if len(sample) < cfg.min_fill * length:
            reasons.append("under_filled")
            continue
        samples.append(spill.add(sample))
        documents["whole"] += sum(not d.cut for d in fit.docs)
        documents["cut"] += sum(d.cut for d in fit.docs)
        documents["filled"] += sum(d.filled for d in fit.docs)
        documents["samples_filled"] += any(d.filled for d in fit.docs)
    return samples, {"available_samples": len(kept), "reasons": reasons, "documents": documents}


def _fill(cfg: PackConfig, fitter: _LongFitter, hungry: list[_Fit], docs: dict[str, dict],
          paths: dict[str, Path]) -> None:
    """One batched search for every sample whose own documents left room."""
    from longctx.retrieval.search import Retriever
    from longctx.synth.retrieve import query_vectors

    vectors = query_vectors(paths["retrieved"], [f.instruction_id for f in hungry])
    hits = Retriever(paths["index"], paths["embeddings"]).search_vectors(vectors, cfg.fill_top_k)
    more = [[h.doc_id for h in found if h.doc_id not in {d.doc_id for d in fit.docs}]
            for fit, found in zip(hungry, hits)]
    docs.update(read_documents(paths["docs"], [d for ids in more for d in ids if d not in docs]))
    for fit, ids in zip(tqdm(hungry, desc="pack long: fill", unit="sample", disable=None), more):
        fitter.add(fit, ids, docs, filled=True)

