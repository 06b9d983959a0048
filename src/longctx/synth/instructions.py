"""Rule `instructions`: the short-context LLM writes instructions that need several documents.

After "Bootstrap Your Own Context Length": a random chunk of the corpus goes in front of every
generation prompt, so instructions spread over the corpus's topics instead of repeating the
model's favourite few. Replies are parsed leniently (small models number, bullet, bold and
preface their lists in every way), then filtered by length, exact and near duplicates. Rounds
of prompts run until `count` instructions are kept or `max_rounds` is spent.

The first round, which asks for all `count` instructions and so holds nearly every call,
scatters into shard jobs by prompt number (rule `instructions_shard`); its gather (rule
`instructions`) filters their candidates in prompt order and runs the rounds that top up what
the filters dropped, which depend on what was kept so far. The result is the same bytes for
any shard count.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from longctx import repro
from longctx.config import InstructionsConfig
from longctx.errors import LongctxError
from longctx.llm import LLM
from longctx.llm.base import derive_seed
from longctx.parts import read_parts, write_part
from longctx.shards import Shard, check_count
from longctx.synth.prompts import VERSIONS, instructions_prompt
from longctx.synth.quality import REFERS_TO_PROMPT_TEXT
from longctx.synth.tables import count_reasons, document_rows, read_rows, write_table
from longctx.tokens import Counter, split_chunks

log = logging.getLogger(__name__)

REASONS = ("truncated", "too_short", "too_long", "not_self_contained", "duplicate",
           "near_duplicate", "surplus")
SCHEMA = pa.schema([("id", pa.string()), ("instruction", pa.string()),
                    ("task_type", pa.string()), ("seed_doc_id", pa.string()),
                    ("seed_chunk", pa.large_string()), ("round", pa.int32()),
                    ("prompt", pa.int32())])
# A shard job's part: its first-round candidates, parsed, with the parser's reason (null:
# still in the running), in (prompt, item) order.
CANDIDATES = pa.schema([("prompt", pa.int32()), ("instruction", pa.string()),
                        ("reason", pa.string()), ("task_type", pa.string()),
                        ("seed_doc_id", pa.string()), ("seed_chunk", pa.large_string())])
EMBED_BATCH = 64

# One list marker at the start of a line: bullets, "1." "1)" "(1)" "1:", "Instruction 1:".
_MARKER = re.compile(r"^(?:[-*•+]\s+|\(\d{1,2}\)\s*|\d{1,2}(?:[.):\]]|\s+-)(?!\d)\s*|"
                     r"(?:instruction|task|question)\s*(?:#?\d{1,2}\s*[:.)-]|:)\s*)",
                     re.IGNORECASE)
# An instruction must stand without the seed chunk (the training sample will not have it),
# and must not be about instructions (small models write "The first instruction is to ...").
_REFERS_TO_PROMPT = re.compile(REFERS_TO_PROMPT_TEXT + r"|\binstructions?\b", re.IGNORECASE)
_QUOTES = [('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("`", "`")]


def _clean_line(line: str) -> str:
    """The instruction in one list line, without markers, emphasis or wrapping quotes.
    Loops because markers nest (e.g. '**1.** "Compare ..."')."""
    prev = None
    while line != prev:
        prev = line
        line = line.strip().replace("**", "").replace("__", "")
        line = _MARKER.sub("", line)
        line = re.sub(r"(?<!\w)\*(\S[^*]*?)\*(?!\w)", r"\1", line)  # *italics*
        if len(line) > 1 and line[0] == line[-1] == "_":
            line = line[1:-1]
        for left, right in _QUOTES:
            inner = line[1:-1]
            if (len(line) > 1 and line[0] == left and line[-1] == right
                    and left not in inner and right not in inner):
                line = inner
    return line


def _is_item(line: str) -> bool:
    """Headers ('# ...'), preambles ('Here are 3 instructions:') and punctuation are not."""
    return bool(re.search(r"\w", line)) and not line.endswith(":") and not line.startswith("#")


def parse_completion(text: str, finish_reason: str,
                     per_prompt: int) -> list[tuple[str, str | None]]:
    """(instruction, reason) per candidate in one reply; reason None = still in the running.
    A cut-off reply's last line is incomplete ("truncated"); items past `per_prompt` were not
    asked for ("surplus"). An empty list means the reply was unparseable."""
    lines = text.splitlines()
    cut = finish_reason == "length" and not text.endswith("\n")
    items: list[tuple[str, str | None]] = []
    for i, raw in enumerate(lines):
        line = _clean_line(raw)
        if line and _is_item(line):
            items.append((line, "truncated" if cut and i == len(lines) - 1 else None))
    out, asked = [], 0
    for line, reason in items:
        if reason is None:
            asked += 1
            reason = "surplus" if asked > per_prompt else None
        out.append((line, reason))
    return out


def normalise(text: str) -> str:
    """What makes two instructions the same: case, spacing and final punctuation do not."""
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".!?;:,").rstrip()


def instruction_id(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def seed_chunk(text: str, rng: random.Random, max_tokens: int, count: Counter) -> str:
    """A chunk of at most `max_tokens` tokens at a random word of `text`: the window of about
    2 x max_tokens words is cut by the real tokenizer, so the limit is exact."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    n_words = min(len(spans), 2 * max_tokens)
    start = rng.randrange(len(spans) - n_words + 1)
    window = text[spans[start][0]:spans[start + n_words - 1][1]]
    return split_chunks(window, max_tokens, count)[0]


def round_prompts(cfg: InstructionsConfig, missing: int) -> int:
    """Prompts of a round that still misses `missing` instructions: enough for them if 2 of
    every 3 candidates survive the filters (`longctx plan` predicts the first round by it)."""
    return max(1, -(-3 * missing // (2 * cfg.per_prompt)))


@dataclass
class Candidate:
    text: str
    reason: str | None
    task_type: str
    doc_id: str
    chunk: str
    round: int
    prompt: int


class Deduper:
    """Exact and near-duplicate memory of the kept instructions; the embedder loads lazily,
    once, and only if some candidate gets as far as needing it."""

    def __init__(self, model: str, threshold: float) -> None:
        self.model_name, self.threshold = model, threshold
        self.model = None
        self.seen: set[str] = set()
        self.buffer: np.ndarray | None = None  # kept vectors in rows [:n], grown by doubling
        self.n = 0

    def embed(self, texts: list[str]) -> np.ndarray:
        from longctx.retrieval.embed import encode, load_embedder

        if self.model is None:
            self.model = load_embedder(self.model_name)
        return encode(self.model, texts, EMBED_BATCH)

    def reason(self, text: str, vector: np.ndarray) -> str | None:
        if normalise(text) in self.seen:
            return "duplicate"
        if self.n and float(np.max(self.buffer[:self.n] @ vector)) >= self.threshold:
            return "near_duplicate"
        return None

    def add(self, text: str, vector: np.ndarray) -> None:
        self.seen.add(normalise(text))
        if self.buffer is None or self.n == len(self.buffer):
            grown = np.zeros((max(16, 2 * self.n), len(vector)), dtype=np.float32)
            if self.buffer is not None:
                grown[:self.n] = self.buffer
            self.buffer = grown
        self.buffer[self.n] = vector
        self.n += 1


def _filter_round(cands: list[Candidate], cfg: InstructionsConfig, dedup: Deduper,
                  kept: list[Candidate]) -> None:
    """Give every candidate of a round its reason (None: kept), in (prompt, item) order."""
    for c in cands:
        n = len(c.text.split())
        if c.reason is None and n < cfg.min_words:
            c.reason = "too_short"
        elif c.reason is None and n > cfg.max_words:
            c.reason = "too_long"
        elif c.reason is None and _REFERS_TO_PROMPT.search(c.text):
            c.reason = "not_self_contained"
    alive = [c for c in cands if c.reason is None]
    vectors = dedup.embed([c.text for c in alive]) if alive else []
    for c, vector in zip(alive, vectors):
        c.reason = "surplus" if len(kept) >= cfg.count else dedup.reason(c.text, vector)
        if c.reason is None:
            dedup.add(c.text, vector)
            kept.append(c)


def _round(r: int, cfg: InstructionsConfig, llm: LLM, seed: int, docs_path: str | Path,
           rows: Sequence[int], prompts: list[int]) -> tuple[list[Candidate], Counts]:
    """Prompts `prompts` of generation round `r`: their candidates and reply counts. Each
    prompt draws from its own seed, so it is the same whichever job sends it. Only the
    documents the prompts draw are read (a corpus may hold 10M)."""
    rngs = [random.Random(derive_seed(seed, "instructions", r, p)) for p in prompts]
    drawn = [rng.choice(rows) for rng in rngs]
    docs = read_rows(docs_path, drawn, ["id", "text"])
    plans, chats = [], []
    for rng, row in zip(rngs, drawn):
        doc_id, text = docs[row]["id"], docs[row]["text"] or ""
        if not text.strip():
            raise LongctxError(f"{docs_path}: document {doc_id} has no text (rerun corpus)")
        chunk = seed_chunk(text, rng, cfg.seed_chunk_tokens, llm.count_tokens)
        task_type = rng.choice(cfg.task_types)
        plans.append((doc_id, chunk, task_type))
        chats.append(instructions_prompt(chunk, task_type, cfg.per_prompt))
    outs = llm.chat(chats, cfg.sampling(derive_seed(seed, "instructions", r)),
                    VERSIONS["instructions"], desc=f"instructions round {r}")
    cands, counts = [], Counts()
    for p, (doc_id, chunk, task_type), out in zip(prompts, plans, outs):
        items = parse_completion(out.text, out.finish_reason, cfg.per_prompt)
        counts.add(out.finish_reason, parsed=bool(items))
        cands += [Candidate(t, why, task_type, doc_id, chunk, r, p) for t, why in items]
    return cands, counts


@dataclass
class Counts:
    """The replies of some prompts: how many, how each finished, how many parsed to nothing
    (additive: a shard job's are summed at gather)."""

    prompts: int = 0
    stop: int = 0
    length: int = 0
    unparseable: int = 0

    def add(self, finish_reason: str, parsed: bool) -> None:
        self.prompts += 1
        self.stop += finish_reason == "stop"
        self.length += finish_reason == "length"
        self.unparseable += not parsed

    def __iadd__(self, other: Counts) -> Counts:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)
        return self


def seed_documents(docs: str | Path) -> Sequence[int]:
    """What seed chunks are drawn from: corpus row numbers (never every id in memory)."""
    rows = document_rows(docs)
    if not len(rows):
        raise LongctxError(f"{docs}: no document to draw seed chunks from")
    return rows


def first_round(cfg: InstructionsConfig, llm: LLM, seed: int, *, shard: Shard, params: str,
                docs: str | Path, part: str | Path) -> int:
    """Shard job: the first round's prompts `shard` owns (by prompt number), every candidate
    of their replies, parsed but not yet filtered, to `part`; returns the candidate count.
    The first round asks for all `count` instructions, so it holds nearly every call."""
    n_prompts = round_prompts(cfg, cfg.count)
    check_count(shard, n_prompts, "instructions")
    rows = seed_documents(docs)
    owned = [p for p in range(n_prompts) if shard.owns(str(p))]
    cands, counts = _round(0, cfg, llm, seed, docs, rows, owned) if owned else ([], Counts())
    write_part(part, [_candidate_row(c) for c in cands], CANDIDATES, shard, params=params,
               context={"model": repro.fingerprint(llm.identity)}, counters=asdict(counts))
    log.info("instructions %s: %d candidates from %d of the %d first-round prompts",
             shard.name, len(cands), len(owned), n_prompts)
    return len(cands)


def gather_instructions(cfg: InstructionsConfig, llm: LLM, seed: int, *, params: str,
                        parts: list[Path], docs: str | Path, instructions: str | Path,
                        metrics: str | Path) -> dict:
    """The shards' first round, filtered in (prompt, item) order as one job would, then more
    rounds here until `count` instructions are kept or `max_rounds` is spent. Writes them to
    `instructions` (fewer, with a warning, if rounds run out) and their stats to `metrics`."""
    got = read_parts(parts, CANDIDATES, params, key="prompt",
                     order=list(range(round_prompts(cfg, cfg.count))), rerun="instructions")
    if got.context and got.context["model"] != repro.fingerprint(llm.identity):
        raise LongctxError("instructions parts: made by another generator than llm names; "
                           "rerun instructions")
    cands = [Candidate(r["instruction"], r["reason"], r["task_type"], r["seed_doc_id"],
                       r["seed_chunk"], 0, r["prompt"]) for r in got.rows]
    counts = Counts(**got.counters)
    dedup = Deduper(cfg.dedup_model, cfg.dedup_similarity)
    kept: list[Candidate] = []
    _filter_round(cands, cfg, dedup, kept)
    rounds, rows = 1, None
    while rounds < cfg.max_rounds and len(kept) < cfg.count:
        rows = rows or seed_documents(docs)
        prompts = list(range(round_prompts(cfg, cfg.count - len(kept))))
        new, more = _round(rounds, cfg, llm, seed, docs, rows, prompts)
        _filter_round(new, cfg, dedup, kept)
        cands += new
        counts += more
        rounds += 1
    return _write(cfg, llm, seed, kept, cands, counts, rounds, instructions, metrics)


def _candidate_row(c: Candidate) -> dict:
    return {"prompt": c.prompt, "instruction": c.text, "reason": c.reason,
            "task_type": c.task_type, "seed_doc_id": c.doc_id, "seed_chunk": c.chunk}


def _write(cfg: InstructionsConfig, llm: LLM, seed: int, kept: list[Candidate],
           cands: list[Candidate], counts: Counts, rounds: int, instructions: str | Path,
           metrics: str | Path) -> dict:
    """The kept instructions and the stats of every candidate; refuses to write none."""
    dropped = count_reasons([c.reason for c in cands], REASONS)
    if not kept:
        raise LongctxError(
            f"instructions: no usable instruction after {rounds} rounds: {len(cands)} "
            f"candidates, dropped {dropped}, {counts.unparseable} unparseable of "
            f"{counts.prompts} replies")
    if len(kept) < cfg.count:
        log.warning("instructions: kept %d of the %d asked for after %d rounds (dropped %s)",
                    len(kept), cfg.count, rounds, dropped)
    write_table(instructions, [{"id": instruction_id(c.text), "instruction": c.text,
                            "task_type": c.task_type, "seed_doc_id": c.doc_id,
                            "seed_chunk": c.chunk, "round": c.round, "prompt": c.prompt}
                           for c in kept], SCHEMA)
    words = [len(c.text.split()) for c in kept]
    stats = {
        "prompts": counts.prompts, "rounds": rounds, "candidates": len(cands),
        "kept": len(kept), "dropped": dropped, "unparseable_outputs": counts.unparseable,
        "finish_reasons": {"stop": counts.stop, "length": counts.length},
        "task_types": count_reasons([c.task_type for c in kept], tuple(cfg.task_types)),
        "words": {"mean": round(sum(words) / len(words), 3), "max": max(words)},
        "count": cfg.count, "sampling": asdict(cfg.sampling(seed)),  # run seed; rounds derive
        "template": VERSIONS["instructions"], "model": repro.fingerprint(llm.identity),
        "dedup_model": cfg.dedup_model, "dedup_similarity": cfg.dedup_similarity,
    }
    repro.write_json(metrics, stats)
    log.info("instructions: kept %d of %d candidates from %d prompts in %d rounds", len(kept),
             len(cands), counts.prompts, rounds)
    return stats
