"""A training stage that dies after optimizer step N in every process: run under `accelerate
launch` by tests that resume a multi-process stage (the CLI has no such hook, by design).

usage: crashing_train.py PARAMS BASE SEQUENCES RUN_DIR N
"""

import sys
from pathlib import Path

from longctx.config import load_params
from longctx.train.loop import train_stage


def main(params_file: str, base: str, sequences: str, run_dir: str, crash_at: str) -> None:
    def crash(step: int) -> None:
        if step == int(crash_at):
            raise SystemExit(f"killed after step {step}")

    out = Path(run_dir)
    train_stage(load_params(Path(params_file)), stage=0, base=Path(base), init=Path(base),
                sequences=Path(sequences), model=out / "model", live=out / "live",
                checkpoints=out / "checkpoints", on_step=crash)


if __name__ == "__main__":
    main(*sys.argv[1:])
