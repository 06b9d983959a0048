"""The sharded steps for real, on the micro profile: embed, instructions, summarize, respond
and long_output as 3 shard jobs each write the bytes that 1 shard job writes, with the bundled
models and a cold call cache, and Snakemake and the exported dvc.yaml see one job per shard.

One project runs the DAG up to the corpus; a copy of it (upstream artifacts and Snakemake's
records included, so nothing upstream reruns) switches to 3 shards; then both run the sharded
steps at once, one thread per job (the same floating point in both).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from test_e2e import PROJECT_DIRS, PROJECT_FILES, finish, run, start

from longctx.repro import sha256_file

pytestmark = pytest.mark.e2e

SHARDED = ["embed", "instructions", "summarize", "respond", "long_output"]
TABLES = {"instructions": "instructions", "summarize": "summaries", "respond": "responses",
          "long_output": "long_output"}
TARGETS = ["data/index"] + [f"data/synth/{table}.parquet" for table in TABLES.values()]


def artifacts(project: Path) -> dict[str, str]:
    """Every file the sharded steps and the steps between them write, by its hash."""
    paths = [p for p in (project / "data/embeddings").rglob("*") if p.is_file()]
    paths += [project / f"data/synth/{table}{suffix}" for table in ["retrieved", *TABLES.values()]
              for suffix in (".parquet", ".json")]
    return {str(p.relative_to(project)): sha256_file(p) for p in paths}


def edit_params(project: Path, **sections: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def projects(root, tmp_path_factory) -> tuple[Path, Path, str]:
    """(1-shard project, 3-shard project, the 3-shard run's output)."""
    one = tmp_path_factory.mktemp("shards") / "one"
    one.mkdir()
    for name in PROJECT_FILES:
        (one / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / name, one / name)
    for name in PROJECT_DIRS:
        shutil.copytree(root / name, one / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(one, "longctx", "profile", "micro")
    # micro writes 2 instructions (2 first-round prompts) and 1 long-output target: 3 shards
    # need 3 instructions (3 prompts of 2) and 3 targets
    edit_params(one, instructions={"count": 3}, long_output={"count": 3})
    run(one, "snakemake", "--cores", "1", "data/corpus/docs.parquet")
    three = one.parent / "three"
    shutil.copytree(one, three, symlinks=True)  # copy2: mtimes kept, upstream stays done
    shutil.rmtree(three / "cache", ignore_errors=True)  # cold: every call made anew
    edit_params(three, shards={"default": 3})
    runs = [start(p, "snakemake", "--cores", "1", *TARGETS) for p in (one, three)]
    try:
        outputs = [finish(proc) for proc in runs]
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
    return one, three, outputs[1]


def test_three_shards_write_the_bytes_of_one(projects):
    one, three, _ = projects
    written = artifacts(one)
    assert len([name for name in written if name.startswith("data/embeddings/")]) > 3
    assert artifacts(three) == written
    assert sorted(p.name for p in (three / "data/synth/parts/respond").iterdir()) == \
        ["1-of-3.parquet", "2-of-3.parquet", "3-of-3.parquet"]


def test_one_job_per_shard_and_nothing_upstream_reruns(projects):
    _, three, output = projects
    for step in SHARDED:
        assert output.count(f"(Rule: {step}_shard)") == 3, step
        assert output.count(f"(Rule: {step})") == 1, step
    for upstream in ("base_model", "corpus"):
        assert f"(Rule: {upstream})" not in output
    assert (three / "logs/respond/2-of-3.log").is_file()
    assert sorted(p.name for p in (three / "data/parts/embed").iterdir()) == \
        ["1-of-3", "2-of-3", "3-of-3"]
    assert "Nothing to be done" in run(three, "snakemake", "--cores", "1", "-n", *TARGETS)


def test_dvc_yaml_gets_one_stage_per_shard(projects):
    _, three, _ = projects
    run(three, "longctx", "dvc-export")
    stages = yaml.safe_load((three / "dvc.yaml").read_text())["stages"]
    for step in SHARDED:
        shards = [f"{step}_shard-{n}-of-3" for n in (1, 2, 3)]
        assert [s for s in stages if s.startswith(f"{step}_shard")] == shards
        assert sorted(d for d in stages[step]["deps"] if "/parts/" in d) == \
            [stages[s]["outs"][0] for s in shards]
        assert "--shard 2-of-3" in stages[shards[1]]["cmd"]
