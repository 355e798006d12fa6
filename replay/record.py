"""Recorder: capture trainable parameters after every optimizer step, off the training thread.

A façade over the parts in `replay.recording`, one job each:

    capture() (the optimizer's post-hook, or the user) ── snapshot.begin(t): buffers now
    the next step's pre-hook (or at once, without an optimizer) ── snapshot.fence(): state t's
        parameters are final: copied (CPU), or gathered and XORed on the GPU, into a slot
        reserved from the writer, then committed
    writer: chunks written and fsynced in the background (`recording.writer`)
    watch: the parameter set stays the recorded one; skipped AMP steps are zero-change states
    interrupts: Ctrl-C is held while a hook runs, so a state is recorded whole or not begun

What state t is: the parameters as the forward of update t sees them. That is the value
right after the previous `optimizer.step()` plus any in-place change made before the next
step begins (weight clipping, projections, max-norm: `p.clamp_()` after `opt.step()`).

Under torch.distributed (DDP, more than one process) every rank holds the same parameters, and
by default each records one contiguous 1/N byte range of every state into its own shard
directory of the run (`store.shards`): copy, encoding and writes fall N× per rank and no rank
is the slow one. Every rank must create the Recorder (the same call, as DDP code does); creation
is collective (the run id is agreed, and a failure on any rank fails all). `rank=r` instead has
one rank record whole states (the others only count steps, with no fence, threads or files).
"""

from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from replay import interrupts, trust
from replay.errors import RecordError
from replay.recording import sharding, snapshot
from replay.recording.rates import RateWatch
from replay.recording.snapshot import CudaSnapshot, DeferredSnapshot, Gather, InlineSnapshot, Piece, whole_pieces
from replay.recording.watch import ParamWatch, wrap_skipping_step
from replay.recording.writer import Writer
from replay.store.claim import Claim, claim
from replay.store.compress import zstd
from replay.store.constants import constants_of
from replay.store.layout import StateLayout, spec_of
from replay.store.manifest import MANIFEST, Manifest
from replay.wrappers import torch_optimizer, trainable_parameters, unwrap_model

# Chosen by tools/bench_chunks.py (2.4 MB states, this 2-core box): write throughput is the
# disk's (350-790 MB/s, noise) from 4 MiB up at every size, while run.state(t) grows with the
# chunk (1.7 ms at 4 MiB, 9.7 at 8, 14 at 16, 22 at 32): 8 MiB keeps random access cheap and
# the file count moderate.
DEFAULT_CHUNK_BYTES = 8 << 20
# A crash loses at most this much recording. 30 s: a killed job loses under a minute of
# states, while a fast small model still writes few, large chunks (each closed chunk starts
# the next with a keyframe, so flushing every second would multiply the bytes of tiny runs).
DEFAULT_FLUSH_SECS = 30.0


def _check_arguments(model: nn.Module, every: int, task: str | None, chunk_bytes: int, queue_size: int,
                     flush_secs: float) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an integer ≥ 1, got {every!r}")
    if task is not None and (not isinstance(task, str) or ":" not in task):
        raise ValueError(f"task: expected 'module:function', got {task!r}")
    if chunk_bytes < 1 or queue_size < 1:
        raise ValueError(f"chunk_bytes and queue_size must be ≥ 1, got {chunk_bytes}, {queue_size}")
    if not (isinstance(flush_secs, int | float) and math.isfinite(flush_secs) and flush_secs > 0):
        raise ValueError(f"flush_secs: expected a positive number of seconds, got {flush_secs!r}")


def _refuse_unrecordable(params: list[tuple[str, nn.Parameter]]) -> None:
    meta = [n for n, p in params if p.is_meta]
    if meta:
        raise RecordError(f"parameter {meta[0]!r} is on the meta device (no values; {len(meta)} in all): materialize "
                          f"the model (to_empty() and load or initialize its weights) before recording it")
    if not any(p.numel() for _, p in params):
        raise RecordError("every trainable parameter of the model is empty (0 elements); there is nothing to record")
    devices = {p.device for _, p in params}
    if len(devices) > 1:
        raise RecordError(f"the trainable parameters are on {len(devices)} devices ({', '.join(map(str, devices))}); "
                          f"record a model whose parameters are on one device")


def _close_at_exit(rec: Recorder) -> None:
    """A script that never calls close() still gets every state written. The writer's threads are
    concurrent.futures executors, which refuse work once the interpreter starts shutting them down, so
    the Recorder closes at threading's exit (before theirs), or at atexit where that hook is missing."""
    ref = weakref.ref(rec)

    def close() -> None:
        if (r := ref()) is not None:
            try:
                r.close()
            except RecordError as e:  # at exit there is no caller to raise to: one line
                print(f"replay: {e}", file=sys.stderr)

    register = getattr(threading, "_register_atexit", None)
    try:
        register(close) if register is not None else atexit.register(close)
    except RuntimeError:  # the interpreter is already shutting down
        atexit.register(close)


class Recorder:
    """Record `model`'s trainable parameters into the run directory `path`.

    With `optimizer` (a torch optimizer, or a wrapper such as accelerate's), every
    `optimizer.step()` is captured automatically; without, call `capture()` after each update.
    State 0 (the parameters now) is captured on creation. Only states 0, every, 2·every, ... are
    stored. A crash loses at most `flush_secs` of recording. Use as a context manager or call
    `close()`. A DistributedDataParallel or torch.compile'd model is recorded under the plain
    model's names. Under DDP every rank records its 1/N byte range of every state (FSDP2: its local
    shards) into its own shard of the run; `rank=r` has one process record whole states instead
    (`recording` says whether this one does). `flush()` writes what is final now.
    `compress=True` stores chunks zstd-compressed (needs zstandard; see `store.compress` for
    what it saves: 1.6x for float32, ~4x for bfloat16), at one core's work per ~470 MB/s of states.
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        *,
        optimizer: object | None = None,
        every: int = 1,
        task: str | None = None,
        metadata: dict | None = None,
        buffers: bool = False,
        flush_secs: float = DEFAULT_FLUSH_SECS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        queue_size: int = 4,
        rank: int | None = None,
        shard: bool | None = None,
        compress: bool = False,
    ):
        _check_arguments(model, every, task, chunk_bytes, queue_size, flush_secs)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if shard and rank is not None:
            raise ValueError("pass rank= (one rank records whole states) or shard=True (each rank a slice), not both")
        if shard and not distributed:
            raise ValueError("shard=True needs an initialized torch.distributed process group of more than one "
                             "process; without one, the Recorder records whole states")
        self._fsdp = sharding.is_fsdp2(unwrap_model(model))
        if self._fsdp and (rank is not None or shard is False or buffers):
            raise ValueError("an FSDP2 model is recorded by every rank, its own shards, and without buffers: drop "
                             "rank=, shard=False and buffers=True")
        self._sharded = self._fsdp or (distributed and rank is None and shard is not False)
        model = unwrap_model(model)
        opt = torch_optimizer(optimizer) if optimizer is not None else None
        self.path, self.model, self.every, self.step = Path(path), model, every, 0
        self._dir = self.path  # where this process writes: the run, or its shard of a sharded run
        self.flush_secs = float(flush_secs)
        if compress:
            zstd()  # one line now, not a failure in the background later
        self._closed, self._hooks = False, []
        self._top: Claim | None = None  # a sharded run's directory, held by rank 0
        self._unpatch: Callable[[], object] = lambda: None
        self._error: BaseException | None = None
        self._ids: list[np.ndarray] = []  # log_batch ids of the coming update
        self._stepping = False  # an optimizer step's pre-hook ran and its post-hook has not (yet)
        self.recording = self._sharded or not distributed or dist.get_rank() == (rank or 0)
        self._deferred = opt is not None  # a pre-hook fences each state before the parameters change
        if not self.recording:  # another process records this run: only count the steps
            if opt is not None:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self.capture()))
            return
        self._params, aliases, frozen = trainable_parameters(model)
        if not self._params:
            raise RecordError("model has no trainable parameters (requires_grad=True); nothing to record")
        _refuse_unrecordable(self._params)
        self._buffers = list(model.named_buffers()) if buffers else []
        specs = [spec_of(n, p) for n, p in self._params] + [spec_of(n, b, "buffer") for n, b in self._buffers]
        self.layout = StateLayout(specs)
        recorded = {s.name for s in specs} | set(aliases)
        self._manifest = Manifest(specs, every=every, task=task, torch_version=torch.__version__,
                                  metadata=dict(metadata or {}), chunk_bytes=chunk_bytes, aliases=aliases,
                                  frozen=frozen, constants=constants_of(model, recorded))
        self._manifest.task_signature = trust.sign(self._manifest.run_id, task) if task else None  # replay.trust
        self._watch = ParamWatch(model, self._params)
        self._writer: Writer | None = None
        if self._sharded:
            self._start_shard(opt, queue_size, chunk_bytes, compress)
        else:
            # everything above can fail without touching the disk; from here on a failure undoes what it made
            self._claim, created = claim(self.path)
            try:
                self._manifest.write(self.path)
                self._start(opt, queue_size, chunk_bytes, compress, self.layout, self._manifest.run_id,
                            whole_pieces([self.layout.offsets[s.name] for s in specs], [p for _, p in self._params]
                                         + [b for _, b in self._buffers]))
            except OSError as e:
                self._abandon(created)
                raise RecordError(f"{self.path}: cannot start recording ({e.strerror or e}); nothing was left "
                                  f"behind — fix that and create the Recorder again") from None
            except BaseException:
                self._abandon(created)
                raise
        if opt is not None and opt is not optimizer and hasattr(optimizer, "step_was_skipped"):
            self._unpatch = wrap_skipping_step(optimizer, self)
        _close_at_exit(self)

    def _start(self, opt: torch.optim.Optimizer | None, queue_size: int, chunk_bytes: int, compress: bool,
               layout: StateLayout, run_id: str, pieces: list[Piece]) -> None:
        """Writer, snapshot and hooks for the flat state `layout` whose bytes are `pieces` of the recorded
        tensors (sources: the parameters, then the buffers, in recording order); state 0 taken now."""
        device = self._params[0][1].device
        cuda = device.type == "cuda"
        self._rates = RateWatch(self._dir, self.every, compress)
        self._writer = Writer(self._dir, layout, run_id, chunk_bytes=chunk_bytes, flush_secs=self.flush_secs,
                              compress=compress, pinned=cuda, rates=self._rates)
        plist, blist = [p for _, p in self._params], [b for _, b in self._buffers]
        n = len(plist)
        ppieces = [p for p in pieces if p.source < n]
        bpieces = [replace(p, source=p.source - n) for p in pieces if p.source >= n]
        if self._fsdp:  # the local shards, fetched at each copy (FSDP2 may swap their storage)
            def sources() -> list[torch.Tensor]:
                return [p.to_local() for p in plist]
        else:
            def sources() -> list[torch.Tensor]:
                return plist
        params, bufs = Gather(ppieces, sources), Gather(bpieces, lambda: blist)
        nbytes = layout.nbytes
        if cuda:
            self._snapshot = CudaSnapshot(params, bufs, nbytes, self._writer, self._rates, device)
        elif nbytes < snapshot.DEFER_BYTES or opt is None:  # without a pre-hook there is no forward to overlap
            self._snapshot = InlineSnapshot(params, bufs, nbytes, self._writer, self._rates)
        else:
            self._snapshot = DeferredSnapshot(params, bufs, nbytes, self._writer, self._rates,
                                              lambda: [sources()[p.source]._version for p in ppieces], queue_size)
        if opt is not None:
            self._hooks.append(opt.register_step_pre_hook(lambda *_: self._fence()))
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.capture()))
        self._take(0)

    def _start_shard(self, opt: torch.optim.Optimizer | None, queue_size: int, chunk_bytes: int,
                     compress: bool) -> None:
        """Sharded recording (collective, `recording.sharding`): rank 0 claims the run and writes its manifest,
        every rank then claims and starts its own shard; a failure anywhere fails every rank with one line."""
        world, me = dist.get_world_size(), dist.get_rank()
        m = self._manifest
        shard_pieces, where = sharding.plan_shard(m, self.layout, self._params, self._fsdp, world, me)
        m.run_id, self._top = sharding.claim_run(self.path, m, me)
        error = None
        if not shard_pieces:  # more ranks than 8-byte units (or local shards): this one has nothing to record
            self.recording = False
            if opt is not None:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self.capture()))
        else:
            name, sm, slayout, pieces = sharding.shard_of(m, self.layout, shard_pieces, self._fsdp, where, me, world)
            self._dir = self.path / name
            try:
                self._claim, created = claim(self._dir)
                try:
                    sm.write(self._dir)
                    self._start(opt, queue_size, chunk_bytes, compress, slayout, sm.run_id, pieces)
                except BaseException as e:
                    self._abandon(created)
                    raise RecordError(f"{self._dir}: cannot start recording ({getattr(e, 'strerror', None) or e})"
                                      ) from None
            except RecordError as e:
                error = str(e)
        failed = sharding.failures(error, world)
        if failed:
            if error is None and self.recording:
                self._abandon(True)
            dist.barrier()  # every shard undone before the run's directory goes
            if self._top is not None:
                (self.path / MANIFEST).unlink(missing_ok=True)
                self._top.release()
                sharding.rmdir_if_created(self.path, True)
            raise sharding.one_line(failed)

    def _abandon(self, created: bool) -> None:
        """The constructor failed: stop what started and remove what it wrote, so a retry can succeed."""
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._watch.remove()
        if self._writer is not None:
            self._writer.abandon()
        for p in self._dir.iterdir():
            if p.name == MANIFEST or p.name.startswith(("chunk-", "batches-", ".")):
                p.unlink(missing_ok=True)
        self._claim.release()
        sharding.rmdir_if_created(self._dir, created)

    # ---- training thread -------------------------------------------------------------

    def log_batch(self, ids: object) -> None:
        """The ids (integers, e.g. data-set indices) of examples the coming update learns from.

        Call once per micro-batch: ids accumulate until the optimizer step (the update from
        state t to t+1 is step t, as in the LCA frames). Read back as `open_run(path).batches`.
        """
        arr = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(f"log_batch: expected a 1-D sequence of integer example ids, got {arr.dtype} "
                            f"of shape {arr.shape}")
        if self.recording:
            self._ids = [*self._ids, arr.astype(np.int64)]  # one assignment: an interrupt keeps all or none

    def capture(self) -> None:
        """Mark one update done (state index += 1) and record the new state if due.

        Interrupt-safe: a Ctrl-C during it is delivered when it returns, with the state recorded
        (or, if it came while waiting for the disk, before anything changed: the update is then
        counted with the next one)."""
        with interrupts.held():
            self._raise_if_failed()
            if not self.recording:
                self.step += 1
                return
            self._advance()

    def _advance(self) -> None:
        """One update done: state index += 1, its state begun if due, the update's batch logged."""
        self._stepping = False
        t = self.step + 1
        if t % self.every == 0:
            self._take(t)
        if self._ids:  # the batch of update t - 1 (state t - 1 -> t)
            self._writer.log_batch(t - 1, np.concatenate(self._ids))
            self._ids = []
        self.step = t

    def _take(self, t: int) -> None:
        """State t is due: the pending one is final (no update since), then begin t (and fence it now
        when no pre-hook will)."""
        self._snapshot.fence()  # copies the recorded tensors: still the pending state's, whatever replaced them
        if t and (what := self._watch.changed()) is not None:  # state t is of another parameter set
            self._error = self._error or RecordError(self._describe_change(what))
            self._raise_if_failed()
        self._snapshot.begin(t)
        if not self._deferred:  # capture() after a manual update: the user says the state is final
            self._snapshot.fence()

    def _fence(self) -> None:
        """The optimizer's pre-hook: the parameters are about to change, so the pending state is final."""
        with interrupts.held():
            self._raise_if_failed()
            self._snapshot.fence()
            self._stepping = True

    def flush(self) -> None:
        """Write every state recorded so far to disk now (fsynced), and return when it is there.

        For a checkpoint, before a long evaluation, or before reading the run while training goes
        on. The state of the latest `optimizer.step()` is not final until the next step begins (an
        in-place change made before then belongs to it), so it is written with the next flush or at
        close; states captured with `capture()` are final at once. The chunk written now is shorter
        than `chunk_bytes` (the next starts with a keyframe): flush at checkpoints, not every step.
        """
        with interrupts.held():
            self._raise_if_failed()
            if not self.recording or self._closed:
                return
            self._snapshot.settle()
            self._writer.flush()

    def close(self) -> None:
        """Fence the last state, flush the partial chunk, stop the threads, detach the hooks. Idempotent.

        The last state includes in-place changes made up to now: close right after training
        (before, say, loading a best checkpoint into the model).
        """
        with interrupts.held():
            if self._closed:
                return
            self._closed = True
            for h in self._hooks:
                h.remove()
            self._unpatch()
            if not self.recording:
                if self._top is not None:
                    self._top.release()
                return
            self._watch.remove()
            try:
                if self._error is None:
                    if self._interrupted_update_moved():  # its changes are the last update's
                        self._advance()
                    self._snapshot.fence()
            finally:
                try:
                    self._snapshot.drain()
                finally:
                    try:
                        self._writer.close()
                    finally:
                        self._claim.release()
                        if self._top is not None:
                            self._top.release()
            self._raise_if_failed()

    def _interrupted_update_moved(self) -> bool:
        """The last optimizer step was interrupted (Ctrl-C, an exception) after its pre-hook fenced the state, and
        changed the parameters: what it changed would otherwise belong to no state, and the run would not end
        with the model's parameters, so close counts it as the last update (as an interrupted update's changes
        are merged into the next state during training). Only when every update is recorded (`every=1`: the
        fenced state is then the parameters the interrupted update began from, so "moved" is its own doing), and
        not for a sharded run, whose ranks would have to agree on it."""
        return self._stepping and not self._sharded and self.every == 1 and self._snapshot.moved()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers ---------------------------------------------------------------------

    @property
    def chunks_written(self) -> int:
        return self._writer.chunks_written if self.recording else 0

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecordError(str(self._error))
        if self.recording and self._writer is not None:
            self._writer.raise_if_failed()

    def _describe_change(self, what: str) -> str:
        return (f"{self.path}: the model's trainable parameters changed after recording began ({what}); "
                f"a run records one fixed parameter set — start a new Recorder for the new model")
