"""Rules `respond_shard` and `respond`: the LLM answers every instruction from its final
query-focused summaries, in shard jobs split by instruction id (longctx.shards), gathered into
one table.

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
from longctx.parts import read_parts, write_part
from longctx.shards import Shard, check_count
from longctx.synth import prompts
from longctx.synth.quality import is_refusal, is_repetitive
from longctx.synth.tables import (
    check_instruction_ids,
    count_reasons,
    mean_max,
    read_instructions,
    read_table,
    write_table,
)

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


def final_summaries(texts: dict[str, str], summaries: list[dict], summaries_path: Path,
                    instructions_path: Path) -> dict[str, list[str]]:
    """Each instruction's final summaries in (level, position) order; unknown ids are errors."""
    check_instruction_ids([row["instruction_id"] for row in summaries], texts, summaries_path,
                          instructions_path, "summarize")
    found: dict[str, list[tuple[int, int, str]]] = {}
    for row in summaries:
        if row["final"]:
            found.setdefault(row["instruction_id"], []).append(
                (row["level"], row["position"], row["summary"]))
    return {iid: [s for _, _, s in sorted(rows)] for iid, rows in found.items()}


def respond(cfg: RespondConfig, llm: LLM, seed: int, *, shard: Shard, params: str,
            instructions: str | Path, summaries: str | Path, part: str | Path) -> int:
    """Answer every instruction of `shard` that has final summaries in `summaries` (one
    batched call), filter the answers and write one row per instruction of the shard, in
    table order, to `part`; returns the number of rows."""
    texts = read_instructions(instructions)
    summary_rows = read_table(summaries,
                              ["instruction_id", "position", "level", "summary", "final"])
    notes = final_summaries(texts, summary_rows, Path(summaries), Path(instructions))
    owned = [iid for iid in texts if shard.owns(iid)]
    check_count(shard, len(texts), "respond")
    asked = [iid for iid in owned if iid in notes]
    sampling = cfg.sampling(derive_seed(seed, "respond"))
    chats = [prompts.respond_prompt(texts[iid], notes[iid]) for iid in asked]
    answers = dict(zip(asked,
                       llm.chat(chats, sampling, prompts.VERSIONS["respond"], desc="respond")))

    rows = []
    for iid in owned:
        answer = answers.get(iid)
        if answer is None:
            rows.append(_row(iid, "", "none", 0, "no_summaries"))
            continue
        text = answer.text.strip()
        reason = reject_reason(text, answer.finish_reason, cfg)
        rows.append(_row(iid, text, answer.finish_reason, answer.completion_tokens, reason))
    context = {"sampling": asdict(sampling), "template": prompts.VERSIONS["respond"],
               "model": repro.fingerprint(llm.identity)}
    write_part(part, rows, RESPONSES_SCHEMA, shard, params=params, context=context)
    log.info("respond %s: %d instructions, %d answered", shard.name, len(rows), len(chats))
    return len(rows)


def gather_responses(*, params: str, instructions: str | Path, parts: list[Path],
                     responses: str | Path, metrics: str | Path) -> dict:
    """The shards' rows, in instruction order, to `responses`, and the stats of all of them
    to `metrics`; returns the stats."""
    order = list(read_instructions(instructions))
    got = read_parts(parts, RESPONSES_SCHEMA, params, key="instruction_id", order=order,
                     rerun="respond")
    if len(got.rows) != len(order):
        raise LongctxError(f"respond parts: {len(got.rows)} rows for the {len(order)} "
                           f"instructions of {instructions}; rerun respond")
    write_table(responses, got.rows, RESPONSES_SCHEMA)
    rows = got.rows
    kept_tokens = [r["n_tokens"] for r in rows if r["kept"]]
    stats = {
        "instructions": len(rows),
        "called": sum(r["reason"] != "no_summaries" for r in rows),
        "kept": len(kept_tokens),
        "dropped": count_reasons([r["reason"] for r in rows], REASONS),
        "finish_reasons": count_reasons([r["finish_reason"] for r in rows], FINISH_REASONS),
        "response_tokens": mean_max(kept_tokens),
        **got.context,
    }
    repro.write_json(metrics, stats)
    log.info("respond: %d of %d kept, dropped %s", stats["kept"], stats["instructions"],
             {k: v for k, v in stats["dropped"].items() if v})
    return stats


def _row(instruction_id: str, text: str, finish_reason: str, n_tokens: int,
         reason: str | None) -> dict:
    return {"instruction_id": instruction_id, "response": text, "finish_reason": finish_reason,
            "n_tokens": n_tokens, "kept": reason is None, "reason": reason}
