"""Rule `pack`: the tokenised training sequences of one stage of progressive context extension.

Three kinds of samples, all in the base model's chat template:
- long: the instruction with its retrieved documents (raw, not the summaries) -> the response.
  Documents are added best first while the sample fits the stage's length L; the first one
  that does not fit whole is cut on a paragraph/line/sentence/word boundary (when enough room
  is left), and a sample whose own documents leave room is filled with further documents of
  a fresh search. The response is never cut. Loss on every token (the paper's rule).
- long_output: a writing instruction -> a long document. Loss on every token.
- short: short instruction data (default: the summarization calls themselves, prompts rebuilt
  exactly as summarize sent them). Loss only on the assistant turns, found by rendering the
  chat turn by turn (the prefix property of the template).

A long sample fills one sequence; long_output and short samples are packed first-fit, several
per sequence, keeping their boundaries (train.data.pack restarts positions and masks across
them). The stage's mixture decides how many sequences of each kind, repeating a kind only
when it has too few. Seeds derive from the global seed, "pack" and the stage, so the same
inputs give the same bytes. (`longctx pack-show`, in pack_show.py, renders a sequence with its
learnt tokens marked.)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from longctx import repro
from longctx.config import Mixture, PackConfig, Params
from longctx.errors import LongctxError
from longctx.llm.base import derive_seed
from longctx.sequences import Tokenized, write_sequences
from longctx.synth.prompts import merge_prompt, qfs_prompt
from longctx.synth.tables import count_reasons, read_documents, read_table
from longctx.tokens import Counter, load_tokenizer, split_chunks, token_counter

log = logging.getLogger(__name__)

KINDS = ("long", "long_output", "short")
REASONS = ("too_long", "under_filled")
ROLES = ("system", "user", "assistant")
SEP = "\n\n"
SHRINK_SLACK = 8  # tokens taken off beyond the overflow when a verified sample is too long
HISTOGRAM_BINS = 8
Chat = list[dict[str, str]]


# --------------------------------------------------------------------------- tokens


class ChatTokenizer:
    """The base model's tokenizer and chat template: chat -> ids, and assistant-only masks."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise LongctxError(f"{model_dir}: the tokenizer has no chat template")

    def ids(self, chat: Chat, generation_prompt: bool = False) -> list[int]:
        """Token ids of a rendered chat; transformers 5 returns a BatchEncoding, 4 a list."""
        out: Any = self.tokenizer.apply_chat_template(
            chat, tokenize=True, add_generation_prompt=generation_prompt)
        if not isinstance(out, list):
            out = out["input_ids"]
        if out and isinstance(out[0], list):  # a batch of one
            out = out[0]
        return list(out)

    def all_learnt(self, sample_id: str, chat: Chat) -> Tokenized:
        """Learn every token but the first, which nothing before it predicts (so the flags,
        and the stats counted from them, say exactly what training learns)."""
        ids = self.ids(chat)
        learn = np.ones(len(ids), bool)
        learn[:1] = False
        return Tokenized(sample_id, np.asarray(ids, np.int32), learn)

    def assistant_learnt(self, sample_id: str, chat: Chat) -> Tokenized:
        """Learn exactly the tokens each assistant turn adds after its generation prompt
        (its text and end-of-turn tokens); everything else is context."""
        ids = self.ids(chat)
        learn = np.zeros(len(ids), bool)
        for i, message in enumerate(chat):
            if message["role"] != "assistant":
                continue
            prompt = self.ids(chat[:i], generation_prompt=True)
            upto = self.ids(chat[:i + 1]) if i + 1 < len(chat) else ids
            if upto[:len(prompt)] != prompt or ids[:len(upto)] != upto:
                raise LongctxError(
                    f"{self.model_dir}: the model's chat template does not render a chat's "
                    f"turns as prefixes of the whole chat (sample {sample_id}, turn {i}), so "
                    "the assistant tokens cannot be told apart for the loss mask")
            learn[len(prompt):len(upto)] = True
        return Tokenized(sample_id, np.asarray(ids, np.int32), learn)


# --------------------------------------------------------------------------- long samples


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


def _long_samples(cfg: PackConfig, chat: ChatTokenizer, count: Counter, length: int,
                  seed: int, paths: dict[str, Path]) -> tuple[list[Tokenized], dict]:
    """Every kept response as a long sample fitted to `length`; (samples, stats)."""
    texts = {r["id"]: r["instruction"]
             for r in read_table(paths["instructions"], ["id", "instruction"])}
    ranked = {}
    for row in read_table(paths["retrieved"], ["instruction_id", "doc_ids"]):
        ranked[row["instruction_id"]] = list(row["doc_ids"] or [])
    kept = [r for r in read_table(paths["responses"], ["instruction_id", "response", "kept"])
            if r["kept"]]
    for row in kept:
        if row["instruction_id"] not in texts:
            raise LongctxError(f"{paths['responses']}: instruction_id {row['instruction_id']!r} "
                               f"is not in {paths['instructions']} (rerun respond)")
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
        samples.append(sample)
        documents["whole"] += sum(not d.cut for d in fit.docs)
        documents["cut"] += sum(d.cut for d in fit.docs)
        documents["filled"] += sum(d.filled for d in fit.docs)
        documents["samples_filled"] += any(d.filled for d in fit.docs)
    return samples, {"available_samples": len(kept), "reasons": reasons, "documents": documents}


def _fill(cfg: PackConfig, fitter: _LongFitter, hungry: list[_Fit], docs: dict[str, dict],
          paths: dict[str, Path]) -> None:
    """One batched search for every sample whose own documents left room."""
    from longctx.retrieval.search import Retriever

    retriever = Retriever(paths["index"], paths["embeddings"])
    hits = retriever.search([f.instruction for f in hungry], cfg.fill_top_k)
    more = [[h.doc_id for h in found if h.doc_id not in {d.doc_id for d in fit.docs}]
            for fit, found in zip(hungry, hits)]
    docs.update(read_documents(paths["docs"], [d for ids in more for d in ids if d not in docs]))
    for fit, ids in zip(tqdm(hungry, desc="pack long: fill", unit="sample", disable=None), more):
        fitter.add(fit, ids, docs, filled=True)


# --------------------------------------------------------------------------- other kinds


def _long_output_samples(chat: ChatTokenizer, length: int, path: Path
                         ) -> tuple[list[Tokenized], dict]:
    rows = [r for r in read_table(path, ["id", "instruction", "target", "kept"]) if r["kept"]]
    samples, reasons = [], []
    for row in tqdm(rows, desc="pack long_output", unit="sample", disable=None):
        messages = [{"role": "user", "content": row["instruction"]},
                    {"role": "assistant", "content": row["target"]}]
        sample = chat.all_learnt(row["id"], messages)
        if len(sample) > length:
            reasons.append("too_long")
        else:
            samples.append(sample)
    return samples, {"available_samples": len(rows), "reasons": reasons}


def qfs_chats(summaries_path: Path, instructions_path: Path, docs_path: Path
              ) -> list[tuple[str, Chat]]:
    """Every summarization call with a kept answer, as (instruction_id/level/position, the
    prompt exactly as summarize sent it + the summary)."""
    columns = ["instruction_id", "level", "position", "doc_id", "char_start", "char_end",
               "children", "summary", "kept", "finish_reason"]
    rows = read_table(summaries_path, columns)
    texts = {r["id"]: r["instruction"]
             for r in read_table(instructions_path, ["id", "instruction"])}
    by_key = {(r["instruction_id"], r["level"], r["position"]): r for r in rows}
    calls = [r for r in rows if r["kept"] and r["finish_reason"] != "carried"]
    docs = read_documents(docs_path, [r["doc_id"] for r in calls if r["level"] == 0])
    out = []
    for r in calls:
        key = f"{r['instruction_id']}/{r['level']}/{r['position']}"
        if r["instruction_id"] not in texts:
            raise LongctxError(f"{summaries_path}: instruction_id {r['instruction_id']!r} is "
                               f"not in {instructions_path} (rerun summarize)")
        instruction = texts[r["instruction_id"]]
        if r["level"] == 0:
            if r["char_start"] is None or r["char_end"] is None:
                raise LongctxError(f"{summaries_path}: summary {key} has no chunk offsets "
                                   "(rerun summarize)")
            prompt = qfs_prompt(instruction, docs[r["doc_id"]]["text"][
                r["char_start"]:r["char_end"]])
        else:
            notes = []
            for child in r["children"] or []:
                below = by_key.get((r["instruction_id"], r["level"] - 1, child))
                if below is None:
                    raise LongctxError(f"{summaries_path}: summary {key} merges position "
                                       f"{child} of level {r['level'] - 1}, which is missing")
                notes.append(below["summary"])
            prompt = merge_prompt(instruction, notes)
        out.append((key, prompt + [{"role": "assistant", "content": r["summary"]}]))
    return out


def _check_chat(chat: Any, where: str) -> Chat:
    if not isinstance(chat, list) or not chat:
        raise LongctxError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
    for i, m in enumerate(chat):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise LongctxError(f"{where}: message {i} must be {{role: one of "
                               f"{'/'.join(ROLES)}, content: a string}}, got {str(m)[:80]!r}")
    if not any(m["role"] == "assistant" for m in chat):
        raise LongctxError(f"{where}: no assistant message to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in chat]


def file_chats(path: str | Path) -> list[tuple[str, Chat]]:
    """The chats of a parquet or jsonl file with a `messages` column/key, as ("file:<record>",
    chat); errors name the file and the record (0-based; jsonl also the line). A file without
    records is an error: else the stage's short share would silently go to the other kinds."""
    path = Path(path)
    if not path.is_file():
        raise LongctxError(f"{path}: chat file not found (pack.short_path)")
    if path.stat().st_size == 0:
        raise LongctxError(f"pack.short_path: {path} holds no records (0 bytes)")
    records: list[tuple[str, Any]] = []
    if path.suffix == ".parquet":
        for i, chat in enumerate(read_table(path, ["messages"])):
            records.append((f"{path}: record {i}", chat["messages"]))
    elif path.suffix in (".jsonl", ".json"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}: record {len(records)} (line {line_no})"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LongctxError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or "messages" not in record:
                raise LongctxError(f"{where}: no `messages` key")
            records.append((where, record["messages"]))
    else:
        raise LongctxError(f"{path}: chat files are .parquet or .jsonl")
    if not records:
        raise LongctxError(f"pack.short_path: {path} holds no records")
    return [(f"file:{i}", _check_chat(chat, where)) for i, (where, chat) in enumerate(records)]


def _short_samples(cfg: PackConfig, chat: ChatTokenizer, length: int, paths: dict[str, Path]
                   ) -> tuple[list[Tokenized], dict]:
    if cfg.short_source == "file":
        chats = file_chats(cfg.short_path)
    else:
        chats = qfs_chats(paths["summaries"], paths["instructions"], paths["docs"])
    samples, reasons = [], []
    for key, messages in tqdm(chats, desc="pack short", unit="sample", disable=None):
        sample = chat.assistant_learnt(key, messages)
        if len(sample) > length:
            reasons.append("too_long")
        else:
            samples.append(sample)
    return samples, {"available_samples": len(chats), "reasons": reasons}


# --------------------------------------------------------------------------- sequences


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each item in the first bin with room (every length <= capacity).
    A max-tree over the bins' free room finds that bin in O(log n)."""
    size = 1
    while size < len(lengths):
        size *= 2
    tree = [capacity] * (2 * size)  # leaves: bins (unused ones are empty, full room)
    bins: list[list[int]] = []
    for item, n in enumerate(lengths):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(item)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


def _shares(mixture: Mixture) -> dict[str, Fraction]:
    """Exact shares (decimal as written), so counts do not depend on float rounding."""
    return {k: Fraction(repr(float(getattr(mixture, k)))) for k in KINDS}


def largest_remainder(n: int, shares: dict[str, Fraction]) -> dict[str, int]:
    """Integer counts summing to n in proportion to shares (ties: KINDS order)."""
    total = sum(shares.values())
    quotas = {k: n * s / total for k, s in shares.items()}
    counts = {k: int(q) for k, q in quotas.items()}
    rest = n - sum(counts.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - counts[k]), KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


def plan_counts(shares: dict[str, Fraction], available: dict[str, int],
                sequences: int | None) -> dict[str, int]:
    """Sequences per kind: `sequences` at the shares, or (None) the most that repeat none.
    Kinds without a share or without sequences are left out, the rest renormalised."""
    used = {k: s for k, s in shares.items() if s > 0 and available[k] > 0}
    if not used:
        return dict.fromkeys(KINDS, 0)

    def fits(n: int) -> bool:
        return all(c <= available[k] for k, c in largest_remainder(n, used).items())

    if sequences is None:
        total = sum(used.values())
        n = min(int(available[k] * total / s) for k, s in used.items())
        while n > 0 and not fits(n):
            n -= 1
        while n < sum(available.values()) and fits(n + 1):
            n += 1
        sequences = n
    counts = dict.fromkeys(KINDS, 0)
    counts.update(largest_remainder(sequences, used))
    return counts


def _choose(count: int, available: int, rng: random.Random) -> list[int]:
    """`count` of `available` sequences: passes of fresh seeded shuffles, repeats only when
    there are too few."""
    order: list[int] = []
    while len(order) < count:
        perm = list(range(available))
        rng.shuffle(perm)
        order += perm
    return order[:count]


def pack_stage(params: Params, stage: int, model_dir: str | Path, docs: str | Path,
               instructions: str | Path, retrieved: str | Path, summaries: str | Path,
               responses: str | Path, long_output: str | Path, index: str | Path,
               embeddings: str | Path, out: str | Path, stats: str | Path) -> dict:
    """Write stage `stage`'s sequences.parquet and stats.json; returns the stats."""
    schedule = params.stages.schedule
    if not 0 <= stage < len(schedule):
        raise LongctxError(f"stages.schedule: no stage {stage} (the schedule has "
                           f"{len(schedule)}: 0..{len(schedule) - 1})")
    cfg, spec = params.pack, schedule[stage]
    length = spec.length
    capacity = {"long": length, "long_output": length,
                "short": min(cfg.short_sequence_tokens or length, length)}
    seed = derive_seed(params.seed, "pack", stage)
    shares = _shares(spec.mixture or cfg.mixture)
    paths = {k: Path(v) for k, v in dict(
        docs=docs, instructions=instructions, retrieved=retrieved, summaries=summaries,
        responses=responses, index=index, embeddings=embeddings).items()}
    chat = ChatTokenizer(model_dir)

    made: dict[str, tuple[list[Tokenized], dict]] = {}
    empty: tuple[list[Tokenized], dict] = ([], {"available_samples": 0, "reasons": []})
    made["long"] = _long_samples(cfg, chat, token_counter(chat.tokenizer), length,
                                 seed, paths) if shares["long"] > 0 else empty
    made["long_output"] = _long_output_samples(chat, length, Path(long_output)) \
        if shares["long_output"] > 0 else empty
    made["short"] = _short_samples(cfg, chat, capacity["short"], paths) \
        if shares["short"] > 0 else empty

    packed: dict[str, list[list[Tokenized]]] = {}
    for kind in KINDS:
        samples = made[kind][0]
        if kind == "long":
            packed[kind] = [[s] for s in samples]
            continue
        order = list(range(len(samples)))
        random.Random(derive_seed(seed, "order", kind)).shuffle(order)
        bins = first_fit([len(samples[i]) for i in order], capacity[kind])
        packed[kind] = [[samples[order[j]] for j in b] for b in bins]

    available = {k: len(packed[k]) for k in KINDS}
    for kind in KINDS:
        if shares[kind] > 0 and not available[kind]:
            log.warning("pack stage %d: no %s sequences (share %s): %s", stage, kind,
                        float(shares[kind]), _why_none(made[kind][1], capacity[kind]))
    counts = plan_counts(shares, available, spec.sequences)
    total = sum(counts.values())
    if total == 0:
        why = "; ".join(f"{k}: {_why_none(made[k][1], capacity[k])}" for k in KINDS
                        if shares[k] > 0)
        raise LongctxError(f"stages.schedule[{stage}] (length {length}): no sequence to pack "
                           f"({why})")

    rows: list[tuple[str, list[Tokenized]]] = []
    for kind in KINDS:
        picks = _choose(counts[kind], available[kind], random.Random(
            derive_seed(seed, "choose", kind)))
        rows += [(kind, packed[kind][i]) for i in picks]
    random.Random(derive_seed(seed, "sequences")).shuffle(rows)
    write_sequences(out, rows)
    result = _stats(stage, length, capacity, shares, counts, available, made, rows)
    repro.write_json(stats, result)
    log.info("pack stage %d (length %d): %d sequences (%s), padding %.1f%% -> %s", stage,
             length, total, ", ".join(f"{counts[k]} {k}" for k in KINDS),
             100 * result["padding_fraction"], out)
    return result


def _why_none(info: dict, capacity: int) -> str:
    dropped = count_reasons(info["reasons"], REASONS)
    if not info["available_samples"]:
        return "no samples in its input"
    parts = [f"{n} {reason}" for reason, n in dropped.items() if n]
    return f"all {info['available_samples']} samples dropped ({', '.join(parts)}; " \
           f"nothing fits {capacity} tokens)"


def _stats(stage: int, length: int, capacity: dict[str, int], shares: dict[str, Fraction],
           counts: dict[str, int], available: dict[str, int],
           made: dict[str, tuple[list[Tokenized], dict]],
           rows: list[tuple[str, list[Tokenized]]]) -> dict:
    """Everything packed and dropped; no timings, so a rerun writes the same bytes."""
    used = {k: s for k, s in shares.items() if counts[k] > 0}
    norm = sum(used.values())
    kinds = {}
    for kind in KINDS:
        mine = [samples for k, samples in rows if k == kind]
        kinds[kind] = {
            "available_samples": made[kind][1]["available_samples"],
            "dropped": count_reasons(made[kind][1]["reasons"], REASONS),
            "packed_sequences": available[kind],
            "sequence_tokens": capacity[kind],
            "sequences": counts[kind],
            "repeats": max(0, counts[kind] - available[kind]),
            "samples": sum(len(s) for s in mine),
            "tokens": sum(len(x) for s in mine for x in s),
            "learnt_tokens": sum(int(x.learn.sum()) for s in mine for x in s),
        }
    sizes = [sum(len(x) for x in samples) for _, samples in rows]
    histogram = [0] * HISTOGRAM_BINS
    for n in sizes:
        histogram[(n * HISTOGRAM_BINS - 1) // length] += 1
    tokens = sum(sizes)
    documents = made["long"][1].get("documents", {"whole": 0, "cut": 0, "filled": 0,
                                                  "samples_filled": 0})
    return {
        "stage": stage, "length": length, "sequences": len(rows),
        "mixture": {k: round(float(used[k] / norm), 6) if k in used else 0.0 for k in KINDS},
        "kinds": kinds, "long_documents": documents,
        "tokens": tokens, "learnt_tokens": sum(v["learnt_tokens"] for v in kinds.values()),
        "padding_fraction": round(1 - tokens / (len(rows) * length), 6),
        "mean_fill": round(sum(sizes) / len(sizes) / length, 6),
        "length_histogram": [{"upto": _edge(length, i), "sequences": histogram[i]}
                             for i in range(HISTOGRAM_BINS)],
    }


def _edge(length: int, i: int) -> int | float:
    edge = Fraction(length * (i + 1), HISTOGRAM_BINS)
    return int(edge) if edge.denominator == 1 else round(float(edge), 2)
