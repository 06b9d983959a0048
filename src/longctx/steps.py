"""What each DAG step reads and writes, named once.

Every path a step takes has one name, and that name is at once the step function's keyword,
its `longctx <step>` flag and the key of its Snakemake rule's input or output: `cli` builds
each step's arguments from this table and calls the step function with them by keyword, and
`workflow.step_command` builds each rule's command from it. A path cannot be passed in the
wrong place (a swapped pair fails by name), and a step gains a path by one line here, one in
its rule and one in its function.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from longctx.errors import LongctxError
from longctx.shards import Shard

Role = Literal["input", "output", "option"]


@dataclass(frozen=True)
class Arg:
    """One argument of a step: a rule `input`, a rule `output`, or an `option` the rule fills
    in itself (a wildcard, a directory that is not an output)."""

    name: str
    help: str
    role: Role = "input"
    type: Callable[[str], Any] = Path
    nargs: str | None = None  # "+"/"*": a list of paths (report gathers one per model)
    required: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def inp(name: str, help: str, **kw: Any) -> Arg:
    return Arg(name, help, "input", **kw)


def out(name: str, help: str, **kw: Any) -> Arg:
    return Arg(name, help, "output", **kw)


def opt(name: str, help: str, **kw: Any) -> Arg:
    return Arg(name, help, "option", **kw)


@dataclass(frozen=True)
class Step:
    command: str  # longctx <command>
    rule: str  # the Snakemake rule that runs it
    help: str
    args: tuple[Arg, ...]


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except LongctxError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


STAGE = opt("stage", "index into stages.schedule", type=int)
SHARD = opt("shard", "this job's shard, N-of-M (a sharded step: longctx.shards)", type=_shard)
PARTS = inp("parts", "every shard's part, 1-of-M .. M-of-M", nargs="+")
MODEL_NAME = opt("name", "the model's name in results (base, stage-0, ...)", type=str)
METRICS = out("metrics", "stats json")
BASE_MODEL = inp("model", "the base model dir (tokenizer, chat template)")
DOCS = inp("docs", "corpus docs.parquet")
LLM = inp("model", "the base model dir (the LLM, unless llm.model names another)")

STEPS: dict[str, Step] = {s.command: s for s in (
    Step("base-model", "base_model", "write the base model as an HF dir",
         (out("model", "the model dir to write"),)),
    Step("corpus", "corpus", "read, clean, dedupe and count the documents",
         (inp("tokenizer", "the base model dir"), out("docs", "docs.parquet"), METRICS)),
    Step("embed", "embed_shard", "embed a shard's documents (a contiguous range of corpus "
         "rows) into float16 files", (SHARD, DOCS, out("part", "the shard's part dir"))),
    Step("gather-embed", "embed", "embed's shard parts, in corpus order",
         (PARTS, out("embeddings", "the embeddings dir"))),
    Step("index", "index", "build the FAISS index and check its recall",
         (inp("embeddings", "the embeddings dir"), out("index", "the index dir"))),
    Step("instructions", "instructions_shard", "the LLM writes multi-document instructions: "
         "a shard's first-round prompts", (SHARD, DOCS, LLM, out("part", "the shard's "
                                                                  "candidates"))),
    Step("gather-instructions", "instructions", "instructions' shard parts, filtered in "
         "prompt order, and the rounds that top them up",
         (PARTS, DOCS, LLM, out("instructions", "instructions.parquet"), METRICS)),
    Step("retrieve", "retrieve", "top-k documents per instruction",
         (inp("instructions", "instructions.parquet"), inp("index", "the index dir"),
          inp("embeddings", "the embeddings dir"), out("retrieved", "retrieved.parquet"),
          METRICS)),
    Step("summarize", "summarize_shard", "recursive query-focused summaries of the "
         "documents retrieved for a shard's instructions",
         (SHARD, inp("instructions", "instructions.parquet"),
          inp("retrieved", "retrieved.parquet"), DOCS, LLM,
          out("part", "the shard's summaries"))),
    Step("gather-summarize", "summarize", "summarize's shard parts, in instruction order",
         (inp("instructions", "instructions.parquet"), PARTS,
          out("summaries", "summaries.parquet"), METRICS)),
    Step("respond", "respond_shard", "the LLM answers each instruction of a shard from its "
         "summaries", (SHARD, inp("instructions", "instructions.parquet"),
                       inp("summaries", "summaries.parquet"), LLM,
                       out("part", "the shard's responses"))),
    Step("gather-respond", "respond", "respond's shard parts, in instruction order",
         (inp("instructions", "instructions.parquet"), PARTS,
          out("responses", "responses.parquet"), METRICS)),
    Step("long-output", "long_output_shard", "back-translated writing instructions for a "
         "shard's long documents", (SHARD, DOCS, LLM, out("part", "the shard's rows"))),
    Step("gather-long-output", "long_output", "long_output's shard parts, in document order",
         (PARTS, out("long_output", "long_output.parquet"), METRICS)),
    Step("pack", "pack", "the tokenised training sequences of one stage",
         (STAGE, BASE_MODEL, DOCS, inp("instructions", "instructions.parquet"),
          inp("retrieved", "retrieved.parquet"), inp("summaries", "summaries.parquet"),
          inp("responses", "responses.parquet"), inp("long_output", "long_output.parquet"),
          inp("index", "the index dir (fills long samples)"),
          inp("embeddings", "the embeddings dir"), out("sequences", "sequences.parquet"),
          METRICS)),
    Step("train", "train_stage", "train one stage from the previous weights (resumes from "
         "its checkpoints)",
         (STAGE, inp("base", "the base model (the schedule starts from its length and RoPE "
                     "base)"), inp("init", "weights to start from"),
          inp("sequences", "the stage's sequences.parquet"),
          out("model", "the stage's model dir"),
          opt("live", "dvclive dir (metrics.json, plots)"),
          opt("checkpoints", "resumable state"))),
    Step("niah-samples", "niah_samples_shard", "the needle-in-a-haystack grid (lengths x "
         "depths) at a shard's lengths, sized in the base model's tokenizer",
         (SHARD, BASE_MODEL, DOCS, out("part", "the shard's samples"))),
    Step("gather-niah-samples", "niah_samples", "niah-samples' shard parts, in length order",
         (PARTS, out("samples", "parquet"))),
    Step("ruler-samples", "ruler_samples_shard", "the RULER tasks at a shard's (task, length) "
         "pairs, sized in the base model's tokenizer (cached per task and length)",
         (SHARD, BASE_MODEL, DOCS, out("part", "the shard's samples"))),
    Step("gather-ruler-samples", "ruler_samples", "ruler-samples' shard parts, in task and "
         "length order", (PARTS, out("samples", "parquet"))),
    *(Step(f"eval-{kind}", f"eval_{kind}", f"one model answers {what}; scores per length "
           "(percent)", (MODEL_NAME, inp("model", "model dir"), inp("samples", "parquet"),
                         out("results", "results json"),
                         out("table", "every answer as csv", required=False)))
      for kind, what in (("niah", "the NIAH grid"), ("ruler", "the RULER tasks"))),
    Step("eval-lmeval", "eval_lmeval", "one model through lm-eval-harness (the shipped tasks "
         "offline, standard ones with hub access)",
         (MODEL_NAME, inp("model", "model dir"), inp("docs", "corpus (longctx_cloze)"),
          inp("ruler", "RULER samples (longctx_ruler)", required=False),
          out("results", "results json"))),
    Step("report", "report", "every score in one metrics file, NIAH heatmaps, RULER curves, "
         "training loss and one HTML page",
         (opt("models", "model names, in order", type=str, nargs="+"),
          inp("niah", "each model's niah results json, in --models order", nargs="+"),
          inp("ruler", "each model's ruler results json, in --models order", nargs="+"),
          inp("lmeval", "each model's lmeval results json (none when lmeval.tasks is empty)",
              nargs="*", required=False),
          inp("train", "stage metrics.json", nargs="*", required=False),
          inp("train_plots", "stage plots dirs", nargs="*", required=False),
          out("metrics", "the flat metrics json"), out("curves", "RULER vs length (tsv)"),
          out("plots", "figures directory"), out("report", "the HTML page"))),
)}


def step_kwargs(command: str, values: Any, without: tuple[str, ...] = ()) -> dict[str, Any]:
    """The step function's keyword arguments, read from parsed CLI `values` by name."""
    return {a.name: getattr(values, a.name) for a in STEPS[command].args
            if a.name not in without}
