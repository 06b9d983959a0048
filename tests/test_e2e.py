"""The whole DAG (data, synthesis, training and evaluation), for real, on the micro profile with
the bundled models.

Two runs from scratch in two fresh checkouts, one by Snakemake and one by DVC, must produce
byte-identical artifacts, from the converted base model to training, scores and plots; each
tool must then see the other's work as up to date, and a `dvc exp run -S index...` must rerun
only what the change reaches. The two runs go at once, one thread per job, and share one LLM
call cache (what keeps CI within its time on 2 cores): a synthesis or evaluation call is made
by whichever run reaches it first (generation itself is checked against the cache in the llm
tests); everything else is computed by both. The same thread count in both keeps their
floating point identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from longctx.repro import sha256_file

pytestmark = pytest.mark.e2e

PROJECT_FILES = ["Snakefile", "params.yaml", "dvc.yaml", "pyproject.toml", ".gitignore",
                 ".dvcignore", ".dvc/config", ".dvc/.gitignore"]
PROJECT_DIRS = ["workflow", "src", "configs"]
ARTIFACTS = ["models", "data", "results/eval", "results/plots"]  # not the training logs' timings
MODELS = ["base", "stage-0", "stage-1"]


def start(cwd: Path, *cmd: str) -> subprocess.Popen:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """The command's output (stdout, then stderr); it must have succeeded."""
    output = "".join(proc.communicate())
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{output[-4000:]}"
    return output


def run(cwd: Path, *cmd: str) -> str:
    return finish(start(cwd, *cmd))


def artifact_hashes(project: Path) -> dict[str, str]:
    return {
        str(path.relative_to(project)): sha256_file(path)
        for top in ARTIFACTS
        for path in sorted((project / top).rglob("*"))
        if path.is_file() and path.name != ".snakemake_timestamp"  # Snakemake's own marker
    }


@pytest.fixture(scope="module")
def origin(root, tmp_path_factory) -> Path:
    """A git repository holding the project on the micro profile, as a user would clone it."""
    repo = tmp_path_factory.mktemp("origin")
    for name in PROJECT_FILES:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, repo / name)
    for name in PROJECT_DIRS:
        shutil.copytree(root / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "longctx", "profile", "micro")
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "micro")
    return repo


def clone(origin: Path, tmp_path_factory, name: str) -> Path:
    target = tmp_path_factory.mktemp(name) / "longctx"
    run(target.parent, "git", "clone", "-q", str(origin), str(target))
    return target


@pytest.fixture(scope="module")
def both_runs(origin, tmp_path_factory) -> tuple[Path, Path, str]:
    """(Snakemake's checkout, DVC's checkout, DVC's output), both DAGs run at once."""
    by_snakemake = clone(origin, tmp_path_factory, "snakemake")
    by_dvc = clone(origin, tmp_path_factory, "dvc")
    calls = tmp_path_factory.mktemp("llm-calls")
    for project in (by_snakemake, by_dvc):
        (project / "cache").mkdir()
        (project / "cache" / "llm").symlink_to(calls, target_is_directory=True)
    runs = [start(by_snakemake, "snakemake", "--cores", "1"), start(by_dvc, "dvc", "repro")]
    try:
        outputs = [finish(proc) for proc in runs]
    finally:  # one failed: stop the other
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
    return by_snakemake, by_dvc, outputs[1]


@pytest.fixture(scope="module")
def by_snakemake(both_runs) -> Path:
    return both_runs[0]


@pytest.fixture(scope="module")
def by_dvc(both_runs) -> tuple[Path, str]:
    return both_runs[1], both_runs[2]


STAGES = ["base_model", "corpus", "embed", "index", "instructions", "retrieve", "summarize",
          "embed_shard-1-of-1", "instructions_shard-1-of-1", "summarize_shard-1-of-1",
          "respond_shard-1-of-1",
          "long_output_shard-1-of-1",
          "respond", "long_output", "pack-0", "pack-1", "train_stage-0", "train_stage-1",
          "niah_samples_shard-1-of-1", "niah_samples", "ruler_samples_shard-1-of-1",
          "ruler_samples", "report"] + [
          f"eval_{kind}-{model}" for kind in ("niah", "ruler") for model in MODELS]  # no lm-eval
EDGES = [("base_model", "corpus"), ("corpus", "embed_shard-1-of-1"),
         ("embed_shard-1-of-1", "embed"), ("embed", "index"),
         ("corpus", "instructions_shard-1-of-1"), ("instructions_shard-1-of-1", "instructions"),
         ("instructions", "retrieve"), ("index", "retrieve"),
         ("retrieve", "summarize_shard-1-of-1"), ("summarize_shard-1-of-1", "summarize"),
         ("summarize", "respond"), ("corpus", "long_output_shard-1-of-1"),
         ("long_output_shard-1-of-1", "long_output"),
         ("respond", "pack-0"), ("long_output", "pack-1"), ("pack-0", "train_stage-0"),
         ("train_stage-0", "train_stage-1"), ("pack-1", "train_stage-1"),
         ("niah_samples_shard-1-of-1", "niah_samples"), ("niah_samples", "eval_niah-base"),
         ("ruler_samples_shard-1-of-1", "ruler_samples"), ("ruler_samples", "eval_ruler-stage-0"),
         ("train_stage-0", "eval_niah-stage-0"), ("train_stage-1", "eval_ruler-stage-1"),
         ("eval_ruler-stage-1", "report"), ("eval_niah-base", "report")]


def test_snakemake_builds_the_whole_dag(by_snakemake):
    base = by_snakemake / "models" / "base"
    assert (base / "model.safetensors").is_file() and (base / "chat_template.jinja").is_file()
    assert (by_snakemake / "data" / "index" / "docs.faiss").is_file()
    for table in ("instructions", "retrieved", "summaries", "responses", "long_output"):
        assert (by_snakemake / "data" / "synth" / f"{table}.parquet").is_file()
    assert "Nothing to be done" in run(by_snakemake, "snakemake", "--cores", "2", "-n")


def test_each_stage_carries_its_scheduled_rope_base_and_a_loss_curve(by_snakemake):
    """micro: base_length 256 at the model's 1e5, stages 512 and 1024 -> x4 per doubling."""
    for k, (length, theta) in enumerate([(512, 4e5), (1024, 1.6e6)]):
        config = json.loads((by_snakemake / f"models/stage-{k}/config.json").read_text())
        assert config["max_position_embeddings"] == length
        assert config["rope_parameters"]["rope_theta"] == pytest.approx(theta)
        loss = by_snakemake / f"results/train/stage-{k}/plots/metrics/train/loss.tsv"
        assert loss.read_text().splitlines()[0] == "step\tloss"
    shown = run(by_snakemake, "longctx", "pack-show", "data/pack/stage-0/sequences.parquet",
                "--sequence", "0", "--color", "never", "--max-tokens", "64")
    assert "sample 1/" in shown and "[[" in shown, shown
    metrics = run(by_snakemake, "dvc", "metrics", "show")
    assert "results/train/stage-1/metrics.json" in metrics and "rope_theta" in metrics


def test_long_samples_reach_training_and_learn_all_but_their_first_token(by_dvc):
    """The DAG's own long samples (instruction + raw documents -> response) are packed into
    every stage and learn every token but the first; training learns exactly the tokens the
    pack flags in the sequences it reads (micro: one per step)."""
    import pyarrow.parquet as pq

    project, _ = by_dvc
    for k in range(2):
        rows = pq.read_table(project / f"data/pack/stage-{k}/sequences.parquet").to_pylist()
        longs = [r for r in rows if r["kind"] == "long"]
        assert longs, f"stage {k}: no long sequences"
        assert all(not r["learn"][0] and all(r["learn"][1:]) for r in longs)
        trained = json.loads((project / f"results/train/stage-{k}/metrics.json").read_text())
        read = rows[:trained["stage"]["steps"]]
        assert trained["stage"]["learnt_tokens"] == sum(sum(r["learn"]) for r in read)


def test_show_prints_an_instructions_whole_story(by_snakemake):
    import pyarrow.parquet as pq

    first = pq.read_table(by_snakemake / "data/synth/instructions.parquet").column("id")[0]
    printed = run(by_snakemake, "longctx", "show", first.as_py()[:8])
    for heading in ("Instruction", "Inspired by", "Retrieved documents (2)", "Summaries",
                    "Response"):
        assert heading in printed, printed


def test_search_finds_the_albania_article_first(by_snakemake):
    printed = run(by_snakemake, "longctx", "search", "history of Albania", "-k", "3")
    first = next(line for line in printed.splitlines() if line.strip())
    assert "Albania" in first, printed


def test_dvc_runs_each_stage_once_in_order(by_dvc):
    _, output = by_dvc
    ran = re.findall(r"Running stage '([\w-]+)'", output)
    assert sorted(ran) == sorted(STAGES), output
    assert all(ran.index(a) < ran.index(b) for a, b in EDGES), ran


def test_two_runs_from_scratch_give_identical_artifacts(by_snakemake, by_dvc):
    project, _ = by_dvc
    first, second = artifact_hashes(by_snakemake), artifact_hashes(project)
    assert "data/corpus/docs.parquet" in first and "models/base/model.safetensors" in first
    assert first == second


def test_after_dvc_repro_snakemake_and_dvc_have_nothing_to_do(by_dvc):
    project, _ = by_dvc
    assert "Nothing to be done" in run(project, "snakemake", "--cores", "2", "-n")
    assert "up to date" in run(project, "dvc", "status")


def test_after_snakemake_dvc_commit_makes_dvc_clean(by_snakemake):
    run(by_snakemake, "dvc", "commit", "-f")
    assert "up to date" in run(by_snakemake, "dvc", "status")
    assert "Nothing to be done" in run(by_snakemake, "snakemake", "--cores", "2", "-n")


def test_exp_run_reruns_only_what_the_change_reaches(by_dvc):
    """recall_sample changes the index manifest, so retrieve and pack (which searches it to
    fill samples) rerun; their tables are the same (flat search is exact), so neither
    summarize nor training runs again."""
    project, _ = by_dvc
    run(project, "git", "add", "dvc.lock")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "lock")
    output = run(project, "dvc", "exp", "run", "-S", "index.recall_sample=10")
    assert sorted(re.findall(r"Running stage '([\w-]+)'", output)) == [
        "index", "pack-0", "pack-1", "retrieve"], output


def test_base_model_is_a_working_chat_model(by_snakemake):
    """The bundled GGUF, dequantized and saved, still answers through its chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = by_snakemake / "models" / "base"
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.config.max_position_embeddings == 8192
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_every_model_is_scored_reported_and_plotted(by_snakemake):
    """micro: NIAH 256/512 x depths 0/100 and two RULER tasks at 512 (lm-eval is off), for
    the base model and both stages; dvc shows every score and renders every plot."""
    metrics = json.loads((by_snakemake / "results/eval/metrics.json").read_text())
    assert list(metrics) == MODELS
    expected = {"niah", "niah@256", "niah@512", "ruler@512", "ruler/niah_single_1@512",
                "ruler/vt@512"}
    for scores in metrics.values():
        assert expected <= set(scores), scores
        assert all(0 <= v <= 100 for v in scores.values())
    shown = json.loads(run(by_snakemake, "dvc", "metrics", "show", "--json"))
    [workspace] = shown.values()  # one revision: the workspace
    workspace = workspace["data"]["results/eval/metrics.json"]["data"]
    assert workspace == metrics
    run(by_snakemake, "dvc", "plots", "show", "-o", "dvc_plots")
    static = {p.name for p in (by_snakemake / "dvc_plots" / "static").iterdir()}
    assert {f"workspace_results_plots_niah-{m}.png" for m in MODELS} <= static
    page = (by_snakemake / "dvc_plots" / "index.html").read_text()
    assert "ruler_curve" in page and "results/train/stage-1/plots" in page
    report = (by_snakemake / "results/report.html").read_text()
    assert all(m in report for m in MODELS) and report.count("data:image/png;base64") == 5
