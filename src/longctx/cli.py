"""`longctx <step>`: one subcommand per Snakemake rule, plus tools around the DAG.

Each step loads and validates the params file, then calls one function of its module with
its own section and its paths by keyword: the step table (longctx.steps) names each path
once, for the rule's command and for the arguments parsed here. Heavy libraries are imported
inside the commands so `longctx --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from longctx import logs
from longctx.config import PARAMS_FILE, Params, load_params
from longctx.errors import LongctxError
from longctx.steps import STEPS, step_kwargs

log = logging.getLogger("longctx")


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params)


def _paths(args: argparse.Namespace, *without: str) -> dict:
    """The step function's keyword arguments: every argument of the step table by name."""
    return step_kwargs(args.command, args, without)


def cmd_base_model(args: argparse.Namespace) -> None:
    from longctx.base_model import prepare_base_model

    manifest = prepare_base_model(_params(args).base_model, **_paths(args))
    log.info("base model: %s parameters -> %s", f"{manifest['parameters']:,}", args.model)


def cmd_corpus(args: argparse.Namespace) -> None:
    from longctx.corpus import build_corpus

    stats = build_corpus(_params(args).corpus, **_paths(args))
    log.info("corpus: %s documents, %s tokens -> %s",
             f"{stats['documents']:,}", f"{stats['tokens']:,}", args.docs)


def cmd_embed(args: argparse.Namespace) -> None:
    from longctx.retrieval.embed import embed_shard
    from longctx.retrieval.embed_parts import embed_params

    cfg = _params(args).embed
    info = embed_shard(cfg, params=embed_params(cfg), **_paths(args))
    log.info("embed %s: %s vectors in %d files -> %s", args.shard.name,
             f"{sum(f['rows'] for f in info['files']):,}", len(info["files"]), args.part)


def cmd_gather_embed(args: argparse.Namespace) -> None:
    from longctx.retrieval.embed_parts import embed_params, gather_embeddings

    manifest = gather_embeddings(params=embed_params(_params(args).embed), **_paths(args))
    log.info("embeddings: %s vectors of dim %s -> %s",
             f"{manifest['rows']:,}", manifest["dim"], args.embeddings)


def cmd_index(args: argparse.Namespace) -> None:
    from longctx.retrieval.index import build_index

    params = _params(args)
    manifest = build_index(params.index, params.seed, **_paths(args))
    log.info("index: %s, recall@%s = %.3f -> %s", manifest["type"], manifest["recall_k"],
             manifest["recall"], args.index)


def _with_llm(args: argparse.Namespace, step, **given) -> Any:
    """`step(section, llm, seed, **paths)` with the configured generator open (and closed
    after); the step's `model` input is the generator's, not the step function's. Each job
    has a call cache file of its own (a shard's: `<step>/<N-of-M>`)."""
    from longctx.synth.tables import open_llm

    params = _params(args)
    section = args.command.removeprefix("gather-").replace("-", "_")
    shard = getattr(args, "shard", None)
    job = section if shard is None else f"{section}/{shard.name}"
    with open_llm(params.llm, args.model, job) as llm:
        return step(getattr(params, section), llm, params.seed, **given,
                    **_paths(args, "model"))


def _part_params(args: argparse.Namespace, section: str,
                 shared: tuple[str, ...] = ("llm", "seed")) -> str:
    """What a sharded step's parts are checked against at gather: the params its rules pass
    (its own section and the `shared` ones: llm and seed, or seed alone for steps without
    an LLM)."""
    from longctx.repro import fingerprint

    params = _params(args)

    def dump(name: str) -> Any:
        value = getattr(params, name)  # a section, or the seed
        return value.model_dump(mode="json") if hasattr(value, "model_dump") else value

    return fingerprint({"section": dump(section), **{name: dump(name) for name in shared}})


def cmd_instructions(args: argparse.Namespace) -> None:
    from longctx.synth.instructions import first_round

    rows = _with_llm(args, first_round, params=_part_params(args, "instructions"))
    log.info("instructions %s: %d candidates -> %s", args.shard.name, rows, args.part)


def cmd_gather_instructions(args: argparse.Namespace) -> None:
    from longctx.synth.instructions import gather_instructions

    stats = _with_llm(args, gather_instructions, params=_part_params(args, "instructions"))
    log.info("instructions: %d kept of %d candidates -> %s", stats["kept"],
             stats["candidates"], args.instructions)


def cmd_retrieve(args: argparse.Namespace) -> None:
    from longctx.synth.retrieve import retrieve

    stats = retrieve(_params(args).retrieve, **_paths(args))
    log.info("retrieve: %d instructions, %.1f documents each -> %s", stats["instructions"],
             stats["documents_per_instruction"], args.retrieved)


def cmd_summarize(args: argparse.Namespace) -> None:
    from longctx.synth.summarize import summarize

    rows = _with_llm(args, summarize, params=_part_params(args, "summarize"))
    log.info("summarize %s: %d summaries -> %s", args.shard.name, rows, args.part)


def cmd_gather_summarize(args: argparse.Namespace) -> None:
    from longctx.synth.summarize import gather_summaries

    stats = gather_summaries(params=_part_params(args, "summarize"), **_paths(args))
    log.info("summarize: %d summaries over %d levels -> %s", stats["summaries"],
             stats["levels"], args.summaries)


def cmd_respond(args: argparse.Namespace) -> None:
    from longctx.synth.respond import respond

    rows = _with_llm(args, respond, params=_part_params(args, "respond"))
    log.info("respond %s: %d instructions -> %s", args.shard.name, rows, args.part)


def cmd_gather_respond(args: argparse.Namespace) -> None:
    from longctx.synth.respond import gather_responses

    stats = gather_responses(params=_part_params(args, "respond"), **_paths(args))
    log.info("respond: %d kept of %d -> %s", stats["kept"], stats["instructions"],
             args.responses)


def cmd_long_output(args: argparse.Namespace) -> None:
    from longctx.synth.long_output import long_output

    rows = _with_llm(args, long_output, params=_part_params(args, "long_output"))
    log.info("long_output %s: %d candidates -> %s", args.shard.name, rows, args.part)


def cmd_gather_long_output(args: argparse.Namespace) -> None:
    from longctx.synth.long_output import gather_long_output

    stats = gather_long_output(params=_part_params(args, "long_output"), **_paths(args))
    log.info("long_output: %d kept of %d candidates -> %s", stats["kept"], stats["candidates"],
             args.long_output)


def cmd_pack(args: argparse.Namespace) -> None:
    from longctx.pack import pack_stage

    stats = pack_stage(_params(args), **_paths(args))
    log.info("pack: stage %d, %d sequences of %d tokens -> %s", stats["stage"],
             stats["sequences"], stats["length"], args.sequences)


def cmd_pack_show(args: argparse.Namespace) -> None:
    from longctx.pack_show import pack_show

    print(pack_show(args.sequences, args.model, args.sequence, args.color, args.max_tokens))


def cmd_train(args: argparse.Namespace) -> None:
    from longctx.train.launch import launcher, run

    params = _params(args)
    command = launcher(params.train, args.argv)
    if command is not None:  # several processes: the launcher runs this same command in each
        log.info("train: %s", " ".join(command))
        ended = run(command, relay=command[0] == "srun")
        if ended.status != 0 and not ended.started and params.train.nodes > 1:
            raise LongctxError(
                f"stage {args.stage}: the {params.train.nodes} machines did not meet within "
                f"train.rendezvous_timeout_s ({params.train.rendezvous_timeout_s} s): every "
                "machine must run `longctx train` with the same train.nodes and "
                "train.rendezvous, and the first must be reachable there (torchrun's reason "
                "is above)")
        if ended.status != 0:
            raise LongctxError(f"stage {args.stage}: a training process failed or was stopped "
                               "(see above)")
        return
    from longctx.train.loop import TrainingInterrupted, train_stage  # (torch: not relaunching)

    try:
        summary = train_stage(params, **_paths(args))
    except TrainingInterrupted:
        if os.environ.get("RANK", "0") != "0":  # every process stopped alike: rank 0 says so
            sys.exit(1)
        raise
    log.info("train: stage %d (length %d, RoPE base %g), %d steps, final loss %s -> %s",
             args.stage, summary["length"], summary["rope_theta"], summary["steps"],
             summary["final_loss"], args.model)


def cmd_niah_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import niah_shard

    params = _params(args)
    rows = niah_shard(params.niah, params.seed, params=_part_params(args, "niah", ("seed",)),
                      **_paths(args))
    log.info("niah-samples %s: %d samples -> %s", args.shard.name, rows, args.part)


def cmd_gather_niah_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import gather_niah

    stats = gather_niah(_params(args).niah, params=_part_params(args, "niah", ("seed",)),
                        **_paths(args))
    log.info("niah-samples: %d samples over %d lengths -> %s", stats["samples"],
             stats["lengths"], args.samples)


def cmd_ruler_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import ruler_shard

    params = _params(args)
    rows = ruler_shard(params.ruler, params.seed, params=_part_params(args, "ruler", ("seed",)),
                       **_paths(args))
    log.info("ruler-samples %s: %d samples -> %s", args.shard.name, rows, args.part)


def cmd_gather_ruler_samples(args: argparse.Namespace) -> None:
    from longctx.eval.data import gather_ruler

    stats = gather_ruler(_params(args).ruler, params=_part_params(args, "ruler", ("seed",)),
                         **_paths(args))
    log.info("ruler-samples: %d samples (%d tasks x %d lengths) -> %s", stats["samples"],
             stats["tasks"], stats["lengths"], args.samples)


def _evaluate(kind: str, args: argparse.Namespace) -> None:
    from longctx.eval.run import evaluate

    result = evaluate(kind, _params(args).eval, **_paths(args))
    summary = ", ".join(f"{k} {v:.1f}" for k, v in result["scores"].items() if "/" not in k)
    log.info("eval-%s %s: %s -> %s", kind, args.name, summary, args.results)


def cmd_eval_niah(args: argparse.Namespace) -> None:
    _evaluate("niah", args)


def cmd_eval_ruler(args: argparse.Namespace) -> None:
    _evaluate("ruler", args)


def cmd_eval_lmeval(args: argparse.Namespace) -> None:
    from longctx.eval.lmeval import evaluate_lmeval

    params = _params(args)
    result = evaluate_lmeval(params.lmeval, params.eval, params.seed, **_paths(args))
    log.info("eval-lmeval %s: %s -> %s", args.name,
             ", ".join(f"{k} {v:.3f}" for k, v in result["scores"].items()), args.results)


def cmd_report(args: argparse.Namespace) -> None:
    from longctx.eval.report import build_report

    metrics = build_report(**_paths(args))
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


def serve_argv(model: Path | None, host: str, port: int, device: str, dtype: str,
               extra: list[str]) -> list[str]:
    """The `transformers serve` command line for a model dir, pinned to it (so a request's
    `model` is the path as given: models/base, what llm.model 'base' sends), or with no
    model (None) unpinned: each model dir a request names is loaded when first asked for
    (models/stage-0: what eval.backend openai sends). In the hf backend's device and dtype
    (auto: bfloat16 on GPU, float32 on CPU, not the checkpoint's bfloat16), so `openai`
    through it decodes as `hf` does."""
    from longctx.hub import resolve_device
    from longctx.llm.hf import resolve_dtype

    device = resolve_device(device)
    exe = Path(sys.executable).with_name("transformers")  # the console script of this venv
    head = [str(exe)] if exe.is_file() else [
        sys.executable, "-c", "from transformers.cli.transformers import main; main()"]
    pinned = [] if model is None else [str(model)]
    return [*head, "serve", *pinned, "--device", device, "--dtype",
            resolve_dtype(dtype, device), "--host", host, "--port", str(port), *extra]


def cmd_serve(args: argparse.Namespace) -> None:
    """Replace this process with `transformers serve` (no home-made server): the real
    OpenAI-compatible endpoints (chat with streaming, completions, usage) of the same
    transformers the project pins; one process per replica."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai")):
        raise LongctxError("longctx serve runs `transformers serve`, which needs its serving "
                           "extra: pip install 'longctx[serve]'")
    if not args.eval and not args.model.is_dir():
        raise LongctxError(f"{args.model}: no model directory (run `snakemake models/base`)")
    section = _params(args).eval if args.eval else _params(args).llm
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    argv = serve_argv(None if args.eval else args.model, args.host, args.port, section.device,
                      section.dtype, extra)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local dir: nothing to download
    os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")  # no PyPI call at start
    log.info("serve: %s", " ".join(["transformers", *argv[argv.index("serve"):]]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def cmd_validate(args: argparse.Namespace) -> None:
    from longctx.workflow import check_params

    for path in args.files or [args.params]:
        if args.no_files:
            load_params(path)
        else:
            check_params(path)  # what Snakemake refuses, named files included
        print(f"{path}: ok")


PLAN_HELP = ("what a profile costs (jobs, LLM calls, tokens, bytes, FLOPs, GPU-hours) and "
             "whether it can work, before anything runs")


def cmd_plan(args: argparse.Namespace) -> None:
    from longctx.costs_table import HELP, add_arguments, plan_command

    parser = argparse.ArgumentParser(prog="longctx plan", description=PLAN_HELP, epilog=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    plan_command(parser.parse_args(args.plan_args, argparse.Namespace(params=args.params)))


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
    parser.add_argument("--log", type=Path, default=None, help="also write the log lines, "
                        "warnings and any error to this file (a rule's log:)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kwargs)
        p.set_defaults(func=func)
        return p

    for step in STEPS.values():
        p = add(step.command, globals()["cmd_" + step.command.replace("-", "_")],
                f"rule {step.rule}: {step.help}")
        for arg in step.args:
            p.add_argument(arg.flag, type=arg.type, nargs=arg.nargs, required=arg.required,
                           default=[] if arg.nargs == "*" else None,
                           help=f"{arg.help} (written)" if arg.role == "output" else arg.help)
    _add_inspection(add)
    _add_maintenance(add)
    return parser


def _add_inspection(add) -> None:
    """Commands that read the DAG's artifacts: look at data, query the index, serve a model."""
    p = add("pack-show", cmd_pack_show, "print packed sequences sample by sample, the tokens "
            "that carry loss marked (green, or [[ ]] without colour)")
    p.add_argument("sequences", type=Path, help="a sequences.parquet of the pack step")
    p.add_argument("--sequence", type=int, default=None, help="only this sequence")
    p.add_argument("--model", type=Path, default=Path("models/base"), help="its tokenizer")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="elide the middle of samples longer than this")

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

    p = add("serve", cmd_serve, "serve a model dir on an OpenAI-compatible endpoint with "
            "`transformers serve` (its device and dtype from the llm section), e.g. one "
            "replica of llm.base_url for llm.backend: openai")
    p.add_argument("--model", type=Path, default=Path("models/base"))
    p.add_argument("--eval", action="store_true", help="serve every evaluated model instead, "
                   "unpinned (models/base, models/stage-<k>, each loaded when first asked "
                   "for, by its path from here), in the eval section's device and dtype: a "
                   "replica of eval.base_url for eval.backend: openai")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="more `transformers serve` flags, after -- (e.g. -- --continuous-batching)")


def _add_maintenance(add) -> None:
    """Commands that keep the project's own files right: params, schema, dvc.yaml."""
    p = add("validate", cmd_validate, "validate params files (default: --params): what "
            "every step and Snakemake refuse, files the params name included")
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--no-files", action="store_true", help="check keys and values only, not "
                   "that the files the params name are there (a profile for another machine)")

    # plan's own flags are parsed by cmd_plan: building them here would load the costs
    # modules into every step's process, outside the steps' code inputs
    add("plan", cmd_plan, PLAN_HELP, add_help=False)

    p = add("schema", cmd_schema, "write the JSON schema of params files (for editors)")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, args.plan_args = parser.parse_known_args(argv)  # plan parses its own (cmd_plan)
    if args.plan_args and args.command != "plan":
        parser.error(f"unrecognized arguments: {' '.join(args.plan_args)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch under a launcher
    file = logs.setup(args.verbose, args.log)
    try:
        args.func(args)
    except LongctxError as exc:
        message = f"longctx {args.command}: error: {exc}"
        print(message, file=sys.stderr)
        logs.to_file(file, message)
        return 1
    except Exception:  # Python prints the traceback; the log keeps it too
        logs.to_file(file, f"longctx {args.command}: failed", sys.exc_info())
        raise
    finally:
        logs.close(file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
