"""`longctx <step>`: one subcommand per Snakemake rule, plus tools around the DAG.

Each step loads and validates the params file, then calls one function of its module with
its own section; paths come from the rule so the Snakefile is the one place they are written.
Heavy libraries are imported inside the commands so `longctx --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from longctx.config import PARAMS_FILE, Params, load_params
from longctx.errors import LongctxError

log = logging.getLogger("longctx")


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params)


def cmd_base_model(args: argparse.Namespace) -> None:
    from longctx.base_model import prepare_base_model

    manifest = prepare_base_model(_params(args).base_model, args.out)
    log.info("base model: %s parameters -> %s", f"{manifest['parameters']:,}", args.out)


def cmd_corpus(args: argparse.Namespace) -> None:
    from longctx.corpus import build_corpus

    stats = build_corpus(_params(args).corpus, args.tokenizer, args.out, args.stats)
    log.info("corpus: %s documents, %s tokens -> %s",
             f"{stats['documents']:,}", f"{stats['tokens']:,}", args.out)


def cmd_embed(args: argparse.Namespace) -> None:
    from longctx.retrieval.embed import embed_corpus

    manifest = embed_corpus(_params(args).embed, args.docs, args.out)
    log.info("embeddings: %s vectors of dim %s -> %s",
             f"{manifest['rows']:,}", manifest["dim"], args.out)


def cmd_index(args: argparse.Namespace) -> None:
    from longctx.retrieval.index import build_index

    params = _params(args)
    manifest = build_index(params.index, args.embeddings, args.out, params.seed)
    log.info("index: %s, recall@%s = %.3f -> %s", manifest["type"], manifest["recall_k"],
             manifest["recall"], args.out)


def _with_llm(args: argparse.Namespace, step) -> dict:
    """Run `step(params, llm)` with the configured generator open (and closed after)."""
    from longctx.synth.tables import open_llm

    params = _params(args)
    with open_llm(params.llm, args.model) as llm:
        return step(params, llm)


def cmd_instructions(args: argparse.Namespace) -> None:
    from longctx.synth.instructions import generate_instructions

    stats = _with_llm(args, lambda p, llm: generate_instructions(
        p.instructions, llm, p.seed, args.docs, args.out, args.stats))
    log.info("instructions: %d kept of %d candidates -> %s", stats["kept"],
             stats["candidates"], args.out)


def cmd_retrieve(args: argparse.Namespace) -> None:
    from longctx.synth.retrieve import retrieve

    stats = retrieve(_params(args).retrieve, args.instructions, args.index, args.embeddings,
                     args.out, args.stats)
    log.info("retrieve: %d instructions, %.1f documents each -> %s", stats["instructions"],
             stats["documents_per_instruction"], args.out)


def cmd_summarize(args: argparse.Namespace) -> None:
    from longctx.synth.summarize import summarize

    stats = _with_llm(args, lambda p, llm: summarize(
        p.summarize, llm, p.seed, args.instructions, args.retrieved, args.docs, args.out,
        args.stats))
    log.info("summarize: %d summaries over %d levels -> %s", stats["summaries"],
             stats["levels"], args.out)


def cmd_respond(args: argparse.Namespace) -> None:
    from longctx.synth.respond import respond

    stats = _with_llm(args, lambda p, llm: respond(
        p.respond, llm, p.seed, args.instructions, args.summaries, args.out, args.stats))
    log.info("respond: %d kept of %d -> %s", stats["kept"], stats["instructions"], args.out)


def cmd_long_output(args: argparse.Namespace) -> None:
    from longctx.synth.long_output import long_output

    stats = _with_llm(args, lambda p, llm: long_output(
        p.long_output, llm, p.seed, args.docs, args.out, args.stats))
    log.info("long_output: %d kept of %d candidates -> %s", stats["kept"], stats["candidates"],
             args.out)


def cmd_pack(args: argparse.Namespace) -> None:
    from longctx.pack import pack_stage

    stats = pack_stage(_params(args), args.stage, args.model, args.docs, args.instructions,
                       args.retrieved, args.summaries, args.responses, args.long_output,
                       args.index, args.embeddings, args.out, args.stats)
    log.info("pack: stage %d, %d sequences of %d tokens -> %s", stats["stage"],
             stats["sequences"], stats["length"], args.out)


def cmd_pack_show(args: argparse.Namespace) -> None:
    from longctx.pack_show import pack_show

    print(pack_show(args.sequences, args.model, args.sequence, args.color, args.max_tokens))


def cmd_train(args: argparse.Namespace) -> None:
    from longctx.train.launch import launcher, run

    params = _params(args)
    command = launcher(params.train, args.argv)
    if command is not None:  # several processes: the launcher runs this same command in each
        log.info("train: %s", " ".join(command))
        if run(command) != 0:
            raise LongctxError(f"stage {args.stage}: a training process failed or was stopped "
                               "(see above)")
        return
    from longctx.train.loop import TrainingInterrupted, train_stage  # (torch: not relaunching)

    try:
        summary = train_stage(params, args.stage, args.base, args.init, args.sequences,
                              args.out, args.live, args.checkpoints)
    except TrainingInterrupted:
        if os.environ.get("RANK", "0") != "0":  # every process stopped alike: rank 0 says so
            sys.exit(1)
        raise
    log.info("train: stage %d (length %d, RoPE base %g), %d steps, final loss %s -> %s",
             args.stage, summary["length"], summary["rope_theta"], summary["steps"],
             summary["final_loss"], args.out)


def cmd_niah_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import build_niah

    params = _params(args)
    stats = build_niah(params.niah, params.seed, args.model, args.docs, args.out)
    log.info("niah-samples: %d samples over %d lengths -> %s", stats["samples"],
             stats["lengths"], args.out)


def cmd_ruler_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import build_ruler

    params = _params(args)
    stats = build_ruler(params.ruler, params.seed, args.model, args.docs, args.out)
    log.info("ruler-samples: %d samples (%d tasks x %d lengths) -> %s", stats["samples"],
             stats["tasks"], stats["lengths"], args.out)


def _evaluate(kind: str, args: argparse.Namespace) -> None:
    from longctx.eval.run import evaluate

    result = evaluate(kind, args.name, args.model, args.samples, _params(args).eval, args.out,
                      args.csv)
    summary = ", ".join(f"{k} {v:.1f}" for k, v in result["scores"].items() if "/" not in k)
    log.info("eval-%s %s: %s -> %s", kind, args.name, summary, args.out)


def cmd_eval_niah(args: argparse.Namespace) -> None:
    _evaluate("niah", args)


def cmd_eval_ruler(args: argparse.Namespace) -> None:
    _evaluate("ruler", args)


def cmd_eval_lmeval(args: argparse.Namespace) -> None:
    from longctx.eval.lmeval import evaluate_lmeval

    params = _params(args)
    result = evaluate_lmeval(args.name, args.model, args.docs, args.ruler, params.lmeval,
                             params.eval, params.seed, args.out)
    log.info("eval-lmeval %s: %s -> %s", args.name,
             ", ".join(f"{k} {v:.3f}" for k, v in result["scores"].items()), args.out)


def cmd_report(args: argparse.Namespace) -> None:
    from longctx.eval.report import build_report

    metrics = build_report(args.models, args.niah, args.ruler, args.lmeval, args.train,
                           args.train_plots, args.metrics, args.curves, args.plots, args.report)
    for model, scores in metrics.items():
        log.info("report: %s: %s", model, ", ".join(
            f"{k} {v:.3g}" for k, v in scores.items() if k.count("/") != 1))
    log.info("report: -> %s", args.report)


def cmd_show(args: argparse.Namespace) -> None:
    from longctx.synth.show import show

    print(show(args.instruction_id, args.synth, args.docs))


def cmd_search(args: argparse.Namespace) -> None:
    from longctx.retrieval.search import search_command

    print(search_command(args.query, args.k, args.index, args.embeddings, args.docs))


def cmd_serve(args: argparse.Namespace) -> None:
    from longctx.llm.serve import serve_forever

    llm = _params(args).llm
    serve_forever(args.model, args.host, args.port, model_name=args.name,
                  api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
                  device=llm.device, dtype=llm.dtype, context_tokens=llm.context_tokens)


def cmd_validate(args: argparse.Namespace) -> None:
    from longctx.workflow import check_params

    for path in args.files or [args.params]:
        if args.no_files:
            load_params(path)
        else:
            check_params(path)  # what Snakemake refuses, named files included
        print(f"{path}: ok")


def cmd_schema(args: argparse.Namespace) -> None:
    from longctx.config import json_schema_text

    _write_or_check(args.out, json_schema_text(), args.check, "longctx schema")


def cmd_dvc_export(args: argparse.Namespace) -> None:
    from longctx.dvc_export import export_dvc_yaml

    _write_or_check(args.out, export_dvc_yaml(args.snakefile, args.params), args.check,
                    "longctx dvc-export")


def cmd_profile(args: argparse.Namespace) -> None:
    from longctx.repro import write_text

    source = Path(args.configs) / f"{args.name}.yaml"
    if not source.is_file():
        known = sorted(p.stem for p in Path(args.configs).glob("*.yaml"))
        raise LongctxError(f"{source}: no such profile (known: {', '.join(known) or 'none'})")
    load_params(source)
    write_text(args.params, source.read_text(encoding="utf-8"))
    print(f"{args.params} is now profile {args.name!r} ({source}); snakemake and dvc both read it")
    if not args.snakefile.is_file():
        return
    try:  # the DAG depends on params (the number of stages, the files they name)
        cmd_dvc_export(argparse.Namespace(out=Path("dvc.yaml"), snakefile=args.snakefile,
                                          params=args.params, check=False))
    except LongctxError as exc:
        raise LongctxError(f"dvc.yaml not regenerated: {exc}; run `longctx dvc-export` once "
                           "it is fixed") from None


def _write_or_check(path: Path, text: str, check: bool, command: str) -> None:
    from longctx.repro import write_text

    if check:
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            raise LongctxError(f"{path} is out of date: run `{command}` and commit the result")
        print(f"{path}: up to date")
    else:
        write_text(path, text)
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longctx", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path,
                        default=Path(os.environ.get("LONGCTX_PARAMS", PARAMS_FILE)),
                        help="params file (default: params.yaml or $LONGCTX_PARAMS)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = add("base-model", cmd_base_model, "rule base_model: write the base model as an HF dir")
    p.add_argument("--out", type=Path, required=True)

    p = add("corpus", cmd_corpus, "rule corpus: read, clean, dedupe and count the documents")
    p.add_argument("--tokenizer", type=Path, required=True, help="base model dir")
    p.add_argument("--out", type=Path, required=True, help="docs.parquet")
    p.add_argument("--stats", type=Path, required=True, help="stats json")

    p = add("embed", cmd_embed, "rule embed: embed every document into float16 shards")
    p.add_argument("--docs", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    p = add("index", cmd_index, "rule index: build the FAISS index and check its recall")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)

    def synth_step(name: str, func, help: str, *inputs: str) -> argparse.ArgumentParser:
        p = add(name, func, help)
        for inp in inputs:
            p.add_argument(f"--{inp}", type=Path, required=True)
        p.add_argument("--out", type=Path, required=True, help="parquet table")
        p.add_argument("--stats", type=Path, required=True, help="stats json")
        return p

    synth_step("instructions", cmd_instructions, "rule instructions: the LLM writes "
               "multi-document instructions", "docs", "model")
    synth_step("retrieve", cmd_retrieve, "rule retrieve: top-k documents per instruction",
               "instructions", "index", "embeddings")
    synth_step("summarize", cmd_summarize, "rule summarize: recursive query-focused summaries "
               "of the retrieved documents", "instructions", "retrieved", "docs", "model")
    synth_step("respond", cmd_respond, "rule respond: the LLM answers each instruction from "
               "its summaries", "instructions", "summaries", "model")
    synth_step("long-output", cmd_long_output, "rule long_output: back-translated writing "
               "instructions for long documents", "docs", "model")

    p = add("pack", cmd_pack, "rule pack: the tokenised training sequences of one stage")
    p.add_argument("--stage", type=int, required=True, help="index into stages.schedule")
    for inp in ("model", "docs", "instructions", "retrieved", "summaries", "responses",
                "long-output", "index", "embeddings"):
        p.add_argument(f"--{inp}", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="sequences.parquet")
    p.add_argument("--stats", type=Path, required=True, help="stats json")

    p = add("pack-show", cmd_pack_show, "print packed sequences sample by sample, the tokens "
            "that carry loss marked (green, or [[ ]] without colour)")
    p.add_argument("sequences", type=Path, help="a sequences.parquet of the pack step")
    p.add_argument("--sequence", type=int, default=None, help="only this sequence")
    p.add_argument("--model", type=Path, default=Path("models/base"), help="its tokenizer")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="elide the middle of samples longer than this")

    p = add("train", cmd_train, "rule train_stage: train one stage from the previous weights "
            "(resumes from its checkpoints)")
    p.add_argument("--stage", type=int, required=True, help="index into stages.schedule")
    p.add_argument("--base", type=Path, required=True, help="the base model (the schedule "
                   "starts from its length and RoPE base)")
    p.add_argument("--init", type=Path, required=True, help="weights to start from")
    p.add_argument("--sequences", type=Path, required=True, help="the stage's sequences.parquet")
    p.add_argument("--out", type=Path, required=True, help="the stage's model dir")
    p.add_argument("--live", type=Path, required=True, help="dvclive dir (metrics, plots)")
    p.add_argument("--checkpoints", type=Path, required=True, help="resumable state")

    for name, func, what in (("niah-samples", cmd_niah_samples, "the needle-in-a-haystack "
                              "grid (lengths x depths)"),
                             ("ruler-samples", cmd_ruler_samples, "the RULER tasks")):
        p = add(name, func, f"rule {name.replace('-', '_')}: {what}, sized in the base "
                "model's tokenizer (cached per task and length)")
        p.add_argument("--model", type=Path, required=True, help="the base model dir")
        p.add_argument("--docs", type=Path, required=True, help="corpus docs.parquet")
        p.add_argument("--out", type=Path, required=True, help="samples parquet")

    for name, func, what in (("eval-niah", cmd_eval_niah, "the NIAH grid"),
                             ("eval-ruler", cmd_eval_ruler, "the RULER tasks")):
        p = add(name, func, f"rule {name.replace('-', '_')}: one model answers {what}; "
                "scores per length (percent)")
        p.add_argument("--name", required=True, help="the model's name in results (base, "
                       "stage-0, ...)")
        p.add_argument("--model", type=Path, required=True, help="model dir")
        p.add_argument("--samples", type=Path, required=True, help="samples parquet")
        p.add_argument("--out", type=Path, required=True, help="results json")
        p.add_argument("--csv", type=Path, default=None, help="every answer as csv")

    p = add("eval-lmeval", cmd_eval_lmeval, "rule eval_lmeval: one model through "
            "lm-eval-harness (the shipped tasks offline, standard ones with hub access)")
    p.add_argument("--name", required=True, help="the model's name in results")
    p.add_argument("--model", type=Path, required=True, help="model dir")
    p.add_argument("--docs", type=Path, required=True, help="corpus (longctx_cloze)")
    p.add_argument("--ruler", type=Path, default=None, help="RULER samples (longctx_ruler)")
    p.add_argument("--out", type=Path, required=True, help="results json")

    p = add("report", cmd_report, "rule report: every score in one metrics file, NIAH "
            "heatmaps, RULER curves, training loss and one HTML page")
    p.add_argument("--models", nargs="+", required=True, help="model names, in order")
    for kind in ("niah", "ruler"):
        p.add_argument(f"--{kind}", nargs="+", type=Path, required=True,
                       help=f"each model's {kind} results json, in --models order")
    p.add_argument("--lmeval", nargs="*", type=Path, default=[],
                   help="each model's lmeval results json (none when lmeval.tasks is empty)")
    p.add_argument("--train", nargs="*", type=Path, default=[], help="stage metrics.json")
    p.add_argument("--train-plots", nargs="*", type=Path, default=[], help="stage plots dirs")
    p.add_argument("--metrics", type=Path, required=True, help="the flat metrics json")
    p.add_argument("--curves", type=Path, required=True, help="RULER vs length table (tsv)")
    p.add_argument("--plots", type=Path, required=True, help="figures directory")
    p.add_argument("--report", type=Path, required=True, help="the HTML page")

    p = add("show", cmd_show, "print an instruction, its documents, summaries and response")
    p.add_argument("instruction_id", help="an id from data/synth/instructions.parquet "
                   "(a unique prefix is enough)")
    p.add_argument("--synth", type=Path, default=Path("data/synth"))
    p.add_argument("--docs", type=Path, default=Path("data/corpus/docs.parquet"))

    p = add("search", cmd_search, "print the top-k documents for a query")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--index", type=Path, default=Path("data/index"))
    p.add_argument("--embeddings", type=Path, default=Path("data/embeddings"))
    p.add_argument("--docs", type=Path, default=Path("data/corpus/docs.parquet"))

    p = add("serve", cmd_serve, "serve a model dir on an OpenAI-compatible endpoint "
            "(/v1/chat/completions), e.g. for llm.backend: openai")
    p.add_argument("--model", type=Path, default=Path("models/base"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default="base", help="model name clients ask for")
    p.add_argument("--api-key-env", default=None,
                   help="NAME of an environment variable whose value clients must send")

    p = add("validate", cmd_validate, "validate params files (default: --params): what "
            "every step and Snakemake refuse, files the params name included")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--no-files", action="store_true", help="check keys and values only, not "
                   "that the files the params name are there (a profile for another machine)")

    p = add("schema", cmd_schema, "write the JSON schema Snakemake validates params against")
    p.add_argument("--out", type=Path, default=Path("workflow/schemas/params.schema.json"))
    p.add_argument("--check", action="store_true", help="fail if the file is stale")

    p = add("dvc-export", cmd_dvc_export, "generate dvc.yaml from the Snakemake DAG")
    p.add_argument("--out", type=Path, default=Path("dvc.yaml"))
    p.add_argument("--snakefile", type=Path, default=Path("Snakefile"))
    p.add_argument("--check", action="store_true", help="fail if dvc.yaml is out of sync")

    p = add("profile", cmd_profile, "switch params.yaml to configs/NAME.yaml")
    p.add_argument("name")
    p.add_argument("--configs", type=Path, default=Path("configs"))
    p.add_argument("--snakefile", type=Path, default=Path("Snakefile"))
    return parser


class _Drop(logging.Filter):
    """Drops one library message, known by a phrase in it."""

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def _quiet_libraries() -> None:
    """Library chatter that longctx's own lines already cover or that asks nothing of the
    user (all of it shown again under -v): faiss probing CPU features; accelerate logging
    every file of a checkpoint (longctx logs each checkpoint once) and noting that tied
    embeddings are stored once (resuming restores them exactly: tests/test_train_loop.py);
    DeepSpeed announcing that it found no GPU, and torch telling DeepSpeed (every step, on
    every process) that two collectives it calls are deprecated."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    for name in ("faiss.loader", "accelerate.accelerator", "accelerate.checkpointing",
                 "accelerate.utils.fsdp_utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(_Drop("Removed shared tensor"))
    logging.getLogger("DeepSpeed").addFilter(_Drop("Setting accelerator to CPU"))


class AboveProgressBars(logging.StreamHandler):
    """Log lines go above tqdm's progress bars on the same stream instead of into the middle
    of one: tqdm.write clears the bars, writes the line, and draws them again."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:
            self.handleError(record)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch under a launcher
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        handlers=[AboveProgressBars()])
    if not args.verbose:
        _quiet_libraries()
    try:
        args.func(args)
    except LongctxError as exc:
        print(f"longctx {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
