"""Benchmark one training step, ours against plain Hugging Face; prints ONE JSON object on stdout.

Random-init Llama shapes (SmolLM2-135M, Llama-3.2-1B, and `tiny` for CPU smoke runs), batch 1,
AdamW (lr 1e-5), activation checkpointing, SDPA attention; bf16 weights under bf16 autocast on
CUDA, fp32 on CPU. Per shape and sequence length, variants on the same weights (same seed)
and the same random tokens:
  plain_hf: `model(input_ids=ids, labels=ids).loss`, backward, step, zero_grad: the logits of
            the whole sequence (and their fp32 copy) live through the backward pass;
  longctx:  `LossModel(model, chunk_tokens)` from longctx.train.loss, targets = ids shifted by
            one, loss = sum / count: the chunked cross-entropy never holds the whole logits;
  longctx_liger (only with --variants): the same with Liger's fused kernel (train.loss liger).
Every (shape, length, variant) runs in a fresh subprocess, so its peak memory is its own
(CUDA: max_memory_allocated; CPU: the child's ru_maxrss). A variant that runs out of memory is
skipped at the longer lengths. Goals (one H200): Llama-3.2-1B trains at 64K and 128K with
longctx; SmolLM2-135M at 64K runs >= 1.3x plain's tokens/s in < 0.5x plain's memory.

    python bench/train_step.py                                   # CUDA: 8K..128K, real shapes
    python bench/train_step.py --steps 2          # CPU: tiny at 512..2048, about 3 minutes
    python bench/train_step.py --shapes tiny smollm2-135m --lengths 256 512 --steps 1  # 10 min
    python bench/train_step.py --shapes smollm2-135m --lengths 65536 \
        --variants longctx longctx_liger                       # CUDA: ours against Liger's
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import load_average, log, machine_info

SHAPES = {  # Llama configs; all with tied embeddings, like the real checkpoints
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=49152),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         vocab_size=128256),
}
VARIANTS = ("plain_hf", "longctx", "longctx_liger")  # the last: train.loss liger (CUDA)
LR = 1e-5
FLOP_CONVENTION = (
    "TFLOP/s = tokens/s * (6*N + 6*L*d*T) / 1e12, as in REFERENCE.md: N = non-embedding "
    "parameters (the embedding matrix, tied to the output projection, is excluded, so the "
    "vocabulary projection is not counted), L = layers, d = heads * head_dim, T = sequence "
    "length (6*L*d*T is causal attention, half of 12*L*d*T); the recomputation of activation "
    "checkpointing is not counted; tokens = the T input tokens of the step (batch 1)")
# REFERENCE.md, "Measured here: plain Hugging Face training step on one H200" (tokens/s, GiB)
REFERENCE_H200_PLAIN_HF = [
    {"shape": "smollm2-135m", "length": 8192, "tokens_per_s": 46351, "tflops": 69,
     "peak_gib": 6.4},
    {"shape": "smollm2-135m", "length": 32768, "tokens_per_s": 55486, "tflops": 224,
     "peak_gib": 23.0},
    {"shape": "smollm2-135m", "length": 65536, "tokens_per_s": 34435, "tflops": 256,
     "peak_gib": 45.2},
    {"shape": "smollm2-135m", "length": 131072, "tokens_per_s": 19223, "tflops": 274,
     "peak_gib": 89.6},
    {"shape": "llama-3.2-1b", "length": 8192, "tokens_per_s": 34973, "tflops": 261,
     "peak_gib": 21.3},
    {"shape": "llama-3.2-1b", "length": 32768, "tokens_per_s": 22588, "tflops": 277,
     "peak_gib": 64.3},
    {"shape": "llama-3.2-1b", "length": 65536, "status": "oom", "peak_gib": ">139"},
]


def non_embedding_params(shape: str) -> int:
    """N of the FLOP count, from the config (Llama: no biases; two RMSNorms per layer)."""
    c = SHAPES[shape]
    d, hd = c["hidden_size"], c["head_dim"]
    attn = d * hd * (2 * c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    layer = attn + 3 * d * c["intermediate_size"] + 2 * d
    return c["num_hidden_layers"] * layer + d


def flops_per_token(shape: str, length: int) -> int:
    c = SHAPES[shape]
    d_attn = c["num_attention_heads"] * c["head_dim"]
    return 6 * non_embedding_params(shape) + 6 * c["num_hidden_layers"] * d_attn * length


# --------------------------------------------------------------------------- child process


def build_model(shape: str, length: int, device, dtype):
    """A random-init Llama of `shape`, built on `device` (fast for 1B on a GPU), training mode,
    activation checkpointing on, SDPA attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, use_cache=False,
                         max_position_embeddings=max(length, 8192))
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.activation_checkpointing_enable({"use_reentrant": False})
    return model.train()


def rss_gib() -> float:
    """This process's resident memory now (Linux)."""
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(spec: dict) -> dict:
    """One variant at one length, in a fresh process: build, warm up, time. Out-of-memory and
    other failures are reported in the result, never raised."""
    import resource

    import torch

    from longctx.train.loss import LossModel  # imported by both variants: same baseline RSS

    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    dtype = getattr(torch, spec["dtype"])
    length = spec["length"]
    out = {"status": "ok", "step_times_s": []}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def memory() -> tuple[float, float]:
        """(now, peak) in GiB: allocated tensors on CUDA, process RSS on CPU."""
        if cuda:
            return (torch.cuda.memory_allocated(device) / 2**30,
                    torch.cuda.max_memory_allocated(device) / 2**30)
        return rss_gib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    torch.manual_seed(spec["seed"])
    model = build_model(spec["shape"], length, device, dtype)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    ids = torch.randint(0, SHAPES[spec["shape"]]["vocab_size"], (1, length), generator=gen)
    ids = ids.to(device)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    position_ids = torch.arange(length, device=device)[None]
    wrapped = LossModel(model, spec["chunk_tokens"],
                        "liger" if spec["variant"] == "longctx_liger" else "chunked")
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def step() -> torch.Tensor:
        with autocast:
            if spec["variant"] == "plain_hf":
                loss = model(input_ids=ids, labels=ids).loss
            else:
                total, count = wrapped(ids, position_ids, None, targets)
                loss = total / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    out["base_gib"] = memory()[0]  # weights, inputs (and on CPU the libraries): before step 1
    try:
        for i in range(spec["warmup"] + spec["steps"]):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            seconds = time.perf_counter() - t0
            if i == 0:
                out["loss_first_step"] = float(loss)  # same weights, same tokens: must agree
            if i >= spec["warmup"]:
                out["step_times_s"].append(seconds)
            log(f"  {spec['variant']} {spec['shape']} T={length}: step {i + 1} "
                f"{seconds:.2f}s{' (warmup)' if i < spec['warmup'] else ''}")
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate" not in str(exc):
            raise
        out["status"] = "oom"
        out["error"] = str(exc).splitlines()[0][:300]
    if out["status"] == "oom":  # outside the handler: the traceback no longer pins tensors
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
    out["peak_gib"] = memory()[1]
    return out


# --------------------------------------------------------------------------- parent


def run_variant(spec: dict) -> dict:
    """Run `child(spec)` in a fresh interpreter (its stderr passes through) and read back the
    one JSON line it prints; a child killed without answering (the kernel's OOM killer on
    CPU) counts as out of memory."""
    row = {"shape": spec["shape"], "length": spec["length"], "variant": spec["variant"]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        status = "oom" if proc.returncode in (-9, 137) else "error"
        return {**row, "status": status, "returncode": proc.returncode}
    res = json.loads(lines[-1][len("RESULT "):])
    row["status"] = res.pop("status")
    times = res.pop("step_times_s")
    if row["status"] == "ok" and times:
        step_s = statistics.median(times)
        tokens_per_s = spec["length"] / step_s
        row.update(step_s=round(step_s, 4), tokens_per_s=round(tokens_per_s, 1),
                   tflops=round(tokens_per_s * flops_per_token(spec["shape"], spec["length"])
                                / 1e12, 3))
    else:
        row.update(step_s=None, tokens_per_s=None, tflops=None)
    row["peak_gib"] = round(res.pop("peak_gib"), 3)
    row["base_gib"] = round(res.pop("base_gib"), 3)
    row["step_gib"] = round(row["peak_gib"] - row["base_gib"], 3)
    row["step_times_s"] = [round(t, 4) for t in times]
    if "loss_first_step" in res:
        row["loss_first_step"] = round(res.pop("loss_first_step"), 6)
    return {**row, **res}


def compare(results: list[dict]) -> list[dict]:
    """Each of our variants / plain per (shape, length): ratios only where both ran."""
    by = {(r["shape"], r["length"], r["variant"]): r for r in results}
    rows = []
    for shape, length, variant in dict.fromkeys((r["shape"], r["length"], r["variant"])
                                                for r in results):
        if variant == "plain_hf":
            continue
        plain, ours = by.get((shape, length, "plain_hf")), by[(shape, length, variant)]
        row = {"shape": shape, "length": length, "variant": variant,
               "plain_hf": plain and plain["status"], "ours": ours["status"],
               "tokens_per_s_ratio": None, "memory_ratio": None, "step_memory_ratio": None,
               "loss_abs_diff": None}
        if plain and plain["status"] == ours["status"] == "ok":
            row.update(
                tokens_per_s_ratio=round(ours["tokens_per_s"] / plain["tokens_per_s"], 3),
                memory_ratio=round(ours["peak_gib"] / plain["peak_gib"], 3),
                step_memory_ratio=round(ours["step_gib"] / plain["step_gib"], 3),
                loss_abs_diff=round(abs(ours["loss_first_step"] - plain["loss_first_step"]), 6))
        rows.append(row)
    return rows


def goals(results: list[dict], comparison: list[dict]) -> dict:
    """The H200 goals: true/false when measured, null when not (or when a ratio is undefined)."""
    status = {(r["shape"], r["length"], r["variant"]): r["status"] for r in results}
    ratios = {(c["shape"], c["length"], c["variant"]): c for c in comparison}

    def trains(shape: str, length: int):
        s = status.get((shape, length, "longctx"))
        return {"ok": True, "oom": False, "skipped": False}.get(s)

    smol = ratios.get(("smollm2-135m", 65536, "longctx"), {})
    speed, mem = smol.get("tokens_per_s_ratio"), smol.get("memory_ratio")
    return {
        "llama-3.2-1b_longctx_trains_65536": trains("llama-3.2-1b", 65536),
        "llama-3.2-1b_longctx_trains_131072": trains("llama-3.2-1b", 131072),
        "smollm2-135m_65536_tokens_per_s_ratio_ge_1.3": None if speed is None else speed >= 1.3,
        "smollm2-135m_65536_memory_ratio_lt_0.5": None if mem is None else mem < 0.5,
        "values": {"smollm2-135m_65536_tokens_per_s_ratio": speed,
                   "smollm2-135m_65536_memory_ratio": mem},
        "note": "meaningful on one H200 only; on CPU the lengths are far shorter",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None,
                   help="default: smollm2-135m llama-3.2-1b on CUDA, tiny on CPU (a "
                   "smollm2-135m step takes about a minute on 2 cores)")
    p.add_argument("--lengths", nargs="+", type=int, default=None,
                   help="default: 8192 32768 65536 131072 on CUDA, 512 1024 2048 on CPU")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:2]),
                   help="longctx_liger: our step with train.loss liger (CUDA, liger-kernel)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="longctx loss chunk; default: train.loss_chunk_tokens' default on "
                   "CUDA, 256 on CPU (so that the short CPU lengths span several chunks)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 weights + bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    import torch

    from longctx.config import TrainConfig

    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    shapes = args.shapes or (["smollm2-135m", "llama-3.2-1b"] if cuda else ["tiny"])
    lengths = sorted(args.lengths or ([8192, 32768, 65536, 131072] if cuda else [512, 1024, 2048]))
    chunk = args.chunk_tokens or (TrainConfig.model_fields["loss_chunk_tokens"].default
                                  if cuda else 256)

    t_start = time.perf_counter()
    machine = machine_info()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        machine.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                       cuda_version=torch.version.cuda)
    out = {
        "benchmark": "train_step", "machine": machine,
        "settings": {
            "shapes": {s: {**SHAPES[s], "tie_word_embeddings": True,
                           "non_embedding_params": non_embedding_params(s)} for s in shapes},
            "lengths": lengths, "variants": args.variants, "steps": args.steps,
            "warmup": args.warmup, "batch_size": 1,
            "device": device, "seed": args.seed,
            "precision": ("bf16 weights, grads and AdamW states, bf16 autocast" if
                          dtype == "bfloat16" else f"{dtype} weights, no autocast"),
            "optimizer": f"torch AdamW(lr={LR}), other arguments torch defaults, same for both",
            "attention": "sdpa", "activation_checkpointing": "every layer, use_reentrant=False",
            "longctx_loss_chunk_tokens": chunk, "inputs": "uniform random token ids",
            "memory": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats (weights "
                       "included); base_gib = memory_allocated before step 1" if cuda else
                       "ru_maxrss of the variant's own fresh process (whole process: Python, "
                       "torch, weights); base_gib = its RSS before step 1 (after building the "
                       "model); step_gib = peak - base"),
            "isolation": "every (shape, length, variant) in a fresh subprocess",
        },
        "flop_convention": FLOP_CONVENTION,
    }
    if cuda:
        out["reference_h200_plain_hf"] = REFERENCE_H200_PLAIN_HF

    results = []
    for shape in shapes:
        out_of_memory: set[str] = set()  # variants that failed a shorter length of this shape
        for length in lengths:
            for variant in args.variants:
                if variant in out_of_memory:
                    results.append({"shape": shape, "length": length, "variant": variant,
                                    "status": "skipped", "step_s": None, "tokens_per_s": None,
                                    "tflops": None, "peak_gib": None})
                    continue
                log(f"{shape} T={length} {variant}")
                spec = {"shape": shape, "length": length, "variant": variant, "device": device,
                        "dtype": dtype, "steps": args.steps, "warmup": args.warmup,
                        "chunk_tokens": chunk, "seed": args.seed}
                row = run_variant(spec)
                log(f"  -> {row['status']}: {row.get('tokens_per_s')} tokens/s, "
                    f"peak {row.get('peak_gib')} GiB")
                if row["status"] == "oom":
                    out_of_memory.add(variant)
                results.append(row)
    out["results"] = results
    out["comparison"] = compare(results)
    out["goals"] = goals(results, out["comparison"])
    out["load_average_at_end"] = load_average()
    out["total_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
