"""Reading a run: `open_run(path)` → `Run` with bit-exact `state(t)` and `states(a, b)`.

States are rebuilt from the nearest keyframe (the first state of a chunk) by XOR, so they
equal training's parameters bit for bit. Only the chunks a request touches are opened,
through safetensors' memory map; nothing loads the whole run. Every chunk is verified
against the manifest before its first state is returned (see `store.chunk`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save

from replay.errors import ChunkDamaged, RunError
from replay.store.atomic import is_tmp, write_atomic
from replay.store.batches import read_batches
from replay.store.chunk import CHUNK_RE, Chunk
from replay.store.layout import StateLayout
from replay.store.manifest import MANIFEST, Manifest

LOCK = ".replay.lock"


@dataclass
class RunInfo:
    steps: int
    first: int
    last: int
    tensors: int
    params: int
    chunks: int
    bytes_on_disk: int
    bytes_per_param_step: float
    orphans: list[str]
    leftovers: list[str]
    compressed: int = 0  # chunks stored zstd-compressed (Recorder(compress=True))


class Run:
    """A recorded run. `steps` are the recorded state indices (0, every, 2·every, ...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        self.manifest = Manifest.read(self.path)
        self.layout = StateLayout(self.manifest.tensors)
        every = self.manifest.every
        self.chunks: list[Chunk] = []
        self.orphans: list[Chunk] = []  # chunks after a gap (a lost chunk): not part of the run
        self.leftovers: list[str] = []  # temp files of writes a kill interrupted: ignored
        found = []
        for p in self.path.iterdir():
            if CHUNK_RE.match(p.name):
                found.append(Chunk(p, every, self.layout, self.manifest.run_id, self.manifest.version))
            elif is_tmp(p.name):
                self.leftovers.append(p.name)
        expected = 0
        for c in sorted(found, key=lambda c: c.first):
            if c.first == expected and not self.orphans:
                self.chunks.append(c)
                expected = c.last + every
            else:
                self.orphans.append(c)
        self.steps: list[int] = [t for c in self.chunks for t in c.steps]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, steps={len(self.steps)}, tensors={len(self.manifest.params)})"

    @property
    def task(self) -> str | None:
        return self.manifest.task

    @property
    def param_names(self) -> list[str]:
        return [s.name for s in self.manifest.params]

    @property
    def aliases(self) -> dict[str, str]:
        """Tied parameters: {other name: the recorded name of the one shared tensor}."""
        return dict(self.manifest.aliases)

    @property
    def missing(self) -> tuple[int, int] | None:
        """(first missing state, last recorded state after the gap) when a middle chunk is lost, else None."""
        if not self.orphans:
            return None
        return (self.steps[-1] + self.manifest.every if self.steps else 0), self.orphans[-1].last

    @property
    def batches(self) -> pl.DataFrame:
        """The logged training batches (`Recorder.log_batch`): `step, example`, one row per example id;
        step t is the update from state t to t+1. Empty when the run logged none."""
        return read_batches(self.path, self.manifest.run_id)

    def _chunk_of(self, t: int) -> Chunk:
        for c in self.chunks:
            if c.first <= t <= c.last and (t - c.first) % self.manifest.every == 0:
                return c
        have = f"{self.steps[0]}..{self.steps[-1]} every {self.manifest.every}" if self.steps else "none"
        raise RunError(f"{self.path}: state {t} was not recorded (recorded: {have})")

    def _typed(self, cur: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
        return {s.name: cur[s.name].clone().view(s.torch_dtype) for s in self.manifest.tensors if s.kind == kind}

    def state(self, t: int, *, buffers: bool = False) -> dict[str, torch.Tensor]:
        """Parameters at state t ({name: tensor}, named_parameters() names), bit-exact.

        With `buffers=True`, the recorded buffers instead (when the run recorded them).
        """
        for _, cur in self._chunk_of(t).states(start=t):
            return self._typed(cur, "buffer" if buffers else "param")
        raise AssertionError("unreachable")

    def states(self, start: int = 0, stop: int | None = None, *, buffers: bool = False
               ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (t, params) for recorded t in range(start, stop), one decode per state."""
        stop = self.steps[-1] + 1 if stop is None and self.steps else (stop or 0)
        kind = "buffer" if buffers else "param"
        for c in self.chunks:
            if c.last < start or c.first >= stop:
                continue
            for t, cur in c.states(start=start):
                if t >= stop:
                    return
                yield t, self._typed(cur, kind)

    def export(self, t: int, path: str | Path) -> int:
        """Write state t (and its buffers, if recorded) as a plain safetensors file; returns the tensor count.

        Keys are the model's own names (`model.load_state_dict(load_file(path), strict=False)`);
        tied parameters appear once, their other names are in the metadata (`aliases`).
        """
        path = Path(path)
        tensors = self.state(t)
        if self.manifest.buffers:
            tensors.update(self.state(t, buffers=True))
        meta = {"replay_run": self.manifest.run_id, "state": str(t), "aliases": json.dumps(self.aliases)}
        try:
            write_atomic(path, save(tensors, metadata=meta))
        except OSError as e:
            raise RunError(f"{path}: cannot write ({e.strerror or e}); pass a writable file path") from None
        return len(tensors)

    def verify(self) -> list[str]:
        """Check every chunk (checksum, identity, header, size); return one line per problem found."""
        problems = []
        if not self.chunks and not self.orphans:
            problems.append(f"{self.path}: nothing was recorded (no chunk); a recorder killed before its first "
                            f"flush leaves only the manifest")
        for c in self.chunks + self.orphans:
            try:
                c.verify()
            except ChunkDamaged as e:
                problems.append(str(e))
        try:
            read_batches(self.path, self.manifest.run_id)
        except ChunkDamaged as e:
            problems.append(str(e))
        if self.orphans:
            a, b = self.missing
            problems.append(f"{self.path}: states from {a} are missing (a chunk is lost) but {len(self.orphans)} "
                            f"chunk(s) up to state {b} follow the gap; the run is readable up to state "
                            f"{self.steps[-1] if self.steps else 'none'}")
        return problems

    def info(self) -> RunInfo:
        n_params = sum(s.numel for s in self.manifest.params)
        size = sum(c.path.stat().st_size for c in self.chunks)
        steps = len(self.steps)
        return RunInfo(
            steps=steps,
            first=self.steps[0] if steps else -1,
            last=self.steps[-1] if steps else -1,
            tensors=len(self.manifest.tensors),
            params=n_params,
            chunks=len(self.chunks),
            bytes_on_disk=size + (self.path / MANIFEST).stat().st_size,
            bytes_per_param_step=size / max(1, n_params * steps),
            orphans=[c.path.name for c in self.orphans],
            leftovers=list(self.leftovers),
            compressed=sum(c.says_compressed() for c in self.chunks),
        )


def open_run(path: str | Path) -> Run:
    """Open a run directory written by `Recorder` (the contiguous prefix of its chunks)."""
    return Run(path)
