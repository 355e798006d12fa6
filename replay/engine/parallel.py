"""How one `compute` process shares the work with the others that torchrun started.

Two modes, chosen by the caller:

- **steps** (default): the steps are cut into contiguous blocks, dealt to the ranks in turn
  (up to BLOCKS_PER_RANK each, of at least MIN_BLOCK_STEPS steps). Each block starts from
  its first state (random access: a chunk's keyframe) and costs one gradient evaluation more
  than continuing would; dealing several blocks per rank evens out the work, because the
  refinement a step needs varies along training (measured on the digits CNN: the second
  half needed 1.5x the evaluations of the first, which capped 2 contiguous halves at 0.83
  efficiency). Each rank writes its own parquet parts and the per-parameter totals are
  summed on rank 0 (`reduce`). A step's numbers are those of a single process; only the
  totals' float64 sums are associated differently (per rank, then across ranks).
- **data** (`data_parallel=True`): for a step too big for one device's data, every rank
  evaluates every step on its shard of each data set. Each rank also owns a contiguous slice
  of the flat parameter vector: the per-loss gradients are reduce-scattered, so a rank
  receives the whole sums for its slice only, and does Simpson's [losses × parameters]
  bookkeeping for that slice. Only [losses]-sized projections (the refinement test) and
  [losses × tensors] step sums cross between ranks after that. Every rank writes the `params`
  rows of its slice; rank 0 writes the step frames. The gradients' sums are associated
  differently from one process (per shard, then across shards).

With one process (no torchrun, or `--nproc-per-node 1`) both modes are the plain path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from replay.errors import ReplayError


@dataclass(frozen=True)
class Placement:
    """This process's place among the others: rank of world, the mode, whether we own the process group.

    Its methods are the only collectives the engine uses; each names the mode it serves and
    does nothing in any other (in particular, nothing at all in one process).
    """

    rank: int = 0
    world: int = 1
    data_parallel: bool = False
    owns_group: bool = False

    @property
    def shards_steps(self) -> bool:
        return self.world > 1 and not self.data_parallel

    @property
    def shards_data(self) -> bool:
        return self.world > 1 and self.data_parallel

    @property
    def writes_steps(self) -> bool:
        """Whether this rank writes step and tensor frames (every rank in steps mode; rank 0 in data mode)."""
        return self.rank == 0 or self.shards_steps

    @property
    def tag(self) -> str:
        """Suffix of this rank's files ('-r001'); '' for a single process."""
        return f"-r{self.rank:03d}" if self.world > 1 else ""

    def tags(self) -> list[str]:
        """The file suffixes of every rank of this placement."""
        return [f"-r{r:03d}" for r in range(self.world)] if self.world > 1 else [""]

    @property
    def mode(self) -> str:
        return "steps" if self.shards_steps else "data" if self.shards_data else "none"

    def sum_shards(self, *tensors: torch.Tensor) -> None:
        """Data mode: sum each rank's share (of its shard of the data, or its slice's sums) in place, on every rank."""
        if self.shards_data:
            for t in tensors:
                dist.all_reduce(t)

    def sum_shards_onto_first(self, *tensors: torch.Tensor) -> None:
        """Data mode: sum onto rank 0, in place (other ranks' values become undefined)."""
        if self.shards_data:
            for t in tensors:
                dist.reduce(t, 0)

    def sum_blocks_onto_first(self, *tensors: torch.Tensor) -> None:
        """Steps mode: sum every rank's totals over its blocks of steps onto rank 0, in place."""
        if self.shards_steps:
            for t in tensors:
                dist.reduce(t, 0)

    def columns_on_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Data mode: every rank's column slice of x, side by side, on rank 0 (None elsewhere); else x."""
        if not self.shards_data:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(x, parts, 0)
        return torch.cat(parts, 1) if parts is not None else None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum_scattered(self, out: torch.Tensor, chunks: torch.Tensor) -> None:
        """Data mode: out = Σ over ranks of chunks[rank]; `chunks` is [world, *out.shape], contiguous (and
        overwritten). Each rank receives the whole sums of its own slice only."""
        if not self.shards_data:
            out.copy_(chunks[0])
            return
        if dist.get_backend() == "gloo":
            # gloo's reduce-scatter is slower than its all-reduce of the whole buffer (measured, 4 MB,
            # 2 processes: 5.6 vs 4.0 ms); NCCL's moves half the data of an all-reduce
            dist.all_reduce(chunks)
            out.copy_(chunks[dist.get_rank()])
            return
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.14
        fn(out.view(-1), chunks.view(-1))


def parse_device(device: str) -> torch.device:
    """A device replay can use here, or one clear line: only cpu and cuda[:N] are supported."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ReplayError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ReplayError(f"--device {device!r}: replay computes on cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReplayError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ReplayError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def join(device: str, data_parallel: bool) -> tuple[Placement, torch.device]:
    """Join the caller's process group, or torchrun's (from its environment); pick this rank's device.

    `cuda` without an index becomes `cuda:LOCAL_RANK`, one GPU per process; an explicit index
    is kept. A group we create here uses nccl for CUDA and gloo for the CPU.
    """
    dev = parse_device(device)
    joined = dist.is_available() and dist.is_initialized()
    if not joined and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Placement(data_parallel=data_parallel), dev
    if not dist.is_available():
        raise ReplayError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run one process")
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if dev.index is None:  # one GPU per process
            local = os.environ.get("LOCAL_RANK")
            dev = torch.device("cuda", int(local) if local is not None else dist.get_rank() % count if joined else 0)
        if dev.index >= count:
            raise ReplayError(f"--device {device}: this process would use cuda:{dev.index} but this machine has "
                              f"{count} GPU(s); start one process per GPU (torchrun --nproc-per-node {count})")
        torch.cuda.set_device(dev)
    if not joined:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        raise ReplayError(f"--device {device} under an nccl process group: nccl reduces CUDA tensors only; "
                          f"use --device cuda, or a gloo group for the CPU")
    return Placement(dist.get_rank(), dist.get_world_size(), data_parallel, owns_group=not joined), dev


def leave(place: Placement) -> None:
    """Destroy the process group if `join` created it."""
    if place.owns_group and dist.is_initialized():
        dist.destroy_process_group()


BLOCKS_PER_RANK = 8
MIN_BLOCK_STEPS = 8


def segments(todo: list[int], place: Placement) -> list[list[int]]:
    """This rank's steps as contiguous segments (each replayed from its first state)."""
    if not place.shards_steps:
        return [todo] if todo else []
    per_rank = max(1, min(BLOCKS_PER_RANK, len(todo) // (place.world * MIN_BLOCK_STEPS)))
    n_blocks = place.world * per_rank
    q, r = divmod(len(todo), n_blocks)
    bounds = [i * q + min(i, r) for i in range(n_blocks + 1)]  # sizes differ by at most one
    return [todo[bounds[i]:bounds[i + 1]] for i in range(place.rank, n_blocks, place.world)
            if bounds[i] < bounds[i + 1]]


def shard_batches(batches: list[tuple[int, int, int]], place: Placement,
                  keep_whole: bool) -> list[tuple[int, int, int]]:
    """This rank's share of a data set's evaluation batches (start, stop, cell) in data mode.

    Ranks get equal contiguous example ranges, batches cut at their edges. `keep_whole`
    (batch-norm with batch statistics: a batch's composition is part of the loss) instead
    gives each batch whole to the rank whose range holds its first example.
    """
    if not place.shards_data or not batches:
        return batches
    n = batches[-1][1]
    lo, hi = n * place.rank // place.world, n * (place.rank + 1) // place.world
    if keep_whole:
        return [b for b in batches if lo <= b[0] < hi]
    return [(max(a, lo), min(b, hi), c) for a, b, c in batches if a < hi and b > lo]


# How the flat parameter vector meets the ranks' slices in data mode, seen from both sides:
# a parameter's range cut at slice edges (where its gradient goes), and a slice cut at
# parameter edges (what it sums per tensor).

def param_pieces(numels: list[int], slice_size: int) -> list[list[tuple[int, int, int, int, int]]]:
    """Per parameter, its flat range cut at slice edges: (rank, start, stop in that slice, start, stop in it)."""
    out, base = [], 0
    for n in numels:
        pieces, a = [], base
        while a < base + n:
            r, b = a // slice_size, min(base + n, (a // slice_size + 1) * slice_size)
            pieces.append((r, a - r * slice_size, b - r * slice_size, a - base, b - base))
            a = b
        out.append(pieces)
        base += n
    return out


def slice_cuts(sizes: list[int], lo: int, hi: int, device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """The columns lo..hi cut at tensor edges: piece sizes, and each piece's tensor id (len(sizes) = padding).

    Ids are None when the columns are exactly all tensors (one process, or steps mode).
    """
    if lo == 0 and hi == sum(sizes):
        return sizes, None
    cuts, ids, base = [], [], 0
    for i, n in enumerate([*sizes, hi]):  # a last pseudo-tensor covers the padding
        a, b = max(lo, base), min(hi, base + n)
        if a < b:
            cuts.append(b - a)
            ids.append(i)
        base += n
    return cuts, torch.tensor(ids, device=device)
