"""The content-addressed LLM call cache: a rerun pays only for calls that never finished.

One SQLite file (WAL mode: readers never block the one writer, and parallel steps on one
machine may share it; a job on a cluster gets a file of its own, since WAL is not safe over a
network filesystem). A key is the sha256 of everything that determines a completion; the
value is the completion. `put` stores one call in its own transaction the moment it is
finished, so a killed step loses only the calls still being generated, never a half-written
row. API keys never reach it: keys are built from the backend's `identity`, which holds no
secret.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from longctx.llm.base import Completion, Sampling
from longctx.repro import cache_root, fingerprint

SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    desc TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def default_path() -> Path:
    return cache_root() / "llm" / "calls.sqlite"


def call_key(identity: dict[str, Any], rendered: str, sampling: Sampling,
             template_version: str) -> str:
    """sha256 over what makes a completion: model, exact prompt, decoding, template version.

    Greedy decoding ignores top_p and the seed, so they are left out of greedy keys: changing
    the run's seed does not throw away greedy work.
    """
    decoding: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens, "temperature": 0.0}
    seed = None
    if not sampling.greedy:
        decoding = {"max_new_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p}
        seed = sampling.seed
    return fingerprint({"identity": identity, "prompt": rendered, "sampling": decoding,
                        "seed": seed, "template_version": template_version}, chars=64)


class CallCache:
    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a kill
        self._db.execute(SCHEMA)
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay under SQLite's variable limit
                chunk = keys[start:start + 500]
                rows = self._db.execute(
                    "SELECT key, text, finish_reason, prompt_tokens, completion_tokens FROM calls "
                    f"WHERE key IN ({','.join('?' * len(chunk))})", chunk,
                ).fetchall()
                for key, *fields in rows:
                    found[key] = Completion(*fields)
        return found

    def put(self, key: str, completion: Completion, desc: str = "") -> None:
        """Store one finished call (its own transaction: durable before the next one)."""
        c = completion
        row = (key, c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens, desc,
               time.time())
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO calls VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
