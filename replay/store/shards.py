"""Sharded runs: under DDP each of N ranks records one contiguous byte range of the flat state;
under FSDP2 each records the local shards it holds.

Every rank holds the same parameters, so recording them all on one rank makes that rank the
slow one (its copy, encoding and writes gate the next all-reduce). Instead rank r records bytes
[bounds[r], bounds[r+1]) of the flat state (`store.layout`), cut at multiples of 8 bytes (always
element boundaries: tensors are packed largest element first, each at a multiple of its size).
A shard is an ordinary run directory `shard-{r}-of-{N}` inside the run, whose tensors are the
pieces of the full tensors that fall in its range, in byte order: its own flat state is, byte for
byte, that range of the full one, so a full state is N slices put side by side.

Under FSDP2 (`fully_shard`: DTensor parameters, Shard(0) on a 1-D mesh) no rank holds a whole
tensor; each rank's local shard of a tensor is a contiguous element range of it (rows of dim 0), so
a rank records its pieces `name[lo:hi]` (the same naming), and the manifests list them explicitly.

The run's top manifest (format replay-run/3) holds the full tensor list and the bounds (DDP) or
every rank's pieces (FSDP2); each shard's manifest holds its own, and its run id is derived from
the run's and its index, so a shard of another run, or another shard's chunk, is refused by
identity, never read as data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from replay.store.layout import ALIGN, StateLayout, TensorSpec


def bounds(nbytes: int, world: int) -> list[int]:
    """world + 1 byte offsets 0 = b0 <= b1 <= ... = nbytes, multiples of 8, as even as that allows."""
    units = nbytes // ALIGN
    return [(units * r // world) * ALIGN for r in range(world)] + [nbytes]


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank}-of-{world}"


def shard_run_id(run_id: str, rank: int) -> str:
    """The shard's own identity (32 hex digits), derived: a chunk of shard 0 is foreign in shard 1."""
    return hashlib.blake2b(f"{run_id}/shard/{rank}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class ShardPiece:
    """Elements lo..hi (flat) of the full tensor `source`, recorded as tensor `spec` of a shard."""

    spec: TensorSpec
    source: str
    lo: int
    hi: int

    @property
    def whole(self) -> bool:
        return self.spec.name == self.source


def pieces(layout: StateLayout, start: int, stop: int) -> list[ShardPiece]:
    """The pieces of bytes [start, stop) of `layout`'s flat state, in byte order (the shard's packing order).

    A tensor wholly inside keeps its name and shape; one cut by a bound becomes `name[lo:hi]`, 1-D.
    """
    out = []
    for s in layout.packed:
        o, n = layout.offsets[s.name], s.nbytes
        a, b = max(o, start), min(o + n, stop)
        if a >= b:
            continue
        out.append(piece_of(s, (a - o) // s.itemsize, (b - o) // s.itemsize))
    return out


def piece_of(s: TensorSpec, lo: int, hi: int) -> ShardPiece:
    """Elements lo..hi of tensor s, as a shard names and shapes it."""
    if lo == 0 and hi == s.numel:
        return ShardPiece(s, s.name, 0, hi)
    return ShardPiece(TensorSpec(f"{s.name}[{lo}:{hi}]", (hi - lo,), s.dtype, s.kind), s.name, lo, hi)


def listed_pieces(layout: StateLayout, listed: list) -> list[ShardPiece]:
    """Pieces from a manifest's [[name, lo, hi], ...] (FSDP2 shards), checked against the layout."""
    specs = {s.name: s for s in layout.specs}
    out = []
    for item in listed:
        name, lo, hi = item
        s = specs.get(name)
        if s is None or not (0 <= lo < hi <= s.numel):
            raise ValueError(f"piece {item!r} is not a range of a recorded tensor")
        out.append(piece_of(s, lo, hi))
    return out


def uncovered(layout: StateLayout, per_rank: list[list[ShardPiece]]) -> str | None:
    """Why the ranks' pieces do not tile every tensor exactly once (None when they do)."""
    spans: dict[str, list[tuple[int, int]]] = {s.name: [] for s in layout.specs}
    for ps in per_rank:
        for p in ps:
            spans[p.source].append((p.lo, p.hi))
    for s in layout.specs:
        at = 0
        for lo, hi in sorted(spans[s.name]):
            if lo != at:
                how = "no" if lo > at else "two"
                return f"tensor {s.name!r}: elements {min(at, lo)}..{max(at, lo)} are held by {how} shards"
            at = hi
        if at != s.numel:
            return f"tensor {s.name!r}: elements {at}..{s.numel} are held by no shard"
    return None


def dtensor_range(p: object) -> tuple[int, int]:
    """The global element range [lo, hi) of this rank's local shard of a Shard(0) DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    row = 1
    for d in p.shape[1:]:
        row *= d
    rows = shape[0] if len(shape) else 1
    lo = (offset[0] if len(offset) else 0) * row
    return lo, lo + rows * row
