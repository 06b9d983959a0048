"""Training test helpers: sequences files as the pack step writes them, params, a stage run
in this process or as `longctx train` in others, and comparisons of weights and curves."""

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file

from longctx.config import validate_params
from longctx.sequences import SCHEMA
from longctx.train.loop import train_stage


def write_sequences(path, n=12, length=64, seed=0, packed=True):
    """n sequences: even ones a single long sample (all learnt), odd ones three short samples
    (the last third of each learnt; `packed=False`: long ones too), as the pack step writes
    them; tokens count up mod 17."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        if i % 2 == 0 or not packed:
            size = int(torch.randint(length // 2, length + 1, (1,), generator=g))
            lengths, learn = [size], [True] * size
        else:
            lengths = [int(x) for x in torch.randint(6, length // 3, (3,), generator=g)]
            learn = [t >= 2 * n_ // 3 for n_ in lengths for t in range(n_)]
        start = int(torch.randint(0, 17, (1,), generator=g))  # a cycle: learnable in few steps
        ids = [3 + (start + t) % 17 for t in range(sum(lengths))]
        rows.append({"sequence": i, "kind": "long" if i % 2 == 0 else "short", "input_ids": ids,
                     "learn": learn, "sample_lengths": lengths,
                     "sample_ids": [f"s{i}/{k}" for k in range(len(lengths))]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def make_params(steps=4, **train):
    base = {"lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 2, "device": "cpu",
            "loss_chunk_tokens": 16, "save_dtype": "float32", "weight_decay": 0.0}
    return validate_params({
        "seed": 7,
        "stages": {"base_length": 32, "schedule": [{"length": 64, "steps": steps},
                                                   {"length": 128, "steps": 2}]},
        "train": {**base, **train},
    })


def run(tmp_path, base, seqs, params, name="run", stage=0, init=None, on_step=None):
    return train_stage(params, stage=stage, base=base, init=init or base, sequences=seqs,
                       model=tmp_path / name / "model", live=tmp_path / name / "live",
                       checkpoints=tmp_path / name / "checkpoints", on_step=on_step)


def weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def assert_same(a, b, exact=True):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        if exact:
            assert torch.equal(wa[k], wb[k]), k
        else:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6, msg=k)


def curve(live_dir, metric):
    """A logged training metric, one value per step (dvclive's tsv)."""
    rows = (live_dir / "plots" / "metrics" / "train" / f"{metric}.tsv").read_text().split("\n")
    return [float(line.split("\t")[-1]) for line in rows[1:] if line]


def assert_same_curves(live_a, live_b, steps):
    """The same loss and gradient norm at every step: the same gradient, not merely the same
    direction (AdamW's update hides a uniformly mis-scaled gradient)."""
    for metric in ("loss", "grad_norm"):
        assert len(curve(live_a, metric)) == steps
        assert curve(live_a, metric) == pytest.approx(curve(live_b, metric), rel=1e-4), metric


def write_params(tmp_path, params):
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return params_file


def python(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def launch(root, name, processes=2):
    """`accelerate launch` with configs/accelerate/<name>.yaml on CPU processes; FSDP2
    through tests/fsdp2_on_cpu.py (accelerate runs FSDP only on GPUs unless told)."""
    command = ["-m", "accelerate.commands.launch", "--config_file",
               str(root / "configs" / "accelerate" / f"{name}.yaml"), "--num_processes",
               str(processes)]
    return command + ([str(root / "tests" / "fsdp2_on_cpu.py")] if name == "fsdp2" else [])


def train_command(params_file, base, seqs, out):
    return ["-m", "longctx.cli", "--params", str(params_file), "train", "--stage", "0",
            "--base", str(base), "--init", str(base), "--sequences", str(seqs),
            "--model", str(out / "model"), "--live", str(out / "live"),
            "--checkpoints", str(out / "checkpoints")]


def train_cli(params_file, base, seqs, out, launcher=()):
    """`longctx train` as the rule runs it (it relaunches itself as the params say), or run
    directly under `launcher`."""
    return python(*launcher, *train_command(params_file, base, seqs, out))
