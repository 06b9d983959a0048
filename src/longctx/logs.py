"""How longctx logs: lines on the terminal above any progress bar, the same lines (with
warnings and errors) in a rule's log file, and library chatter kept down.

A rule's `log:` is passed as `longctx --log FILE <step>`: the terminal still shows the step as
it runs (progress bars included), and the file keeps its lines for after the run, under
Snakemake and DVC alike.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

FORMAT = logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def setup(verbose: bool, path: Path | None) -> logging.Handler | None:
    """Logging for one command; returns the log file's handler (None without a file)."""
    screen = AboveProgressBars()
    screen.setFormatter(FORMAT)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[screen])
    if not verbose:
        quiet_libraries()
    return log_file(path) if path else None


def close(file: logging.Handler | None) -> None:
    """Detach the log file (a process may run several commands: tests, tools)."""
    if file is not None:
        logging.getLogger().removeHandler(file)
        logging.captureWarnings(False)
        file.close()


class _Drop(logging.Filter):
    """Drops one library message, known by a phrase in it."""

    def __init__(self, phrase: str) -> None:
        super().__init__()
        self.phrase = phrase

    def filter(self, record: logging.LogRecord) -> bool:
        return self.phrase not in record.getMessage()


def quiet_libraries() -> None:
    """Library chatter that longctx's own lines already cover or that asks nothing of the
    user (all of it shown again under -v): faiss probing CPU features; accelerate logging
    every file of a checkpoint (longctx logs each checkpoint once) and noting that tied
    embeddings are stored once (resuming restores them exactly: tests/test_train_loop.py);
    DeepSpeed announcing that it found no GPU, and torch telling DeepSpeed (every step, on
    every process) that two collectives it calls are deprecated."""
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    for name in ("faiss.loader", "accelerate.accelerator", "accelerate.checkpointing",
                 "accelerate.utils.fsdp_utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("accelerate.utils.other").addFilter(_Drop("Removed shared tensor"))
    logging.getLogger("DeepSpeed").addFilter(_Drop("Setting accelerator to CPU"))


class AboveProgressBars(logging.StreamHandler):
    """Log lines go above tqdm's progress bars on the same stream instead of into the middle
    of one: tqdm.write clears the bars, writes the line, and draws them again."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except RecursionError:  # as logging.StreamHandler does
            raise
        except Exception:
            self.handleError(record)


def log_file(path: Path) -> logging.Handler:
    """A handler writing to `path` (a rule's log:, which DVC's run of the same command needs
    created too). A launcher's worker processes append to the file their parent created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if "LOCAL_RANK" not in os.environ:
        path.write_text("", encoding="utf-8")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(FORMAT)
    logging.getLogger().addHandler(handler)
    logging.captureWarnings(True)
    return handler


def to_file(file: logging.Handler | None, message: str, exc_info=None) -> None:
    """A line for the log file alone (the screen already shows it)."""
    if file is not None:
        file.handle(logging.makeLogRecord({"name": "longctx", "msg": message,
                                           "levelno": logging.ERROR, "exc_info": exc_info}))
