"""The evaluation figures: NIAH heatmap, RULER score-vs-length curves, training loss.

Figures are built on matplotlib's object API (no pyplot state) under the "default" style, so a
user's matplotlibrc cannot change them, and saved without the Software stamp: the same inputs
give byte-identical PNGs, which keeps DVC from seeing a change where there is none.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import style as mpl_style
from matplotlib.colors import LinearSegmentedColormap, to_hex
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from longctx.errors import LongctxError
from longctx.repro import atomic_path

matplotlib.use("Agg")  # never a display: these run in Snakemake jobs and CI

# Red (0) -> yellow -> green (100), light enough for black text; the HTML report shares it.
SCORE_CMAP = LinearSegmentedColormap.from_list(
    "longctx_score", ["#f8696b", "#ffeb84", "#63be7b"]
).with_extremes(bad="#d9d9d9")  # bad: a grid cell nobody evaluated
EFFECTIVE_THRESHOLD = 85.6  # RULER's effective-length bar: Llama-2-7B's score at 4K
_DPI = 100


def score_color(score: float) -> str:
    """The heatmap colour of a percent score as "#rrggbb" (scores outside 0..100 clip)."""
    return to_hex(SCORE_CMAP(min(max(score, 0.0), 100.0) / 100.0))


@contextlib.contextmanager
def _style() -> Iterator[None]:
    with mpl_style.context("default"), matplotlib.rc_context({"font.size": 10}):
        yield


def _tex(text: str) -> str:
    """Plain text for matplotlib: a "$" pair in a model name would otherwise be mathtext."""
    return text.replace("$", r"\$")


def save_png(fig: Figure, out_png: Path) -> None:
    """Write a figure atomically, with no metadata that changes between runs."""
    with _style(), atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI, facecolor="white", metadata={"Software": None})


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LongctxError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def niah_grid(niah: Mapping[str, Any]) -> tuple[list[int], list[float], list[list[float]]]:
    """(lengths, depths, mean score per [depth][length]; NaN where a cell has no rows)."""
    model = niah.get("model", "?")
    rows = niah.get("rows")
    if not isinstance(rows, list) or not rows:
        raise LongctxError(f"niah results of {model!r}: 'rows' must be a non-empty list")
    cells: dict[tuple[int, float], list[float]] = {}
    for i, row in enumerate(rows):
        where = f"niah results of {model!r}: rows[{i}]"
        if not isinstance(row, dict):
            raise LongctxError(f"{where}: expected an object")
        try:
            key = (int(row["length"]), float(row["depth"]))
            score = _number(row["score"], f"{where}.score")
        except (KeyError, TypeError, ValueError) as exc:
            raise LongctxError(f"{where}: needs numeric length, depth and score ({exc})") from exc
        cells.setdefault(key, []).append(score)
    lengths = sorted({length for length, _ in cells})
    depths = sorted({depth for _, depth in cells})
    grid = [
        [
            sum(cells[(length, depth)]) / len(cells[(length, depth)])
            if (length, depth) in cells
            else math.nan
            for length in lengths
        ]
        for depth in depths
    ]
    return lengths, depths, grid


def niah_figure(niah: Mapping[str, Any], title: str) -> Figure:
    """The NIAH heatmap figure; cell (length i, depth j) is centred at data point (i, j)."""
    lengths, depths, grid = niah_grid(niah)
    model = str(niah.get("model", ""))
    cells = [v for row in grid for v in row if not math.isnan(v)]
    overall = niah.get("scores", {}).get("niah")
    mean = float(overall) if isinstance(overall, int | float) else sum(cells) / len(cells)
    with _style():
        width = max(5.0, 2.6 + 0.8 * len(lengths))
        height = max(3.5, 1.6 + 0.42 * len(depths))
        fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(
            grid, cmap=SCORE_CMAP, vmin=0, vmax=100, aspect="auto", interpolation="nearest"
        )
        for j, row in enumerate(grid):
            for i, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(i, j, f"{value:.0f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(length) for length in lengths])
        ax.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        who = f"{model}, " if model and model not in title else ""
        ax.set_title(_tex(f"{title}\n{who}mean {mean:.1f}"))
        fig.colorbar(image, ax=ax, label="score (%)")
    return fig


def niah_heatmap(niah: dict, out_png: Path, title: str) -> None:
    """Needle-in-a-haystack heatmap: length x depth (0 at top), green 100 to red 0."""
    save_png(niah_figure(niah, title), Path(out_png))


def _ruler_averages(scores: Mapping[str, Any], model: str) -> dict[int, float]:
    out = {}
    for key, value in scores.items():
        prefix, _, length = key.partition("@")
        if prefix == "ruler" and length.isdigit():
            out[int(length)] = _number(value, f"ruler scores of {model!r}: {key}")
    return out


def ruler_curves(ruler: dict[str, dict], out_png: Path) -> None:
    """RULER average vs length, one line per model (in the given order).

    `ruler` maps model name to its ruler.json content, or to its flat gathered metrics: either
    way the "ruler@<length>" scores are what is drawn; a model with none is left out.
    """
    with _style():
        fig = Figure(figsize=(7.0, 4.5), dpi=_DPI, layout="constrained")
        ax = fig.add_subplot()
        ticks: set[int] = set()
        for model, data in ruler.items():
            scores = data.get("scores", data) if isinstance(data, dict) else None
            if not isinstance(scores, dict):
                raise LongctxError(f"ruler results of {model!r}: expected an object of scores")
            points = sorted(_ruler_averages(scores, model).items())
            if not points:
                continue
            ticks.update(length for length, _ in points)
            ax.plot(
                [length for length, _ in points],
                [score for _, score in points],
                marker="o",
                clip_on=False,
                label=_tex(model),
            )
        ax.axhline(
            EFFECTIVE_THRESHOLD,
            linestyle="--",
            color="0.45",
            linewidth=1,
            label=f"effective length threshold (Llama-2-7B, {EFFECTIVE_THRESHOLD})",
        )
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.xaxis.set_minor_locator(NullLocator())
            low, high = min(ticks), max(ticks)
            ax.set_xlim(low / 2**0.25, high * 2**0.25)
        ax.set_ylim(0, 100)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("RULER average score (%)")
        ax.set_title("RULER score vs context length")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    save_png(fig, Path(out_png))


def stage_files(path: Path) -> tuple[Path, Path | None]:
    """(loss.tsv, metrics.json or None) of a stage given its directory or its loss.tsv."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        return path / "plots" / "metrics" / "train" / "loss.tsv", path / "metrics.json"
    if path.parts[-4:-1] == ("plots", "metrics", "train"):
        return path, path.parents[3] / "metrics.json"
    return path, None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; any failure is a LongctxError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LongctxError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise LongctxError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise LongctxError(f"{path}: expected a JSON object")
    return data


def read_loss(path: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a dvclive loss.tsv."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise LongctxError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    out = []
    for i, row in enumerate(rows, start=2):
        try:
            out.append((int(row["step"]), float(row["loss"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise LongctxError(f"{path}: line {i} needs integer 'step' and 'loss' ({exc})") from exc
    if not out:
        raise LongctxError(f"{path}: no loss rows")
    return out


def format_theta(theta: float) -> str:
    return f"{int(theta):,}" if float(theta).is_integer() else f"{theta:,g}"


def _stage_label(name: str, metrics_json: Path | None) -> str:
    if metrics_json is None or not metrics_json.exists():
        return name
    stage = read_json(metrics_json).get("stage")
    if not isinstance(stage, dict):
        return name
    parts = []
    if isinstance(stage.get("length"), int | float):
        parts.append(f"length {int(stage['length'])}")
    if isinstance(stage.get("rope_theta"), int | float):
        parts.append(f"rope_theta {format_theta(stage['rope_theta'])}")
    return f"{name} ({', '.join(parts)})" if parts else name


def loss_curves(stages: dict[str, Path], out_png: Path) -> None:
    """Training loss vs global step: each stage continues after the previous stage's last step.

    `stages` maps stage name (in training order) to its output directory (holding metrics.json
    and plots/metrics/train/loss.tsv) or directly to its loss.tsv.
    """
    with _style():
        fig = Figure(figsize=(7.0, 4.0), dpi=_DPI, layout="constrained")
        ax = fig.add_subplot()
        offset = 0
        for k, (name, path) in enumerate(stages.items()):
            loss_tsv, metrics_json = stage_files(Path(path))
            rows = read_loss(loss_tsv)
            steps = [offset + step for step, _ in rows]
            if k:
                ax.axvline(offset - 0.5, color="0.75", linewidth=1, linestyle=":")
            ax.plot(
                steps,
                [loss for _, loss in rows],
                color=f"C{k % 10}",
                marker="o" if len(rows) <= 60 else None,
                markersize=3,
                label=_tex(_stage_label(name, metrics_json)),
            )
            offset = steps[-1] + 1
        ax.set_xlabel("global step")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss across stages")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if stages:
            ax.legend(fontsize=9)
    save_png(fig, Path(out_png))
