"""Stopping and resuming a stage where the layout changes: a signal in the middle of a step
(saved at the end of that micro-batch), a run resumed on another process count (the global
batch is the invariant: torchrun data parallel, DeepSpeed ZeRO-3 through its universal
checkpoint), two machines meeting by c10d rendezvous on localhost, and the refusals (another
global batch, a rendezvous nobody joins). Tiny random Llama on CPU, gloo between processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from crashing_train import sigterm_during_micro_batch
from llm_data import build_tiny_chat_model
from train_data import (
    assert_same,
    assert_same_curves,
    launch,
    make_params,
    python,
    run,
    train_cli,
    train_command,
    write_params,
    write_sequences,
)

from longctx.errors import LongctxError
from longctx.train.checkpoint import Checkpointer
from longctx.train.loop import TrainingInterrupted

STEPS = 3


@pytest.fixture
def stage(tmp_path):
    """A base model and 16 sequences: 3 steps of 4, and one process's reference run."""
    base = build_tiny_chat_model(tmp_path / "base", max_positions=64)
    seqs = write_sequences(tmp_path / "pack" / "stage-0.parquet", n=16)
    run(tmp_path, base, seqs, make_params(steps=STEPS, global_batch=4), "one")
    return tmp_path, base, seqs


def params(**train):
    return make_params(steps=STEPS, global_batch=4, checkpoint_every=1000, **train)


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("*/step-*"))


def test_sigterm_mid_step_saves_after_that_micro_batch_and_resumes_exactly(stage):
    """SIGTERM in the 2nd micro-batch of step 2 (of 4 accumulated): the checkpoint follows
    that micro-batch, with the step's partial gradient and its 2 sequences done; the rerun
    trains the remaining 2 and ends with the uninterrupted run's weights, bit for bit."""
    tmp_path, base, seqs = stage
    with sigterm_during_micro_batch(6), pytest.raises(
            TrainingInterrupted, match="SIGTERM in step 2 of 3, after 2 of its 4 sequences"):
        run(tmp_path, base, seqs, params(), "term")
    out = tmp_path / "term"
    assert checkpoints(out) == ["step-00000001-00000002"]
    saved = next((out / "checkpoints").glob("*/step-*"))
    state = json.loads((saved / "trainer.json").read_text())
    assert (state["step"], state["done"], state["layout"]["world"]) == (1, 2, 1)
    assert (saved / "gradients.safetensors").is_file()
    resumed = []
    run(tmp_path, base, seqs, params(), "term", on_step=resumed.append)
    assert resumed == [2, 3]
    assert_same(tmp_path / "one" / "model", out / "model")
    assert_same_curves(tmp_path / "one" / "live", out / "live", STEPS)


def test_one_process_stopped_mid_step_resumes_as_two(stage):
    """Stopped by SIGTERM after 2 of step 2's 4 sequences on one process, resumed on two
    (torchrun data parallel, gloo) in the middle of that step, its partial gradient
    restored: the same global batch of 4 sequences per step, accumulated over 4 or 2
    micro-batches per process, ends with the weights and curves of one uninterrupted
    process, to float rounding (sums reduced in another order)."""
    tmp_path, base, seqs = stage
    out = tmp_path / "run"
    with sigterm_during_micro_batch(6), pytest.raises(TrainingInterrupted):
        run(tmp_path, base, seqs, params(), out.name)
    resumed = train_cli(write_params(tmp_path, params(processes=2)), base, seqs, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "2 process(es) accumulating 2 micro-batches" in resumed.stderr
    assert "resuming at step 1 + 2 sequences" in resumed.stderr
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", STEPS)


def test_fsdp2_shards_load_into_another_process_count(tmp_path, root):
    """configs/accelerate/fsdp2.yaml: weights and optimizer states saved as 2 processes'
    shards by torch.distributed.checkpoint load into 3 processes' shards. Stopped after 2 of
    step 2's 6 sequences, which are no whole round of 3 processes' micro-batches: step 2
    starts over from its own start, and the stage ends as one process training
    uninterrupted would."""
    base = build_tiny_chat_model(tmp_path / "base", max_positions=64)
    seqs = write_sequences(tmp_path / "seqs.parquet", n=12)
    run(tmp_path, base, seqs, make_params(steps=2, global_batch=6), "one")
    fsdp2 = str(root / "configs/accelerate/fsdp2.yaml")
    out = tmp_path / "fsdp2"

    def fsdp2_params(processes):
        return write_params(tmp_path, make_params(steps=2, global_batch=6, processes=processes,
                                                  accelerate_config=fsdp2))

    killed = python(*launch(root, "fsdp2"), str(root / "tests" / "crashing_train.py"),
                    str(fsdp2_params(2)), str(base), str(seqs), str(out), "micro", "4")
    assert killed.returncode != 0 and "SIGTERM in step 2" in killed.stderr, \
        killed.stderr[-3000:]
    assert checkpoints(out) == ["step-00000001-00000002"]
    resumed = train_cli(fsdp2_params(3), base, seqs, out, launch(root, "fsdp2", processes=3))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("do not split into this run's rounds of micro-batches: step 2 "
                                "starts over") == 1
    assert "3 process(es) accumulating 2 micro-batches" in resumed.stderr
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", 2)


def test_zero3_resumes_on_another_process_count_from_a_universal_checkpoint(tmp_path, root):
    """configs/accelerate/zero3.yaml: stopped mid-step with 2 processes (gradients and
    optimizer states partitioned in two), resumed with 1: DeepSpeed's ds_to_universal
    converts the checkpoint, the partial gradient is put back whole, and the stage ends as
    one process training uninterrupted would."""
    pytest.importorskip("deepspeed")
    # an output projection of 4096 x 32 > DeepSpeed's persistence threshold: partitioned
    base = build_tiny_chat_model(tmp_path / "base", max_positions=64, vocab_size=4096,
                                 tied=True)
    seqs = write_sequences(tmp_path / "seqs.parquet", n=16)
    run(tmp_path, base, seqs, make_params(steps=STEPS, global_batch=4), "one")
    zero3 = str(root / "configs/accelerate/zero3.yaml")
    out = tmp_path / "zero3"
    params_file = write_params(tmp_path, params(processes=2, accelerate_config=zero3))
    killed = python(*launch(root, "zero3"), str(root / "tests" / "crashing_train.py"),
                    str(params_file), str(base), str(seqs), str(out), "micro", "3")
    assert killed.returncode != 0 and "SIGTERM in step 2" in killed.stderr, \
        killed.stderr[-3000:]
    assert checkpoints(out) == ["step-00000001-00000002"]
    resumed = train_cli(write_params(tmp_path, params(processes=1, accelerate_config=zero3)),
                        base, seqs, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "was saved by 2 processes: converting it to DeepSpeed's universal" in resumed.stderr
    assert "resuming at step 1 + 2 sequences" in resumed.stderr
    assert_same(tmp_path / "one" / "model", out / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", out / "live", STEPS)


def test_a_checkpoint_of_another_global_batch_is_refused_and_kept(stage):
    tmp_path, base, seqs = stage
    with sigterm_during_micro_batch(2), pytest.raises(TrainingInterrupted):
        run(tmp_path, base, seqs, params(), "term")
    kept = checkpoints(tmp_path / "term")
    with pytest.raises(LongctxError, match=r"saved with global_batch 4, but this run has 2: "
                                           r"set it back to resume"):
        run(tmp_path, base, seqs, make_params(steps=STEPS, global_batch=2), "term")
    assert checkpoints(tmp_path / "term") == kept


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_machines_meet_take_signals_and_resume_on_one_process(tmp_path):
    """`train.nodes: 2` on localhost: two `longctx train` commands, each one machine's
    torchrun agent with one process, meet at a c10d rendezvous on 127.0.0.1. SIGTERM sent to
    both (as srun passes a job's signal to every node's task) reaches the training
    processes, which save and stop; the stage then resumes on ONE process and ends with the
    weights and curves of one process training uninterrupted."""
    steps = 8
    base = build_tiny_chat_model(tmp_path / "base", max_positions=64)
    seqs = write_sequences(tmp_path / "seqs.parquet", n=steps * 4)
    run(tmp_path, base, seqs, make_params(steps=steps, global_batch=4), "one")
    two = make_params(steps=steps, global_batch=4, checkpoint_every=1000, processes=2, nodes=2,
                      rendezvous=f"127.0.0.1:{free_port()}")
    command = [sys.executable, *train_command(write_params(tmp_path, two), base, seqs,
                                              tmp_path / "run")]
    machines = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    logs = [[], []]
    readers = [threading.Thread(target=lambda m=m, log=log: log.extend(m.stderr))
               for m, log in zip(machines, logs)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 300
    while not any("step 1/8: loss" in line for log in logs for line in list(log)):
        assert time.monotonic() < deadline and all(m.poll() is None for m in machines), logs
        time.sleep(0.05)
    for machine in machines:
        machine.send_signal(signal.SIGTERM)
    for machine, reader in zip(machines, readers):
        machine.wait(timeout=120)
        reader.join()
    text = "".join(logs[0] + logs[1])
    assert "--nnodes 2" in text and "--rdzv-backend c10d" in text
    assert text.count("2 process(es) accumulating 2 micro-batches") == 1  # by rank 0 alone
    assert text.count("stopped by SIGTERM") == 1, text[-3000:]
    assert len(checkpoints(tmp_path / "run")) == 1 and not (tmp_path / "run" / "model").exists()
    resumed = []
    run(tmp_path, base, seqs, make_params(steps=steps, global_batch=4), "run",
        on_step=resumed.append)
    assert resumed and resumed[-1] == steps
    assert_same(tmp_path / "one" / "model", tmp_path / "run" / "model", exact=False)
    assert_same_curves(tmp_path / "one" / "live", tmp_path / "run" / "live", steps)


def test_a_rendezvous_nobody_joins_fails_in_one_line_within_the_timeout(stage):
    tmp_path, base, seqs = stage
    params_file = write_params(tmp_path, params(processes=2, nodes=2, rendezvous_timeout_s=3,
                                                rendezvous=f"127.0.0.1:{free_port()}"))
    alone = train_cli(params_file, base, seqs, tmp_path / "alone")
    assert alone.returncode != 0
    assert ("stage 0: the 2 machines did not meet within train.rendezvous_timeout_s (3 s)"
            in alone.stderr), alone.stderr[-3000:]
    assert not (tmp_path / "alone" / "checkpoints").exists()


def test_a_signal_margin_shorter_than_a_micro_batch_and_a_save_is_warned_once(tmp_path, caplog):
    """Under SLURM, `cluster.signal_margin_s` must cover the rest of a micro-batch and a
    save, or the job is killed while saving: said once, with the margin to set."""
    accelerator = SimpleNamespace(num_processes=1, distributed_type="NO")
    checkpointer = Checkpointer(accelerator, tmp_path, "run", params().train, stage=0,
                                margin_s=60)
    checkpointer.check_margin(50.0)  # no save measured yet: nothing to say
    checkpointer.save_s = 5.0
    checkpointer.check_margin(50.0)
    assert not caplog.records
    checkpointer.save_s = 20.0
    checkpointer.check_margin(50.0)
    checkpointer.check_margin(50.0)
    assert [r.getMessage() for r in caplog.records] == [
        "stage 0: cluster.signal_margin_s 60 s is shorter than a micro-batch (50 s) plus a "
        "checkpoint save (20 s): SLURM may kill the job before its checkpoint is written; "
        "raise it to at least 105"]
    elsewhere = Checkpointer(accelerator, tmp_path, "run", params().train, stage=0, margin_s=None)
    elsewhere.save_s = 1e6
    elsewhere.check_margin(1e6)
    assert len(caplog.records) == 1
