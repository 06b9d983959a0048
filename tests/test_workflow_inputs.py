"""A rule's inputs are everything its step reads: the files its params name, and the code its
step runs (derived from the step's imports), so an edit reruns exactly the stages it reaches,
in Snakemake and in DVC alike; and a bad params file stops Snakemake in one line, before any
job, with the refusal `longctx validate` gives.

The tools run for real on a project whose outputs are stand-ins (no step runs): `snakemake
--touch` and `dvc commit` record them as up to date, then one input is edited.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from longctx import workflow
from longctx.config import load_params
from longctx.errors import LongctxError
from longctx.inputs import named_files

PROJECT_FILES = ["Snakefile", ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"]
PROJECT_DIRS = ["workflow", "src", "configs"]
INPUTS = {  # what the params below name, as a user keeps them next to the project
    "inputs/corpus/a.jsonl": '{"id": "a", "text": "alpha"}\n',
    "inputs/corpus/b.jsonl": '{"id": "b", "text": "bravo"}\n',
    "inputs/squad.json": '{"data": []}\n',
    "inputs/chats.jsonl": '{"messages": [{"role": "user", "content": "hi"}]}\n',
}


def tools(cwd: Path, *cmds: tuple[str, ...], check: bool = True) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each command, all run at once."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd in cmds]
    outputs = [proc.communicate(timeout=600) for proc in procs]  # (a full pipe waits its turn)
    results = [(proc.returncode, *output) for proc, output in zip(procs, outputs)]
    for cmd, (status, out, err) in zip(cmds, results):
        assert status == 0 or not check, f"{' '.join(cmd)}:\n{out[-3000:]}{err[-3000:]}"
    return results


def tool(cwd: Path, *cmd: str) -> str:
    """The output of one command, which must succeed."""
    [(_, out, err)] = tools(cwd, cmd)
    return out + err


def with_inputs(params: dict) -> dict:
    params["corpus"]["sources"] = [{"format": "jsonl", "paths": ["inputs/corpus/*.jsonl"]}]
    params["ruler"]["squad_path"] = "inputs/squad.json"
    params["pack"].update(short_source="file", short_path="inputs/chats.jsonl")
    params["train"]["accelerate_config"] = "configs/accelerate/single.yaml"
    return params


def stand_in_outputs(project: Path, stages: dict) -> None:
    """Every output of the DAG, in dependency order (so each is newer than its inputs)."""
    for name, stage in stages.items():
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = project / out
            directory = path.suffix == "" or out.startswith("models/") or out.endswith("plots")
            target = path / "stand-in" if directory else path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps({"stage": name}))


@pytest.fixture(scope="module")
def project(root, tmp_path_factory) -> Path:
    """A git checkout on the micro profile whose params name local files, every output
    present and recorded by both tools."""
    project = tmp_path_factory.mktemp("inputs") / "longctx"
    for name in PROJECT_FILES:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, project / name)
    for name in PROJECT_DIRS:
        shutil.copytree(root / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in INPUTS.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    params = with_inputs(yaml.safe_load((root / "configs/micro.yaml").read_text()))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tool(project, "longctx", "dvc-export")
    tool(project, "git", "init", "-q", "-b", "main")
    tool(project, "git", "add", "-A")
    tool(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "inputs")
    stand_in_outputs(project, yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    tool(project, "snakemake", "--touch", "--cores", "1", "--quiet", "all")
    tool(project, "dvc", "commit", "-f", "-q")
    return project


@pytest.fixture(scope="module")
def stages(project) -> dict:
    return yaml.safe_load((project / "dvc.yaml").read_text())["stages"]


def step_of(stage: dict) -> str:
    """`longctx --log FILE <step> ...`: the step a stage runs."""
    return stage["cmd"].split()[3]


def src_deps(stage: dict) -> list[str]:
    return [d for d in stage["deps"] if d.startswith("src/")]


# --------------------------------------------------------------------------- code inputs


def test_each_rules_code_is_the_import_closure_of_its_step(stages):
    for name, stage in stages.items():
        step = step_of(stage)
        assert src_deps(stage) == workflow.step_code(step), name
    assert "src/longctx/repro.py" in src_deps(stages["pack-0"])  # derive_seed's and writes
    assert "src/longctx/llm/base.py" in src_deps(stages["niah_samples_shard-1-of-1"])  # derive_seed
    lmeval = workflow.step_code("eval-lmeval")  # (the micro DAG runs no lm-eval)
    assert "src/longctx/eval/tasks/longctx_cloze.yaml" in lmeval  # read beside lmeval.py
    assert "src/longctx/eval/plots.py" not in src_deps(stages["pack-0"])
    assert not any(d.endswith(("/config.py", "/errors.py", "/cli.py"))
                   for stage in stages.values() for d in src_deps(stage))


# Run in a fresh interpreter (a pytest worker has imported longctx modules already): load the
# heavy libraries once, then fork a child per step that runs it to its first missing input
# and reports the longctx modules it loaded beyond the params check every step makes.
LOADED_BY_STEPS = """
import json, os, sys
import faiss, polars, sentence_transformers, torch, transformers
commands, out = json.loads(sys.argv[1]), sys.argv[2]
loaded = {}
for step, argv in commands.items():
    read, write = os.pipe()
    if os.fork() == 0:
        os.close(read)
        from longctx.cli import main
        from longctx.config import load_params
        load_params("params.yaml")
        checked = set(sys.modules)
        try:
            main(argv)
        except BaseException:
            pass
        new = sorted(m for m in set(sys.modules) - checked if m.split(".")[0] == "longctx")
        os.write(write, json.dumps(new).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        loaded[step] = json.loads(pipe.read())
    os.wait()
open(out, "w").write(json.dumps(loaded))
"""


def test_step_code_covers_every_module_a_step_loads(root, stages, tmp_path):
    """Each step run for real (to its first missing input) loads no longctx module outside
    its rule's code inputs."""
    params = yaml.safe_load((root / "configs/micro.yaml").read_text())
    params["base_model"]["source"] = "./no-such-model"  # base-model stops before converting
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    by_step = {step_of(stage): stage for stage in stages.values()}
    commands = {step: stage["cmd"].split()[1:] for step, stage in by_step.items()}
    subprocess.run([sys.executable, "-c", LOADED_BY_STEPS, json.dumps(commands), "loaded.json"],
                   cwd=tmp_path, check=True, timeout=600)
    for step, loaded in json.loads((tmp_path / "loaded.json").read_text()).items():
        files = {workflow._module_file(m).as_posix() for m in loaded}  # noqa: SLF001
        code = set(src_deps(by_step[step]))
        assert files, f"{step} loaded nothing: the check would hold for any code inputs"
        assert files <= code, f"{step} loads {sorted(files - code)}, not among its inputs"


def test_training_reads_the_sequences_format_not_how_pack_makes_samples(stages):
    """An edit to the long-sample fitter reruns pack alone; training depends on the file
    format between them (longctx.sequences), which pack imports too."""
    def readers(path):
        return {name.split("-")[0] for name, stage in stages.items() if path in stage["deps"]}

    assert readers("src/longctx/pack/long.py") == {"pack"}
    assert readers("src/longctx/sequences.py") >= {"pack", "train_stage"}
    assert not any(d.startswith("src/longctx/pack/") for d in stages["train_stage-0"]["deps"])


def test_step_code_follows_lazy_package_and_relative_imports(tmp_path, monkeypatch):
    package = tmp_path / "src" / "longctx"
    files = {
        "__init__.py": "",
        "cli.py": "def _helper():\n    from longctx.a import run\n\n"
                  "def cmd_go(args):\n    _helper()\n\ndef cmd_other(args):\n"
                  "    import longctx.c\n",
        "a/__init__.py": "def lazy():\n    from longctx import d\n",
        "a/run.py": "from . import sibling\n\ndef later():\n    from longctx.b import thing\n"
                    "from pathlib import Path\nDATA = Path(__file__).parent / 'data'\n",
        "a/sibling.py": "",
        "a/data/table.yaml": "x: 1\n",
        "b.py": "thing = 1\n",
        "c.py": "",
        "d.py": "",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert workflow.step_code("go") == [f"src/longctx/{n}" for n in (
        "__init__.py", "a/__init__.py", "a/data/table.yaml", "a/run.py", "a/sibling.py",
        "b.py")]  # not d.py: a/__init__ runs as a parent package, its function does not
    assert workflow.step_code("other") == ["src/longctx/__init__.py", "src/longctx/c.py"]
    with pytest.raises(LongctxError, match="no such step"):
        workflow.step_code("nothing")


# --------------------------------------------------------------------------- params files


def test_files_the_params_name_are_inputs_of_exactly_the_rules_that_read_them(project, stages,
                                                                              monkeypatch):
    monkeypatch.chdir(project)  # paths in params are relative to the project, as for the steps
    params = load_params("params.yaml")
    assert [p.as_posix() for p in named_files(params, "corpus")] == [
        "inputs/corpus/a.jsonl", "inputs/corpus/b.jsonl"]  # the glob, expanded
    readers = {"inputs/corpus/a.jsonl": {"corpus"},
               "inputs/squad.json": {"ruler_samples_shard-1-of-1", "ruler_samples"},
               "inputs/chats.jsonl": {"pack-0", "pack-1"},
               "configs/accelerate/single.yaml": {"train_stage-0", "train_stage-1"}}
    for path, expected in readers.items():
        assert {name for name, st in stages.items() if path in st["deps"]} == expected, path
    for name, stage in stages.items():
        named = {p.as_posix() for p in named_files(params, *stage.get("params", []))}
        assert named <= set(stage["deps"]), name


def test_a_local_model_directory_stands_for_its_files(tmp_path, monkeypatch):
    model = tmp_path / "my-model"
    for name in ("config.json", "model.safetensors", ".cache/huggingface/x.lock"):
        (model / name).parent.mkdir(parents=True, exist_ok=True)
        (model / name).write_text("{}")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("base_model:\n  source: ./my-model\n")
    params = load_params(tmp_path / "params.yaml")
    assert [p.as_posix() for p in named_files(params, "base_model")] == [
        "my-model/config.json", "my-model/model.safetensors"]


def stale(project: Path) -> tuple[Counter, set[str]]:
    """What each tool would run now: `snakemake -n`'s jobs by rule (`all` aside), and the
    stages `dvc status` reports changed."""
    [(_, *snakemake), (_, *dvc)] = tools(project, ("snakemake", "-n", "--cores", "1"),
                                         ("dvc", "status"))
    jobs: Counter = Counter()
    out = "".join(snakemake)
    if "Nothing to be done" not in out:
        table = out[out.index("Job stats:"):].split("total")[0]
        jobs.update({m[1]: int(m[2]) for m in re.finditer(r"(?m)^(\w+)\s+(\d+)$", table)})
        jobs.pop("all", None)
    return jobs, set(re.findall(r"(?m)^([\w-]+):$", "".join(dvc)))


def _downstream(stages: dict, first: set[str]) -> Counter:
    """`first` and every stage that reads what they write, counted by rule."""
    outputs = {name: set(st.get("outs", []) + st.get("metrics", []) + st.get("plots", []))
               for name, st in stages.items()}
    reached = set(first)
    for name, stage in stages.items():  # dvc.yaml is in dependency order
        if any(dep in outputs[up] for up in reached for dep in stage["deps"]):
            reached.add(name)
    return Counter(name.split("-")[0] for name in reached)


@pytest.mark.parametrize("edited", ["inputs/corpus/b.jsonl", "inputs/squad.json",
                                    "inputs/chats.jsonl", "src/longctx/repro.py",
                                    "src/longctx/eval/plots.py", "src/longctx/pack/long.py"])
def test_an_edited_input_makes_exactly_its_readers_stale_in_both_tools(project, stages, edited):
    assert stale(project) == (Counter(), set())
    path = project / edited
    before, stamp = path.read_text(), path.stat()
    readers = {name for name, stage in stages.items() if edited in stage["deps"]}
    assert readers
    try:
        path.write_text(before + "\n# edited\n" if edited.endswith(".py") else before + "\n")
        assert stale(project) == (_downstream(stages, readers), readers)
    finally:  # back as it was, content and time: the next edit starts from a clean state
        path.write_text(before)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


# --------------------------------------------------------------------------- bad params


BAD_PARAMS = {  # a fault as users make them (a change, or the whole text) -> what validate says
    "bad YAML": ("seed: 1\n  corpus: [\n", "params.yaml: not valid YAML (mapping values"),
    "not a mapping": ("- seed: 1\n", "params.yaml: expected a mapping of sections, got list"),
    "unknown top-level key": ({"bogus": 1}, "params.yaml: bogus: unknown key"),
    "unknown nested key": ({"embed": {"batchsize": 3}},
                           "params.yaml: embed.batchsize: unknown key"),
    "wrong type": ({"retrieve": {"top_k": "many"}}, "params.yaml: retrieve.top_k: "),
    "quoted number": ({"instructions": {"count": "8"}}, "params.yaml: instructions.count: "),
    "stages that do not grow": (
        {"stages": {"schedule": [{"length": 512, "steps": 1}, {"length": 512, "steps": 1}]}},
        "params.yaml: stages.schedule[1].length: "),
    "a RoPE base that falls": (
        {"stages": {"schedule": [{"length": 512, "steps": 1, "rope_theta": 1e6},
                                 {"length": 1024, "steps": 1, "rope_theta": 5e5}]}},
        "params.yaml: stages.schedule[1].rope_theta: "),
    "a missing corpus file": (
        {"corpus": {"sources": [{"format": "jsonl", "paths": ["inputs/none.jsonl"]}]}},
        "inputs/none.jsonl: file not found (corpus.sources[0].paths)"),
}


@pytest.mark.parametrize("fault", list(BAD_PARAMS))
def test_bad_params_stop_snakemake_in_one_line_as_longctx_validate_does(project, fault):
    change, says = BAD_PARAMS[fault]
    good = (project / "params.yaml").read_text()
    params = yaml.safe_load(good)
    for section, value in ({} if isinstance(change, str) else change).items():
        params[section] = {**params[section], **value} if isinstance(value, dict) else value
    bad = change if isinstance(change, str) else yaml.safe_dump(params, sort_keys=False)
    try:
        (project / "params.yaml").write_text(bad)
        validate, snakemake = tools(project, ("longctx", "validate"),
                                    ("snakemake", "-n", "--cores", "1"), check=False)
    finally:
        (project / "params.yaml").write_text(good)
    [refusal] = validate[2].strip().splitlines()
    assert validate[0] == 1 and says in refusal, refusal
    lines = (snakemake[1] + snakemake[2]).strip().splitlines()
    assert snakemake[0] == 1 and len(lines) <= 3, lines
    assert refusal.split("error: ", 1)[1] in lines[-1]
