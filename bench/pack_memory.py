"""Benchmark pack's peak memory against the tokens it packs; prints ONE JSON object.

pack's memory used to grow with the stage's tokens: every sample's ids and learn flags were
held until the sequences file was written (5 bytes a token as arrays, over 150 GB for the
paper's stages). Now the tokens wait in a spill on disk (src/longctx/pack/spill.py). This
bench runs the real `longctx pack` (its own process, peak RSS from getrusage, as
bench/scale.py measures) on synthetic synthesis tables of --sizes instructions: each
instruction retrieves --top-k documents of a synthetic corpus (bench/scale.py's, --docs
documents) and has a kept response, so every long sample fills its stage of --length
tokens from its own documents (no index search). The baseline measured in the same run is
what holding the samples would take: the stage's tokens x 5 bytes (int32 id + bool flag),
from the stats.json pack writes, and the RSS of a bare process importing pack's code.

    python bench/pack_memory.py                          # 1K, 4K, 16K instructions
    python bench/pack_memory.py --sizes 500,2000 --docs 5000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from machine import load_average, machine_info
from scale import REPO, bare_import_rss, run_measured, sentence_pool, tokens_per_word, write_corpus

TOKEN_BYTES = 5  # an int32 id and a bool learn flag


def write_synthesis(root: Path, n: int, docs: Path, top_k: int, seed: int) -> None:
    """instructions, retrieved (top_k random documents each), responses (all kept), and empty
    summaries and long_output tables, in the schemas the steps write."""
    import pyarrow.parquet as pq

    from longctx.synth.instructions import SCHEMA as INSTRUCTIONS
    from longctx.synth.long_output import LONG_OUTPUT_SCHEMA
    from longctx.synth.respond import RESPONSES_SCHEMA
    from longctx.synth.retrieve import SCHEMA as RETRIEVED
    from longctx.synth.retrieve import vector_column
    from longctx.synth.summarize import SCHEMA as SUMMARIES
    from longctx.synth.tables import write_table

    doc_ids = pq.read_table(docs, columns=["id"])["id"].to_pylist()
    rng = np.random.default_rng([seed, n])
    ids = [f"{i:016x}" for i in range(n)]
    write_table(root / "instructions.parquet", [
        {"id": i, "instruction": f"Compare what the documents say about topic {k}.",
         "task_type": "comparison", "seed_doc_id": None, "seed_chunk": None, "round": 0,
         "prompt": k} for k, i in enumerate(ids)], INSTRUCTIONS)
    picks = rng.integers(0, len(doc_ids), size=(n, top_k))
    write_table(root / "retrieved.parquet", [
        {"instruction_id": i, "doc_ids": [doc_ids[d] for d in row], "scores": [1.0] * top_k}
        for i, row in zip(ids, picks)], RETRIEVED,
        query=vector_column(np.zeros((n, 0), dtype=np.float32)))  # no fill: no search
    write_table(root / "responses.parquet", [
        {"instruction_id": i, "response": f"The documents agree on topic {k}. " * 8,
         "finish_reason": "stop", "n_tokens": 64, "kept": True, "reason": None}
        for k, i in enumerate(ids)], RESPONSES_SCHEMA)
    write_table(root / "summaries.parquet", [], SUMMARIES)
    write_table(root / "long_output.parquet", [], LONG_OUTPUT_SCHEMA)


def params_file(path: Path, length: int) -> Path:
    """The micro profile with one stage of `length` tokens, long samples only."""
    params = yaml.safe_load((REPO / "configs" / "micro.yaml").read_text())
    params["stages"] = {"base_length": length // 2, "schedule": [
        {"length": length, "steps": 1, "mixture": {"long": 1.0, "long_output": 0.0,
                                                   "short": 0.0}}]}
    params["pack"] = dict(params.get("pack") or {}) | {"min_fill": 0.5}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def pack_command(params: Path, model: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "longctx.cli", "--params", str(params), "pack", "--stage",
            "0", "--model", str(model), "--docs", str(data / "docs.parquet"),
            "--instructions", str(data / "instructions.parquet"),
            "--retrieved", str(data / "retrieved.parquet"),
            "--summaries", str(data / "summaries.parquet"),
            "--responses", str(data / "responses.parquet"),
            "--long-output", str(data / "long_output.parquet"),
            "--index", str(data / "index"), "--embeddings", str(data / "embeddings"),
            "--sequences", str(out / "sequences.parquet"), "--metrics", str(out / "stats.json")]


def measure(n: int, args, work: Path, model: Path, params: Path, env: dict) -> dict:
    data = work / f"synth-{n}"
    data.mkdir(parents=True, exist_ok=True)
    os.link(work / "docs.parquet", data / "docs.parquet")
    write_synthesis(data, n, data / "docs.parquet", args.top_k, args.seed)
    out = work / f"pack-{n}"
    from longctx.pack.spill import spill_dir

    result = run_measured(pack_command(params, model, data, out), env, work / f"pack-{n}.log")
    stats = json.loads((out / "stats.json").read_text())
    held = stats["tokens"] * TOKEN_BYTES / 2**20
    return {"instructions": n, "sequences": stats["sequences"], "tokens": stats["tokens"],
            **result, "us_per_sample": round(result["wall_s"] / n * 1e6, 1),
            "tokens_as_arrays_mib": round(held, 1),
            "spill_left": spill_dir(out / "sequences.parquet").exists()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1000,4000,16000", help="instructions (long samples)")
    ap.add_argument("--docs", type=int, default=20_000, help="synthetic corpus documents")
    ap.add_argument("--top-k", type=int, default=16, help="documents retrieved per instruction")
    ap.add_argument("--length", type=int, default=2048, help="the stage's sequence length")
    ap.add_argument("--model-dir", default=None, help="base model dir (default models/base)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longctx-pack-bench-") as tmp:
        work = Path(tmp)
        from generate import model_dir

        model = model_dir(args.model_dir, work)
        pool = sentence_pool(np.random.default_rng(args.seed))
        text_bytes = write_corpus(work / "docs.parquet", args.docs, pool,
                                  tokens_per_word(model, pool), args.seed)
        env = dict(os.environ)
        load_before = load_average()
        imports = bare_import_rss("pack", env, work)
        params = params_file(work / "params.yaml", args.length)
        rows = [measure(n, args, work, model, params, env) for n in sizes]
    first, last = rows[0], rows[-1]
    out = {
        "benchmark": "pack_memory",
        "machine": machine_info(),
        "settings": {"sizes": sizes, "documents": args.docs, "top_k": args.top_k,
                     "length": args.length, "mixture": "long only", "seed": args.seed,
                     "model": str(model)},
        "load_average_before": load_before,
        "baseline": {"what": "a bare python importing pack's code; the stage's tokens held "
                             "as arrays (5 bytes a token), per size below",
                     "imports": imports, "corpus_text_mib": round(text_bytes / 2**20, 1)},
        "sizes": rows,
        "growth": {"rss_mib": round(last["peak_rss_mib"] - first["peak_rss_mib"], 1),
                   "tokens_as_arrays_mib": round(last["tokens_as_arrays_mib"]
                                                 - first["tokens_as_arrays_mib"], 1),
                   "rss_ratio": round(last["peak_rss_mib"] / first["peak_rss_mib"], 3)},
        "load_average_after": load_average(),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
