"""Rule `long_output`: the paper's long-output samples. A long document (2K-32K tokens) becomes
the target and the LLM back-translates it into the writing instruction that would ask for it.

The short model cannot read the whole document, so it sees the start and the end (enough to
name topic and kind of text) plus the length in words; the target stays the full raw text.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from longctx import repro
from longctx.config import LongOutputConfig
from longctx.errors import LongctxError
from longctx.llm import LLM
from longctx.llm.base import derive_seed
from longctx.parts import read_parts, write_part
from longctx.shards import Shard, check_count
from longctx.synth import prompts
from longctx.synth.quality import REFERS_TO_PROMPT_TEXT, is_repetitive
from longctx.synth.tables import (
    count_reasons,
    document_rows,
    mean_max,
    read_documents,
    read_rows,
    write_table,
)
from longctx.tokens import split_chunks

log = logging.getLogger(__name__)

LONG_OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("doc_id", pa.string()),
    ("instruction", pa.string()),
    ("target", pa.large_string()),
    ("target_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("kept", pa.bool_()),
    ("reason", pa.string()),
])
REASONS = ("empty", "truncated", "too_short", "not_an_instruction", "not_self_contained",
           "repetitive")
MIN_WORDS = 4
GAP = "\n\n[...]\n\n"  # between the start and the end of an excerpt
WINDOW_MARGIN = 32  # chat-template tokens around the prompt

_LABEL = re.compile(r"^\s*(the\s+)?(writing\s+)?instruction\s*:\s*", re.IGNORECASE)
_WRITING = re.compile(r"(write|compose|create|draft|produce)\b", re.IGNORECASE)
# The prompt echoed ("Write an instruction that asks an AI assistant to write this text."):
# no topic, so no use as an instruction without the document.
_ECHO = re.compile(REFERS_TO_PROMPT_TEXT + r"|\bAI assistant\b|\binstructions? (?:that|which)\b",
                   re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "`": "`"}


def check_window(cfg: LongOutputConfig, llm: LLM) -> None:
    """Fail before any call when the excerpt, the prompt and the answer cannot fit."""
    if llm.context_tokens is None:
        return
    overhead = llm.count_tokens([prompts.backtranslate_prompt("", 100_000)[0]["content"]])[0]
    need = cfg.excerpt_tokens + overhead + WINDOW_MARGIN + cfg.max_new_tokens
    if need > llm.context_tokens:
        raise LongctxError(
            f"long_output.excerpt_tokens={cfg.excerpt_tokens}: with the prompt ({overhead}) and "
            f"max_new_tokens={cfg.max_new_tokens} it needs {need} tokens, more than the "
            f"model's {llm.context_tokens}-token window; lower long_output.excerpt_tokens")


def pick_candidates(docs: str | Path, eligible: Sequence[int], cfg: LongOutputConfig,
                    seed: int) -> list[str]:
    """The ids of a seeded sample of the `eligible` corpus rows, in id order. Ids and texts
    are read for the candidates alone, so a 10M-document corpus is never held in memory."""
    rng = random.Random(derive_seed(seed, "long_output"))
    picked = [eligible[i] for i in rng.sample(range(len(eligible)),
                                              min(cfg.count, len(eligible)))]
    return sorted(row["id"] for row in read_rows(docs, picked, ["id"]).values())


def excerpt(text: str, max_tokens: int, llm: LLM) -> str:
    """The whole text when it fits, else its start and its end around a gap marker: small
    pieces (an eighth of the budget, cut on paragraph/sentence boundaries) are taken from
    both ends while the excerpt fits `max_tokens`."""
    count = llm.count_tokens
    if not text.strip() or count([text])[0] <= max_tokens:
        return text
    pieces = split_chunks(text, max(1, max_tokens // 8), count)
    sizes = count(pieces)
    room = max_tokens - count([GAP])[0]
    head, tail, used = 0, len(pieces), 0
    while head < tail:  # alternate ends, so the start and the end get equal shares
        side = head if head <= len(pieces) - tail else tail - 1
        if used + sizes[side] > room:
            break
        used += sizes[side]
        head, tail = (head + 1, tail) if side == head else (head, tail - 1)
    short = "".join(pieces[:head]).strip() + GAP + "".join(pieces[tail:]).strip()
    while count([short])[0] > max_tokens and (head or tail < len(pieces)):  # seams merged
        head, tail = (head - 1, tail) if head > len(pieces) - tail else (head, tail + 1)
        short = "".join(pieces[:head]).strip() + GAP + "".join(pieces[tail:]).strip()
    return short


def approx_words(text: str) -> int:
    """The length the instruction asks for: words rounded to the nearest 100 (at least 100)."""
    return max(100, (len(text.split()) + 50) // 100 * 100)


def _unwrap(line: str) -> str:
    """One line without bold, an "Instruction:" label or wrapping quotes."""
    line = _LABEL.sub("", line.replace("**", "").strip(), count=1).strip()
    while len(line) >= 2 and _QUOTES.get(line[0]) == line[-1]:
        line = line[1:-1].strip()
    return line


def clean_instruction(text: str) -> tuple[str, bool]:
    """(the instruction, whether it ran to the end of the answer). Small models wrap it in
    chatter ("Here's a request:"), so the first line that starts like a writing instruction
    wins; without one, the first paragraph is returned (and rejected as not an instruction)."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if _WRITING.match(_unwrap(line)):
            return _unwrap(line), i == len(lines) - 1
    head = re.split(r"\n\s*\n", text.strip(), maxsplit=1)
    return _unwrap(head[0]), len(head) == 1


def reject_reason(text: str, finish_reason: str, at_end: bool = True,
                  max_repeated_fraction: float = 1.0) -> str | None:
    """Why a cleaned answer is no instruction (None: keep it). A cut-off answer only loses
    its instruction when the cut fell inside it."""
    if not text:
        return "empty"
    if finish_reason == "length" and at_end:
        return "truncated"
    if len(text.split()) < MIN_WORDS:
        return "too_short"
    if not _WRITING.match(text):  # e.g. "I'm ready to help", or a summary of the text
        return "not_an_instruction"
    if _ECHO.search(text):
        return "not_self_contained"
    if is_repetitive(text, max_repeated_fraction):
        return "repetitive"
    return None


def sample_id(doc_id: str, instruction: str) -> str:
    return hashlib.sha256(f"{doc_id}\n{instruction}".encode()).hexdigest()[:16]


def long_output(cfg: LongOutputConfig, llm: LLM, seed: int, *, shard: Shard, params: str,
                docs: str | Path, part: str | Path) -> int:
    """Back-translate a writing instruction for every candidate document of `shard` (one
    batched call) and write one row per candidate, in id order, to `part`; returns the
    number of rows."""
    check_window(cfg, llm)
    eligible = document_rows(docs, (cfg.min_tokens, cfg.max_tokens))
    candidates = pick_candidates(docs, eligible, cfg, seed)
    if not candidates:
        log.warning("long_output: no document has %d-%d tokens; writing an empty table",
                    cfg.min_tokens, cfg.max_tokens)
    check_count(shard, len(candidates), "long_output")
    candidates = [d for d in candidates if shard.owns(d)]
    documents = read_documents(docs, candidates) if candidates else {}
    sampling = cfg.sampling(derive_seed(seed, "long_output"))
    chats = [prompts.backtranslate_prompt(excerpt(documents[i]["text"], cfg.excerpt_tokens, llm),
                                          approx_words(documents[i]["text"])) for i in candidates]
    answers = llm.chat(chats, sampling, prompts.VERSIONS["backtranslate"], desc="long_output")

    rows = []
    for doc_id, answer in zip(candidates, answers):
        instruction, at_end = clean_instruction(answer.text)
        reason = reject_reason(instruction, answer.finish_reason, at_end,
                               cfg.max_repeated_fraction)
        rows.append({"id": sample_id(doc_id, instruction), "doc_id": doc_id,
                     "instruction": instruction, "target": documents[doc_id]["text"],
                     "target_tokens": documents[doc_id]["n_tokens"],
                     "finish_reason": answer.finish_reason, "kept": reason is None,
                     "reason": reason})
    context = {"documents": len(document_rows(docs)), "eligible": len(eligible),
               "min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens,
               "sampling": asdict(sampling), "template": prompts.VERSIONS["backtranslate"],
               "model": repro.fingerprint(llm.identity)}
    write_part(part, rows, LONG_OUTPUT_SCHEMA, shard, params=params, context=context)
    log.info("long_output %s: %d candidates", shard.name, len(rows))
    return len(rows)


def gather_long_output(*, params: str, parts: list[Path], long_output: str | Path,
                       metrics: str | Path) -> dict:
    """The shards' rows, in document id order, to `long_output`, and the stats of all of
    them to `metrics`; returns the stats."""
    got = read_parts(parts, LONG_OUTPUT_SCHEMA, params, key="doc_id", order=None,
                     rerun="long_output")
    write_table(long_output, got.rows, LONG_OUTPUT_SCHEMA)
    kept = [r["target_tokens"] for r in got.rows if r["kept"]]
    context = dict(got.context)
    stats = {
        "documents": context.pop("documents"),
        "eligible": context.pop("eligible"),
        "candidates": len(got.rows),
        "kept": len(kept),
        "dropped": count_reasons([r["reason"] for r in got.rows], REASONS),
        "target_tokens": {"sum": sum(kept), **mean_max(kept)},
        **context,
    }
    repro.write_json(metrics, stats)
    log.info("long_output: %d of %d candidates kept (%d eligible of %d documents)",
             stats["kept"], stats["candidates"], stats["eligible"], stats["documents"])
    return stats
