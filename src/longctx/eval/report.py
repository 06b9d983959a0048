"""The evaluation summary: one flat metrics file, the RULER curve table and an HTML report.

metrics.json is what `dvc metrics show/diff` compares across experiments, so every score of
every model lives in it under a stable flat key; ruler_curve.tsv feeds `dvc plots`. The HTML
page is self-contained (images inlined, no external assets) so it can be mailed or archived
as one file, and deterministic (no timestamps) so an unchanged evaluation rewrites equal bytes.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from longctx.config import RULER_TASKS  # RULER's own task order; unknown ones follow
from longctx.errors import LongctxError
from longctx.eval.plots import format_theta, read_json, score_color
from longctx.repro import atomic_path, write_json, write_text

KINDS = ("niah", "ruler", "lmeval")
_RULER_AVG = re.compile(r"ruler@(\d+)")
_RULER_TASK = re.compile(r"ruler/(.+)@(\d+)")


def gather_metrics(models: dict[str, dict[str, Path]]) -> dict[str, dict[str, float]]:
    """Merge each model's niah/ruler/lmeval "scores" into one flat dict per model.

    Values are rounded to 4 decimals so float noise does not show up in `dvc metrics diff`.
    """
    out: dict[str, dict[str, float]] = {}
    for name, files in models.items():
        merged: dict[str, float] = {}
        for kind, path in files.items():
            if kind not in KINDS:
                raise LongctxError(f"{path}: unknown result kind {kind!r} (one of {KINDS})")
            data = read_json(Path(path))
            if data.get("model") != name:
                raise LongctxError(f"{path}: 'model' is {data.get('model')!r}, expected {name!r}")
            scores = data.get("scores")
            if not isinstance(scores, dict):
                raise LongctxError(f"{path}: 'scores' must be an object")
            for key, value in scores.items():
                if (
                    isinstance(value, bool)
                    or not isinstance(value, int | float)
                    or not math.isfinite(value)
                ):
                    raise LongctxError(f"{path}: scores[{key!r}] is not a finite number")
                if key in merged:
                    raise LongctxError(f"{path}: score {key!r} is also in another result file")
                merged[key] = round(float(value), 4)
        out[name] = dict(sorted(merged.items()))
    return out


def _ruler_lengths(metrics: Mapping[str, Mapping[str, float]]) -> list[int]:
    return sorted(
        {int(m[1]) for scores in metrics.values() for k in scores if (m := _RULER_AVG.fullmatch(k))}
    )


def curve_table(metrics: dict[str, dict[str, float]]) -> str:
    """TSV of RULER average by length, one column per model, for `dvc plots`."""
    for name in metrics:
        if any(c in name for c in "\t\r\n"):
            raise LongctxError(f"model name {name!r}: tabs and newlines cannot go in a TSV header")
    lines = ["\t".join(["length", *metrics])]
    for length in _ruler_lengths(metrics):
        cells = [str(length)]
        for scores in metrics.values():
            value = scores.get(f"ruler@{length}")
            cells.append("" if value is None else f"{value:g}")
        lines.append("\t".join(cells))
    return "\n".join(lines) + "\n"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(key: str, value: float | None) -> str:
    """lm-eval reports fractions, NIAH and RULER percentages."""
    if value is None:
        return "–"
    return f"{value:.3f}" if key.startswith("lmeval/") else f"{value:.1f}"


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return '<td class="na">–</td>'
    if key.startswith("lmeval/"):
        return f"<td>{_fmt(key, value)}</td>"
    return f'<td style="background:{score_color(value)}">{_fmt(key, value)}</td>'


def _table(head: list[str], rows: list[str]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "\n".join(rows)
    return f"<table>\n<thead><tr>{th}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _summary(metrics: Mapping[str, Mapping[str, float]]) -> str:
    keys = {k for scores in metrics.values() for k in scores}
    columns = [k for k in ("niah", "ruler") if k in keys]
    columns += [f"ruler@{length}" for length in _ruler_lengths(metrics)]
    columns += sorted(k for k in keys if k.startswith("lmeval/"))
    if not columns:
        return "<p>No scores.</p>"
    rows = [
        f'<tr><th scope="row">{_e(name)}</th>'
        + "".join(_cell(c, scores.get(c)) for c in columns)
        + "</tr>"
        for name, scores in metrics.items()
    ]
    return _table(["model", *columns], rows)


def _task_order(task: str) -> tuple[int, str]:
    return (RULER_TASKS.index(task) if task in RULER_TASKS else len(RULER_TASKS), task)


def _ruler_tasks(name: str, scores: Mapping[str, float]) -> str:
    cells: dict[tuple[str, int], float] = {}
    for key, value in scores.items():
        if m := _RULER_TASK.fullmatch(key):
            cells[(m[1], int(m[2]))] = value
    if not cells:
        return ""
    lengths = sorted({length for _, length in cells} | set(_ruler_lengths({name: scores})))
    tasks = sorted({task for task, _ in cells}, key=_task_order)
    rows = [
        f'<tr><th scope="row">{_e(task)}</th>'
        + "".join(_cell("ruler", cells.get((task, length))) for length in lengths)
        + "</tr>"
        for task in tasks
    ]
    rows.append(
        '<tr class="avg"><th scope="row">average</th>'
        + "".join(_cell("ruler", scores.get(f"ruler@{length}")) for length in lengths)
        + "</tr>"
    )
    table = _table(["task", *map(str, lengths)], rows)
    return f'<h3>{_e(name)}</h3>\n<div class="scroll">{table}</div>'


def _num_cell(value: Any, fmt: Callable[[float], str]) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return '<td class="na">–</td>'
    return f"<td>{_e(fmt(value))}</td>"


def _training(train: Mapping[str, Path]) -> str:
    rows = []
    for name, path in train.items():
        data = read_json(Path(path))
        stage = data.get("stage") if isinstance(data.get("stage"), dict) else {}
        loss = data["train"].get("loss") if isinstance(data.get("train"), dict) else None
        rows.append(
            f'<tr><th scope="row">{_e(name)}</th>'
            + _num_cell(stage.get("length"), lambda v: f"{v:g}")
            + _num_cell(stage.get("rope_theta"), format_theta)
            + _num_cell(stage.get("steps"), lambda v: f"{v:g}")
            + _num_cell(loss, lambda v: f"{v:.4f}")
            + "</tr>"
        )
    return _table(["stage", "length", "rope_theta", "steps", "final loss"], rows)


def _figure(caption: str, path: Path) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LongctxError(f"{path}: cannot read image ({exc.strerror or exc})") from exc
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise LongctxError(f"{path}: image {caption!r} is not a PNG")
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure><img src="{uri}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


_CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: #222; max-width: 1100px; margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 .4em; }
p.note { color: #555; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
thead th { background: #f3f3f3; font-weight: 600; }
tbody th { text-align: left; font-weight: 600; background: #fafafa; }
td { text-align: right; }
td.na { color: #999; text-align: center; }
tr.avg th, tr.avg td { font-weight: 700; border-top: 2px solid #888; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
""".strip()


def write_report(
    out_html: Path,
    metrics: dict,
    images: dict[str, Path],
    train: dict[str, Path] | None = None,
    title: str = "longctx report",
) -> None:
    """Write the one-page HTML report: summary, RULER per task, training, figures.

    `metrics` is gather_metrics' result, `images` maps caption to PNG (shown in that order),
    `train` maps stage name to its metrics.json.
    """
    parts = [
        "<!doctype html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>\n{_CSS}\n</style></head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        '<p class="note">NIAH and RULER scores are percentages (0–100), lm-eval scores are '
        "fractions (0–1) as lm-eval reports them. Cells are coloured red (0) → yellow → green "
        "(100).</p>",
        "<h2>Summary</h2>",
        f'<div class="scroll">{_summary(metrics)}</div>',
    ]
    tables = [t for name, scores in metrics.items() if (t := _ruler_tasks(name, scores))]
    if tables:
        parts += ["<h2>RULER per task</h2>", *tables]
    if train:
        parts += ["<h2>Training</h2>", f'<div class="scroll">{_training(train)}</div>']
    if images:
        parts += ["<h2>Figures</h2>", *(_figure(c, p) for c, p in images.items())]
    parts += ["</body>", "</html>"]
    write_text(out_html, "\n".join(parts) + "\n")


def build_report(*, models: list[str], niah: list[Path], ruler: list[Path], lmeval: list[Path],
                 train: list[Path], train_plots: list[Path], metrics: Path, curves: Path,
                 plots: Path, report: Path) -> dict[str, Any]:
    """The `report` step: writes `metrics` (metrics.json), the curve table `curves`, every
    figure into the dir `plots` and the HTML page `report`; returns the metrics.

    The per-kind lists are parallel to `models` (one results file per model, in order);
    `train`/`train_plots` hold each stage's metrics.json and dvclive plots dir, in order.
    """
    from longctx.eval.plots import loss_curves, niah_heatmap, ruler_curves

    for kind, paths in (("niah", niah), ("ruler", ruler), ("lmeval", lmeval)):
        if len(paths) != len(models) and not (kind == "lmeval" and not paths):
            raise LongctxError(f"report: {len(paths)} {kind} results for {len(models)} models")
    files = {m: {"niah": n, "ruler": r} for m, n, r in zip(models, niah, ruler)}
    for m, lm in zip(models, lmeval):
        files[m]["lmeval"] = lm
    gathered = gather_metrics(files)
    if len(train) != len(train_plots):
        raise LongctxError(f"report: {len(train)} stage metrics for {len(train_plots)} plots")
    stages = [p.parent.name for p in train]  # results/train/stage-<k>/metrics.json
    images: dict[str, Path] = {}
    with atomic_path(plots) as tmp:
        tmp.mkdir()
        for name, path in zip(models, niah):
            png = tmp / f"niah-{name}.png"
            niah_heatmap(read_json(path), png, f"NIAH: {name}")
            images[f"Needle in a haystack: {name}"] = plots / png.name
        ruler_curves(gathered, tmp / "ruler.png")
        images["RULER average vs length"] = plots / "ruler.png"
        if stages:  # dvclive's layout inside each stage's plots dir
            loss_curves({name: d / "metrics" / "train" / "loss.tsv"
                         for name, d in zip(stages, train_plots)}, tmp / "loss.png")
            images["Training loss"] = plots / "loss.png"
    write_json(metrics, gathered)
    write_text(curves, curve_table(gathered))
    write_report(report, gathered, images, dict(zip(stages, train)))
    return gathered
