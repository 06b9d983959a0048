"""Benchmark LLM generation on this machine; prints ONE JSON object on stdout.

(a) throughput: output tokens/s of our transformers backend (`LLM.chat` over `HFBackend`:
    length-sorted, left-padded batches of B) against a naive loop calling `model.generate`
    once per prompt, on the same N prompts ("Summarize: <Lee news article>", truncated to
    varied lengths), same model and dtype, greedy, same max_new_tokens. Goal: ratio >= 3x
    on 2 CPU cores, judged at --batch-size; --extra-batch-sizes are measured for context.
    Greedy texts are compared with the naive loop's (batching should not change them).
(b) cache: `LLM.chat` calls/s cold (generating, writing the cache) and warm (all hits).
(c) the summarize step itself (chunking, QFS calls, recursion, table writes) on demo documents:
    calls/s with a cold cache, then rerun on the warm cache (every call a hit); the two runs'
    tables must be byte-identical.

    python bench/generate.py                       # 16 prompts, batch 16 (+8), 64 new tokens
    python bench/generate.py --prompts 8 --max-new-tokens 16 --extra-batch-sizes "" \
        --summarize-instructions 1                 # smoke
    python bench/generate.py --model-dir models/base --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import load_average, log, machine_info


def demo_prompts(n: int) -> list[list[dict[str, str]]]:
    """'Summarize: <article>' chats, articles cut to 40..250 words so lengths vary."""
    from longctx.assets import demo_corpus_files

    lines = [ln.strip() for ln in demo_corpus_files()["lee"].read_text(errors="replace")
             .splitlines() if ln.strip()]
    chats = []
    for i in range(n):
        words = lines[i % len(lines)].split()[: 40 + (i * 97) % 211]
        text = "Summarize in two sentences: " + " ".join(words)
        chats.append([{"role": "user", "content": text}])
    return chats


def model_dir(arg: str | None, tmp: Path) -> Path:
    if arg:
        return Path(arg)
    if Path("models/base/config.json").is_file():
        return Path("models/base")
    from longctx.base_model import prepare_base_model
    from longctx.config import BaseModelConfig

    log("models/base not found: converting the bundled GGUF (about a minute)")
    path = tmp / "base"
    prepare_base_model(BaseModelConfig(), model=path)
    return path


def naive_loop(path: Path, chats: list, max_new_tokens: int, dtype: str) -> dict:
    """What a first script does: one `generate` per prompt, the checkpoint's own defaults
    except greedy decoding and the same token budget."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}

    def one(chat):
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stop = next((i for i, t in enumerate(new) if t in eos), None)
        kept = new if stop is None else new[:stop]
        return tokenizer.decode(kept, skip_special_tokens=True), len(kept) + (stop is not None)

    one(chats[0][:1])  # warm-up: first-call allocations and kernel selection
    t0 = time.perf_counter()
    results = [one(c) for c in chats]
    seconds = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    return {"seconds": round(seconds, 2), "output_tokens": tokens,
            "output_tokens_per_s": round(tokens / seconds, 2),
            "texts": [t for t, _ in results]}


def ours(backend, chats: list, max_new_tokens: int, batch_size: int, cache: Path) -> dict:
    from longctx.llm import LLM, CallCache, Sampling

    llm = LLM(backend, CallCache(cache), batch_size=batch_size)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    t0 = time.perf_counter()
    outs = llm.chat(chats, sampling, "bench/1", desc=f"bench-b{batch_size}")
    cold = time.perf_counter() - t0
    stats = llm.last
    t0 = time.perf_counter()
    warm_outs = llm.chat(chats, sampling, "bench/1", desc="bench-warm")
    warm = time.perf_counter() - t0
    assert warm_outs == outs and llm.last.hits == len(chats)
    tokens = sum(o.completion_tokens for o in outs)
    return {
        "batch_size": batch_size,
        "seconds": round(cold, 2),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / cold, 2),
        "batches": stats.batches,
        "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in ("stop", "length")},
        "cache": {"cold_calls_per_s": round(len(chats) / cold, 2),
                  "warm_calls_per_s": round(len(chats) / warm, 1),
                  "warm_seconds": round(warm, 4), "hits": llm.last.hits},
        "texts": [o.text for o in outs],
    }


BENCH_INSTRUCTIONS = [
    "Compare the history and politics of the countries described in these documents.",
    "Write a timeline of the main events reported in these documents.",
    "Summarize what these documents say about sport and its competitions.",
    "Explain the causes and effects of the conflicts these documents describe.",
]


def summarize_cache(path: Path, n_instructions: int, batch_size: int, tmp: Path) -> dict:
    """The summarize step cold (fresh cache) and warm (same cache), on demo documents."""
    import pyarrow as pa

    from longctx.config import CorpusConfig, LLMConfig, SummarizeConfig
    from longctx.corpus import build_corpus
    from longctx.llm import make_llm
    from longctx.synth.summarize import summarize
    from longctx.synth.tables import read_table, write_table

    docs = Path("data/corpus/docs.parquet")
    if not docs.is_file():
        docs = tmp / "docs.parquet"
        build_corpus(CorpusConfig(), tokenizer=path, docs=docs, metrics=tmp / "corpus.json")
    ids = sorted(r["id"] for r in read_table(docs, ["id"]))[: 2 * n_instructions]
    instructions = [{"id": f"bench{i}", "instruction": BENCH_INSTRUCTIONS[i % 4]}
                    for i in range(n_instructions)]
    write_table(tmp / "instructions.parquet", instructions,
                pa.schema([("id", pa.string()), ("instruction", pa.string())]))
    write_table(tmp / "retrieved.parquet",
                [{"instruction_id": r["id"], "doc_ids": ids[2 * i:2 * i + 2]}
                 for i, r in enumerate(instructions)],
                pa.schema([("instruction_id", pa.string()), ("doc_ids", pa.list_(pa.string()))]))
    cfg = SummarizeConfig(chunk_tokens=512, budget_tokens=384, max_chunks_per_document=2,
                          max_levels=2, max_new_tokens=48)
    llm_cfg = LLMConfig(batch_size=batch_size, device="cpu")
    runs = {}
    for name in ("cold", "warm"):
        with make_llm(llm_cfg, path, cache_path=tmp / "summarize.sqlite") as llm:
            t0 = time.perf_counter()
            stats = summarize(cfg, llm, 0, instructions=tmp / "instructions.parquet",
                              retrieved=tmp / "retrieved.parquet", docs=docs,
                              summaries=tmp / f"{name}.parquet", metrics=tmp / f"{name}.json")
            seconds = time.perf_counter() - t0
            t = llm.total
        runs[name] = {"seconds": round(seconds, 3), "calls": t.calls, "hits": t.hits,
                      "generated": t.misses, "calls_per_s": round(t.calls / seconds, 2)}
        log(f"summarize {name}: {runs[name]}")
    same = (tmp / "cold.parquet").read_bytes() == (tmp / "warm.parquet").read_bytes()
    return {"settings": {"instructions": n_instructions, "documents_per_instruction": 2,
                         **cfg.model_dump(), "batch_size": batch_size},
            "summaries": stats["summaries"], "levels": stats["levels"], **runs,
            "warm_speedup": round(runs["cold"]["seconds"] / runs["warm"]["seconds"], 1),
            "tables_identical": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16,
                   help="the batch the goal is judged at (the demo's llm.batch_size)")
    p.add_argument("--extra-batch-sizes", default="8", help="also measured, comma-separated")
    p.add_argument("--summarize-instructions", type=int, default=4,
                   help="instructions in the summarize cold/warm measurement (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model-dir", default=None, help="default: models/base, else the bundled GGUF")
    p.add_argument("--skip-naive", action="store_true")
    args = p.parse_args()

    from longctx.llm import Sampling
    from longctx.llm.hf import HFBackend

    t_start = time.perf_counter()
    out = {"benchmark": "generate", "machine": machine_info(), "settings": vars(args),
           "load_average_before": load_average()}
    sizes = [args.batch_size] + [int(b) for b in args.extra_batch_sizes.split(",") if b]
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.model_dir, Path(tmp))
        out["settings"]["model_dir"] = str(path)
        chats = demo_prompts(args.prompts)
        backend = HFBackend(path, device="cpu")
        out["dtype"] = backend.dtype
        out["prompt_tokens"] = backend.prompt_tokens([backend.render(c) for c in chats])
        list(backend.generate(chats[:1], Sampling(max_new_tokens=2), [0]))  # warm-up
        runs = []
        for b in sizes:
            log(f"ours: batch {b}, {len(chats)} prompts")
            runs.append(ours(backend, chats, args.max_new_tokens, b, Path(tmp) / f"c{b}.sqlite"))
        out["ours"] = [{k: v for k, v in r.items() if k != "texts"} for r in runs]
        if not args.skip_naive:
            log("naive: one generate per prompt")
            naive = naive_loop(path, chats, args.max_new_tokens, backend.dtype)
            out["naive"] = {k: v for k, v in naive.items() if k != "texts"}
            for r, summary in zip(runs, out["ours"]):
                summary["speedup_vs_naive"] = round(
                    r["output_tokens_per_s"] / naive["output_tokens_per_s"], 2)
                summary["texts_identical_to_naive"] = sum(
                    a == b for a, b in zip(r["texts"], naive["texts"]))
            speedup = out["ours"][0]["speedup_vs_naive"]
            out["goal"] = {"batch_size": args.batch_size, "speedup_at_least": 3.0,
                           "speedup": speedup, "met": speedup >= 3.0}
        if args.summarize_instructions:
            log(f"summarize: {args.summarize_instructions} instructions, cold then warm cache")
            out["summarize"] = summarize_cache(path, args.summarize_instructions,
                                               args.batch_size, Path(tmp))
    out["load_average_after"] = load_average()
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
