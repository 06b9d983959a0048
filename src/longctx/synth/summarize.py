"""Rules `summarize_shard` and `summarize`: recursive query-focused summaries of every
instruction's documents, in shard jobs split by instruction id (longctx.shards), gathered
into one table.

The core of "Bootstrap Your Own Context Length": a short-context model cannot read the
retrieved documents whole, so each document is cut into chunks that fit it, every chunk is
summarised with respect to the instruction (irrelevant chunks answer NOTHING RELEVANT and are
dropped), and while an instruction's summaries are longer than `budget_tokens` consecutive
ones are merged into summaries of summaries, one level at a time. Every summary of every level
is a row (kept or why not), so a sample can be traced from its response down to the chunks.

The shard's documents are read once (its instructions x top_k of them, not the corpus), then
its instructions are summarised in groups of `instructions_per_group`: the chunks and chats
a job holds at once are one group's. All chats of one level of a group go to the LLM in one
call, so batches fill up.
A call's output does not depend on its batch-mates, so a killed run, another group size or
another shard count gives the same rows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from longctx import repro
from longctx.config import SummarizeConfig
from longctx.errors import LongctxError
from longctx.llm import LLM, Chat, Completion
from longctx.llm.base import derive_seed
from longctx.parts import read_parts, write_part
from longctx.shards import Shard, check_count
from longctx.synth.prompts import NOTHING_RELEVANT, VERSIONS, merge_prompt, qfs_prompt
from longctx.synth.quality import is_repetitive
from longctx.synth.tables import (
    check_instruction_ids,
    count_reasons,
    mean_max,
    read_documents,
    read_instructions,
    read_table,
    write_table,
)
from longctx.tokens import split_chunks

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("instruction_id", pa.string()), ("level", pa.int32()), ("position", pa.int32()),
    ("doc_id", pa.string()), ("chunk", pa.int32()), ("char_start", pa.int64()),
    ("char_end", pa.int64()), ("children", pa.list_(pa.int32())),
    ("summary", pa.large_string()), ("n_tokens", pa.int32()), ("finish_reason", pa.string()),
    ("kept", pa.bool_()), ("reason", pa.string()), ("final", pa.bool_()),
])
REASONS = ("empty", "nothing_relevant", "repetitive", "over_budget")
TEMPLATE_MARGIN = 32  # chat-template tokens around the user message, and seams at the chunk
NOTE_MARKER = "[100] \n\n"  # what merge_prompt adds around each note: charged when packing
_NOTHING = re.compile(r"^[\W_]*" + r"\s+".join(map(re.escape, NOTHING_RELEVANT.split())) + r"\b",
                      re.IGNORECASE)

# ... and small models say it in their own words instead of the marker
_NO_INFORMATION = re.compile(
    r"\b(?:does|do|did) not (?:contain|provide|include|mention|have) (?:any )?(?:the )?"
    r"(?:relevant |specific |requested )?(?:information|details|facts)"
    r"|\bno (?:relevant |useful |specific )?information\b"
    r"|\bis not relevant to the (?:instruction|question|request)", re.IGNORECASE)


@dataclass
class Summary:
    """One row of summaries.parquet."""

    instruction_id: str
    level: int
    position: int
    summary: str
    n_tokens: int
    finish_reason: str
    doc_id: str | None = None
    chunk: int | None = None
    char_start: int | None = None  # the chunk is the document's text[char_start:char_end]
    char_end: int | None = None
    children: list[int] = field(default_factory=list)
    kept: bool = True
    reason: str | None = None
    final: bool = False


def _read_inputs(instructions_path: Path, retrieved_path: Path) -> tuple[dict, dict]:
    """{id: instruction} in table order and {id: doc_ids best first}; unknown ids are errors."""
    texts = read_instructions(instructions_path)
    rows = read_table(retrieved_path, ["instruction_id", "doc_ids"])
    check_instruction_ids([r["instruction_id"] for r in rows], texts, retrieved_path,
                          instructions_path, "retrieve")
    ranked: dict[str, list[str]] = {}
    for row in rows:
        iid = row["instruction_id"]
        if iid in ranked:
            raise LongctxError(f"{retrieved_path}: instruction_id {iid!r} appears twice")
        ranked[iid] = list(row["doc_ids"] or [])
    return texts, {iid: ranked[iid] for iid in texts if iid in ranked}


def _check_window(cfg: SummarizeConfig, llm: LLM, instructions: list[str]) -> None:
    """Fail before any call when the longest prompt a chunk or a merge group can make would
    not fit the window; LLM.chat would find out only at that level, after paid-for work."""
    if llm.context_tokens is None or not instructions:
        return
    empty = [qfs_prompt(i, "")[0]["content"] for i in instructions]
    empty += [merge_prompt(i, [])[0]["content"] for i in instructions]
    around = max(llm.count_tokens(empty)) + TEMPLATE_MARGIN
    need = cfg.chunk_tokens + around + cfg.max_new_tokens
    if need > llm.context_tokens:
        raise LongctxError(
            f"summarize.chunk_tokens: {cfg.chunk_tokens} chunk tokens + {around} prompt tokens + "
            f"max_new_tokens {cfg.max_new_tokens} = {need} exceed the model's "
            f"{llm.context_tokens}-token window (set chunk_tokens to at most "
            f"{llm.context_tokens - around - cfg.max_new_tokens})")


def _chunk_documents(cfg: SummarizeConfig, llm: LLM, docs: dict[str, dict],
                     ids: list[str]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Each document's chunks (first `max_chunks_per_document`), and how many each left out."""
    chunks, left_out = {}, {}
    for doc_id in tqdm(ids, desc="chunk documents", unit="doc", disable=None):
        parts = split_chunks(docs[doc_id]["text"], cfg.chunk_tokens, llm.count_tokens)
        cap = cfg.max_chunks_per_document or len(parts)
        chunks[doc_id] = parts[:cap]
        left_out[doc_id] = len(parts) - len(chunks[doc_id])
    return chunks, left_out


def classify(text: str, max_repeated_fraction: float) -> str | None:
    """Why an answer is no summary (None: it is one). Small models decorate the marker, and
    loop under greedy decoding."""
    if not text.strip():
        return "empty"
    if _NOTHING.match(text.strip()) or _NO_INFORMATION.search(text):
        return "nothing_relevant"
    return "repetitive" if is_repetitive(text, max_repeated_fraction) else None


def _complete(cfg: SummarizeConfig, llm: LLM, seed: int, level: int,
              chats: list[Chat]) -> list[tuple[Completion, str, int, str | None]]:
    """(completion, stripped text, its tokens, drop reason) per chat: ONE call per level."""
    name = "qfs" if level == 0 else "merge"
    desc = "qfs level 0" if level == 0 else f"merge level {level}"
    outs = llm.chat(chats, cfg.sampling(derive_seed(seed, "summarize", level)), VERSIONS[name],
                    desc=desc)
    texts = [o.text.strip() for o in outs]
    sizes = llm.count_tokens(texts) if texts else []
    return [(o, t, n, classify(t, cfg.max_repeated_fraction))
            for o, t, n in zip(outs, texts, sizes)]


def _group_notes(rows: list[Summary], limit: int, marker: int) -> list[list[Summary]]:
    """Consecutive summaries, greedily grouped so that a group's notes fit `limit` tokens
    (so a merge prompt is no longer than a chunk's)."""
    groups: list[list[Summary]] = []
    total = 0
    for row in rows:
        cost = row.n_tokens + marker
        if not groups or total + cost > limit:
            groups.append([])
            total = 0
        groups[-1].append(row)
        total += cost
    return groups


def _cut(rows: list[Summary], budget: int) -> None:
    """Recursion gave up: the best-ranked summaries are kept while they fit the budget."""
    total = 0
    for i, row in enumerate(rows):
        total += row.n_tokens
        if total > budget:
            for late in rows[i:]:
                late.kept, late.reason = False, "over_budget"
            return


Levels = dict[str, list[list[Summary]]]  # instruction id -> rows by level


def _level0(cfg: SummarizeConfig, llm: LLM, seed: int, texts: dict[str, str],
            ranked: dict[str, list[str]], chunks: dict[str, list[str]]) -> Levels:
    """Every (instruction, document in rank order, chunk) summarised: level 0 of each."""
    keys = [(iid, d, c) for iid, ids in ranked.items() for d in ids
            for c in range(len(chunks[d]))]
    answers = _complete(cfg, llm, seed, 0,
                        [qfs_prompt(texts[i], chunks[d][c]) for i, d, c in keys])
    starts = {d: [0, *accumulate(map(len, parts))]  # "".join(parts) is a prefix of the text
              for d, parts in chunks.items()}
    levels: Levels = {iid: [[]] for iid in ranked}
    for (iid, doc_id, c), (out, text, n, reason) in zip(keys, answers):
        rows = levels[iid][0]
        rows.append(Summary(iid, 0, len(rows), text, n, out.finish_reason, doc_id, c,
                            starts[doc_id][c], starts[doc_id][c + 1],
                            kept=reason is None, reason=reason))
    return levels


def _recurse(cfg: SummarizeConfig, llm: LLM, seed: int, texts: dict[str, str],
             levels: Levels) -> None:
    """Merge levels until every instruction fits its budget (or is cut); marks the final
    summaries."""
    marker = llm.count_tokens([NOTE_MARKER])[0]
    active, merged_levels = list(levels), 0
    while active:
        plans: dict[str, list[list[Summary]]] = {}
        for iid in active:
            level = len(levels[iid]) - 1
            current = [r for r in levels[iid][level] if r.kept]
            if sum(r.n_tokens for r in current) > cfg.budget_tokens:
                groups = _group_notes(current, cfg.chunk_tokens, marker)
                if level < cfg.max_levels and any(len(g) > 1 for g in groups):
                    plans[iid] = groups
                    continue
                _cut(current, cfg.budget_tokens)
            for row in current:
                row.final = row.kept
        if not plans:
            break
        merged_levels += 1
        level = merged_levels
        merges = [g for groups in plans.values() for g in groups if len(g) > 1]
        answers = iter(_complete(cfg, llm, seed, level, [
            merge_prompt(texts[g[0].instruction_id], [r.summary for r in g]) for g in merges]))
        for iid, groups in plans.items():
            levels[iid].append([_merged(iid, level, pos, g, answers)
                                for pos, g in enumerate(groups)])
        active = list(plans)


def _merged(iid: str, level: int, position: int, group: list[Summary],
            answers: Iterator[tuple[Completion, str, int, str | None]]) -> Summary:
    """The next level's row for one group: its merge answer, or a lone member carried up."""
    children = [r.position for r in group]
    if len(group) == 1:
        return Summary(iid, level, position, group[0].summary, group[0].n_tokens, "carried",
                       children=children)
    out, text, n, reason = next(answers)
    return Summary(iid, level, position, text, n, out.finish_reason, children=children,
                   kept=reason is None, reason=reason)


def _by_group(cfg: SummarizeConfig, llm: LLM, seed: int, texts: dict[str, str],
              ranked: dict[str, list[str]], documents: dict[str, dict]) -> tuple[Levels, int]:
    """Every instruction's levels, `instructions_per_group` instructions at a time, and the
    chunk reads max_chunks_per_document left out. A document two groups retrieve is chunked
    in each (chunks are not kept across groups: that would hold the shard's again)."""
    levels: Levels = {}
    reads_left_out = 0
    order = list(ranked)
    for start in range(0, len(order), cfg.instructions_per_group):
        group = {iid: ranked[iid] for iid in order[start:start + cfg.instructions_per_group]}
        doc_ids = list(dict.fromkeys(d for ids in group.values() for d in ids))
        chunks, left_out = _chunk_documents(cfg, llm, documents, doc_ids)
        reads_left_out += sum(left_out[d] for ids in group.values() for d in ids)
        made = _level0(cfg, llm, seed, texts, group, chunks)
        _recurse(cfg, llm, seed, texts, made)
        levels |= made
    return levels, reads_left_out


def summarize(cfg: SummarizeConfig, llm: LLM, seed: int, *, shard: Shard, params: str,
              instructions: str | Path, retrieved: str | Path, docs: str | Path,
              part: str | Path) -> int:
    """Summarize every retrieved document of every instruction of `shard` with respect to
    it, level by level, and write every summary of every level to `part`; returns the number
    of rows."""
    texts, ranked = _read_inputs(Path(instructions), Path(retrieved))
    check_count(shard, len(texts), "summarize")
    ranked = {iid: ids for iid, ids in ranked.items() if shard.owns(iid)}
    doc_ids = list(dict.fromkeys(d for ids in ranked.values() for d in ids))
    documents = read_documents(docs, doc_ids)
    _check_window(cfg, llm, [texts[iid] for iid in ranked])
    levels, reads_left_out = _by_group(cfg, llm, seed, texts, ranked, documents)
    rows = [asdict(row) for iid in texts for level in levels.get(iid, []) for row in level]
    context = {
        "chunk_tokens": cfg.chunk_tokens, "budget_tokens": cfg.budget_tokens,
        "max_levels": cfg.max_levels,
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                     "top_p": cfg.top_p},
        "templates": {"qfs": VERSIONS["qfs"], "merge": VERSIONS["merge"]},
        "model": repro.fingerprint(llm.identity),
    }
    write_part(part, rows, SCHEMA, shard, params=params, context=context,
               counters={"chunk_reads_left_out": reads_left_out})
    log.info("summarize %s: %d instructions, %d summaries", shard.name, len(ranked), len(rows))
    return len(rows)


def gather_summaries(*, params: str, instructions: str | Path, parts: list[Path],
                     summaries: str | Path, metrics: str | Path) -> dict:
    """The shards' summaries, in instruction order, to `summaries`, and the stats of all of
    them to `metrics`; returns the stats."""
    order = list(read_instructions(instructions))
    got = read_parts(parts, SCHEMA, params, key="instruction_id", order=order,
                     rerun="summarize")
    write_table(summaries, got.rows, SCHEMA)
    stats = _stats([Summary(**row) for row in got.rows], len(order),
                   got.counters["chunk_reads_left_out"], got.context)
    repro.write_json(metrics, stats)
    log.info("summarize: %d summaries over %d levels, %d final; %d instructions without any",
             stats["summaries"], stats["levels"], stats["final_summaries"],
             stats["instructions_without_summaries"])
    return stats


def _stats(rows: list[Summary], instructions: int, reads_left_out: int,
           context: dict) -> dict:
    """Counts of everything made and dropped, by level and reason, from the rows alone (so
    any shard count gives the same); no timings, no cache hits (a rerun on a warm cache
    writes the same bytes)."""
    final = [r.n_tokens for r in rows if r.final]
    levels = max((r.level for r in rows), default=-1) + 1
    per_level = []
    for level in range(levels):
        at = [r for r in rows if r.level == level]
        per_level.append({
            "level": level, "calls": sum(r.finish_reason != "carried" for r in at),
            "summaries": len(at), "kept": sum(r.kept for r in at),
            "dropped": count_reasons([r.reason for r in at], REASONS),
            "carried": sum(r.finish_reason == "carried" for r in at),
            "truncated": sum(r.finish_reason == "length" for r in at),
        })
    read = [r for r in rows if r.level == 0]
    lost = [r for r in rows if r.level > 0 and r.reason not in (None, "over_budget")]
    return {
        "instructions": instructions, "documents": len({r.doc_id for r in read}),
        "chunks": len({(r.doc_id, r.chunk) for r in read}),
        "chunk_reads_left_out": reads_left_out, "summaries": len(rows), "levels": levels,
        "per_level": per_level, "dropped": count_reasons([r.reason for r in rows], REASONS),
        "truncated": sum(r.finish_reason == "length" for r in rows),
        "carried": sum(r.finish_reason == "carried" for r in rows),
        "over_budget": sum(r.reason == "over_budget" for r in rows),
        "failed_merges": len(lost), "lost_in_failed_merges": sum(len(r.children) for r in lost),
        "final_summaries": len(final),
        "final_tokens": mean_max(final),
        "instructions_without_summaries": instructions - len({r.instruction_id for r in rows
                                                               if r.final}),
        **context,
    }
