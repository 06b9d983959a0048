"""Helpers the Snakemake rules call, so the .smk files hold wiring only.

A rule's inputs are everything its step reads: upstream artifacts (written in the rule), the
files its params sections name (`params_files`), and its code, derived from the step's
imports (`step_code`), so an edit anywhere in what a step runs reruns it, in Snakemake and in
DVC alike (dvc.yaml is exported from these rules), and an edit elsewhere does not.
"""

from __future__ import annotations

import ast
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from longctx.errors import ConfigError, LongctxError

SOURCE_ROOT = Path("src/longctx")
PACKAGE = "longctx"
# Loaded by every step, yet no artifact depends on their text: params carry the configuration
# (config reads them), errors only word messages, and cli only hands the step its arguments.
NOT_CODE = {"longctx.config", "longctx.errors", "longctx.cli"}


def sections(config: dict[str, Any], *names: str) -> dict[str, Any]:
    """A rule's `params:`: only the sections it reads, so a change elsewhere never reruns it."""
    return {name: config.get(name) for name in names}


def params_files(config: dict[str, Any], *names: str) -> list[str]:
    """The local files the params sections `names` (a rule's `sections`) point its step at:
    corpus globs expanded, model directories as their files (longctx.inputs says what is not
    a file: bundled assets, hub ids, URLs)."""
    from longctx.config import validate_params
    from longctx.inputs import named_files

    return [p.as_posix() for p in named_files(validate_params(config, "params.yaml"), *names)]


def step_command(command: str, omit: tuple[str, ...] = (), **given: str) -> str:
    """A rule's shell command, built from the step table (longctx.steps): each input and
    output under the flag of the same name (`--docs {input.docs}`), the options from `given`
    (`stage="{wildcards.k}"`), arguments in `omit` left out, and the rule's log: file."""
    from longctx.steps import STEPS

    words = ["longctx", "--log", "{log}", command]
    for arg in STEPS[command].args:
        if arg.name in omit:
            continue
        if arg.name in given:
            words += [arg.flag, given.pop(arg.name)]
        elif arg.role != "option":
            words += [arg.flag, f"{{{arg.role}.{arg.name}}}"]
        elif arg.required:
            raise LongctxError(f"longctx {command}: the rule gives no {arg.flag}")
    if given:
        raise LongctxError(f"longctx {command}: no argument {', '.join(sorted(given))}")
    return " ".join(words)


# --------------------------------------------------------------------------- code inputs


def _module_file(name: str) -> Path | None:
    """The source file of module `name` under SOURCE_ROOT (a package: its __init__.py)."""
    base = SOURCE_ROOT.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE_ROOT).with_suffix("").parts)
    return ".".join([PACKAGE, *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imported(node: ast.AST, here: str) -> set[str]:
    """The longctx modules one import statement uses (`from pkg import mod`: pkg.mod)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
    if not isinstance(node, ast.ImportFrom):
        return set()
    module = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = here.split(".")[:len(here.split(".")) - node.level]
        module = ".".join(package + ([module] if module else []))
    if module.split(".")[0] != PACKAGE:
        return set()
    children = {f"{module}.{a.name}" for a in node.names}
    submodules = {c for c in children if _module_file(c) is not None}
    # the package itself counts only for a name it defines; as a parent, step_code adds it
    return submodules | ({module} if submodules != children else set())


def _beside(node: ast.AST, path: Path) -> list[Path]:
    """Data files a module finds next to itself: `Path(__file__).parent / "name"`."""
    if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and isinstance(node.right.value, str)):
        return []
    if not any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node.left)):
        return []
    from longctx.inputs import files_under

    target = path.parent / node.right.value
    return files_under(target) if target.exists() else []


def _toplevel(tree: ast.AST) -> list[ast.AST]:
    """The nodes that run when the module is imported: not those inside functions."""
    nodes, todo = [], [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo += ast.iter_child_nodes(node)
    return nodes


class Parsed(NamedTuple):
    imports: frozenset[str]  # every longctx module the file imports, lazily too
    on_import: frozenset[str]  # those its import alone loads (module level)
    data: tuple[Path, ...]  # data files it reads beside itself


def _parsed(path: Path) -> Parsed:
    stat = path.stat()
    return _parsed_once(path, path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.cache
def _parsed_once(path: Path, *_identity: object) -> Parsed:
    """_parsed, once per file version (every rule of the DAG shares modules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = _module_name(path)
    imports = frozenset(m for node in ast.walk(tree) for m in _imported(node, here))
    on_import = frozenset(m for node in _toplevel(tree) for m in _imported(node, here))
    data = tuple(p for node in ast.walk(tree) for p in _beside(node, path))
    return Parsed(imports, on_import, data)


def _entry_modules(step: str) -> set[str]:
    """What `longctx <step>` imports: its cmd_ function in cli.py and the cli helpers it
    calls (e.g. _with_llm opens the generator)."""
    tree = ast.parse((SOURCE_ROOT / "cli.py").read_text(encoding="utf-8"))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    entry = "cmd_" + step.replace("-", "_")
    if entry not in functions:
        raise LongctxError(f"longctx {step}: no such step ({SOURCE_ROOT / 'cli.py'} has no "
                           f"{entry})")
    todo, seen, modules = [entry], set(), set()
    while todo:
        name = todo.pop()
        seen.add(name)
        for node in ast.walk(functions[name]):
            modules |= _imported(node, f"{PACKAGE}.cli")
            if isinstance(node, ast.Name) and node.id in functions and node.id not in seen:
                todo.append(node.id)
    return modules


def step_code(step: str) -> list[str]:
    """A rule's code inputs: every source file `longctx <step>` can run, read with ast: the
    closure of its imports (lazy ones too) and the data files those modules read beside
    themselves, less NOT_CODE and what only they import. A package that is only the parent
    of an imported module adds its __init__ and what that loads at import time, not what its
    functions import."""
    todo = [(name, True) for name in _entry_modules(step)]
    seen: dict[str, bool] = {}
    files: set[Path] = set()
    while todo:
        name, explicit = todo.pop()
        if seen.get(name, False) or (name in seen and not explicit):
            continue
        seen[name] = explicit
        parts = name.split(".")
        todo += [(".".join(parts[:i]), False) for i in range(1, len(parts))]
        path = _module_file(name)
        if path is None:
            raise LongctxError(f"{name}: imported by longctx {step}, but no {SOURCE_ROOT} file")
        if name in NOT_CODE:  # nor what it imports to check params: no artifact depends on it
            continue
        parsed = _parsed(path)
        todo += [(m, True) for m in (parsed.imports if explicit else parsed.on_import)]
        files |= {path, *(parsed.data if explicit else ())}
    return sorted(p.as_posix() for p in files)


# --------------------------------------------------------------------------- the DAG's shape


def stage_indices(config: dict[str, Any]) -> list[int]:
    """0..K-1 for the K entries of stages.schedule (the default schedule when the params file
    leaves the section out): one pack and one train_stage job each."""
    from longctx.config import validate_params

    return list(range(len(validate_params(config, "params.yaml").stages.schedule)))


def eval_models(config: dict[str, Any]) -> list[str]:
    """The evaluated models, in order: the base model, then every stage (`base`, `stage-<k>`)."""
    return ["base"] + [f"stage-{k}" for k in stage_indices(config)]


def shard_names(config: dict[str, Any], step: str) -> list[str]:
    """The shard wildcards of a sharded step (shards.<step>, else shards.default): 1-of-N ..
    N-of-N, one shard job each, all gathered by the step's own rule."""
    from longctx.config import validate_params
    from longctx.shards import names

    return names(validate_params(config, "params.yaml").shards.of(step))


def model_dir(name: str) -> str:
    """Where an evaluated model's weights live (the outputs of base_model and train_stage)."""
    return "models/base" if name == "base" else f"models/{name}"


def lmeval_tasks(config: dict[str, Any]) -> list[str]:
    """lmeval.tasks (its default when the section is left out): none means no eval_lmeval
    jobs, and longctx_ruler makes the RULER samples an input of each."""
    from longctx.config import validate_params

    return validate_params(config, "params.yaml").lmeval.tasks


# --------------------------------------------------------------------------- params check


def check_params(params_file: str | Path) -> None:
    """What every step would refuse, refused before the DAG is built: bad YAML, a bad key or
    value, a cross-field rule broken, a file the params name missing."""
    from longctx.config import load_params
    from longctx.inputs import NAMED_BY, named_files

    named_files(load_params(params_file), *NAMED_BY)


def check_no_overrides(config: dict[str, Any], params_file: str | Path) -> None:
    """Refuse `--config`/`--configfile` overrides: the steps read `params_file` themselves,
    and DVC tracks that file, so a value that lives only in Snakemake's memory would make
    the two disagree about what was run."""
    on_disk = yaml.safe_load(Path(params_file).read_text(encoding="utf-8")) or {}
    if config != on_disk:
        raise ConfigError(
            f"snakemake's config differs from {params_file}: longctx steps read {params_file}, "
            "so edit it, switch profiles with `longctx profile NAME`, or use "
            "`dvc exp run -S key=value`, instead of --config/--configfile"
        )


def exit_on_refusal(check: Callable[..., None], *args: Any) -> None:
    """Run a check for the Snakefile: a refusal is one line on stderr and exit status 1
    (an exception would print Snakemake's traceback around it)."""
    try:
        check(*args)
    except LongctxError as exc:
        sys.exit(f"longctx: error: {exc}")


# --------------------------------------------------------------------------- cluster jobs

# the rules that run the generator: a sharded step's shard jobs (their gathers only read
# parts, but instructions' gather runs the rounds after the first)
LLM_RULES = {"instructions_shard", "instructions", "summarize_shard", "respond_shard",
             "long_output_shard"}
EVAL_RULES = {"eval_niah", "eval_ruler", "eval_lmeval"}


def _on_cluster(workflow: Any) -> bool:
    """True where the rule's jobs run under a cluster executor: the submitting Snakemake has
    no --cores, and inside a job Snakemake runs in remote mode (SLURM's jobstep and the step
    it starts with srun). Known while the Snakefile is parsed, unlike the executor."""
    return workflow.resource_settings.cores is None or workflow.remote_exec


def job_threads(workflow: Any, config: dict[str, Any], rule: str, local: int | None = None) -> int:
    """A rule's `threads:`. Locally `local`, or every core of `--cores` when None (an LLM
    step, training, evaluation: one at a time, as `workflow.cores` did); on a cluster the
    rule's `cluster` CPUs, the same number in the submitting Snakemake and in the job, so
    the step's OMP_NUM_THREADS (Snakemake sets it from threads) is the allocation's."""
    if _on_cluster(workflow):
        from longctx.config import validate_params

        return validate_params(config, "params.yaml").cluster.job(rule).cpus
    return local if local is not None else workflow.resource_settings.cores


def job_gpus(params: Any, rule: str) -> int:
    """GPUs a rule's job needs, from what its step runs on: the embedder where its device is
    cuda, the LLM steps under the in-process backends (hf, vllm) unless on the CPU, training
    one per process, evaluation under hf unless on the CPU and under vllm its
    tensor_parallel_size (openai: the servers hold them); `cluster.rules.<rule>.gpus`
    overrides."""
    given = params.cluster.job(rule).gpus
    if given is not None:
        return given
    if rule in ("embed_shard", "retrieve"):
        return int(getattr(params, rule.removesuffix("_shard")).device == "cuda")
    if rule in LLM_RULES:
        return int(params.llm.backend in ("hf", "vllm") and params.llm.device != "cpu")
    if rule == "train_stage":
        return 0 if params.train.device == "cpu" else params.train.processes
    if rule in EVAL_RULES:
        backend = params.eval.backend
        if backend == "vllm":
            return params.eval.tensor_parallel_size
        return int(backend == "hf" and params.eval.device != "cpu")
    return 0


def job_resources(config: dict[str, Any], rule: str) -> dict[str, Any]:
    """A rule's `resources:`, in the keys snakemake-executor-plugin-slurm reads: CPUs,
    memory, time limit and partition per rule from the `cluster` section, GPUs (`gpu`, and
    `gpu_model` when set: sbatch --gpus=[MODEL:]N), and for training `--signal=USR1@margin`,
    so a time limit first makes it save a checkpoint that the retry resumes from. Without
    `B:`: that form signals only the batch shell, which dies of it and takes the job down;
    this one reaches the processes of the job's step (see `keep_running_on_usr1`). Local
    runs ignore every key but `gpu`, which `--resources gpu=N` can bound."""
    from longctx.config import validate_params

    params = validate_params(config, "params.yaml")
    cluster, job = params.cluster, params.cluster.job(rule)
    gpus = job_gpus(params, rule)
    resources: dict[str, Any] = {
        "cpus_per_task": job.cpus, "mem_mb": job.mem_mb, "runtime": job.runtime_min,
        "slurm_partition": job.partition
        or (cluster.gpu_partition if gpus else cluster.cpu_partition),
    }
    if rule == "train_stage":
        resources["slurm_extra"] = f"--signal=USR1@{cluster.signal_margin_s}"
        if params.train.nodes > 1:
            return _across_machines(resources, params, gpus // params.train.nodes)
    if gpus:
        resources["gpu"] = gpus
        if cluster.gpu_model:
            resources["gpu_model"] = cluster.gpu_model
    return resources


def _across_machines(resources: dict[str, Any], params: Any, gpus_per_node: int
                     ) -> dict[str, Any]:
    """A training job over `train.nodes` machines: one task per node (`longctx train` starts
    its torchrun agents there with srun, so the plugin runs it without srun: `mpi`), each
    with the CPUs and `gpus_per_node` GPUs (sbatch --gpus-per-node: the plugin's `gpu` is a
    job total, which SLURM may spread unevenly)."""
    nodes, model = params.train.nodes, params.cluster.gpu_model
    extra = " --ntasks-per-node=1"
    if gpus_per_node:
        extra += f" --gpus-per-node={model + ':' if model else ''}{gpus_per_node}"
    return {**resources, "nodes": nodes, "tasks": nodes, "mpi": "srun",
            "slurm_extra": resources["slurm_extra"] + extra}


def keep_running_on_usr1(workflow: Any) -> None:
    """Inside a cluster job, let Snakemake outlive SIGUSR1. SLURM's `--signal=USR1@margin`
    goes to every process of the job's step: the Snakemake that runs the rule and the step
    under it (`longctx train`, which saves a checkpoint and goes on). Python's default for
    SIGUSR1 is to die, and with Snakemake dead the job fails though training goes on. A
    handler, not SIG_IGN: the step Snakemake starts gets the default back on exec, then its
    own handler."""
    import signal

    if workflow.remote_exec:
        signal.signal(signal.SIGUSR1, lambda *_: None)
