"""Real `transformers serve` replicas on localhost for the tests, each started by `longctx
serve` (offline, CPU, one thread): pinned to one model dir (the llm section's replicas), or
unpinned with `--eval` (every model dir a request names, by its path from the replica's
working directory). Each replica's own access log counts the requests it answered."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

READY_S = 240.0  # two cold starts on 2 busy CPU cores take about 30-60 s


def serve_workdir(workdir: Path, root: Path, section: str) -> Path:
    """`workdir` with the project's params, the `section` (llm or eval) on the CPU: the tests
    are about CPU, even on a GPU machine. Replicas run there and read those params."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.setdefault(section, {})["device"] = "cpu"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One `longctx serve` process, its URL and its log; `model_dir` None: `--eval`."""

    def __init__(self, model_dir: Path | None, workdir: Path, name: str,
                 endpoint: str = "/v1/chat/completions") -> None:
        self.model_dir, self.workdir, self.name = model_dir, workdir, name
        self.endpoint = endpoint  # the requests `answered` counts
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = self.workdir / f"{self.name}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1",
               "LONGCTX_PARAMS": str(self.workdir / "params.yaml")}
        serving = ["--eval"] if self.model_dir is None else ["--model", str(self.model_dir)]
        cmd = [sys.executable, "-c", "import sys; from longctx.cli import main; "
               "sys.exit(main())", "serve", *serving, "--port", str(self.port)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, deadline: float) -> None:
        """Until /health answers 200; a process that exits or a deadline passed fails the
        test with the replica's own last words."""
        while time.monotonic() < deadline:
            if not self.alive():
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url[:-3] + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.25)
        pytest.fail(f"{self.name} not ready after {READY_S:.0f}s:\n{self.tail()}")

    def answered(self) -> int:
        """Requests to its endpoint that its access log shows answered."""
        text = self.log.read_text(errors="replace")
        return text.count(f'"POST {self.endpoint} HTTP/1.1" 200')

    def answered_since(self, before: int, expected: int) -> int:
        """answered() - before, once it reaches `expected` (the access log line may come a
        moment after the client has read the reply) or 10 s have passed."""
        deadline = time.monotonic() + 10
        while self.answered() - before < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.answered() - before

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def kill(self) -> None:
        """As a crash would: no graceful shutdown, connections in flight just drop."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas

    def ensure_up(self) -> list[Replica]:
        """Both replicas serving (restarting one a test before killed, if tests reorder)."""
        down = [r for r in self.replicas if not r.alive()]
        for r in down:
            r.start()
        deadline = time.monotonic() + READY_S
        for r in down:
            r.wait_ready(deadline)
        return self.replicas
