"""The Snakemake DAG is the one hand-written DAG; dvc.yaml must mirror it exactly."""

import io
import logging
import re
import subprocess
import sys

import pytest
import yaml

from longctx.cli import main
from longctx.config import CLUSTER_RULES
from longctx.dvc_export import export_dvc_yaml
from longctx.errors import LongctxError
from longctx.logs import AboveProgressBars
from longctx.steps import STEPS
from longctx.workflow import check_no_overrides, job_resources, job_threads, step_command


@pytest.fixture(scope="module")
def exported(root):
    return export_dvc_yaml(root / "Snakefile", root / "params.yaml")


def test_dvc_yaml_is_in_sync_with_the_snakemake_dag(root, exported):
    committed = (root / "dvc.yaml").read_text()
    assert committed == exported, "dvc.yaml is stale: run `longctx dvc-export` and commit it"


def test_every_stage_runs_its_own_longctx_step(exported):
    stages = yaml.safe_load(exported)["stages"]
    order = list(stages)  # a dependency order
    assert sorted(order) == sorted(["base_model", "corpus", "embed", "index", "instructions",
                                    "retrieve", "summarize", "respond", "long_output",
                                    "pack-0", "pack-1", "train_stage-0", "train_stage-1",
                                    "niah_samples", "ruler_samples", "report",
                                    "embed_shard-1-of-1", "instructions_shard-1-of-1",
                                    "summarize_shard-1-of-1",
                                    "respond_shard-1-of-1", "long_output_shard-1-of-1",
                                    "niah_samples_shard-1-of-1", "ruler_samples_shard-1-of-1"]
                                   + [f"eval_{kind}-{model}" for kind in ("niah", "ruler", "lmeval")
                                      for model in ("base", "stage-0", "stage-1")])
    for first, then in [("base_model", "corpus"), ("corpus", "embed_shard-1-of-1"),
                        ("embed_shard-1-of-1", "embed"), ("embed", "index"),
                        ("index", "retrieve"), ("instructions", "retrieve"),
                        ("corpus", "instructions_shard-1-of-1"),
                        ("instructions_shard-1-of-1", "instructions"),
                        ("retrieve", "summarize_shard-1-of-1"),
                        ("summarize_shard-1-of-1", "summarize"),
                        ("summarize", "respond_shard-1-of-1"),
                        ("respond_shard-1-of-1", "respond"),
                        ("respond", "pack-0"), ("pack-0", "train_stage-0"),
                        ("train_stage-0", "train_stage-1"), ("pack-1", "train_stage-1"),
                        ("niah_samples_shard-1-of-1", "niah_samples"),
                        ("ruler_samples_shard-1-of-1", "ruler_samples"),
                        ("niah_samples", "eval_niah-base"), ("train_stage-1", "eval_ruler-stage-1"),
                        ("eval_lmeval-stage-1", "report"), ("train_stage-1", "report")]:
        assert order.index(first) < order.index(then)
    commands = {step.rule: step.command for step in STEPS.values()}
    for name, stage in stages.items():
        rule = name.split("-")[0]  # one stage per job: the rule name, then its wildcards
        step = commands[rule]
        logs = rule.removesuffix("_shard")  # a shard's log: logs/<step>/<N-of-M>.log
        assert re.match(rf"longctx --log logs/{logs}(/\S+)?\.log {step} ", stage["cmd"]), name
        assert any(dep.startswith("src/longctx/") for dep in stage["deps"]), name
    assert stages["index"]["params"] == ["index", "seed"]
    assert stages["embed"]["params"] == ["embed"]
    assert "data/corpus/docs.parquet" in stages["embed_shard-1-of-1"]["deps"]
    assert stages["corpus"]["metrics"] == ["data/corpus/stats.json"]
    assert stages["summarize"]["params"] == ["llm", "seed", "summarize"]
    assert "src/longctx/llm/hf.py" in stages["summarize"]["deps"]  # a package's modules
    assert stages["respond"]["metrics"] == ["data/synth/responses.json"]
    assert stages["train_stage-1"]["params"] == ["seed", "stages", "train"]
    assert "models/stage-0" in stages["train_stage-1"]["deps"]  # from the previous weights
    assert stages["train_stage-1"]["plots"] == ["results/train/stage-1/plots"]
    assert stages["ruler_samples"]["params"] == ["ruler", "seed"]
    assert stages["eval_ruler-stage-0"]["params"] == ["eval"]
    assert "models/stage-0" in stages["eval_ruler-stage-0"]["deps"]
    assert stages["report"]["metrics"] == ["results/eval/metrics.json"]
    assert stages["report"]["plots"] == ["results/plots"]


def test_dvc_plots_draw_ruler_against_length_one_line_per_model(exported):
    [curve] = yaml.safe_load(exported)["plots"]
    spec = curve["results/eval/ruler_curve.tsv"]
    assert spec["x"] == "length"
    assert spec["y"] == {"results/eval/ruler_curve.tsv": ["base", "stage-0", "stage-1"]}


def test_snakemake_refuses_config_overrides():
    with pytest.raises(LongctxError, match="differs from .*params.yaml"):
        check_no_overrides({"seed": 1}, "params.yaml")


def test_profile_switch_rewrites_params_and_dvc_yaml(root, tmp_path, monkeypatch):
    import shutil

    for name in ("Snakefile", "params.yaml", "dvc.yaml"):
        shutil.copy(root / name, tmp_path / name)
    for name in ("workflow", "configs", "src"):
        shutil.copytree(root / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "micro"]) == 0
    assert (tmp_path / "params.yaml").read_text() == (root / "configs" / "micro.yaml").read_text()
    assert (tmp_path / "dvc.yaml").read_text() == export_dvc_yaml(
        tmp_path / "Snakefile", tmp_path / "params.yaml")
    assert main(["profile", "no-such-profile"]) == 1
    assert (tmp_path / "params.yaml").read_text() == (root / "configs" / "micro.yaml").read_text()


def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("embed:\n  batchsize: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "longctx.cli", "--params", str(bad), "validate"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"longctx validate: error: {bad}: embed.batchsize: unknown key"
    ]


def test_log_lines_go_above_a_progress_bar_not_into_it():
    """On a terminal the training bar and the step lines share stderr: each line is printed
    on a line of its own (the bar cleared first) and the bar drawn again below it."""
    from tqdm import tqdm

    stream = io.StringIO()
    handler = AboveProgressBars(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("longctx", logging.INFO, __file__, 1, "step 1: loss 2.5", (), None)
    with tqdm(total=3, desc="train stage 0", file=stream, disable=False) as bar:
        bar.update(1)
        handler.emit(record)
        drawn = stream.getvalue()  # before the bar closes
    line = next(x for x in drawn.split("\n") if "loss 2.5" in x)
    assert line.rsplit("\r", 1)[-1] == "step 1: loss 2.5"  # not after the bar's text
    assert "train stage 0:  33%" in drawn[drawn.index("loss 2.5"):]  # the bar again


def test_a_rules_command_passes_each_path_under_its_own_name():
    """The step table names each path once: flag, rule input/output and step keyword."""
    assert step_command("index") == ("longctx --log {log} index --embeddings {input.embeddings} "
                                     "--index {output.index}")
    pack = step_command("pack", stage="{wildcards.k}").split()
    assert pack[pack.index("--long-output") + 1] == "{input.long_output}"
    assert pack[pack.index("--sequences") + 1] == "{output.sequences}"
    assert "--ruler" not in step_command("eval-lmeval", name="x", omit=("ruler",))
    with pytest.raises(LongctxError, match="gives no --stage"):
        step_command("pack")
    with pytest.raises(LongctxError, match="no argument bogus"):
        step_command("index", bogus="1")


def test_every_step_parses_the_arguments_its_table_names(tmp_path):
    """What a rule's command passes, `longctx <step>` parses back under the same names."""
    from longctx.cli import build_parser

    for command, step in STEPS.items():
        values = {a.name: "2-of-3" if a.name == "shard" else "7"
                  for a in step.args if a.role == "option"}
        words = step_command(command, **values)
        argv = [w.replace("{log}", "x.log").replace("{", "").replace("}", "")
                for w in words.split()[1:]]
        args = build_parser().parse_args(argv)
        for arg in step.args:
            value = getattr(args, arg.name)
            assert value not in (None, []), (command, arg.name)


def test_a_step_writes_its_log_lines_and_its_error_to_the_log_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("embed:\n  batchsize: 3\n")
    log = tmp_path / "logs" / "validate.log"  # its directory made, as under `dvc repro`
    log.parent.mkdir()
    log.write_text("an earlier run's lines\n")
    proc = subprocess.run(
        [sys.executable, "-m", "longctx.cli", "--log", str(log), "--params", str(bad),
         "validate"], capture_output=True, text=True,
    )
    assert proc.returncode == 1
    error = f"longctx validate: error: {bad}: embed.batchsize: unknown key"
    assert proc.stderr.strip().splitlines() == [error]  # once on screen
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"longctx: {error}"), lines


def test_the_cluster_section_names_exactly_the_rules_of_the_dag(root):
    """cluster.rules keys are checked against CLUSTER_RULES: a rule missing there could not be
    sized, a name left there after a rename would be accepted and size nothing."""
    text = "".join(path.read_text() for path in sorted((root / "workflow" / "rules").glob("*.smk")))
    defined = set(re.findall(r"^rule (\w+):", text, re.M))
    assert defined == set(CLUSTER_RULES)


def test_a_rules_cluster_job_asks_for_the_gpus_its_step_runs_on():
    on_gpu = {"llm": {"backend": "hf", "device": "cuda"}, "embed": {"device": "cuda"},
              "train": {"device": "cuda", "processes": 4, "global_batch": 4},
              "cluster": {"gpu_model": "h100", "signal_margin_s": 120,
                          "rules": {"summarize": {"mem_mb": 2000, "partition": "short"}}}}
    shard = job_resources(on_gpu, "summarize_shard")
    assert shard == {"cpus_per_task": 4, "mem_mb": 16000, "runtime": 240,
                     "slurm_partition": "gpu", "gpu": 1, "gpu_model": "h100"}
    gather = job_resources(on_gpu, "summarize")  # reads the shards' parts: a CPU job
    assert gather == {"cpus_per_task": 4, "mem_mb": 2000, "runtime": 240,
                      "slurm_partition": "short"}
    train = job_resources(on_gpu, "train_stage")
    assert train["gpu"] == 4 and train["slurm_extra"] == "--signal=USR1@120"
    machines = {**on_gpu, "train": {"device": "cuda", "processes": 16, "nodes": 2,
                                    "global_batch": 16}}
    assert job_resources(machines, "train_stage") == {  # srun inside: one task per node
        "cpus_per_task": 4, "mem_mb": 16000, "runtime": 240, "slurm_partition": "gpu",
        "nodes": 2, "tasks": 2, "mpi": "srun",
        "slurm_extra": "--signal=USR1@120 --ntasks-per-node=1 --gpus-per-node=h100:8"}
    assert job_resources(on_gpu, "embed_shard")["gpu"] == 1
    assert "gpu" not in job_resources(on_gpu, "embed")  # the gather only concatenates
    assert job_resources(on_gpu, "instructions")["gpu"] == 1  # its gather runs later rounds
    assert "gpu" not in job_resources(on_gpu, "retrieve")  # its device is still auto
    served = {"llm": {"backend": "openai", "base_url": "http://localhost:8000/v1"}}
    assert "gpu" not in job_resources(served, "respond_shard")  # the server holds the GPU
    assert job_resources({"cluster": {"rules": {"respond_shard": {"gpus": 2}}}},
                         "respond_shard")["gpu"] == 2
    # evaluation: on its own device (hf), its engine's tensor parallel GPUs (vllm), none when
    # servers answer (openai)
    assert job_resources({"eval": {"device": "cuda"}}, "eval_ruler")["gpu"] == 1
    assert "gpu" not in job_resources({"eval": {"device": "cpu"}}, "eval_niah")
    vllm = {"eval": {"backend": "vllm", "tensor_parallel_size": 4}}
    assert job_resources(vllm, "eval_lmeval")["gpu"] == 4
    evaluated = {"eval": {"backend": "openai", "base_url": "http://localhost:8000/v1",
                          "device": "cuda"}}
    assert "gpu" not in job_resources(evaluated, "eval_niah")


def test_a_rules_threads_are_its_cluster_cpus_on_a_cluster_and_cores_locally():
    """Read while the Snakefile is parsed: under a cluster executor there is no --cores."""
    from types import SimpleNamespace

    def workflow(cores, remote=False):
        return SimpleNamespace(resource_settings=SimpleNamespace(cores=cores), remote_exec=remote)

    config = {"cluster": {"cpus": 3, "rules": {"respond_shard": {"cpus": 6}}}}
    assert job_threads(workflow(8), config, "respond_shard") == 8  # an LLM step: every core
    assert job_threads(workflow(8), config, "respond", local=1) == 1  # its gather
    assert job_threads(workflow(None), config, "respond_shard") == 6
    assert job_threads(workflow(None), config, "respond", local=1) == 3
    assert job_threads(workflow(2, remote=True), config, "respond_shard") == 6  # in the job
