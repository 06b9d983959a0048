"""The training loop on a tiny random Llama (CPU; fp32 but for the bf16 test): stages,
resume, signals, loss normalisation, errors before training, and two-process runs on gloo
(torchrun data parallel, DeepSpeed ZeRO-3, FSDP2, context parallelism)."""

import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from llm_data import build_tiny_chat_model
from train_data import (
    assert_same,
    assert_same_curves,
    curve,
    launch,
    make_params,
    python,
    run,
    train_cli,
    train_command,
    weights,
    write_params,
    write_sequences,
)

from longctx.config import TrainConfig, validate_params
from longctx.errors import ConfigError, LongctxError
from longctx.train.loop import TrainingInterrupted, lr_factor


@pytest.fixture
def setup(tmp_path):
    base = build_tiny_chat_model(tmp_path / "base", max_positions=64)
    seqs = write_sequences(tmp_path / "pack" / "stage-0.parquet")
    return tmp_path, base, seqs


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1, lr_schedule="cosine")
    factors = [lr_factor(s, 10, cfg) for s in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[2:]))
    linear = TrainConfig(warmup_steps=0, min_lr_ratio=0.0, lr_schedule="linear")
    assert [lr_factor(s, 5, linear) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_factor(7, 10, TrainConfig(warmup_steps=1, lr_schedule="constant")) == 1.0


def test_stages_train_from_each_other_with_their_rope_base(setup, caplog):
    tmp_path, base, seqs = setup
    params = make_params(steps=6)
    with caplog.at_level("INFO", logger="longctx.train.checkpoint"):
        summary = run(tmp_path, base, seqs, params, "s0")
    # every 2 steps but the last: the model is saved then (and the checkpoints deleted)
    assert re.findall(r"checkpoint: step (\d+)", caplog.text) == ["2", "4"]
    out = tmp_path / "s0"
    config = json.loads((out / "model" / "config.json").read_text())
    # base length 32 (stages.base_length) and base 1e4 (the tiny Llama's) -> x4 per doubling
    assert config["max_position_embeddings"] == 64 == summary["length"]
    assert config["rope_parameters"]["rope_theta"] == pytest.approx(4e4)
    assert json.loads((out / "model" / "longctx_manifest.json").read_text())["stage"] == {
        "index": 0, "length": 64, "rope_theta": 4e4, "derived": True}
    losses = [float(r.split("\t")[-1]) for r in
              (out / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split(
                  "\n")[1:] if r]
    assert len(losses) == 6 and losses[-1] < losses[0]  # it learns
    assert json.loads((out / "live" / "metrics.json").read_text())["stage"]["steps"] == 6
    before, after = weights(base), weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    seqs1 = write_sequences(tmp_path / "pack" / "stage-1.parquet", length=128, seed=1)
    run(tmp_path, base, seqs1, params, "s1", stage=1, init=out / "model")
    config1 = json.loads((tmp_path / "s1" / "model" / "config.json").read_text())
    assert config1["max_position_embeddings"] == 128
    assert config1["rope_parameters"]["rope_theta"] == pytest.approx(1.6e5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_killed_run_resumes_to_the_same_weights(setup, tied):
    """Also with tied input and output embeddings (the default SmolLM2's), which a checkpoint
    stores once."""
    tmp_path, base, seqs = setup
    if tied:
        base = build_tiny_chat_model(tmp_path / "tied", max_positions=64, tied=True)
    params = make_params(steps=5)
    run(tmp_path, base, seqs, params, "whole")

    def crash(step):
        if step == 3:  # after the step-2 checkpoint: step 3 is lost and redone
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path, base, seqs, params, "killed", on_step=crash)
    assert not (tmp_path / "killed" / "model").exists()
    resumed = []
    run(tmp_path, base, seqs, params, "killed", on_step=resumed.append)
    assert resumed == [3, 4, 5]
    assert_same(tmp_path / "whole" / "model", tmp_path / "killed" / "model")
    assert not any((tmp_path / "killed" / "checkpoints").iterdir())  # spent once the model is out
    tsv = (tmp_path / "killed" / "live" / "plots" / "metrics" / "train" / "loss.tsv")
    assert len(tsv.read_text().strip().split("\n")) == 1 + 5  # no gap, no repeat


def test_sigterm_saves_a_checkpoint_then_stops(setup):
    tmp_path, base, seqs = setup
    params = make_params(steps=3)
    run(tmp_path, base, seqs, params, "whole")

    def term(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 1 of 3"):
        run(tmp_path, base, seqs, params, "term", on_step=term)
    saved = list((tmp_path / "term" / "checkpoints").glob("*/step-*"))
    assert [p.name for p in saved] == ["step-00000001"]
    resumed = []
    run(tmp_path, base, seqs, params, "term", on_step=resumed.append)
    assert resumed == [2, 3]
    assert_same(tmp_path / "whole" / "model", tmp_path / "term" / "model")


def test_loss_weighs_every_token_alike_across_micro_batches(setup):
    """Two sequences as one padded, masked micro-batch, or as two accumulated ones: the same
    update (the loss is normalised by the step's token count, not averaged per batch)."""
    tmp_path, base, seqs = setup
    run(tmp_path, base, seqs, make_params(steps=2, batch_size=2, global_batch=2), "batched")
    run(tmp_path, base, seqs, make_params(steps=2, global_batch=2), "accumulated")
    assert_same(tmp_path / "batched" / "model", tmp_path / "accumulated" / "model", exact=False)
    assert_same_curves(tmp_path / "batched" / "live", tmp_path / "accumulated" / "live", 2)


def test_bad_setups_fail_before_training(setup, tmp_path):
    _, base, seqs = setup
    with pytest.raises(LongctxError, match=r"12 sequences, but 7 steps x 2 .* need 14"):
        run(tmp_path, base, seqs, make_params(steps=7, batch_size=2, global_batch=2))
    with pytest.raises(ConfigError, match=r"stages.schedule\[1\].length: 48 must exceed"):
        validate_params({"stages": {"schedule": [{"length": 64}, {"length": 48}]}})  # at once
    at_base = make_params().model_copy(update={"stages": validate_params({"stages": {
        "schedule": [{"length": 64}]}}).stages})  # the base model's length: known only here
    with pytest.raises(ConfigError, match=r"stages.schedule\[0\].length: 64 must exceed the "
                                          r"base model's 64"):
        run(tmp_path, base, seqs, at_base)
    with pytest.raises(LongctxError, match="longctx_manifest.json: not found"):
        run(tmp_path, base, seqs, make_params(), stage=1)  # stage 1 from the base: no stage 0
    long = write_sequences(tmp_path / "long.parquet", length=100)
    with pytest.raises(LongctxError, match="exceeds the stage length 64"):
        run(tmp_path, base, long, make_params())
    with pytest.raises(LongctxError, match="flex_attention has no backward pass on CPU"):
        run(tmp_path, base, seqs, make_params(attention="flex_attention"))
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(LongctxError, match="flash_attention_2 needs the flash-attn package"):
            run(tmp_path, base, seqs, make_params(attention="flash_attention_2"))
    with pytest.raises(LongctxError, match="train.loss: liger needs a CUDA GPU"):
        run(tmp_path, base, seqs, make_params(loss="liger"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("launcher", ["one process", "zero3", "fsdp2"])
def test_bf16_trains_like_fp32(setup, root, launcher):
    """`train.dtype: bfloat16`, the GPU default, run on CPU through `longctx train`: in one
    process, autocast with a bf16 attention mask and the chunked loss taking bf16 hidden
    states to an fp32 softmax; under ZeRO-3 (2 processes, the paper profile's launcher),
    DeepSpeed's bf16 engine with the output projection partitioned; under FSDP2, bf16
    weights gathered per layer with fp32 masters. All save bf16 weights and stay within
    bf16's precision of one fp32 process on the same sequences, so the GPU paths' dtype
    handling is checked before a GPU runs them. (Tied embeddings, as in SmolLM2: saved once,
    and the log keeps quiet about the checkpoint storing them once.)"""
    tmp_path, _, seqs = setup
    settings = {"steps": 3, "dtype": "bfloat16", "save_dtype": "bfloat16"}
    if launcher == "zero3":
        pytest.importorskip("deepspeed")
        settings.update(processes=2, global_batch=4,
                        accelerate_config=str(root / "configs/accelerate/zero3.yaml"))
    elif launcher == "fsdp2":
        settings.update(processes=2, global_batch=4)
    else:
        settings.update(global_batch=4)
    # an output projection of 4096 x 32: over DeepSpeed's persistence threshold (partitioned)
    base = build_tiny_chat_model(tmp_path / "tied", max_positions=64, vocab_size=4096,
                                 tied=True)
    run(tmp_path, base, seqs, make_params(steps=3, global_batch=4), "fp32")
    result = train_cli(write_params(tmp_path, make_params(**settings)), base, seqs,
                       tmp_path / "bf16", launch(root, "fsdp2") if launcher == "fsdp2" else ())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint: step 2" in result.stderr
    chatter = ["Removed shared tensor", "is deprecated", "Saving model to"]
    if launcher == "one process":  # (accelerate's launcher, a process of its own, says it)
        chatter.append("Setting accelerator to CPU")
    assert not [c for c in chatter if c in result.stdout + result.stderr]
    fp32, bf16 = tmp_path / "fp32" / "live", tmp_path / "bf16" / "live"
    assert curve(bf16, "loss") == pytest.approx(curve(fp32, "loss"), rel=2e-2)
    assert curve(bf16, "grad_norm") == pytest.approx(curve(fp32, "grad_norm"), rel=5e-2)
    # it did compute in bf16: further from fp32 than fp32's own reordering noise (~1e-7)
    assert max(abs(a / b - 1) for a, b in zip(curve(bf16, "loss"), curve(fp32, "loss"))) > 1e-5
    saved, reference, start = (weights(d) for d in (tmp_path / "bf16" / "model",
                                                     tmp_path / "fp32" / "model", base))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert saved.keys() == start.keys()  # no second copy of the tied output projection
    # AdamW moves a weight by about lr whatever its gradient's size, so single weights can
    # differ by a step; the whole update must point the same way, by the same amount
    update_bf16, update_fp32 = (torch.cat([(w[k].float() - start[k].float()).flatten()
                                           for k in sorted(start)])
                                for w in (saved, reference))
    assert torch.cosine_similarity(update_bf16, update_fp32, dim=0) > 0.99
    assert update_bf16.norm() == pytest.approx(float(update_fp32.norm()), rel=0.05)


def test_two_processes_take_signals_and_train_like_one_accumulating(setup):
    """`train.processes: 2` relaunches `longctx train` under torchrun (gloo on CPU), whose
    processes sit in sessions of their own. Signals sent to the `longctx train` that a rule
    runs reach them: SIGUSR1, a checkpoint and on; SIGTERM, a checkpoint and stop (none trains
    on as an orphan). The rerun resumes, and the update equals one process accumulating the
    same two sequences per step; each step and the stop are logged once (by rank 0)."""
    tmp_path, base, _ = setup
    seqs = write_sequences(tmp_path / "many.parquet", n=60)
    run(tmp_path, base, seqs, make_params(steps=30, global_batch=2, checkpoint_every=1000),
        "one")
    params_file = write_params(tmp_path, make_params(steps=30, processes=2, global_batch=2,
                                                     checkpoint_every=1000))
    out = tmp_path / "two"
    proc = subprocess.Popen([sys.executable, *train_command(params_file, base, seqs, out)],
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, stopping = [], False
    for line in proc.stderr:  # to its end: every process holding it has exited
        lines.append(line)
        if "step 1/30: loss" in line:
            proc.send_signal(signal.SIGUSR1)
        elif "checkpoint: step" in line and not stopping:  # the one SIGUSR1 asked for
            proc.send_signal(signal.SIGTERM)
            stopping = True
    killed = "".join(lines)
    assert proc.wait(timeout=30) != 0, killed[-3000:]
    saved = sorted(int(p.name.removeprefix("step-")) for p in out.glob("checkpoints/*/step-*"))
    # SIGUSR1 follows step 1's log line, so its checkpoint is at step 1 or later
    assert len(saved) == 2 and 1 <= saved[0] < saved[1] < 30, killed[-3000:]
    assert killed.count(f"stopped by SIGTERM after step {saved[1]} of 30") == 1  # by rank 0
    assert not (out / "model").exists()

    resumed = train_cli(params_file, base, seqs, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {saved[1]}" in resumed.stderr
    assert "2 process(es)" in resumed.stderr
    logged = re.findall(r"stage 0 step (\d+)/30: loss", killed + resumed.stderr)
    assert logged == [str(i) for i in range(1, 31)]
    # one line per checkpoint (ours), not accelerate's
    assert killed.count(f"checkpoint: step {saved[0]} ") == 1
    assert "Saving current state" not in killed
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", 30)


@pytest.mark.parametrize("launcher", ["zero3", "fsdp2"])
def test_sharded_runs_accumulate_and_resume_like_one_process(setup, root, launcher):
    """configs/accelerate/{zero3,fsdp2}.yaml, 2 processes on CPU: weights, gradients and
    optimizer states sharded, 2 micro-batches accumulated per process. A run killed in step 2
    (checkpoint every step) resumes from its sharded checkpoint and ends with the update of
    ONE process accumulating the same 4 sequences per step; tied embeddings stay tied."""
    if launcher == "zero3":
        pytest.importorskip("deepspeed")
    tmp_path, _, seqs = setup
    # an output projection of 4096 x 32 > DeepSpeed's persistence threshold (1e5 elements):
    # really partitioned, so the chunked loss must have it gathered (external parameter)
    base = build_tiny_chat_model(tmp_path / "base-4k", max_positions=64, vocab_size=4096,
                                 tied=True)
    run(tmp_path, base, seqs, make_params(steps=3, global_batch=4), "one")
    params = make_params(steps=3, global_batch=4, processes=2, checkpoint_every=1,
                         accelerate_config=str(root / f"configs/accelerate/{launcher}.yaml"))
    params_file = write_params(tmp_path, params)
    out = tmp_path / launcher
    killed = python(*launch(root, launcher), str(root / "tests" / "crashing_train.py"),
                    str(params_file), str(base), str(seqs), str(out), "step", "2")
    assert killed.returncode != 0 and "killed after step 2" in killed.stderr, \
        killed.stderr[-3000:]
    assert not (out / "model").exists()
    # on_step runs before the step's checkpoint: step 2 is lost and redone
    saved = list((out / "checkpoints").glob("*/step-*"))
    assert [p.name for p in saved] == ["step-00000001"]
    if launcher == "fsdp2":  # each process wrote its own shards
        assert {p.name for p in saved[0].rglob("*.distcp")} >= {"__0_0.distcp", "__1_0.distcp"}
    resumed = train_cli(params_file, base, seqs, out,
                        launch(root, launcher) if launcher == "fsdp2" else ())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 1" in resumed.stderr and "2 process(es)" in resumed.stderr
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", 3)  # no gap, no repeat


def test_context_parallel_trains_like_one_process(setup, root):
    """`train.context_parallel: 2` under configs/accelerate/zero3.yaml (2 processes on CPU):
    both processes hold half of each sequence (DeepSpeed Ulysses); odd lengths are padded to
    split evenly. Loss, gradient norm and weights equal one process training on whole
    sequences: no token loses its target or its attention to the other half."""
    pytest.importorskip("deepspeed")
    tmp_path, base, _ = setup
    seqs = write_sequences(tmp_path / "long.parquet", packed=False)
    run(tmp_path, base, seqs, make_params(steps=3, global_batch=2), "one")
    params = make_params(steps=3, global_batch=2, processes=2, context_parallel=2,
                         accelerate_config=str(root / "configs/accelerate/zero3.yaml"))
    out = tmp_path / "cp"
    result = train_cli(write_params(tmp_path, params), base, seqs, out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "context parallel 2" in result.stderr
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", 3)


def test_context_parallel_setups_that_cannot_work_fail_first(setup, monkeypatch):
    tmp_path, base, seqs = setup
    with pytest.raises(ConfigError,
                       match=r"train\.context_parallel: 2 must divide train\.processes 1"):
        make_params(context_parallel=2)
    with pytest.raises(ConfigError, match="needs attention sdpa or flash_attention_2"):
        make_params(context_parallel=2, processes=2, attention="eager")
    with pytest.raises(LongctxError, match="context_parallel: 2 needs DeepSpeed"):
        run(tmp_path, base, seqs, make_params(context_parallel=2, processes=2))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # as a DeepSpeed launch sets it
    with pytest.raises(LongctxError, match="3 must divide the model's 4 attention heads"):
        run(tmp_path, base, seqs, make_params(context_parallel=3, processes=3))
    with pytest.raises(LongctxError, match="pack up to 3 samples, which sdpa cannot"):
        run(tmp_path, base, seqs, make_params(context_parallel=2, processes=2))
    assert not (tmp_path / "run").exists()


def test_launcher_relaunches_only_when_asked(monkeypatch, root):
    from accelerate.commands.config.config_args import load_config_from_file

    from longctx.train.launch import launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--stage", "0"]
    assert launcher(TrainConfig(), argv) is None
    torchrun = launcher(TrainConfig(processes=2, global_batch=2), argv)
    assert torchrun[1:7] == ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--standalone", "-m"] and torchrun[-4:] == ["longctx.cli", *argv]
    monkeypatch.chdir(root)
    for name in ("single", "ddp", "fsdp2", "zero3"):
        config = f"configs/accelerate/{name}.yaml"
        load_config_from_file(config)  # accelerate itself accepts the file
        command = launcher(TrainConfig(accelerate_config=config, processes=4, global_batch=4),
                           argv)
        assert command[1:7] == ["-m", "accelerate.commands.launch", "--config_file", config,
                                "--num_processes", "4"]  # the params' count, not the file's
    with pytest.raises(ConfigError, match="train.accelerate_config: nowhere.yaml: file not found"):
        launcher(TrainConfig(accelerate_config="nowhere.yaml"), argv)
    monkeypatch.setenv("WORLD_SIZE", "2")  # already launched: train here
    assert launcher(TrainConfig(processes=2, global_batch=2), argv) is None


def test_machines_meet_by_c10d_rendezvous(monkeypatch, root):
    """`train.nodes` > 1: one torchrun agent per machine (processes / nodes each) meeting at
    `train.rendezvous` by c10d, within the params' timeout; `accelerate launch` is told the
    machines, this one's rank and the same rendezvous; outside SLURM the endpoint is needed."""
    from longctx.train.launch import launcher

    for name in ("WORLD_SIZE", "SLURM_JOB_ID", "SLURM_NODEID", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    argv = ["train", "--stage", "0"]
    two = {"processes": 4, "nodes": 2, "global_batch": 4, "rendezvous": "10.0.0.1:29400",
           "rendezvous_timeout_s": 60}
    assert launcher(TrainConfig(**two), argv)[1:] == [
        "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id",
        "longctx-train", "--rdzv-conf", "join_timeout=60,read_timeout=60", "-m", "longctx.cli",
        *argv]
    monkeypatch.chdir(root)
    monkeypatch.setenv("NODE_RANK", "1")
    command = launcher(TrainConfig(**two, accelerate_config="configs/accelerate/zero3.yaml"),
                       argv)
    assert command[7:21] == ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip",
                             "10.0.0.1", "--main_process_port", "29400", "--rdzv_backend",
                             "c10d", "--deepspeed_multinode_launcher", "standard", "-m",
                             "longctx.cli"]
    with pytest.raises(LongctxError, match="2 machines need train.rendezvous"):
        launcher(TrainConfig(**{**two, "rendezvous": None}), argv)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="SLURM's scontrol not installed "
                    "(.ci/slurm-cluster.sh installs it)")
def test_under_slurm_srun_starts_an_agent_on_every_node(monkeypatch):
    """In a SLURM job of 2 nodes, `longctx train` runs itself on each node through srun (one
    task per node); each of those agents meets the others at the job's first node, on a
    port of the job's own, with its SLURM node id as machine rank. A job with fewer nodes
    than the params ask is refused."""
    from longctx.train.launch import NODE_AGENT, launcher

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(NODE_AGENT, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-08]")
    argv = ["train", "--stage", "0"]
    cfg = TrainConfig(processes=16, nodes=2, global_batch=16)
    assert launcher(cfg, argv) == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        f"--export=ALL,{NODE_AGENT}=1", sys.executable, "-m", "longctx.cli", *argv]
    monkeypatch.setenv(NODE_AGENT, "1")  # srun's task on a node
    agent = launcher(cfg, argv)
    assert agent[3:5] == ["--nproc_per_node", "8"]
    assert agent[agent.index("--rdzv-endpoint") + 1] == "gpu07:24321"
    assert agent[agent.index("--rdzv-id") + 1] == "longctx-4321"
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    with pytest.raises(LongctxError, match="train.nodes: 2 machines, but this SLURM job has 1"):
        launcher(cfg, argv)


DYING_LAUNCHER = """
import os, signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
while not os.path.exists(sys.argv[2] + ".ready"):
    time.sleep(0.05)
time.sleep(1.5)  # (`run` looks for its processes twice a second)
os.kill(os.getpid(), signal.SIGKILL)
"""
SAVING_WORKER = """
import os, signal, sys, time
from longctx.train.launch import stop_with_launcher

def save(signum, frame):
    time.sleep(1.5)  # a checkpoint being written
    open(sys.argv[1], "w").write(f"saved, child of {os.getppid()}")
    sys.exit(0)

signal.signal(signal.SIGTERM, save)
stop_with_launcher()
open(sys.argv[1] + ".ready", "w").close()
signal.pause()
"""


def test_a_killed_launchers_processes_save_before_the_command_returns(tmp_path, caplog):
    """torchrun SIGKILLed (by the OOM killer, say): its training processes get SIGTERM, and
    `longctx train` fails only once they have saved and stopped, so a rerun that the
    workflow starts at once never races their checkpoint."""
    from longctx.train.launch import run as run_launcher

    out = tmp_path / "checkpoint"
    ended = run_launcher([sys.executable, "-c", DYING_LAUNCHER, SAVING_WORKER, str(out)])
    assert ended.status == -signal.SIGKILL and ended.started
    assert out.read_text() == f"saved, child of {os.getpid()}"  # adopted, then reaped
    assert "launcher ended (status -9); waiting for 1 training process(es)" in caplog.text


def test_a_checkpoint_of_other_inputs_is_never_resumed(setup):
    """Same directories, another learning rate: the old run's state is left out (and cleared)."""
    tmp_path, base, seqs = setup

    def crash(step):
        if step == 3:  # after the step-2 checkpoint
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run(tmp_path, base, seqs, make_params(steps=4), "a", on_step=crash)
    stale = list((tmp_path / "a" / "checkpoints").iterdir())
    assert stale
    resumed = []
    run(tmp_path, base, seqs, make_params(steps=4, lr=1e-3), "a", on_step=resumed.append)
    assert resumed == [1, 2, 3, 4] and not any(p.exists() for p in stale)
    run(tmp_path, base, seqs, make_params(steps=4, lr=1e-3), "b")
    assert_same(tmp_path / "a" / "model", tmp_path / "b" / "model")
