"""Running `longctx train` in several processes: the rule's command stays `longctx train`, and
the params say how many processes and which accelerate config; the command relaunches itself
and stays in charge of the processes it started: signals reach them, and none trains on
without it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from longctx.config import TrainConfig
from longctx.inputs import file_named

log = logging.getLogger(__name__)


def launcher(cfg: TrainConfig, argv: list[str]) -> list[str] | None:
    """The command that runs `longctx <argv>` as `cfg.processes` processes, or None when this
    process trains itself (a single process, or one already started by a launcher)."""
    if "WORLD_SIZE" in os.environ or (cfg.processes == 1 and cfg.accelerate_config is None):
        return None
    module = ["-m", "longctx.cli", *argv]
    if cfg.accelerate_config is not None:
        file_named(cfg.accelerate_config, "train.accelerate_config")
        # the params' count wins over the file's: one place says how many processes run
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                cfg.accelerate_config, "--num_processes", str(cfg.processes), *module]
    # plain data parallel: torchrun, which Accelerate reads (gloo on CPU, nccl on GPUs)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(cfg.processes), *module]


FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def run(command: list[str]) -> int:
    """Run the launcher to its end and return its exit status. SIGTERM and SIGUSR1 (and SIGINT,
    SIGHUP) received meanwhile go straight to the training processes (the launcher's children,
    this machine's), which save a checkpoint and stop (SIGTERM) or go on (SIGUSR1) as a single
    process does. Sent to the launcher instead, torchrun would kill them 30 s after SIGTERM,
    whatever they were saving, and die of SIGUSR1, leaving them to train on unwatched; they
    start sessions of their own, so a terminal's or a scheduler's process-group signal does not
    reach them either. If this process is killed outright, the launcher gets SIGTERM and
    passes it on. If the launcher dies first, its processes get SIGTERM (`stop_with_launcher`)
    and this returns once they have saved and stopped, so a rerun never races their writes."""
    import psutil

    die_with_parent = _parent_death_signal()
    launcher = subprocess.Popen(command, preexec_fn=die_with_parent)
    seen: dict[int, psutil.Process] = {}  # every training process the launcher started

    def workers() -> list[psutil.Process]:
        try:
            current = psutil.Process(launcher.pid).children()
        except psutil.NoSuchProcess:
            current = []
        seen.update((p.pid, p) for p in current)
        return current

    def forward(signum: int, frame: Any) -> None:
        if launcher.poll() is not None:
            return
        targets = workers() or ([] if signum == signal.SIGUSR1 else [launcher])
        for target in targets:  # (none yet for SIGUSR1: there is nothing to save)
            try:
                target.send_signal(signum)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    _adopt_orphans(True)  # a dead launcher's processes become ours: waited for, and reaped
    try:
        while True:
            try:
                status = launcher.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                workers()
        orphans = [p for p in seen.values() if p.is_running()]
        if orphans:  # it died: they got SIGTERM and are saving a checkpoint
            log.warning("the launcher ended (status %d); waiting for %d training process(es) "
                        "to save and stop", status, len(orphans))
            psutil.wait_procs(orphans)
        return status
    finally:
        _adopt_orphans(False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prctl() -> Any:
    """Linux's prctl, or None elsewhere."""
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _parent_death_signal() -> Any:
    """A function that, called in a process, has SIGTERM sent to it when its parent dies
    (PR_SET_PDEATHSIG); None off Linux. Resolved here, not in a forked child."""
    prctl = _prctl()
    return None if prctl is None else lambda: prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _adopt_orphans(on: bool) -> None:
    """Orphaned descendants become this process's children (PR_SET_CHILD_SUBREAPER), not
    init's, which in a container may never reap them (and a zombie looks alive)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(36, int(on))  # 36: PR_SET_CHILD_SUBREAPER


def stop_with_launcher() -> None:
    """In a process a launcher started: SIGTERM (save a checkpoint and stop) when the launcher
    dies, rather than train on as an orphan."""
    die_with_parent = _parent_death_signal()
    if die_with_parent is not None:
        die_with_parent()
