"""A training stage interrupted on cue in every process: run under a launcher by tests that
resume a multi-process stage (the CLI has no such hook, by design).

usage: crashing_train.py PARAMS BASE SEQUENCES RUN_DIR step N    dies after optimizer step N
       crashing_train.py PARAMS BASE SEQUENCES RUN_DIR micro M   SIGTERM during micro-batch M
"""

import contextlib
import os
import signal
import sys
from pathlib import Path

from longctx.config import load_params
from longctx.train.loop import train_stage
from longctx.train.loss import LossModel


@contextlib.contextmanager
def sigterm_during_micro_batch(m: int):
    """The process sends itself SIGTERM in the forward pass of its m-th micro-batch (counted
    from 1 over the run), as SLURM or a user would in the middle of a step."""
    forward, calls = LossModel.forward, [0]

    def counting(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == m:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    LossModel.forward = counting
    try:
        yield
    finally:
        LossModel.forward = forward


def main(params_file: str, base: str, sequences: str, run_dir: str, cue: str, at: str) -> None:
    def crash(step: int) -> None:
        if cue == "step" and step == int(at):
            raise SystemExit(f"killed after step {step}")

    out = Path(run_dir)
    interrupt = sigterm_during_micro_batch(int(at)) if cue == "micro" else contextlib.nullcontext()
    with interrupt:
        train_stage(load_params(Path(params_file)), stage=0, base=Path(base), init=Path(base),
                    sequences=Path(sequences), model=out / "model", live=out / "live",
                    checkpoints=out / "checkpoints", on_step=crash)


if __name__ == "__main__":
    main(*sys.argv[1:])
