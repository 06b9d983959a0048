"""The DAG on a real SLURM cluster: slurmctld and slurmd on this machine (.ci/slurm-cluster.sh,
which CI's .ci/run starts first), driven by snakemake-executor-plugin-slurm through
workflow/profiles/slurm, on the micro profile.

The data and synthesis half runs twice from scratch in two fresh copies of the project, once
as SLURM jobs and once by `snakemake --cores 1`, at once; the artifacts must be byte-identical,
and slurmctld's job-completion log must hold exactly one completed job per job of the DAG,
counted from Snakemake's own dry run (so rules that scatter into shard jobs are counted as
they expand). One thread per job in both (`cluster.cpus: 1`; Snakemake sets OMP_NUM_THREADS
from a job's threads) keeps their floating point identical. As in test_e2e, the two runs
share one LLM call cache: a call is made by whichever run reaches it first, so this checks the
wiring, not generation (the llm tests check that).
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.repro import sha256_file

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None,
                       reason="no sbatch: SLURM is not installed (start a one-node cluster "
                       "with .ci/slurm-cluster.sh)"),
]

PROJECT_FILES = ["Snakefile", "params.yaml", "dvc.yaml", "pyproject.toml"]
PROJECT_DIRS = ["workflow", "src", "configs"]
# the data and synthesis half: every rule from base_model to respond and long_output
TARGETS = ["data/synth/responses.parquet", "data/synth/long_output.parquet"]
ARTIFACTS = ["models", "data"]
ON_CLUSTER = """
shards:                    # test_slurm: the sharded steps as two shard jobs and a gather
  default: 2
  long_output: 1           # the micro corpus has one long-output candidate document
cluster:                   # test_slurm: one CPU per job, as `snakemake --cores 1`
  cpus: 1
  mem_mb: 4000
  runtime_min: 30
"""
PROFILE = ["--workflow-profile", "workflow/profiles/slurm", "--slurm-no-account",
           "--slurm-keep-successful-logs", "--slurm-status-command", "squeue",
           "--slurm-init-seconds-before-status-checks", "2", "--latency-wait", "5"]


def environment() -> dict[str, str]:
    """This interpreter's bin first (sbatch exports it to the jobs) and one thread."""
    return dict(os.environ, OMP_NUM_THREADS="1",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def start(cwd: Path, *cmd: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output = proc.communicate()[0]
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{output[-4000:]}"
    return output


def job_log() -> Path:
    """slurmctld's job-completion log (JobCompType=jobcomp/filetxt): one line per job."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    if config.returncode != 0:
        pytest.fail(f"no SLURM cluster answers (start it: .ci/slurm-cluster.sh): "
                    f"{config.stderr.strip()}")
    found = dict(re.findall(r"^(JobComp\w+)\s*=\s*(\S+)", config.stdout, re.M))
    if found.get("JobCompType") != "jobcomp/filetxt":
        pytest.fail(f"the cluster keeps no job-completion file (JobCompType "
                    f"{found.get('JobCompType')}): start the test cluster, .ci/slurm-cluster.sh")
    return Path(found["JobCompLoc"])


def project(root: Path, where: Path) -> Path:
    """A fresh copy of the project on the micro profile, its jobs one CPU each."""
    where.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy(root / name, where / name)
    for name in PROJECT_DIRS:
        shutil.copytree(root / name, where / name, ignore=shutil.ignore_patterns("__pycache__"))
    finish(start(where, "longctx", "profile", "micro"))
    with (where / "params.yaml").open("a", encoding="utf-8") as params:
        params.write(ON_CLUSTER)
    return where


def planned_jobs(where: Path) -> collections.Counter:
    """Jobs per rule in Snakemake's dry run of TARGETS (its "Job stats" table)."""
    output = finish(start(where, "snakemake", *PROFILE, "-n", *TARGETS))
    table = output.split("Job stats:", 1)[1].split("total", 1)[0]
    return collections.Counter({rule: int(n) for rule, n in
                                re.findall(r"^(\w+)\s+(\d+)\s*$", table, re.M)})


def completed_jobs(log: Path, where: Path) -> dict[str, str]:
    """{SLURM job id: state} of every job the job-completion log has from `where`."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    fields = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]
    return {f["JobId"]: f["JobState"] for f in fields if f.get("WorkDir") == str(where)}


def submitted_jobs(where: Path) -> dict[str, str]:
    """{SLURM job id: rule} from the plugin's logs (.snakemake/slurm_logs/rule_R/.../ID.log)."""
    logs = where / ".snakemake" / "slurm_logs"
    return {path.stem: path.relative_to(logs).parts[0].removeprefix("rule_")
            for path in logs.rglob("*.log")}


def artifact_hashes(where: Path) -> dict[str, str]:
    return {str(path.relative_to(where)): sha256_file(path)
            for top in ARTIFACTS for path in sorted((where / top).rglob("*"))
            if path.is_file() and path.name != ".snakemake_timestamp"}


@pytest.fixture(scope="module")
def runs(root, tmp_path_factory) -> tuple[Path, Path, collections.Counter]:
    """(the cluster's checkout, the local one, the jobs the DAG plans), both runs done."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("snakemake-executor-plugin-slurm is not installed: pip install -e '.[dev]'")
    base = tmp_path_factory.mktemp("slurm")
    on_cluster, local = project(root, base / "cluster"), project(root, base / "local")
    calls = base / "llm-calls"
    calls.mkdir()
    for where in (on_cluster, local):
        (where / "cache").mkdir()
        (where / "cache" / "llm").symlink_to(calls, target_is_directory=True)
    plan = planned_jobs(on_cluster)
    procs = [start(on_cluster, "snakemake", *PROFILE, *TARGETS),
             start(local, "snakemake", "--cores", "1", *TARGETS)]
    try:
        for proc in procs:
            finish(proc)
    finally:  # one failed: stop the other (its SLURM jobs are cancelled by the plugin)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    return on_cluster, local, plan


def test_the_plan_holds_the_data_and_synthesis_half(runs):
    _, _, plan = runs
    for rule in ("base_model", "corpus", "embed", "index", "instructions", "retrieve",
                 "summarize", "respond", "long_output"):
        assert plan[rule] >= 1, plan


def test_the_cluster_ran_one_job_per_job_of_the_dag(runs):
    on_cluster, _, plan = runs
    completed = completed_jobs(job_log(), on_cluster)
    submitted = submitted_jobs(on_cluster)
    assert set(completed) == set(submitted), (completed, submitted)
    assert set(completed.values()) == {"COMPLETED"}, completed
    assert collections.Counter(submitted.values()) == plan


def test_cluster_and_local_runs_give_identical_artifacts(runs):
    on_cluster, local, _ = runs
    by_cluster, by_local = artifact_hashes(on_cluster), artifact_hashes(local)
    assert "data/synth/responses.parquet" in by_cluster
    assert "models/base/model.safetensors" in by_cluster
    assert by_cluster == by_local


def test_nothing_is_left_to_do_after_the_cluster_run(runs):
    on_cluster, _, _ = runs
    output = finish(start(on_cluster, "snakemake", "--cores", "1", "-n", *TARGETS))
    assert "Nothing to be done" in output, output
