"""Evaluation summary: flat metrics, the RULER curve table, the figures and the HTML report."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from longctx.errors import LongctxError
from longctx.eval.plots import loss_curves, niah_figure, niah_heatmap, ruler_curves, save_png
from longctx.eval.report import curve_table, gather_metrics, write_report

LENGTHS = (1024, 2048)
DEPTHS = (0.0, 50.0, 100.0)
TASKS = ("niah_single_1", "vt")
XSS = "<script>alert(1)</script>"


def _niah(model: str) -> dict:
    """Two trials per cell, all right except 2048@100 (both wrong) and 1024@50 (one of two)."""
    rows = []
    for length in LENGTHS:
        for depth in DEPTHS:
            for index in range(2):
                score = 100.0
                if (length, depth) == (2048, 100.0) or ((length, depth) == (1024, 50.0) and index):
                    score = 0.0
                rows.append(
                    {
                        "length": length,
                        "depth": depth,
                        "index": index,
                        "score": score,
                        "prediction": XSS,
                        "references": ["1234567"],
                    }
                )
    scores = {}
    for length in LENGTHS:
        cell = [r["score"] for r in rows if r["length"] == length]
        scores[f"niah@{length}"] = sum(cell) / len(cell)
    scores["niah"] = sum(r["score"] for r in rows) / len(rows)
    return {"model": model, "scores": scores, "rows": rows}


def _ruler(model: str, shift: float) -> dict:
    scores = {}
    for length in LENGTHS:
        per_task = [max(0.0, 100.0 - shift * i - length / 100) for i, _ in enumerate(TASKS)]
        for task, score in zip(TASKS, per_task, strict=True):
            scores[f"ruler/{task}@{length}"] = score
        scores[f"ruler@{length}"] = sum(per_task) / len(per_task)
    return {"model": model, "scores": scores, "rows": []}


def _write(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def evals(tmp_path: Path) -> dict[str, dict[str, Path]]:
    """base and stage-0 with all three result files, stage-1 without lm-eval."""
    models = {}
    for k, name in enumerate(("base", "stage-0", "stage-1")):
        d = tmp_path / "eval" / name
        models[name] = {
            "niah": _write(d / "niah.json", _niah(name)),
            "ruler": _write(d / "ruler.json", _ruler(name, shift=10.0 + 7 * k)),
        }
        if name != "stage-1":
            lmeval = {
                "lmeval/longctx_cloze/acc": 0.4 + k / 3,
                "lmeval/longctx_cloze/acc_norm": 0.45,
            }
            models[name]["lmeval"] = _write(d / "lmeval.json", {"model": name, "scores": lmeval})
    return models


@pytest.fixture
def stages(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for k, (length, theta, losses) in enumerate(
        [(2048, 400000.0, [2.54, 3.05, 2.67]), (4096, 1600000.0, [3.36, 3.11])]
    ):
        d = tmp_path / "train" / f"stage-{k}"
        tsv = d / "plots" / "metrics" / "train" / "loss.tsv"
        tsv.parent.mkdir(parents=True)
        tsv.write_text("step\tloss\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(losses)))
        meta = {
            "train": {"loss": losses[-1]},
            "step": len(losses) - 1,
            "stage": {"length": length, "rope_theta": theta, "steps": len(losses)},
        }
        _write(d / "metrics.json", meta)
        out[f"stage-{k}"] = d
    return out


def test_gather_metrics_merges_flat_keys(evals):
    metrics = gather_metrics(evals)
    assert list(metrics) == ["base", "stage-0", "stage-1"]
    base = metrics["base"]
    expected = {"niah", "niah@1024", "niah@2048", "ruler@1024", "ruler@2048"}
    expected |= {f"ruler/{t}@{n}" for t in TASKS for n in LENGTHS}
    expected |= {"lmeval/longctx_cloze/acc", "lmeval/longctx_cloze/acc_norm"}
    assert set(base) == expected
    assert set(metrics["stage-1"]) == expected - {k for k in expected if k.startswith("lmeval/")}
    assert base["niah@2048"] == pytest.approx(66.6667)  # rounded to 4 decimals
    assert base["niah@2048"] == round(base["niah@2048"], 4)
    assert metrics["stage-0"]["lmeval/longctx_cloze/acc"] == 0.7333
    assert base["ruler/vt@1024"] == pytest.approx(100 - 10 - 10.24)


def test_gather_metrics_rejects_wrong_model_and_missing_file(evals, tmp_path):
    bad = _write(tmp_path / "eval" / "oops" / "ruler.json", _ruler("stage-0", 1.0))
    with pytest.raises(LongctxError, match=r"oops/ruler\.json.*'stage-0'.*'base'"):
        gather_metrics({"base": {**evals["base"], "ruler": bad}})
    missing = tmp_path / "eval" / "base" / "nowhere.json"
    with pytest.raises(LongctxError, match=r"nowhere\.json"):
        gather_metrics({"base": {"niah": missing}})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(LongctxError, match=r"broken\.json"):
        gather_metrics({"base": {"lmeval": broken}})


def test_curve_table(evals):
    metrics = gather_metrics(evals)
    metrics["stage-1"].pop("ruler@2048")
    lines = curve_table(metrics).splitlines()
    assert lines[0] == "length\tbase\tstage-0\tstage-1"
    assert [line.split("\t")[0] for line in lines[1:]] == ["1024", "2048"]
    row = lines[1].split("\t")
    assert [float(v) for v in row[1:]] == [metrics[m]["ruler@1024"] for m in metrics]
    assert lines[2].split("\t")[3] == ""  # missing score: empty cell


def _rgb(image: np.ndarray, fig, ax, x: float, y: float) -> np.ndarray:
    """The pixel under data point (x, y); savefig at the figure's dpi keeps display pixels."""
    px, py = ax.transData.transform((x, y))
    return image[int(round(image.shape[0] - py)), int(round(px)), :3]


def test_niah_heatmap_colours_cells(tmp_path):
    niah = _niah("base")
    fig = niah_figure(niah, "NIAH: base")
    out = tmp_path / "heat.png"
    save_png(fig, out)
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 250 and image.shape[1] > 400
    fig.canvas.draw()
    ax = fig.axes[0]
    # Cells are centred at (length index, depth index); sample off-centre to miss the label.
    green = _rgb(image, fig, ax, 0.3, 0.3)  # 1024 @ depth 0: 100
    red = _rgb(image, fig, ax, 1.3, 2.3)  # 2048 @ depth 100 (bottom row): 0
    half = _rgb(image, fig, ax, 0.3, 1.3)  # 1024 @ depth 50: 50
    assert green[1] > green[0] + 0.15 and green[1] > green[2]
    assert red[0] > red[1] + 0.2 and red[0] > red[2]
    assert half[0] > 0.9 and half[1] > 0.8  # yellow
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1024", "2048"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "50", "100"]
    assert {t.get_text() for t in ax.texts} == {"100", "50", "0"}
    assert "base" in ax.get_title() and "mean 75.0" in ax.get_title()


def test_figures_are_deterministic(tmp_path, evals, stages):
    metrics = gather_metrics(evals)
    for run in ("a", "b"):
        niah_heatmap(_niah("base"), tmp_path / run / "niah.png", "NIAH: base")
        ruler_curves(metrics, tmp_path / run / "ruler.png")
        ruler_curves(
            {m: json.loads(p["ruler"].read_text()) for m, p in evals.items()},
            tmp_path / run / "ruler_raw.png",
        )
        loss_curves(stages, tmp_path / run / "loss.png")
    for name in ("niah.png", "ruler.png", "loss.png"):
        a, b = (tmp_path / run / name for run in ("a", "b"))
        assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert a.read_bytes() == b.read_bytes(), name
        assert b"Software" not in a.read_bytes()
    # ruler.json content and gathered metrics draw the same curves
    assert (tmp_path / "a" / "ruler.png").read_bytes() == (
        tmp_path / "a" / "ruler_raw.png"
    ).read_bytes()
    assert not list(tmp_path.rglob(".*.tmp-*"))


def test_loss_curves_reports_bad_tsv(tmp_path, stages):
    tsv = stages["stage-1"] / "plots" / "metrics" / "train" / "loss.tsv"
    tsv.write_text("step\tloss\n0\tnan-ish\n")
    with pytest.raises(LongctxError, match=r"stage-1/plots/metrics/train/loss\.tsv"):
        loss_curves(stages, tmp_path / "loss.png")
    with pytest.raises(LongctxError, match=r"missing.*loss\.tsv"):
        loss_curves({"s": tmp_path / "missing"}, tmp_path / "loss.png")


def _report(tmp_path: Path, evals, stages, out: Path) -> str:
    metrics = gather_metrics(evals)
    niah_heatmap(_niah("base"), tmp_path / "niah_base.png", "NIAH: base")
    ruler_curves(metrics, tmp_path / "ruler.png")
    loss_curves(stages, tmp_path / "loss.png")
    images = {
        "NIAH heatmap: base": tmp_path / "niah_base.png",
        "RULER curves": tmp_path / "ruler.png",
        "Training loss": tmp_path / "loss.png",
    }
    train = {name: d / "metrics.json" for name, d in stages.items()}
    write_report(out, metrics, images, train=train)
    return out.read_text(encoding="utf-8")


def test_report_is_complete_and_deterministic(tmp_path, evals, stages):
    page = _report(tmp_path, evals, stages, tmp_path / "a.html")
    again = _report(tmp_path, evals, stages, tmp_path / "b.html")
    assert page == again
    metrics = gather_metrics(evals)
    for model, scores in metrics.items():
        assert f'<th scope="row">{model}</th>' in page
        for key, value in scores.items():
            if key.startswith("niah@"):
                continue  # the summary shows the NIAH mean; the heatmap shows the cells
            shown = f"{value:.3f}" if key.startswith("lmeval/") else f"{value:.1f}"
            assert f">{shown}</td>" in page, (model, key)
    assert page.count('<img src="data:image/png;base64,') == 3
    assert "http" not in page.replace('name="viewport"', "")  # nothing external
    for header in ("ruler@1024", "ruler@2048", "lmeval/longctx_cloze/acc_norm", "niah_single_1"):
        assert f"<th>{header}</th>" in page or f">{header}</th>" in page
    assert "<td>400,000</td>" in page and "<td>1,600,000</td>" in page
    assert "<td>2.6700</td>" in page and "<td>3.1100</td>" in page


def test_report_escapes_text(tmp_path, evals):
    name = XSS
    d = tmp_path / "eval" / "xss"
    ruler = _ruler(name, 5.0)
    ruler["scores"][f"ruler/{XSS}@1024"] = 50.0
    models = {
        name: {
            "niah": _write(d / "niah.json", _niah(name)),
            "ruler": _write(d / "ruler.json", ruler),
        }
    }
    metrics = gather_metrics(models)
    niah_heatmap(_niah(name), tmp_path / "x.png", f"NIAH: {name}")
    out = tmp_path / "x.html"
    write_report(out, metrics, {f"heatmap {XSS}": tmp_path / "x.png"}, title=f"report {XSS}")
    page = out.read_text(encoding="utf-8")
    assert "<script" not in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 5  # title x2, model x2, task...


def test_report_rejects_missing_image(tmp_path, evals):
    with pytest.raises(LongctxError, match=r"gone\.png"):
        write_report(tmp_path / "r.html", gather_metrics(evals), {"x": tmp_path / "gone.png"})
    assert not (tmp_path / "r.html").exists()
