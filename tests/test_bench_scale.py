"""bench/scale.py runs end to end on one small corpus and reports what its README promises."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from llm_data import build_tiny_chat_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scale():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        yield importlib.import_module("scale")
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_slope_and_extrapolation(scale):
    rows = [{"documents": 10_000, "peak_rss_mib": 400.0, "us_per_doc": 50.0},
            {"documents": 100_000, "peak_rss_mib": 490.0, "us_per_doc": 40.0}]
    assert scale.slope(rows) == {"from": 10_000, "to": 100_000, "rss_ratio": 1.225,
                                 "rss_mib_per_1k_docs": 1.0, "flat_goal": 1.5, "flat": True}
    assert scale.slope(rows[:1]) == {}
    (far,) = scale.extrapolate(rows, [10_000, 100_000, 1_000_000])
    assert far == {"documents": 1_000_000, "extrapolated": True,
                   "peak_rss_mib_estimate": 1390.0, "us_per_doc_estimate": 40.0}


def test_scale_bench_smoke(tmp_path):
    model = build_tiny_chat_model(tmp_path / "model", max_positions=2048)
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--sizes", "300",
           "--steps", "niah_samples,ruler_samples", "--lengths", "1024",
           "--tasks", "niah_single_2,qa_1", "--model-dir", str(model),
           "--workdir", str(tmp_path / "work"), "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert {"benchmark", "machine", "settings", "baseline", "steps", "not_covered",
            "total_seconds"} <= set(report)
    assert report["settings"]["sizes"] == [300]
    assert [c["documents"] for c in report["baseline"]["corpora"]] == [300]
    assert all(c["text_bytes"] > 300 * 500 for c in report["baseline"]["corpora"])
    assert set(report["steps"]) == {"niah_samples", "ruler_samples"}
    assert "corpus" in report["not_covered"] and "summarize" not in report["not_covered"]
    for step, result in report["steps"].items():
        rows = result["sizes"]
        assert [r["documents"] for r in rows] == [300]
        imports = report["baseline"]["imports"][step]["peak_rss_mib"]
        for r in rows:
            # the step loads a tokenizer and builds samples: more than importing its code
            assert r["peak_rss_mib"] > imports > 20
            assert r["us_per_doc"] == round(r["wall_s"] / r["documents"] * 1e6, 2)
        assert result["slope"] == {}  # one size: no slope
    assert not (tmp_path / "work" / "corpus-300").exists()  # corpora are deleted after use


SYNTH_CALLS = {"instructions": {"instructions"}, "summarize": {"qfs", "merge"},
               "respond": {"respond"}, "long_output": {"backtranslate"}}


def test_scale_bench_synthesis_smoke(scale, bundled_model_dir, tmp_path):
    """Every synthesis step, as its real command, against the scripted LLM server, on
    synthetic vectors and their real index. The base model's tokenizer sizes the budgets as
    in a real run (a byte-level toy tokenizer would fit no summary into them)."""
    steps = ["index", *scale.SYNTH_STEPS]
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--sizes", "300",
           "--steps", ",".join(steps), "--embed-max-size", "0", "--instructions", "8",
           "--model-dir", str(bundled_model_dir), "--workdir", str(tmp_path / "work")]
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert set(report["steps"]) == set(steps)
    assert report["settings"]["vectors"] == {"300": "synthetic"}
    served = report["settings"]["llm"]["calls_served"]
    assert served["instructions"] >= 2 and served["respond"] == served["backtranslate"] == 8
    assert served["merge"] > 0  # the summaries overflow the micro budget: a level merges
    for step, result in report["steps"].items():
        (row,) = result["sizes"]
        assert row["exit_code"] == 0 and row["documents"] == 300
        assert row["peak_rss_mib"] > report["baseline"]["imports"][step]["peak_rss_mib"] > 20
        assert set(row.get("llm_calls", {})) <= SYNTH_CALLS.get(step, set())
        assert set(row.get("llm_calls", {})) >= SYNTH_CALLS.get(step, set()) - {"merge"}
        if "instructions" not in step:
            assert row["vectors"] == "synthetic"


def test_pack_memory_bench_smoke(tmp_path):
    model = build_tiny_chat_model(tmp_path / "model", max_positions=2048)
    out = tmp_path / "pack.json"
    cmd = [sys.executable, str(REPO / "bench" / "pack_memory.py"), "--sizes", "20,10",
           "--docs", "200", "--top-k", "8", "--length", "512", "--model-dir", str(model),
           "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert json.loads(out.read_text()) == report
    assert {"benchmark", "machine", "settings", "baseline", "sizes", "growth"} <= set(report)
    rows = report["sizes"]
    assert [r["instructions"] for r in rows] == [10, 20]
    for r in rows:  # every sample fills its own sequence from its own documents
        assert r["sequences"] == r["instructions"]
        assert 0.5 * 512 * r["instructions"] <= r["tokens"] <= 512 * r["instructions"]
        assert r["peak_rss_mib"] > report["baseline"]["imports"]["peak_rss_mib"]
        assert r["tokens_as_arrays_mib"] == round(r["tokens"] * 5 / 2**20, 1)
        assert not r["spill_left"]
