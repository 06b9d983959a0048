"""Rule `pack`: the tokenised training sequences of one stage of progressive context extension.

Three kinds of samples, all in the base model's chat template (chat.py):
- long (long.py): the instruction with its retrieved documents (raw, not the summaries) -> the
  response, fitted to the stage's length L. Loss on every token (the paper's rule).
- long_output (sources.py): a writing instruction -> a long document. Loss on every token.
- short (sources.py): short instruction data (default: the summarization calls themselves,
  prompts rebuilt exactly as summarize sent them). Loss only on the assistant turns, found by
  rendering the chat turn by turn (the prefix property of the template).

A long sample fills one sequence; long_output and short samples are packed first-fit, several
per sequence, keeping their boundaries (train.data.pack_samples restarts positions and masks
across them). The stage's mixture decides how many sequences of each kind (plan.py),
repeating a kind only when it has too few. Seeds derive from the global seed, "pack" and the
stage, so the same inputs give the same bytes. Packing works on lengths alone: each sample's
tokens go to a spill on disk as it is made (spill.py) and come back in the final order as the
sequences are written, so a stage's billions of tokens are never all in memory. The
sequences file is longctx.sequences, the contract with training. (`longctx pack-show`, in
pack_show.py, renders a sequence with its learnt tokens marked.)
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from longctx import repro
from longctx.config import PackConfig, Params
from longctx.errors import LongctxError
from longctx.llm.base import derive_seed
from longctx.pack.chat import ChatTokenizer
from longctx.pack.long import long_samples
from longctx.pack.plan import (
    KINDS,
    choose,
    first_fit,
    kind_shares,
    largest_remainder,
    plan_counts,
    stage_stats,
    why_none,
)
from longctx.pack.sources import long_output_samples, qfs_chats, short_samples
from longctx.pack.spill import Spill, Spilled, spill_beside
from longctx.sequences import write_sequences
from longctx.tokens import token_counter

__all__ = ["first_fit", "largest_remainder", "pack_stage", "qfs_chats"]

log = logging.getLogger(__name__)


def pack_stage(params: Params, *, stage: int, model: str | Path, docs: str | Path,
               instructions: str | Path, retrieved: str | Path, summaries: str | Path,
               responses: str | Path, long_output: str | Path, index: str | Path,
               embeddings: str | Path, sequences: str | Path, metrics: str | Path) -> dict:
    """Write stage `stage`'s `sequences` (sequences.parquet) and `metrics` (stats.json) from
    the synthesis tables, the corpus and the index; returns the stats. `model` is the base
    model dir, whose chat template and tokenizer every sample is rendered in."""
    schedule = params.stages.schedule
    if not 0 <= stage < len(schedule):
        raise LongctxError(f"stages.schedule: no stage {stage} (the schedule has "
                           f"{len(schedule)}: 0..{len(schedule) - 1})")
    cfg, spec = params.pack, schedule[stage]
    length = spec.length
    capacity = {"long": length, "long_output": length,
                "short": min(cfg.short_sequence_tokens or length, length)}
    seed = derive_seed(params.seed, "pack", stage)
    shares = kind_shares(spec.mixture or cfg.mixture)
    paths = {k: Path(v) for k, v in dict(
        docs=docs, instructions=instructions, retrieved=retrieved, summaries=summaries,
        responses=responses, long_output=long_output, index=index,
        embeddings=embeddings).items()}
    with spill_beside(sequences) as spill:
        made = _make_samples(cfg, ChatTokenizer(model), length, capacity, seed, shares, paths,
                             spill)
        packed = {kind: _into_sequences(made[kind][0], kind, capacity[kind], seed)
                  for kind in KINDS}
        counts = _counts(stage, length, capacity, shares, made, packed, spec.sequences)
        rows = _choose_rows(packed, counts, seed)
        write_sequences(sequences, ((kind, [spill.load(s) for s in samples])
                                    for kind, samples in rows))
    result = stage_stats(stage, length, capacity, shares, counts,
                         {k: len(packed[k]) for k in KINDS}, made, rows)
    repro.write_json(metrics, result)
    log.info("pack stage %d (length %d): %d sequences (%s), padding %.1f%% -> %s", stage,
             length, len(rows), ", ".join(f"{counts[k]} {k}" for k in KINDS),
             100 * result["padding_fraction"], sequences)
    return result


Made = dict[str, tuple[list[Spilled], dict]]  # kind -> (samples, what was dropped and why)


def _counts(stage: int, length: int, capacity: dict[str, int], shares: dict,
            made: Made, packed: dict[str, list[list[Spilled]]], sequences: int | None
            ) -> dict[str, int]:
    """Sequences per kind (plan_counts), warning of a kind with a share and none to give,
    refusing a stage with nothing at all."""
    available = {k: len(packed[k]) for k in KINDS}
    for kind in KINDS:
        if shares[kind] > 0 and not available[kind]:
            log.warning("pack stage %d: no %s sequences (share %s): %s", stage, kind,
                        float(shares[kind]), why_none(made[kind][1], capacity[kind]))
    counts = plan_counts(shares, available, sequences)
    if sum(counts.values()) == 0:
        why = "; ".join(f"{k}: {why_none(made[k][1], capacity[k])}" for k in KINDS
                        if shares[k] > 0)
        raise LongctxError(f"stages.schedule[{stage}] (length {length}): no sequence to pack "
                           f"({why})")
    return counts


def _make_samples(cfg: PackConfig, chat: ChatTokenizer, length: int, capacity: dict[str, int],
                  seed: int, shares: dict, paths: dict[str, Path], spill: Spill) -> Made:
    """Every sample of each kind the mixture asks for, fitted to its sequence length, its
    tokens in `spill`."""
    empty: tuple[list[Spilled], dict] = ([], {"available_samples": 0, "reasons": []})
    made: Made = {}
    made["long"] = long_samples(cfg, chat, token_counter(chat.tokenizer), length,
                                seed, paths, spill) if shares["long"] > 0 else empty
    made["long_output"] = long_output_samples(chat, length, paths["long_output"], spill) \
        if shares["long_output"] > 0 else empty
    made["short"] = short_samples(cfg, chat, capacity["short"], paths, spill) \
        if shares["short"] > 0 else empty
    return made


def _into_sequences(samples: list[Spilled], kind: str, capacity: int, seed: int
                    ) -> list[list[Spilled]]:
    """A long sample is a sequence of its own; the other kinds are packed first-fit, in a
    seeded order, several per sequence of `capacity` tokens."""
    if kind == "long":
        return [[s] for s in samples]
    order = list(range(len(samples)))
    random.Random(derive_seed(seed, "order", kind)).shuffle(order)
    bins = first_fit([len(samples[i]) for i in order], capacity)
    return [[samples[order[j]] for j in b] for b in bins]


def _choose_rows(packed: dict[str, list[list[Spilled]]], counts: dict[str, int], seed: int
                 ) -> list[tuple[str, list[Spilled]]]:
    """The stage's (kind, samples) rows: each kind's count chosen by seed, then shuffled."""
    rows: list[tuple[str, list[Spilled]]] = []
    for kind in KINDS:
        picks = choose(counts[kind], len(packed[kind]), random.Random(
            derive_seed(seed, "choose", kind)))
        rows += [(kind, packed[kind][i]) for i in picks]
    random.Random(derive_seed(seed, "sequences")).shuffle(rows)
    return rows
