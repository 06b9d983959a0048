"""`longctx plan`: its flags (the throughputs, with where their defaults come from), the
tables it prints, and the refusal. The arithmetic is longctx.costs; the sizes it starts from
are longctx.costs_models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longctx.config import load_params
from longctx.costs import Models, Plan, Rates, estimate
from longctx.costs_models import (
    FINEWEB_EDU_MEAN_TOKENS,
    PAPER_LONG_OUTPUT_TOKENS,
    Shape,
    corpus_size,
    resolve_shape,
)
from longctx.errors import LongctxError

HELP = """\
For the params, before anything runs: per step its jobs, LLM calls, tokens in (estimated at
4 characters a token) and out (at most: every call writes max_new_tokens), vectors and bytes
on disk (embeddings: float16 x dim; FAISS: flat 4*dim, ivf_flat 4*dim+8, ivf_pq
pq_m*pq_bits/8+8 bytes per vector plus centroids and codebooks, hnsw 4*dim+8*M+16), per
training stage its sequences, tokens (steps x sequences per step x length), FLOPs
(6*N*tokens, N = non-embedding parameters + the output projection, plus 6*layers*d*T per
token for causal attention, d = heads x head_dim, T = the span a token attends over: the
stage length for long samples and under sdpa/eager, else the sample's length; activation
recomputation not counted), and GPU-hours at the rates below. Refuses (exit 1, one line per
problem) what cannot work: stages the documents cannot fill, too few sequences for a stage's
steps, LLM prompts larger than the generator's window, IVF searches shallower than k."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of `longctx plan`; every default says where it comes from."""
    p.add_argument("params_file", nargs="?", type=Path, default=None,
                   help="params file (default: --params, i.e. params.yaml)")
    r = Rates()
    p.add_argument("--gpu-tflops", type=float, default=r.gpu_tflops, help="dense bf16 TFLOP/s "
                   "of one GPU (default %(default)s: H100/H200 SXM, NVIDIA's datasheet)")
    p.add_argument("--mfu", type=float, default=r.mfu, help="share of it training reaches "
                   "(default %(default)s: a plain HF step on one H200 measured 274-277 TFLOP/s, "
                   "REFERENCE.md, counted without the output projection; torchtitan's 8B at "
                   "256K with context parallelism is ~0.14)")
    p.add_argument("--embed-docs-per-s", type=float, default=r.embed_docs_per_s,
                   help="documents/s per GPU of E5-Mistral-7B at 512 tokens, scaled to the "
                   "embedder by parameters x tokens (default %(default)s: ~60 per H100, "
                   "REFERENCE.md)")
    p.add_argument("--llm-tokens-per-s", type=float, default=r.llm_tokens_per_s,
                   help="prompt+output tokens/s per GPU of a vLLM server with Llama-3.1-8B, "
                   "scaled to the generator by parameters, halved for llm.backend hf "
                   "(default %(default)s: 15-20 summarize calls/s of 1.1K in + 150 out per "
                   "H100, REFERENCE.md; vLLM ~2x batched HF generate)")
    p.add_argument("--mean-doc-tokens", type=float, default=FINEWEB_EDU_MEAN_TOKENS,
                   help="mean document length of a parquet/jsonl/wikipedia source when "
                   "docs.parquet is not there (default %(default)s: Fineweb-Edu sample-10BT, "
                   "~10B GPT-2 tokens over 9.67M documents, its dataset card)")
    p.add_argument("--long-output-tokens", type=float, default=PAPER_LONG_OUTPUT_TOKENS,
                   help="mean long-output target without docs.parquet (default %(default)s: "
                   "the paper's 10K samples of 77M tokens, arXiv 2412.18860)")
    p.add_argument("--documents", type=int, default=None, help="corpus documents (default: "
                   "docs.parquet, else the params' max_documents)")
    p.add_argument("--docs", type=Path, default=Path("data/corpus/docs.parquet"),
                   help="the corpus step's table, read for document lengths if it exists")
    p.add_argument("--base-dir", type=Path, default=Path("models/base"),
                   help="the base model dir, read for its config.json if it exists")
    for role in ("base", "llm", "embed"):
        p.add_argument(f"--{role}-config", type=Path, default=None, help=f"config.json of "
                       f"the {role} model when it is neither local nor a known model")


def plan_command(args: argparse.Namespace) -> None:
    """Print the tables; raise (exit 1) after printing the problems, one per line."""
    path = args.params_file or args.params
    params = load_params(path)
    models = Models(*(resolve_shape(ref, role, key, f"--{role}-config",
                                    getattr(args, f"{role}_config"), args.base_dir)
                      for ref, role, key in ((params.base_model.source, "base",
                                              "base_model.source"),
                                             (params.llm.model, "llm", "llm.model"),
                                             (params.embed.model, "embed", "embed.model"))))
    if params.llm.model == "base":
        models = Models(models.base, models.base, models.embed)
    corpus = corpus_size(params, args.docs, args.mean_doc_tokens, args.documents,
                         args.long_output_tokens)
    rates = Rates(args.gpu_tflops, args.mfu, args.embed_docs_per_s, args.llm_tokens_per_s)
    plan = estimate(params, models, corpus, rates)
    print(render(path, plan, models, corpus.origin, corpus.documents, corpus.mean_tokens, rates))
    for problem in plan.problems:
        print(f"longctx plan: refused: {problem}", file=sys.stderr)
    if plan.problems:
        raise LongctxError(f"{path}: {len(plan.problems)} problem(s) above; this profile "
                           "cannot work as set")
    print(f"{path}: ok")


def si(x: float) -> str:
    """1234 -> 1.23K: counts that span ten orders of magnitude, readable in a column."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g}{unit}"
    return f"{x:.3g}" if x else "-"


def gigabytes(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n else "-"


def _shape(role: str, s: Shape) -> str:
    return (f"{role} {s.name}: {si(s.parameters)} parameters, {s.layers} layers x {s.hidden}, "
            f"vocab {s.vocab:,}, {s.max_positions or '?'} positions ({s.origin})")


def render(path: Path, plan: Plan, models: Models, origin: str, documents: int,
           mean: float, rates: Rates) -> str:
    """The steps table, the stages table, the assumptions and notes."""
    lines = [f"longctx plan: {path}",
             _shape("base", models.base), _shape("llm", models.llm),
             _shape("embed", models.embed),
             f"corpus: {documents:,} documents x ~{mean:,.0f} tokens ({origin})", ""]
    head = ("step", "jobs", "LLM calls", "tokens in", "tokens out", "on disk", "GPU-h", "work")
    table = [head] + [(r.step, str(r.jobs), si(r.calls), si(r.tokens_in), si(r.tokens_out),
                       gigabytes(r.disk), f"{r.gpu_hours:,.1f}" if r.gpu_hours else "-",
                       r.what) for r in plan.rows]
    total = sum(r.gpu_hours for r in plan.rows)
    table.append(("total", "", si(sum(r.calls for r in plan.rows)), "", "",
                  gigabytes(sum(r.disk for r in plan.rows)), f"{total:,.1f}", ""))
    lines += _columns(table) + [""]
    head = ("stage", "length", "RoPE base", "sequences", "needed", "tokens", "6N FLOPs",
            "attn FLOPs", "GPU-h")
    table = [head] + [(str(s.stage), f"{s.length:,}", f"{s.rope_theta:.3g}" if s.rope_theta
                       else "?", f"~{s.sequences:,}", f"{s.need:,}", si(s.tokens),
                       f"{s.flops_linear:.3g}", f"{s.flops_attention:.3g}",
                       f"{s.gpu_hours:,.1f}") for s in plan.stages]
    lines += _columns(table) + [""]
    lines.append(f"rates: {rates.gpu_tflops:g} TFLOP/s x MFU {rates.mfu:g} (training), "
                 f"{rates.embed_docs_per_s:g} docs/s (embed, E5-Mistral-7B at 512 tokens), "
                 f"{rates.llm_tokens_per_s:g} tokens/s (LLM, Llama-3.1-8B on vLLM); "
                 "`longctx plan --help` for the formulas")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned text columns, numbers right-aligned, the last column left ragged."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])]
        out.append("  ".join(cells + [r[-1]]).rstrip())
    return out
