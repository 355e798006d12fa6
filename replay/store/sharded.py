"""The states of a sharded run (`store.shards`): N shard directories put side by side, bit-exact.

A state exists when every shard recorded it: the run's steps are the steps all shards share (a
rank that died early shortens the run, and `verify`/`info` say which). A missing shard, or one
from another run (identity, range or tensors that are not the ones the run's manifest implies),
is one line naming it; nothing is ever read as zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import polars as pl
import torch

from replay.errors import RunError
from replay.store.claim import is_locked
from replay.store.directory import ChunkDir, not_recorded
from replay.store.files import regular_size
from replay.store.layout import StateLayout
from replay.store.manifest import MANIFEST, Manifest
from replay.store.shards import ShardPiece, listed_pieces, pieces, shard_name, shard_run_id, uncovered


class ShardedDirs:
    """The shard directories of a run recorded by N ranks, one byte range of every state each: the same reader
    as one `ChunkDir` (what `store.run.Run` reads states from)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest = Path(path), manifest
        self.layout = StateLayout(manifest.tensors)
        world = manifest.shards["world"]
        self.pieces = self._pieces(world)  # per rank: the pieces it holds (DDP byte ranges or FSDP2 shards)
        self.shards: list[tuple[int, ChunkDir]] = []  # (rank, its directory) for every rank that holds something
        self._copies: list[list[tuple[int, int, int]]] = []  # per shard: (full offset, shard offset, bytes)
        for r in range(world):
            if self.pieces[r]:
                run, plan = self._open_shard(r, world)
                self.shards.append((r, run))
                self._copies.append(plan)
        runs = [s for _, s in self.shards]
        self.chunks = [c for s in runs for c in s.chunks]
        self.orphans = [c for s in runs for c in s.orphans]
        self.invalid = [c for s in runs for c in s.invalid]
        self.leftovers = [f"{s.path.name}/{n}" for s in runs for n in s.leftovers]
        shortest = min((s.steps for s in runs), key=len)
        self.steps = list(shortest)
        for r, s in self.shards:
            if s.steps[:len(shortest)] != shortest:
                raise RunError(f"{s.path}: shard {r} recorded steps {s.steps[:3]}... where the others recorded "
                               f"{shortest[:3]}...; it is not this run's shard — restore it from the run's copy")

    def _damaged(self, why: str) -> RunError:
        return RunError(f"{self.path}/{MANIFEST}: damaged manifest ({why}); restore it from a copy of the run")

    def _pieces(self, world: int) -> list[list[ShardPiece]]:
        sh = self.manifest.shards
        if "pieces" in sh:
            try:
                per = [listed_pieces(self.layout, x) for x in sh["pieces"]]
            except ValueError as e:
                raise self._damaged(str(e)) from None
        else:
            b = sh["bounds"]
            if b[-1] != self.layout.nbytes:
                raise self._damaged(f"shard bounds end at {b[-1]:,}, the state has {self.layout.nbytes:,} bytes")
            per = [pieces(self.layout, b[r], b[r + 1]) for r in range(world)]
        if why := uncovered(self.layout, per):
            raise self._damaged(why)
        return per

    def _want(self, r: int, world: int) -> dict:
        sh, me = self.manifest.shards, {"rank": r, "world": world, "run": self.manifest.run_id}
        if "pieces" in sh:
            return {**me, "pieces": sh["pieces"][r]}
        return {**me, "start": sh["bounds"][r], "stop": sh["bounds"][r + 1]}

    def _open_shard(self, r: int, world: int) -> tuple[ChunkDir, list[tuple[int, int, int]]]:
        d = self.path / shard_name(r, world)
        held = sum(p.spec.nbytes for p in self.pieces[r])
        if not d.is_dir():
            raise RunError(f"{d}: shard {r} of {world} is missing (rank {r} recorded {held:,} bytes of every state "
                           f"there); copy every rank's shard directory into {self.path}")
        run = ChunkDir(d, Manifest.read(d))
        sm = run.manifest
        specs = [p.spec for p in self.pieces[r]]
        if sm.shard != self._want(r, world) or sm.run_id != shard_run_id(self.manifest.run_id, r) or \
                sm.tensors != specs:
            raise RunError(f"{d}: not shard {r} of this run (it belongs to run {str((sm.shard or {}).get('run'))[:8]}, "
                           f"shard {(sm.shard or {}).get('rank')}; this run is {self.manifest.run_id[:8]}); "
                           f"put this run's own shard {r} there")
        plan: list[tuple[int, int, int]] = []
        for p in self.pieces[r]:  # each piece's bytes, coalesced where they follow each other in both states
            dst = self.layout.offsets[p.source] + p.lo * p.spec.itemsize
            src, n = run.layout.offsets[p.spec.name], p.spec.nbytes
            if plan and plan[-1][0] + plan[-1][2] == dst and plan[-1][1] + plan[-1][2] == src:
                plan[-1] = (plan[-1][0], plan[-1][1], plan[-1][2] + n)
            else:
                plan.append((dst, src, n))
        return run, plan

    @property
    def live(self) -> bool | None:
        states = [s.live for _, s in self.shards] + [is_locked(self.path)]
        return True if any(states) else (None if None in states else False)

    @property
    def missing(self) -> tuple[int, int] | None:
        gaps = [m for _, s in self.shards if (m := s.missing) is not None]
        return min(gaps) if gaps else None

    @property
    def batches(self) -> pl.DataFrame:
        """Every rank's logged batches (each rank logs the examples it trained on), by step."""
        frames = [s.batches for _, s in self.shards]
        return pl.concat(frames).sort("step", maintain_order=True) if frames else pl.DataFrame()

    def manifest_bytes(self) -> int:
        return sum(s.manifest_bytes() for _, s in self.shards) + (regular_size(self.path / MANIFEST) or 0)

    def flat_state(self, t: int) -> torch.Tensor:
        if t not in set(self.steps):
            raise not_recorded(self.path, self.steps, self.manifest.every, t)
        for _, flat in self.flat_states(t, t + 1):
            return flat.clone()
        raise RunError(f"{self.path}: state {t} was not recorded by every shard")

    def flat_states(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        stop = self.steps[-1] + 1 if stop is None and self.steps else (stop or 0)
        stop = min(stop, self.steps[-1] + 1) if self.steps else 0
        whole = torch.zeros(self.layout.nbytes, dtype=torch.uint8)
        streams = [(plan, s.flat_states(start, stop)) for plan, (_, s) in zip(self._copies, self.shards, strict=True)]
        while True:
            t = None
            for plan, it in streams:
                got = next(it, None)
                if got is None:
                    return
                if t is not None and got[0] != t:
                    raise RunError(f"{self.path}: shards disagree on the state after {t}; run `replay verify`")
                t, flat = got
                for dst, src, n in plan:  # one copy per shard for DDP's byte ranges
                    whole[dst:dst + n] = flat[src:src + n]
            yield t, whole

    def verify(self) -> list[str]:
        problems = []
        for r, s in self.shards:
            problems += s.verify()
            if len(s.steps) > len(self.steps):
                problems.append(f"{s.path}: shard {r} recorded {len(s.steps) - len(self.steps)} state(s) past the "
                                f"last one every shard has ({self.steps[-1] if self.steps else 'none'}): another "
                                f"rank stopped earlier; the run is readable up to there")
        return problems
