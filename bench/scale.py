"""Benchmark how each step's memory and time grow with the corpus; prints ONE JSON object.

Synthetic corpora of --sizes documents are written in the corpus table format
(`longctx.corpus.SCHEMA`, row groups of 2048 as the corpus step writes them), built fast from
the demo corpus' vocabulary: a pool of random sentences drawn from the Lee news corpus' words
(by frequency, so years, numbers and names occur), three paragraphs of three sentences per
document (~150 words: paragraphs long enough for RULER's cloze QA), `n_tokens` estimated from
the words with a tokens-per-word ratio measured on a sample in the base model's tokenizer.

Each step then runs as its own process, the real `longctx <step>` command on a params file
of the micro profile with the bench's settings, and its peak RSS (getrusage of a small
launcher's children, see LAUNCHER) and wall time are recorded per size, with the time per
document and the slope: the RSS ratio from the smallest to the largest size (goal: <= 1.5,
flat), and the MiB of RSS each further 1K documents add. Baselines measured in the same run:
the RSS of a bare Python process importing the step's code (`workflow.step_code`: what it
costs before it reads anything) and the corpus' text bytes (the reading before streaming
held ~16x them).

niah_samples and ruler_samples run as one shard job (1-of-1: every unit; the job that reads
the corpus). embed (one shard job too) runs the bundled MiniLM only at sizes up to
--embed-max-size (2 CPU cores embed ~100 short documents/s); above it its RSS is
extrapolated linearly from the two largest measured sizes and its time per document held at
the largest's, marked `"extrapolated": true`. gather_embed (the shard parts into
data/embeddings) and index (flat, exact) run on its output at the sizes embed measured. The
steps whose work is LLM calls are listed under `not_covered` with the reason.

    python bench/scale.py                                 # 10K, 100K, 1M documents
    python bench/scale.py --sizes 10000,100000            # quicker
    python bench/scale.py --sizes 2000 --steps niah_samples --embed-max-size 0   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from machine import load_average, log, machine_info
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
SENTENCES = 200_000  # the pool documents are drawn from
ROW_GROUP = 2048  # the corpus step's default batch_size: its row groups
EVAL_STEPS = ("niah_samples", "ruler_samples")
STEPS = EVAL_STEPS + ("embed", "gather_embed", "index")
EMBED_STEPS = ("embed", "gather_embed", "index")  # run up to --embed-max-size
NOT_COVERED = {
    "corpus": "reads source files, not a corpus table: its memory is bounded by "
              "corpus.batch_size (streamed batches), not measured here",
    "instructions": "LLM calls; a scripted-backend harness for the synthesis steps is not "
                    "written yet",
    "retrieve": "needs instructions.parquet from the instructions step (LLM calls)",
    "summarize": "LLM calls on retrieved documents; no scripted-backend harness yet",
    "respond": "needs summaries (LLM calls); no scripted-backend harness yet",
    "long_output": "LLM calls; no scripted-backend harness yet",
    "pack": "needs the synthesis tables (LLM calls)",
    "train_stage": "reads packed sequences, not the corpus: independent of its size",
    "eval_niah/eval_ruler/eval_lmeval/report": "read the samples and models, not the corpus",
}


# --------------------------------------------------------------------------- corpus


def vocabulary() -> tuple[np.ndarray, np.ndarray]:
    """The Lee news corpus' words and their frequencies (gensim's wheel, no download)."""
    from longctx.assets import demo_corpus_files

    words = demo_corpus_files()["lee"].read_text(errors="replace").split()
    unique, counts = np.unique(np.array(words, dtype=object), return_counts=True)
    return unique, counts / counts.sum()


def sentence_pool(rng: np.random.Generator) -> list[str]:
    words, p = vocabulary()
    lengths = rng.integers(8, 21, size=SENTENCES)
    picks = rng.choice(len(words), size=int(lengths.sum()), p=p)
    out, at = [], 0
    for n in lengths:
        s = " ".join(words[picks[at:at + n]])
        at += n
        out.append(s[0].upper() + s[1:].rstrip(".,;:") + ".")
    return out


def documents(n: int, pool: list[str], rng: np.random.Generator):
    """n documents of 3 paragraphs x 3 sentences, in batches of ROW_GROUP texts."""
    for start in range(0, n, ROW_GROUP):
        count = min(ROW_GROUP, n - start)
        picks = rng.integers(0, len(pool), size=(count, 9))
        yield ["\n\n".join(" ".join(pool[i] for i in row[k:k + 3]) for k in (0, 3, 6))
               for row in picks]


def write_corpus(path: Path, n: int, pool: list[str], tokens_per_word: float,
                 seed: int) -> int:
    """The corpus table of n documents at `path` (atomically); returns its text bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from longctx.corpus import SCHEMA
    from longctx.repro import atomic_path

    rng = np.random.default_rng([seed, n])
    text_bytes = 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
        bar = tqdm(total=n, desc=f"corpus {n:,}", unit=" docs", file=sys.stderr, mininterval=2)
        for batch in documents(n, pool, rng):
            encoded = [t.encode() for t in batch]
            text_bytes += sum(map(len, encoded))
            ids = [hashlib.sha256(b).hexdigest() for b in encoded]
            writer.write_table(pa.Table.from_pydict({
                "id": ids, "text": batch, "title": [None] * len(batch),
                "source": ["synthetic"] * len(batch), "source_id": ids,
                "n_tokens": [round(len(t.split()) * tokens_per_word) for t in batch]},
                schema=SCHEMA))
            bar.update(len(batch))
        bar.close()
    return text_bytes


def tokens_per_word(model: Path, pool: list[str]) -> float:
    """Measured on 200 synthetic documents in the base model's tokenizer."""
    from longctx.tokens import load_tokenizer

    tokenizer = load_tokenizer(model)
    texts = next(documents(200, pool, np.random.default_rng(0)))
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / sum(len(t.split()) for t in texts)


# --------------------------------------------------------------------------- running steps


# The child's peak RSS is read by a small launcher process, not by the bench itself: Linux
# counts the forking process's RSS into a child's ru_maxrss (the pre-exec address space), so
# children of this process (numpy, a tokenizer, the sentence pool) would all read >= its size.
LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
open(sys.argv[1], "w").write(json.dumps({"code": code, "maxrss_kib": kib}))
"""


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path) -> dict:
    """Run one command as a grandchild under LAUNCHER: its peak RSS (getrusage of the
    launcher's children, MiB) and wall time."""
    result = log_path.with_suffix(".rusage.json")
    start = time.perf_counter()
    with open(log_path, "wb") as out:
        subprocess.run([sys.executable, "-c", LAUNCHER, str(result), *cmd], stdout=out,
                       stderr=subprocess.STDOUT, env=env, check=True)
    wall = time.perf_counter() - start
    usage = json.loads(result.read_text())
    if usage["code"] != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({usage['code']}):\n{tail}")
    return {"peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1), "wall_s": round(wall, 2)}


def bare_import_rss(step: str, env: dict[str, str], work: Path) -> dict:
    """Baseline: a bare Python process importing the code `longctx <step>` runs."""
    from longctx.workflow import step_code

    modules = sorted({p.removeprefix("src/").removesuffix(".py").removesuffix("/__init__")
                      .replace("/", ".") for p in step_code(step) if p.endswith(".py")})
    code = "".join(f"import {m}\n" for m in modules)
    result = run_measured([sys.executable, "-c", code], env, work / f"import-{step}.log")
    return result | {"modules": len(modules)}


def params_file(path: Path, args: argparse.Namespace) -> Path:
    """The micro profile with the bench's eval and embed settings."""
    params = yaml.safe_load((REPO / "configs" / "micro.yaml").read_text())
    params["niah"] = {"lengths": args.lengths, "depths": [0, 50, 100], "trials": 1}
    params["ruler"] = {"tasks": args.tasks, "lengths": args.lengths, "samples": 1}
    params["embed"] |= {"max_tokens": args.embed_tokens, "batch_size": 64}
    params["index"] |= {"type": "flat", "recall_sample": 100}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def step_commands(step: str, params: Path, model: Path, data: Path) -> list[str]:
    """The `longctx <step>` command line, paths named as the rule names them."""
    base = [sys.executable, "-m", "longctx.cli", "--params", str(params)]
    return {
        "niah_samples": base + ["niah-samples", "--shard", "1-of-1", "--model", str(model),
                                "--docs", str(data / "docs.parquet"), "--part",
                                str(data / "niah-part.parquet")],
        "ruler_samples": base + ["ruler-samples", "--shard", "1-of-1", "--model", str(model),
                                 "--docs", str(data / "docs.parquet"), "--part",
                                 str(data / "ruler-part.parquet")],
        "embed": base + ["embed", "--shard", "1-of-1", "--docs", str(data / "docs.parquet"),
                         "--part", str(data / "embed-part")],
        "gather_embed": base + ["gather-embed", "--parts", str(data / "embed-part"),
                                "--embeddings", str(data / "embeddings")],
        "index": base + ["index", "--embeddings", str(data / "embeddings"), "--index",
                         str(data / "index")],
    }[step]


def slope(rows: list[dict]) -> dict:
    """RSS ratio from the smallest to the largest size, and MiB per further 1K documents."""
    measured = [r for r in rows if "peak_rss_mib" in r]
    if len(measured) < 2:
        return {}
    a, b = measured[0], measured[-1]
    ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
    per_k = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["documents"] - a["documents"]) * 1000
    return {"from": a["documents"], "to": b["documents"], "rss_ratio": round(ratio, 3),
            "rss_mib_per_1k_docs": round(per_k, 4), "flat_goal": 1.5,
            "flat": ratio <= 1.5}


def extrapolate(rows: list[dict], sizes: list[int]) -> list[dict]:
    """embed above --embed-max-size: RSS linear in the two largest measured sizes, time per
    document that of the largest (embedding is per document)."""
    if len(rows) < 2:
        return []
    a, b = rows[-2], rows[-1]
    per_doc = (b["peak_rss_mib"] - a["peak_rss_mib"]) / (b["documents"] - a["documents"])
    return [{"documents": n, "extrapolated": True,
             "peak_rss_mib_estimate": round(b["peak_rss_mib"] + per_doc * (n - b["documents"]), 1),
             "us_per_doc_estimate": b["us_per_doc"]} for n in sizes if n > b["documents"]]


# --------------------------------------------------------------------------- main


def measure_size(n: int, steps: list[str], args, work: Path, model: Path,
                 corpus: tuple[list[str], float], results: dict[str, list[dict]]) -> dict:
    """Write the n-document corpus, run the steps on it, then delete it."""
    import shutil

    data = work / f"corpus-{n}"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text_bytes = write_corpus(data / "docs.parquet", n, *corpus, args.seed)
    corpus = {"documents": n, "text_bytes": text_bytes,
              "parquet_bytes": (data / "docs.parquet").stat().st_size,
              "write_s": round(time.perf_counter() - t0, 1)}
    params = params_file(work / "params.yaml", args)
    for step in steps:
        if step in EMBED_STEPS and n > args.embed_max_size:
            continue
        needs = {"gather_embed": "embed-part", "index": "embeddings"}.get(step)
        if needs and not (data / needs).is_dir():
            continue
        env = os.environ | {"LONGCTX_CACHE": str(work / f"cache-{n}-{step}")}
        log(f"{step} on {n:,} documents")
        row = run_measured(step_commands(step, params, model, data), env,
                           work / f"{step}-{n}.log")
        row |= {"documents": n, "us_per_doc": round(row["wall_s"] / n * 1e6, 2)}
        results[step].append(row)
    shutil.rmtree(data)
    return corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="corpus sizes (documents)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"of {', '.join(STEPS)}")
    ap.add_argument("--lengths", default="1024,4096", help="NIAH and RULER lengths (tokens)")
    ap.add_argument("--tasks", default="all", help="RULER tasks (comma separated) or all")
    ap.add_argument("--embed-max-size", type=int, default=100_000,
                    help="largest size embed and index run at (above: extrapolated)")
    ap.add_argument("--embed-tokens", type=int, default=32, help="embed.max_tokens")
    ap.add_argument("--model-dir", default=None, help="base model dir (default models/base)")
    ap.add_argument("--workdir", default=None, help="kept; default a temporary dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    from longctx.config import RULER_TASKS

    sizes = sorted(int(s) for s in args.sizes.split(","))
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.tasks = list(RULER_TASKS) if args.tasks == "all" else args.tasks.split(",")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longctx-scale-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        from generate import model_dir

        model = model_dir(args.model_dir, work)
        out = run_all(sizes, steps, args, work, model)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


def run_all(sizes: list[int], steps: list[str], args, work: Path, model: Path) -> dict:
    import longctx.corpus  # noqa: F401  (its imports are not the corpus' write time)

    pool = sentence_pool(np.random.default_rng(args.seed))
    ratio = tokens_per_word(model, pool)
    load_before = load_average()
    env = dict(os.environ)
    baseline = {step: bare_import_rss(step.replace("_", "-"), env, work) for step in steps}
    results: dict[str, list[dict]] = {step: [] for step in steps}
    corpora = [measure_size(n, steps, args, work, model, (pool, ratio), results)
               for n in sizes]
    report = {}
    for step, rows in results.items():
        for row in rows:
            row["rss_over_imports_mib"] = round(row["peak_rss_mib"]
                                                - baseline[step]["peak_rss_mib"], 1)
            row["rss_vs_smallest"] = round(row["peak_rss_mib"] / rows[0]["peak_rss_mib"], 3)
        report[step] = {"sizes": rows, "slope": slope(rows)}
        if step == "embed":
            report[step]["extrapolated"] = extrapolate(rows, sizes)
    return {
        "benchmark": "scale",
        "machine": machine_info(),
        "settings": {"sizes": sizes, "steps": steps, "niah_ruler_lengths": args.lengths,
                     "ruler_tasks": args.tasks, "ruler_samples": 1, "niah_depths": [0, 50, 100],
                     "embed_max_size": args.embed_max_size, "embed_max_tokens": args.embed_tokens,
                     "index_type": "flat", "seed": args.seed, "model": str(model),
                     "tokens_per_word": round(ratio, 3),
                     "documents": "synthetic: 3 paragraphs x 3 sentences of Lee-corpus words"},
        "load_average_before": load_before,
        "baseline": {"what": "peak RSS of a bare python importing the step's code "
                             "(workflow.step_code), and each corpus' text bytes",
                     "imports": baseline, "corpora": corpora},
        "steps": report,
        "not_covered": NOT_COVERED,
        "load_average_after": load_average(),
    }


if __name__ == "__main__":
    main()
