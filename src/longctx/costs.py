"""What a profile costs and whether it can work, computed from params alone (`longctx plan`).

A profile like configs/paper-8b-1m.yaml commits hours of GPUs before its first long sample
is packed; a stage its documents cannot fill, or one with fewer sequences than its steps
read, is knowable from the params and a few sizes. This module is the arithmetic: per step
its jobs, LLM calls and tokens, vectors and bytes on disk, per stage its sequences, tokens,
FLOPs, and GPU-hours at throughputs the user sets (`Rates`), plus the problems that make a
profile refuse. Model sizes come from `costs_models`, the rendering and the CLI from
`costs_table`. Token counts of prompts are estimated at CHARS_PER_TOKEN; generated tokens are
upper bounds (every call writes its max_new_tokens), so LLM time is an upper bound too.

The counts follow the steps' own rules, imported where they are functions: the first
instructions round (synth.instructions.round_prompts), summarize's level-by-level merging
(synth.summarize), pack's sequences per kind (pack.plan.plan_counts), the RoPE schedule
(train.rope.check_stages), sequences per step (train.positions.sequences_per_step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from longctx.config import WINDOW_RULES, Params
from longctx.costs_models import Corpus, Shape
from longctx.errors import LongctxError, RuleError

CHARS_PER_TOKEN = 4  # English text, the common rule of thumb (OpenAI's tokenizer guide)
TEMPLATE_MARGIN = 32  # chat-template tokens around a prompt (synth.summarize's margin)
NOTE_MARKER_TOKENS = 4  # "[12] " and the blank line around each note (synth.summarize)
PAPER_SCALE = (7.11e9, 512)  # E5-Mistral-7B's parameters, tokens per document of the rate
GENERATOR_SCALE = 8.03e9  # Llama-3.1-8B's parameters, the model of the LLM rate


@dataclass(frozen=True)
class Rates:
    """Throughputs per GPU, the user's to set (`longctx plan --help` says where the
    defaults come from); a rate is for the model it names and scaled to others by size."""

    gpu_tflops: float = 989.0
    mfu: float = 0.28
    embed_docs_per_s: float = 60.0
    llm_tokens_per_s: float = 22000.0


@dataclass
class Row:
    """One DAG step: jobs, LLM work, what it makes, GPU-hours."""

    step: str
    jobs: int = 1
    what: str = ""
    calls: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    disk: int = 0
    gpu_hours: float = 0.0


@dataclass
class StageRow:
    """One training stage: what pack makes and training reads, its FLOPs and GPU-hours."""

    stage: int
    length: int
    rope_theta: float | None
    sequences: int
    need: int
    tokens: int
    flops_linear: float
    flops_attention: float
    gpu_hours: float
    long_read: int = 0  # long samples among the sequences training reads


@dataclass
class Plan:
    rows: list[Row] = field(default_factory=list)
    stages: list[StageRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # `key: what to set`, one per problem
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Models:
    base: Shape
    llm: Shape
    embed: Shape


def jobs(params: Params, section: str) -> int:
    """Jobs of a step: a sharded step's shard jobs (`shards:`) plus the one that gathers
    them, else one."""
    if section in type(params.shards).model_fields and section != "default":
        return params.shards.of(section) + 1
    return 1


def prompt_tokens(chat: list[dict]) -> int:
    """Estimated tokens of a rendered prompt, chat template included."""
    return sum(len(m["content"]) for m in chat) // CHARS_PER_TOKEN + TEMPLATE_MARGIN


def _instruction(params: Params) -> str:
    """A stand-in for the longest instruction the instructions step keeps."""
    return " ".join(["word"] * params.instructions.max_words)


def overheads(params: Params) -> dict[str, int]:
    """Prompt tokens around what each WINDOW_RULES key holds (chunk, summaries, excerpt)."""
    from longctx.synth import prompts  # lazy: `longctx --help` builds the plan parser

    inst = _instruction(params)
    per_note = NOTE_MARKER_TOKENS
    return {
        "summarize.chunk_tokens": max(prompt_tokens(prompts.qfs_prompt(inst, "")),
                                      prompt_tokens(prompts.merge_prompt(inst, []))),
        "summarize.budget_tokens": prompt_tokens(prompts.respond_prompt(inst, [])) + per_note * (
            params.summarize.budget_tokens // max(1, params.summarize.max_new_tokens)),
        "long_output.excerpt_tokens": prompt_tokens(prompts.backtranslate_prompt("", 100_000)),
        "instructions.seed_chunk_tokens": prompt_tokens(prompts.instructions_prompt(
            "", params.instructions.task_types[0], params.instructions.per_prompt)),
    }


def _value(params: Params, key: str) -> int:
    section, name = key.split(".")
    return getattr(getattr(params, section), name)


def window_problems(params: Params, llm: Shape) -> list[str]:
    """Every LLM step whose prompt size the params fix must fit the generator's window with
    its prompt and what it generates; the steps find out only when they run."""
    window = params.llm.context_tokens or llm.max_positions
    where = "llm.context_tokens" if params.llm.context_tokens else \
        f"{llm.name}'s max_position_embeddings"
    if window is None:
        return []
    around = overheads(params)
    problems = []
    for held, generated in WINDOW_RULES:
        value, new = _value(params, held), _value(params, generated)
        need = value + around[held] + new
        if need > window:
            problems.append(f"{held}: {value:,} + ~{around[held]:,} prompt tokens + {generated} "
                            f"{new:,} = {need:,} exceed the generator's {window:,}-token window "
                            f"({where}): set {held} to at most {window - around[held] - new:,}")
    return problems


@dataclass(frozen=True)
class Synthesis:
    """What the synthesis steps hand on to pack: counts and mean sizes per sample kind."""

    instructions: int
    summarize_calls: int
    summarize_tokens: float  # mean prompt + summary tokens of one call (a short sample)
    long_output: int
    long_output_tokens: float  # mean tokens of a long-output sample


def summarize_levels(params: Params, notes: int) -> tuple[list[tuple[int, int]], int]:
    """[(merge calls, prompt tokens each)] per level >= 1 for one instruction starting from
    `notes` level-0 summaries, and the final summaries' tokens: synth.summarize's greedy
    grouping with every summary at max_new_tokens (the upper bound)."""
    cfg = params.summarize
    size, levels = cfg.max_new_tokens, []
    per_group = cfg.chunk_tokens // (size + NOTE_MARKER_TOKENS)
    while notes * size > cfg.budget_tokens and len(levels) < cfg.max_levels \
            and per_group >= 2 and notes > 1:
        groups = -(-notes // per_group)
        last = notes - (groups - 1) * per_group
        levels.append((groups - (last == 1), per_group * (size + NOTE_MARKER_TOKENS)))
        notes = groups
    return levels, min(notes * size, cfg.budget_tokens)


def _llm_hours(params: Params, llm: Shape, rates: Rates, tokens: float) -> float:
    """GPU-hours of `tokens` (prompt + output) at the LLM rate, scaled to the generator's
    size; the in-process hf backend at half a vLLM server's rate."""
    rate = rates.llm_tokens_per_s * GENERATOR_SCALE / llm.compute_params
    if params.llm.backend == "hf":
        rate /= 2
    return tokens / rate / 3600


def _llm_row(params: Params, llm: Shape, rates: Rates, step: str, what: str, calls: int,
             tokens_in: float, tokens_out: float) -> Row:
    return Row(step, jobs(params, step), what, calls, round(tokens_in), round(tokens_out),
               gpu_hours=_llm_hours(params, llm, rates, tokens_in + tokens_out))


def synthesis(params: Params, corpus: Corpus, llm: Shape, rates: Rates
              ) -> tuple[list[Row], Synthesis]:
    """The LLM steps: calls (one per prompt), tokens in (estimated) and out (at most)."""
    from longctx.synth import prompts
    from longctx.synth.instructions import round_prompts

    p, inst = params, _instruction(params)
    asked = round_prompts(p.instructions, p.instructions.count)
    rows = [_llm_row(p, llm, rates, "instructions", f"{p.instructions.count:,} instructions, "
                     "first round", asked, asked * (p.instructions.seed_chunk_tokens + overheads(
                         p)["instructions.seed_chunk_tokens"]),
                     asked * p.instructions.max_new_tokens)]
    count = p.instructions.count
    summary_rows, calls, per_call, final = _summarize(p, corpus, llm, rates, count, inst)
    rows += summary_rows
    respond_in = overheads(p)["summarize.budget_tokens"] + final
    rows.append(_llm_row(p, llm, rates, "respond", f"{count:,} responses", count,
                         count * respond_in, count * p.respond.max_new_tokens))
    cfg = p.long_output
    eligible, mean = corpus.within(cfg.min_tokens, cfg.max_tokens)
    asked = cfg.count if eligible is None else min(cfg.count, eligible)
    bt_in = prompt_tokens(prompts.backtranslate_prompt("", 100_000)) + min(cfg.excerpt_tokens,
                                                                         mean)
    rows.append(_llm_row(p, llm, rates, "long_output", f"{asked:,} targets of ~{mean:,.0f} "
                         "tokens", asked, asked * bt_in, asked * cfg.max_new_tokens))
    instruction_tokens = TEMPLATE_MARGIN + cfg.max_new_tokens
    return rows, Synthesis(count, calls, per_call, asked, mean + instruction_tokens)


def _summarize(params: Params, corpus: Corpus, llm: Shape, rates: Rates, count: int,
               inst: str) -> tuple[list[Row], int, float, int]:
    """Level 0 (every instruction x top_k documents x chunks) and the merge levels."""
    import numpy as np

    from longctx.synth import prompts

    cfg, k = params.summarize, params.retrieve.top_k
    cap = cfg.max_chunks_per_document or 10**9
    chunks = corpus.expect(lambda n: np.minimum(cap, np.maximum(1, np.ceil(n / cfg.chunk_tokens))))
    read = corpus.expect(lambda n: np.minimum(n, cap * cfg.chunk_tokens))
    notes = max(1, round(k * chunks))
    levels, final = summarize_levels(params, notes)
    qfs = prompt_tokens(prompts.qfs_prompt(inst, ""))
    calls = count * notes
    tokens_in = count * k * read + calls * qfs
    merges = sum(n for n, _ in levels) * count
    merge_in = count * sum(n * (size + qfs) for n, size in levels)
    out = (calls + merges) * cfg.max_new_tokens
    what = f"{notes} chunks per instruction ({chunks:.2f} per document), {len(levels)} merge " \
           "levels"
    row = _llm_row(params, llm, rates, "summarize", what, calls + merges, tokens_in + merge_in,
                   out)
    per_call = (tokens_in + merge_in + out) / max(1, calls + merges)
    return [row], calls + merges, per_call, final


def _index_bytes(params: Params, vectors: int, dim: int) -> int:
    """FAISS's memory (= file) size by type: float32 vectors, 8-byte ids in inverted lists,
    float32 centroids; PQ codes of pq_m x pq_bits bits and their codebooks; HNSW's 2M int32
    links on level 0 plus ~16 bytes of upper levels and offsets per vector."""
    cfg = params.index
    centroids = cfg.nlist * dim * 4
    return {
        "flat": vectors * dim * 4,
        "ivf_flat": vectors * (dim * 4 + 8) + centroids,
        "ivf_pq": vectors * (cfg.pq_m * cfg.pq_bits // 8 + 8) + centroids
        + 2**cfg.pq_bits * dim * 4,
        "hnsw": vectors * (dim * 4 + 8 * cfg.hnsw_m + 16),
    }[cfg.type]


def data(params: Params, corpus: Corpus, embed: Shape, rates: Rates
         ) -> tuple[list[Row], int, list[str]]:
    """corpus, embed, index, retrieve: documents, vectors, bytes, embedding GPU-hours; the
    vector count, and the index's problems (index.check_capacity's and its search depth)."""
    import numpy as np

    from longctx.retrieval.index import check_capacity

    cfg, n = params.embed, corpus.documents
    window = min(cfg.max_tokens, embed.max_positions or cfg.max_tokens)
    stride = cfg.passage_stride or window
    per_doc = 1.0 if cfg.text == "first_tokens" else corpus.expect(lambda t: np.minimum(
        params.embed.max_passages or 10**9, np.ceil(np.maximum(t - window, 0) / stride) + 1))
    vectors, dim = round(n * per_doc), embed.hidden
    text_tokens = corpus.expect(lambda t: np.minimum(t, window))
    rate = rates.embed_docs_per_s * PAPER_SCALE[0] * PAPER_SCALE[1] / (
        embed.non_embedding * max(1.0, text_tokens))
    queries = params.instructions.count
    rows = [Row("corpus", jobs(params, "corpus"), f"{n:,} documents, "
                f"~{n * corpus.mean_tokens:,.0f} tokens"),
            Row("embed", jobs(params, "embed"), f"{vectors:,} vectors x {dim} "
                f"({embed.name}, {text_tokens:,.0f} tokens each)", disk=vectors * dim * 2,
                gpu_hours=vectors / rate / 3600),
            Row("index", jobs(params, "index"), f"{params.index.type} over {vectors:,} vectors"
                + (", lists on disk" if params.index.on_disk else ""),
                disk=_index_bytes(params, vectors, dim)),
            Row("retrieve", jobs(params, "retrieve"), f"{queries:,} queries x top "
                f"{params.retrieve.top_k}", gpu_hours=queries / rate / 3600)]
    problems = []
    try:
        check_capacity(params.index, vectors, min(vectors, params.index.train_size), dim)
    except LongctxError as exc:
        problems.append(str(exc))
    problems += _search_depth(params, vectors)
    return rows, vectors, problems


def _search_depth(params: Params, vectors: int) -> list[str]:
    """An IVF search sees nprobe lists of ~vectors/nlist each: a deeper k finds too few."""
    cfg = params.index
    if cfg.type not in ("ivf_flat", "ivf_pq"):
        return []
    seen = cfg.nprobe * vectors // cfg.nlist
    deepest = max(params.retrieve.top_k, params.pack.fill_top_k)
    if deepest <= seen:
        return []
    return [f"index.nprobe: {cfg.nprobe} lists of ~{vectors // cfg.nlist:,} vectors hold "
            f"~{seen:,} candidates, fewer than the {deepest:,} documents retrieve.top_k / "
            f"pack.fill_top_k ask for: set index.nprobe to at least "
            f"{-(-deepest * cfg.nlist // max(1, vectors))}"]


UNCOUNTED = 10**12  # sequences of a kind the params cannot size (a chat file): never binding


def fill_problems(params: Params, corpus: Corpus) -> tuple[list[bool], list[str]]:
    """Whether each stage's long samples can reach pack.min_fill of its length: a sample
    holds at most the instruction's top-k documents and its fill search's
    (max(retrieve.top_k, pack.fill_top_k) distinct ones); one short of min_fill is dropped."""
    cfg, schedule = params.pack, params.stages.schedule
    depth = min(max(params.retrieve.top_k, cfg.fill_top_k), corpus.documents)
    reach = depth * corpus.mean_tokens
    filled = [reach >= cfg.min_fill * s.length for s in schedule]
    short = [i for i, ok in enumerate(filled) if not ok]
    if not short:
        return filled, []
    longest = schedule[short[-1]].length
    least, whole = (math.ceil(f * longest / max(1.0, corpus.mean_tokens)) for f in
                    (cfg.min_fill, 1))
    needs = " / ".join(f"{cfg.min_fill * schedule[i].length:,.0f}" for i in short)
    fix = f"set pack.fill_top_k to at least {least:,} ({whole:,} fills the whole length)"
    if least > corpus.documents:
        fix = f"the corpus holds {corpus.documents:,} documents: lower pack.min_fill or the " \
              "stage lengths"
    return filled, [f"pack.fill_top_k: {depth:,} documents of ~{corpus.mean_tokens:,.0f} tokens "
                    f"reach ~{reach:,.0f} tokens, below the {needs} (pack.min_fill "
                    f"{cfg.min_fill} x length) that stage(s) {', '.join(map(str, short))} need:"
                    f" every long sample there would be dropped; {fix}"]


def _available(params: Params, syn: Synthesis, length: int, filled: bool
               ) -> tuple[dict[str, int], dict[str, float]]:
    """Sequences pack can make of each kind without repeating a sample, and the mean
    sample length of each (what one attention span covers)."""
    cfg = params.pack
    short_cap = min(cfg.short_sequence_tokens or length, length)
    long_output = math.ceil(syn.long_output * syn.long_output_tokens / length) \
        if syn.long_output_tokens <= length else 0
    if cfg.short_source == "qfs":
        short = math.ceil(syn.summarize_calls * syn.summarize_tokens / short_cap)
        short_tokens = syn.summarize_tokens
    else:
        short, short_tokens = UNCOUNTED, float(short_cap)
    available = {"long": syn.instructions if filled else 0, "long_output": long_output,
                 "short": short}
    spans = {"long": float(length), "long_output": syn.long_output_tokens,
             "short": short_tokens}
    if params.train.attention in ("sdpa", "eager"):  # a dense mask computes every pair
        spans = dict.fromkeys(spans, float(length))
    return available, spans


def _sequence_problem(i: int, steps: int, per_step: int, made: int, available: dict,
                      shares: dict) -> str:
    need = steps * per_step
    used = [k for k in available if shares[k] > 0 and available[k]]
    binding = min(used, key=lambda k: available[k] / shares[k]) if used else None
    why = f"the {binding} kind limits: ~{available[binding]:,} sequences at share " \
          f"{float(shares[binding]):g}" if binding else "no kind has samples"
    empty = [k for k in available if shares[k] > 0 and not available[k]]
    why += "".join(f"; no {k} sequences" for k in empty)
    key = f"stages.schedule[{i}]"
    return (f"{key}.sequences: unset, pack would make ~{made:,} sequences ({why}) where "
            f"{steps:,} steps x {per_step} sequences per step need {need:,}: set {key}."
            f"sequences to {need:,} (samples repeat) or lower {key}.steps to "
            f"{made // per_step:,}")


def rope_bases(params: Params, base: Shape) -> tuple[list[float | None], list[str]]:
    """Each stage's RoPE base by training's own rule, from the base model's length and base."""
    from longctx.train.rope import Stage, check_stages

    stages = params.stages
    try:
        return check_stages([Stage(s.length, s.rope_theta) for s in stages.schedule],
                            stages.base_length or base.max_positions, base.rope_theta,
                            stages.rope_growth, base=f"{base.name}'s"), []
    except RuleError as exc:
        return [None] * len(stages.schedule), [str(exc.under("stages.schedule"))]


def training(params: Params, base: Shape, syn: Synthesis, filled: list[bool], rates: Rates
             ) -> tuple[list[StageRow], list[str], list[str]]:
    """Per stage: pack's sequence count (pack.plan.plan_counts on estimated sequences per
    kind), what training reads, FLOPs = 6 N tokens + 6 L d T per token of causal attention
    (T: the span a token attends over), GPU-hours; the problems and notes (repeats)."""
    from longctx.pack.plan import kind_shares, plan_counts
    from longctx.train.positions import sequences_per_step

    per_step = sequences_per_step(params.train)
    thetas, problems = rope_bases(params, base)
    rows, notes = [], []
    for i, spec in enumerate(params.stages.schedule):
        shares = kind_shares(spec.mixture or params.pack.mixture)
        available, spans = _available(params, syn, spec.length, filled[i])
        counts = plan_counts(shares, available, spec.sequences)
        made, need = sum(counts.values()), spec.steps * per_step
        if made < need:
            problems.append(_sequence_problem(i, spec.steps, per_step, made, available, shares))
        notes += [f"stage {i}: {counts[k]:,} {k} sequences from ~{available[k]:,} (samples "
                  "repeat)" for k in counts if counts[k] > available[k]]
        tokens = need * spec.length
        mix = {k: counts[k] / made for k in counts} if made else dict(shares)
        linear = 6.0 * base.compute_params * tokens
        attention = 6.0 * base.layers * base.attention_dim * tokens * sum(
            float(mix[k]) * spans[k] for k in mix)
        hours = (linear + attention) / (rates.gpu_tflops * 1e12 * rates.mfu) / 3600
        rows.append(StageRow(i, spec.length, thetas[i], made, need, tokens, linear, attention,
                             hours, round(need * float(mix["long"]))))
    return rows, problems, notes


def shard_problems(params: Params, corpus: Corpus, syn: Synthesis) -> list[str]:
    """Shard counts above the work they split: those shard jobs would refuse, after every
    step before them has run (shards.count_problem)."""
    from longctx.retrieval.embed_parts import vector_files
    from longctx.shards import count_problem
    from longctx.synth.instructions import round_prompts

    p = params
    work = {"embed": vector_files(corpus.documents, p.embed),
            "instructions": round_prompts(p.instructions, p.instructions.count),
            "summarize": syn.instructions, "respond": syn.instructions,
            "long_output": syn.long_output, "niah_samples": len(p.niah.lengths),
            "ruler_samples": len(p.ruler.tasks) * len(p.ruler.lengths)}
    found = (count_problem(step, p.shards.of(step), items) for step, items in work.items())
    return [problem for problem in found if problem is not None]


def estimate(params: Params, models: Models, corpus: Corpus, rates: Rates) -> Plan:
    """Everything `longctx plan` prints, and every problem that makes it refuse."""
    plan = Plan()
    rows, _, problems = data(params, corpus, models.embed, rates)
    plan.rows += rows
    plan.problems += problems
    synth_rows, syn = synthesis(params, corpus, models.llm, rates)
    plan.rows += synth_rows
    plan.problems += window_problems(params, models.llm)
    plan.problems += shard_problems(params, corpus, syn)
    filled, problems = fill_problems(params, corpus)
    plan.problems += problems
    plan.stages, problems, plan.notes = training(params, models.base, syn, filled, rates)
    plan.problems += problems
    schedule = params.stages.schedule
    plan.rows += [Row("pack", len(schedule), f"{len(schedule)} stages, "
                      f"~{sum(s.sequences for s in plan.stages):,} sequences"),
                  Row("train_stage", len(schedule), f"{sum(s.tokens for s in plan.stages):,} "
                      "tokens", gpu_hours=sum(s.gpu_hours for s in plan.stages))]
    read = " / ".join(f"{s.long_read:,}" for s in plan.stages)
    plan.notes.append(f"long samples read per stage: {read} of the {syn.instructions:,} "
                      "instructions synthesised (a stage reads steps x sequences per step)")
    return plan
