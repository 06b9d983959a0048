"""Answer evaluation samples with one model and score them (NIAH grid, RULER).

Generation goes through the same machinery as synthesis: a backend of `eval.backend` (hf in
this process, vLLM's offline engine, or OpenAI-compatible servers on /v1/completions; see
engines.py) behind the content-addressed call cache, so a killed evaluation resumes without
regenerating finished batches, and the prompt the model sees is exactly the one the samples
were sized with (checked, token for token, with the model's own tokenizer on every backend).
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Any

from longctx.config import EvalConfig
from longctx.errors import LongctxError
from longctx.eval.samples import EvalSample, chat_messages, read_samples
from longctx.eval.score import score
from longctx.repro import write_json, write_text

log = logging.getLogger(__name__)

TEMPLATE_VERSION = "eval-v1"  # the call cache's template version for evaluation prompts


def answer(model_dir: Path, samples: list[EvalSample], cfg: EvalConfig,
           cache_path: Path | None = None, desc: str = "eval") -> list[str]:
    """The model's continuation of each sample's answer prefix, greedy, in sample order."""
    from longctx.eval.engines import answer_backend, batch_size
    from longctx.llm.base import Sampling
    from longctx.llm.cache import CallCache
    from longctx.llm.client import LLM

    if not samples:
        return []
    backend = answer_backend(cfg, model_dir, longest=max(s.length for s in samples))
    chats = [chat_messages(s.prompt, s.answer_prefix) for s in samples]
    counts = backend.prompt_tokens([backend.render(c) for c in chats])
    for s, n in zip(samples, counts):
        if n != s.prompt_tokens:
            raise LongctxError(
                f"{model_dir}: {s.task}@{s.length} sample {s.index} renders to {n} tokens, but "
                f"it was sized to {s.prompt_tokens} (the samples were made with another "
                "tokenizer or chat template; regenerate them with this model's)")
    predictions: list[str] = [""] * len(samples)
    by_budget: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_budget[s.max_new_tokens].append(i)
    with LLM(backend, CallCache(cache_path), batch_size(cfg)) as llm:
        for budget, members in sorted(by_budget.items()):
            done = llm.chat([chats[i] for i in members], Sampling(max_new_tokens=budget),
                            TEMPLATE_VERSION, desc=f"{desc} (<= {budget} new tokens)")
            for i, completion in zip(members, done):
                predictions[i] = completion.text
    return predictions


def _mean(values: list[float]) -> float:
    return round(fmean(values), 4)


def scores(kind: str, samples: list[EvalSample], points: list[float]) -> dict[str, float]:
    """Flat scores in percent: niah@<len> and niah, or ruler/<task>@<len> and ruler@<len>."""
    cells: dict[str, list[float]] = defaultdict(list)
    for s, p in zip(samples, points):
        if kind == "niah":
            cells[f"niah@{s.length}"].append(p)
            cells["niah"].append(p)
        else:
            cells[f"ruler/{s.task}@{s.length}"].append(p)
    out = {key: _mean(v) for key, v in cells.items()}
    if kind == "ruler":  # RULER's average: the mean of the task scores at a length
        by_length: dict[int, list[float]] = defaultdict(list)
        for key, value in out.items():
            by_length[int(key.rsplit("@", 1)[1])].append(value)
        out |= {f"ruler@{length}": _mean(v) for length, v in sorted(by_length.items())}
    return dict(sorted(out.items()))


def evaluate(kind: str, cfg: EvalConfig, *, name: str, model: Path, samples: Path,
             results: Path, table: Path | None = None,
             cache_path: Path | None = None) -> dict[str, Any]:
    """Answer and score `samples` with the model dir `model`; write its results as model `name`
    to `results` (json with every row) and, if given, `table` (csv)."""
    if kind not in ("niah", "ruler"):
        raise ValueError(f"unknown evaluation kind {kind!r}")
    loaded = read_samples(samples)
    if not loaded:
        raise LongctxError(f"{samples}: no samples")
    predictions = answer(model, loaded, cfg, cache_path, desc=f"{kind} {name}")
    points = [score(s, p) for s, p in zip(loaded, predictions)]
    rows = []
    for s, p, pt in zip(loaded, predictions, points):
        row = {"task": s.task, "length": s.length, "index": s.index, "score": pt,
               "prediction": p, "references": list(s.references)}
        if s.depth is not None:
            row["depth"] = s.depth
        rows.append(row)
    result = {"model": name, "scores": scores(kind, loaded, points), "rows": rows}
    write_json(results, result)
    if table is not None:
        write_text(table, _csv(name, rows))
    return result


def _csv(model_name: str, rows: list[dict[str, Any]]) -> str:
    """Every answer, one row each, named by model (so the files of several models concatenate,
    and two models with equal answers never write byte-equal files that DVC would link)."""
    buf = io.StringIO()
    fields = ["model", "task", "length", "depth", "index", "score", "prediction", "references"]
    writer = csv.DictWriter(buf, fieldnames=[f for f in fields if f in rows[0] or f == "model"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row | {"model": model_name, "references": "|".join(row["references"])})
    return buf.getvalue()
