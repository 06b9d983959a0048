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
--embed-max-size (2 CPU cores embed ~140 short documents/s); above it its RSS is
extrapolated linearly from the two largest measured sizes and its time per document held at
the largest's, marked `"extrapolated": true`. gather_embed (the shard parts into
data/embeddings) runs on its output at the sizes embed measured.

The synthesis steps run as the DAG runs them, each shard job (1-of-1) and its gather its own
process: instructions + gather_instructions, retrieve, summarize + gather_summarize, respond
+ gather_respond, long_output + gather_long_output, and pack (stage 0). Their LLM calls go
to a scripted OpenAI-compatible server (bench/scripted_llm.py, `llm.backend: openai` at its
URL, in a thread of this process) whose replies are deterministic from the messages and pass
every step's filters, so what is measured is our code -- reading the corpus, chunking, token
counting with the base model's tokenizer, the call cache, the tables -- not a model. The
number of instructions is fixed by --instructions (64; long_output.count too) at every size,
so the slope of a synthesis step is the corpus' alone, not more work. retrieve and pack need
embeddings and an index: up to --embed-max-size the real embed output is used; above it the
bench writes random unit vectors in embed's format (embed_parts' part and gather, the
bundled embedder's identity and layout in the manifest), which `longctx index` (flat,
measured there too) and `retrieve` read as they read embedded ones; the JSON's
settings.vectors says which sizes had which, and each row of index and the steps after it
says so too. A step asked for runs what it reads first (NEEDS; measured only if asked for as
well). Each synthesis row counts the LLM calls it made by prompt kind (`llm_calls`).

    python bench/scale.py                                 # 10K, 100K, 1M documents
    python bench/scale.py --sizes 10000,100000            # quicker
    python bench/scale.py --sizes 2000 --steps niah_samples --embed-max-size 0   # smoke
    python bench/scale.py --sizes 300 --steps pack --embed-max-size 0 --instructions 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from machine import load_average, log, machine_info
from scripted_llm import ScriptedServer
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
SENTENCES = 200_000  # the pool documents are drawn from
ROW_GROUP = 2048  # the corpus step's default batch_size: its row groups
EVAL_STEPS = ("niah_samples", "ruler_samples")
EMBED_STEPS = ("embed", "gather_embed")  # the real embedder: up to --embed-max-size
EMBED_SHARD_SIZE = 8192  # embed.shard_size: documents per vector file (params.yaml's)
PACK_FILL_TOP_K = 64  # pack.fill_top_k (its default): the documents a long sample may fill from
# The synthesis steps, answered by the scripted LLM server (scripted_llm.py).
SYNTH_STEPS = ("instructions", "gather_instructions", "retrieve", "summarize",
               "gather_summarize", "respond", "gather_respond", "long_output",
               "gather_long_output", "pack")
STEPS = EVAL_STEPS + EMBED_STEPS + ("index",) + SYNTH_STEPS
# What each step reads that an earlier step writes: run first (measured only when asked
# for). Above --embed-max-size, embed and gather_embed are replaced by synthetic vectors.
NEEDS = {"gather_embed": ("embed",), "index": ("gather_embed",),
         "gather_instructions": ("instructions",),
         "retrieve": ("gather_instructions", "index"), "summarize": ("retrieve",),
         "gather_summarize": ("summarize",), "respond": ("gather_summarize",),
         "gather_respond": ("respond",), "gather_long_output": ("long_output",),
         "pack": ("gather_respond", "gather_long_output")}
NOT_COVERED = {
    "corpus": "reads source files, not a corpus table: its memory is bounded by "
              "corpus.batch_size (streamed batches), not measured here",
    "train_stage": "reads packed sequences, not the corpus: independent of its size",
    "eval_niah/eval_ruler/eval_lmeval/report": "read the samples and models, not the corpus",
    "the LLM itself": "the synthesis steps' calls are answered by a scripted server "
                      "(bench/scripted_llm.py): their memory and time are our code's, not a "
                      "model's (the hf/vllm backends' are the model's: bench/generate.py)",
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
    return {"peak_rss_mib": round(usage["maxrss_kib"] / 1024, 1), "wall_s": round(wall, 2),
            "exit_code": usage["code"]}


def bare_import_rss(step: str, env: dict[str, str], work: Path) -> dict:
    """Baseline: a bare Python process importing the code `longctx <step>` runs."""
    from longctx.workflow import step_code

    modules = sorted({p.removeprefix("src/").removesuffix(".py").removesuffix("/__init__")
                      .replace("/", ".") for p in step_code(step) if p.endswith(".py")})
    code = "".join(f"import {m}\n" for m in modules)
    result = run_measured([sys.executable, "-c", code], env, work / f"import-{step}.log")
    return result | {"modules": len(modules)}


def params_file(path: Path, args: argparse.Namespace, base_url: str = "") -> Path:
    """The micro profile with the bench's eval, embed and synthesis settings: the LLM is the
    scripted server at `base_url`, and the instructions are a fixed --instructions whatever
    the corpus size (so a synthesis step's slope is the corpus' alone)."""
    params = yaml.safe_load((REPO / "configs" / "micro.yaml").read_text())
    params["niah"] = {"lengths": args.lengths, "depths": [0, 50, 100], "trials": 1}
    params["ruler"] = {"tasks": args.tasks, "lengths": args.lengths, "samples": 1}
    # params.yaml's vector files, not micro's 16 documents: one file and rows.parquet row
    # group per 16 documents would be 62,500 of them at 1M, a cost no real profile has
    params["embed"] |= {"max_tokens": args.embed_tokens, "batch_size": 64,
                        "shard_size": EMBED_SHARD_SIZE}
    params["index"] |= {"type": "flat", "recall_sample": 100}
    params["llm"] = {"backend": "openai", "model": "base", "base_url": base_url or
                     "http://127.0.0.1:9/v1", "max_concurrency": 8, "max_retries": 2,
                     "timeout_s": 60.0}
    params["instructions"] |= {"count": args.instructions, "per_prompt": 4,
                               "max_rounds": 4, "max_new_tokens": 256}
    params["retrieve"] = {"top_k": args.top_k, "device": "cpu"}
    params["summarize"] |= {"max_new_tokens": 96}  # the scripted replies fit it
    params["respond"] |= {"max_new_tokens": 256}
    params["long_output"] = {"count": args.instructions, "min_tokens": 64, "max_tokens": 4096,
                             "excerpt_tokens": 256, "max_new_tokens": 64}  # every document
    # One stage, long enough that a long sample's own top_k documents leave room: pack
    # fills it from the index (its Retriever), as a real stage of 16K+ tokens does.
    params["stages"]["schedule"] = [{"length": args.pack_length, "steps": 1}]
    params["pack"] |= {"fill_top_k": PACK_FILL_TOP_K}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def step_commands(step: str, params: Path, model: Path, data: Path) -> list[str]:
    """The `longctx <step>` command line, paths named as the rule names them."""
    base = [sys.executable, "-m", "longctx.cli", "--params", str(params)]
    docs, synth = str(data / "docs.parquet"), data / "synth"
    path = {name: str(synth / name) for name in (
        "instructions.parquet", "instructions.json", "retrieved.parquet", "retrieved.json",
        "summaries.parquet", "summaries.json", "responses.parquet", "responses.json",
        "long_output.parquet", "long_output.json")}
    part = {name: str(synth / "parts" / name / "1-of-1.parquet")
            for name in ("instructions", "summarize", "respond", "long_output")}
    return {
        "niah_samples": base + ["niah-samples", "--shard", "1-of-1", "--model", str(model),
                                "--docs", docs, "--part", str(data / "niah-part.parquet")],
        "ruler_samples": base + ["ruler-samples", "--shard", "1-of-1", "--model", str(model),
                                 "--docs", docs, "--part", str(data / "ruler-part.parquet")],
        "embed": base + ["embed", "--shard", "1-of-1", "--docs", docs,
                         "--part", str(data / "embed-part")],
        "gather_embed": base + ["gather-embed", "--parts", str(data / "embed-part"),
                                "--embeddings", str(data / "embeddings")],
        "index": base + ["index", "--embeddings", str(data / "embeddings"), "--index",
                         str(data / "index")],
        "instructions": base + ["instructions", "--shard", "1-of-1", "--docs", docs,
                                "--model", str(model), "--part", part["instructions"]],
        "gather_instructions": base + ["gather-instructions", "--parts", part["instructions"],
                                       "--docs", docs, "--model", str(model),
                                       "--instructions", path["instructions.parquet"],
                                       "--metrics", path["instructions.json"]],
        "retrieve": base + ["retrieve", "--instructions", path["instructions.parquet"],
                            "--index", str(data / "index"),
                            "--embeddings", str(data / "embeddings"),
                            "--retrieved", path["retrieved.parquet"],
                            "--metrics", path["retrieved.json"]],
        "summarize": base + ["summarize", "--shard", "1-of-1",
                             "--instructions", path["instructions.parquet"],
                             "--retrieved", path["retrieved.parquet"], "--docs", docs,
                             "--model", str(model), "--part", part["summarize"]],
        "gather_summarize": base + ["gather-summarize",
                                    "--instructions", path["instructions.parquet"],
                                    "--parts", part["summarize"],
                                    "--summaries", path["summaries.parquet"],
                                    "--metrics", path["summaries.json"]],
        "respond": base + ["respond", "--shard", "1-of-1",
                           "--instructions", path["instructions.parquet"],
                           "--summaries", path["summaries.parquet"], "--model", str(model),
                           "--part", part["respond"]],
        "gather_respond": base + ["gather-respond", "--instructions",
                                  path["instructions.parquet"], "--parts", part["respond"],
                                  "--responses", path["responses.parquet"],
                                  "--metrics", path["responses.json"]],
        "long_output": base + ["long-output", "--shard", "1-of-1", "--docs", docs,
                               "--model", str(model), "--part", part["long_output"]],
        "gather_long_output": base + ["gather-long-output", "--parts", part["long_output"],
                                      "--long-output", path["long_output.parquet"],
                                      "--metrics", path["long_output.json"]],
        "pack": base + ["pack", "--stage", "0", "--model", str(model), "--docs", docs,
                        "--instructions", path["instructions.parquet"],
                        "--retrieved", path["retrieved.parquet"],
                        "--summaries", path["summaries.parquet"],
                        "--responses", path["responses.parquet"],
                        "--long-output", path["long_output.parquet"],
                        "--index", str(data / "index"), "--embeddings", str(data / "embeddings"),
                        "--sequences", str(data / "pack" / "stage-0" / "sequences.parquet"),
                        "--metrics", str(data / "pack" / "stage-0" / "stats.json")],
    }[step]


def plan_steps(steps: list[str], n: int, embed_max_size: int) -> tuple[list[str], bool]:
    """The steps to run at size n, in pipeline order: those asked for and what they read
    (NEEDS); and whether the embeddings are synthetic (n above --embed-max-size, where
    embed and gather_embed do not run)."""
    wanted: set[str] = set()

    def add(step: str) -> None:
        if step not in wanted:
            wanted.add(step)
            for need in NEEDS.get(step, ()):
                add(need)

    for step in steps:
        add(step)
    synthetic = n > embed_max_size and "gather_embed" in wanted
    if n > embed_max_size:
        wanted -= set(EMBED_STEPS)
    return [s for s in STEPS if s in wanted], synthetic


def synthetic_embeddings(docs: Path, embeddings: Path, params: Path, seed: int) -> dict:
    """Bench only: random unit vectors for every document of `docs`, written as embed's
    shard job and gather write them (embed_parts' part and gather, the real manifest: the
    bundled embedder's identity, dim and text layout), so `longctx index` and `retrieve`
    read them as they read embedded ones. One row per document (first_tokens), its
    n_tokens the corpus' clipped at the layout's window. Returns the manifest."""
    import pyarrow.parquet as pq

    from longctx.config import load_params
    from longctx.repro import sha256_file
    from longctx.retrieval.embed import (
        embedding_dim,
        load_embedder,
        manifest_context,
        plan_layout,
        resolve_model,
    )
    from longctx.retrieval.embed_parts import (
        embed_params,
        gather_embeddings,
        vector_files,
        write_part,
    )
    from longctx.shards import Shard

    cfg = load_params(params).embed
    model = load_embedder(cfg.model, "cpu", cfg.trust_remote_code)
    layout, dim = plan_layout(cfg, model), embedding_dim(model)
    context = manifest_context(cfg, resolve_model(cfg.model)[1], "cpu", dim, layout, docs,
                               sha256_file(docs), "synthetic")
    context["synthetic_vectors"] = "bench/scale.py: random unit vectors"
    table = pq.read_table(docs, columns=["id", "n_tokens"])
    ids = table.column("id").to_pylist()
    tokens = np.minimum(table.column("n_tokens").to_numpy(), layout.window).tolist()
    rng = np.random.default_rng([seed, len(ids)])
    parts = embeddings.parent / "synthetic-embed-part"
    with write_part(parts, Shard(), embed_params(cfg), context) as writer:
        for index in range(vector_files(len(ids), cfg)):
            rows = range(index * cfg.shard_size, min((index + 1) * cfg.shard_size, len(ids)))
            vectors = rng.standard_normal((len(rows), dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            npy = parts.parent / "synthetic-vectors.npy"
            np.save(npy, vectors.astype(np.float16))
            writer.add(index, npy, {"doc_id": [ids[i] for i in rows],
                                    "passage": [0] * len(rows),
                                    "token_start": [0] * len(rows),
                                    "n_tokens": [tokens[i] for i in rows]},
                       documents=len(rows))
            npy.unlink()
    manifest = gather_embeddings(params=embed_params(cfg), parts=[parts],
                                 embeddings=embeddings)
    shutil.rmtree(parts)
    return manifest


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
                 corpus: tuple[list[str], float], results: dict[str, list[dict]],
                 server: ScriptedServer) -> dict:
    """Write the n-document corpus, run the steps on it (and what they read), then delete
    it."""
    data = work / f"corpus-{n}"
    data.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    text_bytes = write_corpus(data / "docs.parquet", n, *corpus, args.seed)
    corpus = {"documents": n, "text_bytes": text_bytes,
              "parquet_bytes": (data / "docs.parquet").stat().st_size,
              "write_s": round(time.perf_counter() - t0, 1)}
    params = params_file(work / "params.yaml", args, server.base_url)
    plan, synthetic = plan_steps(steps, n, args.embed_max_size)
    if synthetic:
        log(f"synthetic vectors for {n:,} documents (above --embed-max-size)")
        t0 = time.perf_counter()
        synthetic_embeddings(data / "docs.parquet", data / "embeddings", params, args.seed)
        corpus["synthetic_vectors_s"] = round(time.perf_counter() - t0, 1)
    corpus["vectors"] = "synthetic" if synthetic else (
        "embedded" if "gather_embed" in plan else None)
    for step in plan:
        env = os.environ | {"LONGCTX_CACHE": str(work / f"cache-{n}-{step}")}
        measured = step in steps
        log(f"{step} on {n:,} documents" + ("" if measured else " (needed by a later step)"))
        before = server.served
        row = run_measured(step_commands(step, params, model, data), env,
                           work / f"{step}-{n}.log")
        if not measured:
            continue
        row |= {"documents": n, "us_per_doc": round(row["wall_s"] / n * 1e6, 2)}
        calls = {k: v - before[k] for k, v in server.served.items() if v > before[k]}
        if calls:
            row["llm_calls"] = calls
        if step == "index" or step in SYNTH_STEPS and "instructions" not in step:
            row["vectors"] = corpus["vectors"]
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
                    help="largest size the real embed runs at (above: its RSS extrapolated, "
                         "and index and the steps after it read synthetic vectors)")
    ap.add_argument("--embed-tokens", type=int, default=32, help="embed.max_tokens")
    ap.add_argument("--instructions", type=int, default=64,
                    help="instructions.count (and long_output.count), the same at every size")
    ap.add_argument("--top-k", type=int, default=8, help="retrieve.top_k")
    ap.add_argument("--pack-length", type=int, default=4096,
                    help="the one stage's length (tokens) pack fills")
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
    with ScriptedServer(vocabulary()[0].tolist()) as server:
        corpora = [measure_size(n, steps, args, work, model, (pool, ratio), results, server)
                   for n in sizes]
        served = server.served
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
                     "embed_shard_size": EMBED_SHARD_SIZE,
                     "index_type": "flat", "seed": args.seed, "model": str(model),
                     "vectors": {str(c["documents"]): c["vectors"] for c in corpora},
                     "synthetic_vectors": "random unit vectors in embed's format (bench "
                                          "only), at sizes above embed_max_size that need "
                                          "an index",
                     "instructions": args.instructions, "long_output_count": args.instructions,
                     "instructions_fixed": "the same count at every size: a synthesis "
                                           "step's slope is the corpus', not more work",
                     "retrieve_top_k": args.top_k, "pack_stage_length": args.pack_length,
                     "pack_fill_top_k": PACK_FILL_TOP_K,
                     "llm": {"backend": "openai", "server": "bench/scripted_llm.py "
                             "(deterministic replies, no model)", "calls_served": served},
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
