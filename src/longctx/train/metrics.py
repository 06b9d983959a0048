"""What a stage reports per step: one record (loss, lr, learnt tokens, grad norm, tokens/s,
peak memory), to dvclive (the run's plots), the progress bar and, every `train.log_every`
steps, the log.

The records are also the stage's history, which each checkpoint keeps: a resumed run replays
it into dvclive first, so the curves have no gap or repeat. Reporting is the main process's
alone (the values are already reduced over all processes), so a run logs once however many
processes train it.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, over all processes."""

    loss: float  # the mean over the step's target tokens
    learnt: int  # target tokens
    tokens: int  # tokens, padding aside
    grad_norm: float | None  # before clipping; None when train.grad_clip is off
    longest_micro_s: float = 0.0  # this process's slowest micro-batch (a signal waits for one)


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated tensors on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Live:
    """dvclive on the main process: loss, lr, grad norm, tokens/s and memory per step. A
    resumed run replays the checkpoint's history first, so the curve has no gap or repeat."""

    def __init__(self, live_dir: Path, history: list[dict[str, float]], enabled: bool):
        self.live = None
        if not enabled:
            return
        from dvclive import Live

        self.live = Live(str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
        for record in history:
            self.log(record)

    def log(self, record: dict[str, float]) -> None:
        if self.live is not None:
            for name, value in record.items():
                if name != "step":
                    self.live.log_metric(name, value)
            self.live.next_step()

    def end(self, summary: dict[str, float]) -> None:
        if self.live is not None:
            for name, value in summary.items():
                self.live.log_metric(name, value, plot=False)
            self.live.end()


class Metrics:
    """A stage's reporting: dvclive (history replayed), a progress bar from the resumed step,
    a log line every `log_every` steps."""

    def __init__(self, live_dir: Path, history: list[dict[str, float]], *, main: bool,
                 device: torch.device, stage: int, step: int, steps: int, log_every: int):
        from tqdm import tqdm

        self.device, self.stage, self.steps, self.log_every = device, stage, steps, log_every
        self._live = _Live(live_dir, history, main)
        self._bar = tqdm(total=steps, initial=step, desc=f"train stage {stage}", unit="step",
                         disable=not main or None)

    def log(self, step: int, lr: float, stats: StepStats, seconds: float) -> dict[str, Any]:
        """Report optimizer step `step` (1-based), which took `seconds`; returns its record."""
        record = {"step": step, "train/loss": round(stats.loss, 6), "train/lr": lr,
                  "train/learnt_tokens": stats.learnt,
                  "perf/tokens_per_s": round(stats.tokens / seconds, 1),
                  "perf/step_s": round(seconds, 3),
                  "perf/memory_gib": round(memory_gib(self.device), 3)}
        if stats.grad_norm is not None:
            record["train/grad_norm"] = round(stats.grad_norm, 6)
        self._live.log(record)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{stats.loss:.4f}",
                              tok_s=f"{record['perf/tokens_per_s']:.0f}")
        if step % self.log_every == 0:
            log.info("stage %d step %d/%d: loss %.4f, lr %.3g%s, %.3g s, %.0f tokens/s, %.2f GiB",
                     self.stage, step, self.steps, stats.loss, lr,
                     f", grad norm {record['train/grad_norm']:.4g}"
                     if stats.grad_norm is not None else "", seconds,
                     record["perf/tokens_per_s"], record["perf/memory_gib"])
        return record

    def close(self) -> None:
        """The progress bar is done (the stage stops, or its model is saved next)."""
        self._bar.close()

    def end(self, summary: dict[str, float]) -> None:
        """The stage's summary metrics, and dvclive closed."""
        self._live.end(summary)
