"""Rule `respond`: the LLM answers every instruction from its final query-focused summaries.

The answer becomes the target of a long training sample, so only answers worth learning from
are kept: a short model often refuses, stops after a few words, loops on one sentence or runs
out of tokens, and each of those is dropped with its reason (the row stays, for inspection).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from longctx import repro
from longctx.config import RespondConfig
from longctx.errors import LongctxError
from longctx.llm import LLM
from longctx.llm.base import derive_seed
from longctx.synth import prompts
from longctx.synth.quality import is_refusal, is_repetitive
from longctx.synth.tables import count_reasons, mean_max, read_table, write_table

log = logging.getLogger(__name__)

RESPONSES_SCHEMA = pa.schema([
    ("instruction_id", pa.string()),
    ("response", pa.large_string()),
    ("finish_reason", pa.string()),
    ("n_tokens", pa.int32()),
    ("kept", pa.bool_()),
    ("reason", pa.string()),
])
REASONS = ("no_summaries", "empty", "truncated", "refusal", "too_short", "repetitive")
FINISH_REASONS = ("stop", "length", "none")


def reject_reason(text: str, finish_reason: str, cfg: RespondConfig) -> str | None:
    """Why a response is dropped (the first filter that matches), or None to keep it."""
    words = text.lower().split()
    if not words:
        return "empty"
    if finish_reason == "length" and not cfg.keep_truncated:
        return "truncated"
    if is_refusal(text):
        return "refusal"
    if len(words) < cfg.min_words:
        return "too_short"
    if is_repetitive(text, cfg.max_repeated_fraction):
        return "repetitive"
    return None


def final_summaries(instructions: list[dict], summaries: list[dict],
                    summaries_path: Path) -> dict[str, list[str]]:
    """Each instruction's final summaries in (level, position) order; unknown ids are errors."""
    known = {row["id"] for row in instructions}
    found: dict[str, list[tuple[int, int, str]]] = {}
    for row in summaries:
        iid = row["instruction_id"]
        if iid not in known:
            raise LongctxError(f"{summaries_path}: instruction_id {iid!r} is not in the "
                               "instructions table (rerun summarize)")
        if row["final"]:
            found.setdefault(iid, []).append((row["level"], row["position"], row["summary"]))
    return {iid: [s for _, _, s in sorted(rows)] for iid, rows in found.items()}


def respond(cfg: RespondConfig, llm: LLM, seed: int, instructions_path: str | Path,
            summaries_path: str | Path, out_path: str | Path, stats_path: str | Path) -> dict:
    """Answer every instruction that has final summaries in ONE batched call, filter the
    answers, write one row per instruction and the stats; returns the stats."""
    instructions = read_table(instructions_path, ["id", "instruction"])
    summaries = read_table(summaries_path,
                           ["instruction_id", "position", "level", "summary", "final"])
    notes = final_summaries(instructions, summaries, Path(summaries_path))
    asked = [row for row in instructions if row["id"] in notes]
    sampling = cfg.sampling(derive_seed(seed, "respond"))
    chats = [prompts.respond_prompt(row["instruction"], notes[row["id"]]) for row in asked]
    answers = dict(zip((row["id"] for row in asked),
                       llm.chat(chats, sampling, prompts.VERSIONS["respond"], desc="respond")))

    rows = []
    for row in instructions:
        answer = answers.get(row["id"])
        if answer is None:
            rows.append(_row(row["id"], "", "none", 0, "no_summaries"))
            continue
        text = answer.text.strip()
        reason = reject_reason(text, answer.finish_reason, cfg)
        rows.append(_row(row["id"], text, answer.finish_reason, answer.completion_tokens,
                         reason))
    write_table(out_path, rows, RESPONSES_SCHEMA)

    kept_tokens = [r["n_tokens"] for r in rows if r["kept"]]
    stats = {
        "instructions": len(rows),
        "called": len(chats),
        "kept": len(kept_tokens),
        "dropped": count_reasons([r["reason"] for r in rows], REASONS),
        "finish_reasons": count_reasons([r["finish_reason"] for r in rows], FINISH_REASONS),
        "response_tokens": mean_max(kept_tokens),
        "sampling": asdict(sampling),
        "template": prompts.VERSIONS["respond"],
        "model": repro.fingerprint(llm.identity),
    }
    repro.write_json(stats_path, stats)
    log.info("respond: %d of %d kept, dropped %s", stats["kept"], stats["instructions"],
             {k: v for k, v in stats["dropped"].items() if v})
    return stats


def _row(instruction_id: str, text: str, finish_reason: str, n_tokens: int,
         reason: str | None) -> dict:
    return {"instruction_id": instruction_id, "response": text, "finish_reason": finish_reason,
            "n_tokens": n_tokens, "kept": reason is None, "reason": reason}
