"""A stage's samples' tokens on disk while pack decides where each sample goes.

Packing needs only each sample's length (bins), its id and its learnt-token count (stats); the
tokens are needed once, when the sequences file is written. At the paper's lengths a stage's
samples are billions of tokens, so each sample's ids and learn flags are appended to two flat
files as it is made and pack keeps a `Spilled` handle; the writer reads each sequence's
samples back in the final order, a row group at a time. The bytes written are the same as
from samples held in memory.

The files live in `<sequences>.spill/` beside the output (the disk that holds the output has
room for the same tokens again, /tmp may not); it is removed when pack ends, and a killed
pack's leftover is removed when it reruns.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from longctx.sequences import Tokenized

IDS, LEARN = "ids.int32", "learn.bool"


@dataclass(frozen=True)
class Spilled:
    """A sample whose tokens wait on disk: tokens [start, start + length) of the spill."""

    id: str
    start: int
    length: int
    learnt: int  # tokens with learn set

    def __len__(self) -> int:
        return self.length


class Spill:
    """Append-only token store: `add` as samples are made, `load` once every one is added."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._out: dict[str, BinaryIO] | None = {
            name: open(directory / name, "wb") for name in (IDS, LEARN)}
        self._in: dict[str, BinaryIO] = {}
        self._tokens = 0

    def add(self, sample: Tokenized) -> Spilled:
        """Writes the sample's tokens; returns the handle that stands for it."""
        if self._out is None:
            raise RuntimeError("Spill.add after load: the spill is closed for writing")
        ids = np.ascontiguousarray(sample.ids, dtype=np.int32)
        learn = np.ascontiguousarray(sample.learn, dtype=np.bool_)
        if len(ids) != len(learn):
            raise ValueError(f"sample {sample.id}: {len(ids)} ids but {len(learn)} learn flags")
        self._out[IDS].write(ids.tobytes())
        self._out[LEARN].write(learn.tobytes())
        handle = Spilled(sample.id, self._tokens, len(ids), int(learn.sum()))
        self._tokens += len(ids)
        return handle

    def load(self, handle: Spilled) -> Tokenized:
        """The sample's tokens, read back from the spill (the first load ends writing).
        Read with pread, not a memory map: mapped pages would count in the job's RSS until
        the kernel takes them back, a whole stage's tokens by the end."""
        if self._out is not None:
            self._seal()
        ids = self._read(IDS, handle.start * 4, handle.length * 4)
        learn = self._read(LEARN, handle.start, handle.length)
        return Tokenized(handle.id, np.frombuffer(ids, np.int32), np.frombuffer(learn, np.bool_))

    def _read(self, name: str, offset: int, size: int) -> bytes:
        data = os.pread(self._in[name].fileno(), size, offset)
        if len(data) != size:
            raise RuntimeError(f"{self.directory / name}: {len(data)} bytes at {offset}, "
                               f"{size} expected (the spill was changed under pack)")
        return data

    def _seal(self) -> None:
        """Writing done: the files closed and opened for reading."""
        self.close()
        self._in = {name: open(self.directory / name, "rb") for name in (IDS, LEARN)}

    def close(self) -> None:
        """Every file closed (the directory can go)."""
        for f in [*(self._out or {}).values(), *self._in.values()]:
            f.close()
        self._out = None
        self._in = {}


def spill_dir(output: str | Path) -> Path:
    """Where pack's spill for `output` lives while pack runs."""
    return Path(str(output) + ".spill")


@contextmanager
def spill_beside(output: str | Path) -> Iterator[Spill]:
    """A `Spill` in `<output>.spill/`, emptied first and removed at the end, whatever
    happens (a killed run's is removed by the next), with the parents it made if nothing
    else went into them (a failed pack leaves nothing)."""
    directory = spill_dir(output)
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    spill = Spill(directory)
    try:
        yield spill
    finally:
        spill.close()
        shutil.rmtree(directory, ignore_errors=True)
        for parent in made[1:]:  # innermost first
            try:
                parent.rmdir()
            except OSError:  # the output is in it
                break
