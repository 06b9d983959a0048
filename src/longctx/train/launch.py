"""Running `longctx train` in several processes, on one machine or several: the rule's
command stays `longctx train`, and the params say how many processes, on how many machines,
under which accelerate config; the command relaunches itself under torchrun (or `accelerate
launch`) and stays in charge of the processes it started: signals reach them, and none trains
on without it.

Several machines (`train.nodes` > 1) meet by torchrun's c10d rendezvous, one torchrun agent
per machine, each starting processes / nodes processes. Under SLURM, the job's first node
hosts the rendezvous and `longctx train`, run once in the job, starts itself on every node
with srun (one task per node, like ProLong's `srun torchrun`); elsewhere the same
`longctx train` is run on every machine, meeting at `train.rendezvous`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from typing import Any, NamedTuple

from longctx.config import TrainConfig, host_port
from longctx.errors import LongctxError
from longctx.inputs import file_named

log = logging.getLogger(__name__)

NODE_AGENT = "LONGCTX_NODE_AGENT"  # set by srun's export: this task is one machine's agent
RENDEZVOUS_PORT = 20000  # under SLURM: 20000 + job id mod 20000, one port per job


def launcher(cfg: TrainConfig, argv: list[str]) -> list[str] | None:
    """The command that runs `longctx <argv>` as `cfg.processes` processes over `cfg.nodes`
    machines, or None when this process trains itself (a single process, or one already
    started by a launcher)."""
    if "WORLD_SIZE" in os.environ or (cfg.processes == 1 and cfg.accelerate_config is None):
        return None
    nodes = _nodes(cfg)
    if nodes > 1 and _in_slurm() and NODE_AGENT not in os.environ:
        return _srun(nodes, argv)
    module = ["-m", "longctx.cli", *argv]
    per_node = cfg.processes // nodes
    if cfg.accelerate_config is not None:
        file_named(cfg.accelerate_config, "train.accelerate_config")
        # the params' count wins over the file's: one place says how many processes run
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   cfg.accelerate_config, "--num_processes", str(cfg.processes)]
        if nodes > 1:
            host, port = _rendezvous(cfg)
            command += ["--num_machines", str(nodes), "--machine_rank", _node_rank(),
                        "--main_process_ip", host, "--main_process_port", str(port),
                        "--rdzv_backend", "c10d", "--deepspeed_multinode_launcher", "standard"]
        return [*command, *module]
    # plain data parallel: torchrun, which Accelerate reads (gloo on CPU, nccl on GPUs)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(per_node)]
    if nodes == 1:
        return [*command, "--standalone", *module]
    host, port = _rendezvous(cfg)
    timeout = cfg.rendezvous_timeout_s
    return [*command, "--nnodes", str(nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{host}:{port}", "--rdzv-id", _rendezvous_id(),
            "--rdzv-conf", f"join_timeout={timeout},read_timeout={timeout}", *module]


def _in_slurm() -> bool:
    return "SLURM_JOB_ID" in os.environ


def _nodes(cfg: TrainConfig) -> int:
    """The machines of this run: `train.nodes`, which a SLURM job must have been given."""
    allocated = os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
    if _in_slurm() and allocated and int(allocated) < cfg.nodes:
        raise LongctxError(f"train.nodes: {cfg.nodes} machines, but this SLURM job has "
                           f"{allocated} (the SLURM profile asks train_stage jobs for "
                           "train.nodes: submit through it, or lower train.nodes)")
    return cfg.nodes


def _srun(nodes: int, argv: list[str]) -> list[str]:
    """srun starting this same command once on each of the job's nodes, as its agent."""
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            "--kill-on-bad-exit=1", f"--export=ALL,{NODE_AGENT}=1",
            sys.executable, "-m", "longctx.cli", *argv]


def _rendezvous(cfg: TrainConfig) -> tuple[str, int]:
    """Where the machines meet: `train.rendezvous`, else under SLURM the job's first node."""
    if cfg.rendezvous is not None:
        found = host_port(cfg.rendezvous)
        assert found is not None  # (the params check it)
        return found
    if not _in_slurm():
        raise LongctxError(f"train.nodes: {cfg.nodes} machines need train.rendezvous "
                           "(HOST:PORT of the first one) outside SLURM")
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ["SLURM_NODELIST"]
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, check=True).stdout.split()
    return hosts[0], RENDEZVOUS_PORT + int(os.environ["SLURM_JOB_ID"]) % 20000


def _rendezvous_id() -> str:
    """The same on every machine of one run, new for the next: the SLURM job, or a fixed id
    (one run of a stage meets at a time at its rendezvous address)."""
    return f"longctx-{os.environ.get('SLURM_JOB_ID', 'train')}"


def _node_rank() -> str:
    """This machine's rank, for `accelerate launch` (torchrun's c10d rendezvous assigns it
    itself): SLURM's node id, else NODE_RANK, else 0."""
    return os.environ.get("SLURM_NODEID") or os.environ.get("NODE_RANK", "0")


class Ended(NamedTuple):
    """How a launcher ended: its exit status, and whether any training process started
    (none: the launch itself failed, e.g. the machines never met at the rendezvous)."""

    status: int
    started: bool


FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def run(command: list[str], relay: bool = False) -> Ended:
    """Run the launcher to its end. SIGTERM and SIGUSR1 (and SIGINT, SIGHUP) received
    meanwhile go straight to the training processes (the launcher's children, this
    machine's), which save a checkpoint and stop (SIGTERM) or go on (SIGUSR1) as a single
    process does. Sent to the launcher instead, torchrun would kill them 30 s after SIGTERM,
    whatever they were saving; they start sessions of their own, so a terminal's or a
    scheduler's process-group signal does not reach them either. The launcher ignores
    SIGUSR1, whose default would kill it (SLURM's `--signal` reaches every process of a job
    step). `relay`: the launcher passes signals on itself (srun, to every node's agent), so
    they go to it. If this process is killed outright, the launcher gets SIGTERM and passes
    it on. If the launcher dies first, its processes get SIGTERM (`stop_with_launcher`) and
    this returns once they have saved and stopped, so a rerun never races their writes."""
    import psutil

    launcher = subprocess.Popen(command, preexec_fn=_launcher_signals(ignore_usr1=not relay))
    seen: dict[int, psutil.Process] = {}  # every training process the launcher started

    def workers() -> list[psutil.Process]:
        try:
            current = [] if relay else psutil.Process(launcher.pid).children()
        except psutil.NoSuchProcess:
            current = []
        seen.update((p.pid, p) for p in current)
        return current

    def forward(signum: int, frame: Any) -> None:
        if launcher.poll() is not None:
            return
        targets = workers() or ([] if signum == signal.SIGUSR1 and not relay else [launcher])
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
        return Ended(status, started=relay or bool(seen))
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


def _launcher_signals(ignore_usr1: bool) -> Any:
    """The launcher's signal setup, run in it before exec: SIGTERM when this process dies,
    and SIGUSR1 ignored (an ignored signal stays so across exec; the training processes set
    their own handler)."""
    die_with_parent = _parent_death_signal()

    def setup() -> None:
        if die_with_parent is not None:
            die_with_parent()
        if ignore_usr1:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    return setup


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
