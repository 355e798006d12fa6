"""Reading a run: `open_run(path)` → `Run` with bit-exact `state(t)` and `states(a, b)`.

States are rebuilt from the nearest keyframe (the first state of a chunk) by XOR of whole
flat states, so they equal training's parameters bit for bit and decoding costs O(bytes)
whatever the number of tensors. Only the chunks a request touches are read; nothing loads
the whole run. Every chunk is verified against the manifest before its first state is
returned (see `store.chunk`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import save

from replay.errors import ReplayWarning, RunError
from replay.store.atomic import write_atomic
from replay.store.directory import ChunkDir
from replay.store.files import holds_replay_files, regular_size
from replay.store.layout import StateLayout
from replay.store.manifest import Manifest
from replay.store.sharded import ShardedDirs


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
    live: bool | None = False  # a Recorder is writing the run now (None: cannot tell)


class Run:
    """A recorded run. `steps` are the recorded state indices (0, every, 2·every, ...).

    What holds the states is one directory of chunks (`store.directory`) or, for a sharded run, N of them
    side by side (`store.sharded`); this class is the reader both share."""

    def __init__(self, path: str | Path, manifest: Manifest | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunError(f"{self.path}: no such run directory")
        self.manifest = manifest or Manifest.read(self.path)
        self.layout = StateLayout(self.manifest.tensors)
        self.source: ChunkDir | ShardedDirs = (ShardedDirs(self.path, self.manifest) if self.manifest.shards
                                               is not None else ChunkDir(self.path, self.manifest))
        src = self.source
        self.steps: list[int] = list(src.steps)
        self.chunks, self.orphans, self.invalid, self.leftovers = src.chunks, src.orphans, src.invalid, src.leftovers

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
    def live(self) -> bool | None:
        """Whether a Recorder is writing this run right now (its steps may still grow); None if unknown."""
        return self.source.live

    @property
    def missing(self) -> tuple[int, int] | None:
        """(first missing state, last recorded state after the gap) when a middle chunk is lost, else None."""
        return self.source.missing

    @property
    def batches(self) -> pl.DataFrame:
        """The logged training batches (`Recorder.log_batch`): `step, example`, one row per example id;
        step t is the update from state t to t+1. Empty when the run logged none."""
        return self.source.batches

    def _typed(self, flat: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
        """{name: tensor} of one kind, views into one private copy of the flat state (one copy per state)."""
        views = self.layout.views(flat.clone())
        return {s.name: views[s.name] for s in self.manifest.tensors if s.kind == kind}

    def state(self, t: int, *, buffers: bool = False) -> dict[str, torch.Tensor]:
        """Parameters at state t ({name: tensor}, named_parameters() names), bit-exact.

        With `buffers=True`, the recorded buffers instead (when the run recorded them).
        """
        return self._typed(self.flat_state(t), "buffer" if buffers else "param")

    def flat_state(self, t: int) -> torch.Tensor:
        """State t as its flat bytes (`store.layout`), a private copy."""
        return self.source.flat_state(t)

    def flat_states(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (t, flat uint8 state) for recorded t in range(start, stop); the tensor is overwritten by the
        next one (copy what you keep)."""
        return self.source.flat_states(start, stop)

    def states(self, start: int = 0, stop: int | None = None, *, buffers: bool = False
               ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (t, params) for recorded t in range(start, stop), one decode per state."""
        kind = "buffer" if buffers else "param"
        for t, flat in self.flat_states(start, stop):
            yield t, self._typed(flat, kind)

    def export(self, t: int, path: str | Path, *, overwrite: bool = False, base: object = None) -> int:
        """Write state t (and its buffers, if recorded) as a plain safetensors file; returns the tensor count.

        Keys are the model's own names; a tied parameter is written under each of its names
        (`model.load_state_dict(load_file(path))` needs every one), its aliases also in the
        metadata. Frozen parameters and unrecorded buffers were not recorded: pass `base` (the
        model training started from, an nn.Module) to add them from it, checked against the
        checksums the run recorded, so that the file loads with `strict=True`; without it, load
        with `strict=False` onto a model that holds them. Never writes into a run directory, nor
        over a file unless `overwrite`.
        """
        path = Path(path)
        _refuse_target(path, overwrite)
        tensors = self.state(t)
        if self.manifest.buffers:
            tensors.update(self.state(t, buffers=True))
        for alias, name in self.aliases.items():
            tensors[alias] = tensors[name]
        if base is not None:
            tensors.update(self._from_base(base, set(tensors)))
        missing = [n for n in self.manifest.frozen if n not in tensors]
        if missing:  # (a LoRA run records only its adapters)
            warnings.warn(f"{path}: {len(missing)} frozen parameter(s) were not recorded ({missing[0]!r}"
                          f"{', ...' if len(missing) > 1 else ''}): the file holds the trained tensors only and "
                          f"loads with strict=False; pass base=MODEL (--base module:function) to add them",
                          ReplayWarning, stacklevel=2)
        meta = {"replay_run": self.manifest.run_id, "state": str(t), "aliases": json.dumps(self.aliases),
                "frozen_not_recorded": json.dumps(missing)}
        try:  # safetensors refuses shared memory: an alias gets its own copy in the file
            data = save({k: v.clone() if k in self.aliases else v for k, v in tensors.items()}, metadata=meta)
            write_atomic(path, data)
        except OSError as e:
            raise RunError(f"{path}: cannot write ({e.strerror or e}); pass a writable file path") from None
        return len(tensors)

    def _from_base(self, base: object, have: set[str]) -> dict[str, torch.Tensor]:
        """The frozen parameters and unrecorded buffers of `base` (what training did not change, or not
        in its parameters), each checked against the run's checksum of it at state 0."""
        from torch import nn

        from replay.store.constants import mismatched

        if not isinstance(base, nn.Module):
            raise TypeError(f"base: expected the torch.nn.Module training started from, got {type(base).__name__}")
        extra = {n: v.detach().cpu().clone() for n, v in  # (a clone each: tied ones share memory)
                 [*base.named_parameters(remove_duplicate=False), *base.named_buffers()] if n not in have}
        known = {n: c for n, c in self.manifest.constants.items() if c.get("kind") == "frozen"}
        bad = mismatched(known, base)
        if bad:
            raise RunError(f"{self.path}: the base model's {bad[0]!r} differs from the one training froze (its "
                           f"checksum at state 0; {len(bad)} differ in all); pass the model training started from")
        return extra

    def verify(self) -> list[str]:
        """Check every chunk (checksum, identity, header, size); return one line per problem found."""
        return self.source.verify()

    def info(self) -> RunInfo:
        n_params = sum(s.numel for s in self.manifest.params)
        size = sum(regular_size(c.path) or 0 for c in self.chunks)
        steps = len(self.steps)
        return RunInfo(
            steps=steps,
            first=self.steps[0] if steps else -1,
            last=self.steps[-1] if steps else -1,
            tensors=len(self.manifest.tensors),
            params=n_params,
            chunks=len(self.chunks),
            bytes_on_disk=size + self.source.manifest_bytes(),
            bytes_per_param_step=size / max(1, n_params * steps),
            orphans=[c.path.name for c in self.orphans + self.invalid],
            leftovers=list(self.leftovers),
            compressed=sum(c.says_compressed() for c in self.chunks),
            live=self.live,
        )


def _refuse_target(path: Path, overwrite: bool) -> None:
    """Exporting must never destroy a run (or anything else) by accident."""
    if path.is_dir():
        raise RunError(f"{path}: is a directory; pass the path of the .safetensors file to write")
    parent = path.resolve().parent
    if holds_replay_files(parent):
        raise RunError(f"{path}: is inside a run or lca directory, which only replay writes; export to a path "
                       f"outside it")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise RunError(f"{path}: exists; pass overwrite=True (--force) to replace it, or another path")


def open_run(path: str | Path) -> Run:
    """Open a run directory written by `Recorder` (the contiguous prefix of its chunks; a sharded run's
    shards put together, `store.sharded`)."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory")
    manifest = Manifest.read(path)
    if manifest.shard is not None:
        raise RunError(f"{path}: is shard {manifest.shard['rank']} of a sharded run, not a run; open its parent "
                       f"directory {path.parent}")
    return Run(path, manifest)
