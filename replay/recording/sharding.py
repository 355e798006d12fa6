"""Start-up of sharded recording: which bytes of every state this rank records, and the collective steps.

Under DDP every rank holds the same parameters and records one contiguous 1/N byte range of every
state (`store.shards.bounds`); under FSDP2 (`fully_shard`) every rank records its own local shards
(DTensor dim-0 ranges). Rank 0 claims the run directory and writes the run's manifest, every rank
claims its shard directory; creation is collective, so a failure on any rank fails every rank with
the same line, and what was made is undone.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from replay.errors import RecordError
from replay.recording.snapshot import Piece
from replay.store.claim import Claim, claim
from replay.store.layout import StateLayout
from replay.store.manifest import SHARDED_FORMAT, Manifest
from replay.store.shards import ShardPiece, bounds, dtensor_range, listed_pieces, shard_name, shard_run_id
from replay.store.shards import pieces as pieces_in


def is_fsdp2(model: nn.Module) -> bool:
    """Whether the model is sharded the way FSDP2 (`fully_shard`) shards it: every trainable parameter a
    DTensor sharded on dim 0 of a 1-D mesh of every rank; each rank then records its local shards. FSDP1 and
    other DTensor layouts (tensor parallelism, replication, 2-D meshes) are refused in one line."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(model, FullyShardedDataParallel) or any(isinstance(m, FullyShardedDataParallel)
                                                           for m in model.modules()):
        raise RecordError("the model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters replay "
                          "cannot map back to the model's; shard it with FSDP2 (torch.distributed.fsdp.fully_shard) "
                          "or record a DistributedDataParallel model")
    params = [p for p in model.parameters() if p.requires_grad]
    dt = [p for p in params if isinstance(p, DTensor)]
    if not dt:
        return False
    ok = len(dt) == len(params) and all(
        p.device_mesh.ndim == 1 and p.device_mesh.size() == dist.get_world_size()
        and tuple(p.placements) == (Shard(0),) for p in dt)
    if not ok:
        raise RecordError("the model's parameters are DTensors sharded other than FSDP2's way (Shard(0) on a 1-D "
                          "mesh of every rank): tensor parallelism and 2-D meshes are not recordable yet")
    return True


def rmdir_if_created(path: Path, created: bool) -> None:
    if created:
        try:
            path.rmdir()
        except OSError:
            pass


def plan_shard(m: Manifest, layout: StateLayout, params: list[tuple[str, nn.Parameter]], fsdp: bool,
               world: int, me: int) -> tuple[list[ShardPiece], dict]:
    """This rank's pieces of the state, and how its shard manifest says where they are; the run's manifest
    `m` gets every rank's (FSDP2: gathered, a collective) or the byte bounds (DDP)."""
    m.format = SHARDED_FORMAT
    if fsdp:  # each rank its local shards: every rank's list goes into the run's manifest
        mine = [x for x in ([n, *dtensor_range(p)] for n, p in params) if x[2] > x[1]]
        listed: list = [None] * world
        dist.all_gather_object(listed, mine)
        m.shards = {"world": world, "pieces": listed}
        return listed_pieces(layout, mine), {"pieces": mine}
    b = bounds(layout.nbytes, world)
    m.shards = {"world": world, "bounds": b}
    return pieces_in(layout, b[me], b[me + 1]), {"start": b[me], "stop": b[me + 1]}


def claim_run(path: Path, m: Manifest, me: int) -> tuple[str, Claim | None]:
    """(collective) Rank 0 claims the run directory and writes the run's manifest; every rank learns the run
    id, or the error as one line. Returns (run id, rank 0's claim of the directory)."""
    top, held = [None], None
    if me == 0:
        try:
            held, created = claim(path)
            try:
                m.write(path)
            except OSError as e:
                held.release()
                rmdir_if_created(path, created)
                raise RecordError(f"{path}: cannot start recording ({e.strerror or e}); nothing was left "
                                  f"behind — fix that and create the Recorder again") from None
            top = [("ok", m.run_id)]
        except RecordError as e:
            top = [("error", str(e))]
    dist.broadcast_object_list(top, src=0)
    if top[0][0] == "error":
        raise RecordError(top[0][1])
    return top[0][1], held


def shard_of(m: Manifest, layout: StateLayout, shard_pieces: list[ShardPiece], fsdp: bool, where: dict,
             me: int, world: int) -> tuple[str, Manifest, StateLayout, list[Piece]]:
    """(directory name in the run, manifest, layout, snapshot pieces) of this rank's shard run."""
    slayout = StateLayout([p.spec for p in shard_pieces])
    sm = Manifest(slayout.specs, every=m.every, task=m.task, torch_version=m.torch_version, metadata=m.metadata,
                  chunk_bytes=m.chunk_bytes, run_id=shard_run_id(m.run_id, me),
                  shard={"rank": me, "world": world, "run": m.run_id, **where})
    index = {s.name: i for i, s in enumerate(layout.specs)}
    # DDP: ranges of the parameters themselves; FSDP2: a local shard is the whole of its source
    pieces = [Piece(index[p.source], 0 if fsdp else p.lo, (p.hi - p.lo) if fsdp else p.hi,
                    slayout.offsets[p.spec.name], p.spec.torch_dtype, p.spec.shape if p.whole else None)
              for p in shard_pieces]
    return shard_name(me, world), sm, slayout, pieces


def failures(error: str | None, world: int) -> list[tuple[int, str]]:
    """(collective) Every rank's start-up error: [(rank, line)] of those that failed."""
    errors: list = [None] * world
    dist.all_gather_object(errors, error)
    return [(r, e) for r, e in enumerate(errors) if e is not None]


def one_line(failed: list[tuple[int, str]]) -> RecordError:
    r, e = failed[0]
    return RecordError(f"rank {r}: {e}" + (f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""))
