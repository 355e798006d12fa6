"""Recorder: capture trainable parameters after every optimizer step, off the training thread.

What state t is: the parameters as the forward of update t sees them. That is the value
right after the previous `optimizer.step()` plus any in-place change made before the next
step begins (weight clipping, projections, max-norm: `p.clamp_()` after `opt.step()`).

Threads and buffers (S = bytes of one flat state, see `store.layout`):

    training thread ──post-hook──> staging buffer from a bounded pool (blocks = backpressure)
        CPU:  parameters are not updated until the next optimizer.step(), so only a *request*
              is queued; the encoder thread copies them while forward/backward runs.
        CUDA: a non-blocking copy into pinned memory on a side stream, fenced by an event
              that the next step's stream waits on (no host sync on the training thread).
        buffers (BN statistics) change during forward, so they are copied in the hook itself.
    training thread ──next step's pre-hook (or close)──> seal: wait for the copy, then compare
        every parameter's version counter (`p._version`) with its value at the post-hook and
        copy again those changed in place since; only then may the encoder use the state.
    encoder thread: XOR of the sealed state with the previous one into the chunk buffer; a
        chunk is closed when full, or once its oldest state is `flush_secs` old
    flusher thread: checksum (xxHash3), write to a temp name, rename (store.chunk.write_chunk); fsync of
        the files not yet synced on the `flush_secs` clock and at close

Memory is bounded: `queue` staging states plus three chunk buffers of ≤ `chunk_bytes`.

Under torch.distributed (DDP) every rank holds the same parameters, so one rank records
(`rank`, default 0); on the others the Recorder only counts steps — no fence, threads or
files — and so can never make them wait.
"""

from __future__ import annotations

import atexit
import errno
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from replay.errors import RecordError
from replay.pacer import Pacer
from replay.store.atomic import fsync_path
from replay.store.batches import write_batches
from replay.store.chunk import MAX_CHUNK_STATES, ChunkBuilder, write_chunk
from replay.store.claim import claim
from replay.store.compress import compress, zstd
from replay.store.layout import StateLayout, spec_of
from replay.store.manifest import MANIFEST, Manifest
from replay.store.run import LOCK
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
# CPU states smaller than this are copied on the training thread at the post-hook (a 1.2 MB copy
# takes ~0.1 ms here, less than handing the copy to the encoder and waiting for it:
# tools/bench_record.py); larger ones are copied by the encoder while forward/backward runs.
DEFER_BYTES = 16 << 20
_STOP = object()


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


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP and tensor parallelism hold a shard of each parameter per rank: one rank's copy is not the state."""
    if not (dist.is_available() and dist.is_initialized()):
        return  # sharding needs a process group
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    sharded = isinstance(model, FullyShardedDataParallel) or any(
        isinstance(p, DTensor) or isinstance(m, FullyShardedDataParallel)
        for m in model.modules() for p in m.parameters(recurse=False))
    if sharded:
        raise RecordError("the model's parameters are sharded across ranks (FSDP or DTensor); replay records "
                          "whole parameters only — record a DistributedDataParallel or single-process model")


@dataclass(eq=False)
class _Pending:
    """One state on its way from the training thread to the encoder."""

    t: int
    flat: torch.Tensor
    views: dict[str, torch.Tensor]
    copied: threading.Event | torch.cuda.Event | None  # CPU deferred copy done / CUDA side-stream copy
    versions: list[int]
    sealed: threading.Event = field(default_factory=threading.Event)
    patched: torch.cuda.Event | None = None  # CUDA: the re-copy of parameters changed in place


def _write_failed(path: Path, steps: list[int], written: int, e: OSError) -> RecordError:
    """One line for a failed chunk write that says what happened, not always 'free disk space'."""
    remedy = {
        errno.ENOSPC: "free disk space and record anew",
        errno.EDQUOT: "the disk quota is exhausted; free space and record anew",
        errno.ENOENT: "the run directory was deleted or moved while recording; record anew",
        errno.EACCES: "write permission on the run directory was lost; record anew",
        errno.EROFS: "the file system became read-only; record anew elsewhere",
    }.get(e.errno, "record anew")
    return RecordError(f"{path}: writing the chunk of steps {steps[0]}..{steps[-1]} failed ({e.strerror or e}); "
                       f"the {written} chunks already written are intact — {remedy}")


class Recorder:
    """Record `model`'s trainable parameters into the run directory `path`.

    With `optimizer` (a torch optimizer, or a wrapper such as accelerate's), every
    `optimizer.step()` is captured automatically; without, call `capture()` after each update.
    State 0 (the parameters now) is captured on creation. Only states 0, every, 2·every, ... are
    stored. A crash loses at most `flush_secs` of recording. Use as a context manager or call
    `close()`. A DistributedDataParallel or torch.compile'd model is recorded under the plain
    model's names; under DDP by process `rank` only (`recording` says which one this is).
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
        rank: int = 0,
        compress: bool = False,
    ):
        _check_arguments(model, every, task, chunk_bytes, queue_size, flush_secs)
        model = unwrap_model(model)
        _refuse_sharded(model)
        opt = torch_optimizer(optimizer) if optimizer is not None else None
        self._unpatch: Callable[[], object] = lambda: None
        self.path, self.model, self.every, self.step = Path(path), model, every, 0
        self.flush_secs = float(flush_secs)
        if compress:
            zstd()  # one line now, not a failure in the background later
        self._compress = bool(compress)
        self._closed, self._hooks = False, []
        self._error: BaseException | None = None
        self._pending: _Pending | None = None
        self._ids: list[np.ndarray] = []  # log_batch ids of the coming update
        self._batch_rows: list[tuple[int, np.ndarray]] = []  # (update, ids) not yet written
        self._batch_lock = threading.Lock()
        self.chunks_written = 0
        self.recording = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == rank
        if not self.recording:  # another process records this run: only count the steps
            if opt is not None:
                self._hooks.append(opt.register_step_post_hook(lambda *_: self.capture()))
            return
        self._params, aliases, frozen = trainable_parameters(model)
        self._buffers = list(model.named_buffers()) if buffers else []
        if not self._params:
            raise RecordError("model has no trainable parameters (requires_grad=True); nothing to record")
        specs = [spec_of(n, p) for n, p in self._params] + [spec_of(n, b, "buffer") for n, b in self._buffers]
        self.layout = StateLayout(specs)
        self._signature = self._param_signature()
        self._dirty, self._since_check = False, 0
        self._manifest = Manifest(specs, every=every, task=task, torch_version=torch.__version__,
                                  metadata=dict(metadata or {}), chunk_bytes=chunk_bytes, aliases=aliases,
                                  frozen=frozen)
        # everything above can fail without touching the disk; from here on a failure undoes what it made
        self._lock, created = claim(self.path)
        try:
            self._manifest.write(self.path)
            self._start(opt, queue_size, chunk_bytes)
        except OSError as e:
            self._abandon(created)
            raise RecordError(f"{self.path}: cannot start recording ({e.strerror or e}); nothing was left behind — "
                              f"fix that and create the Recorder again") from None
        except BaseException:
            self._abandon(created)
            raise
        if opt is not None and opt is not optimizer and hasattr(optimizer, "step_was_skipped"):
            self._count_skipped_steps(optimizer)
        ref = weakref.ref(self)
        self._atexit = lambda: (r := ref()) is not None and r.close()
        atexit.register(self._atexit)

    def _start(self, opt: torch.optim.Optimizer | None, queue_size: int, chunk_bytes: int) -> None:
        device = self._params[0][1].device
        self._cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self._cuda else None
        # inline: a small CPU state is encoded on the training thread when it is sealed — two passes
        # over a small state cost less than waking another thread for it (tools/bench_record.py)
        self._inline = not self._cuda and self.layout.nbytes < DEFER_BYTES
        # staging pool: the states in flight + the encoder's "previous" + one being filled (inline: current, previous)
        self._pool: queue.Queue = queue.Queue()
        for _ in range(2 if self._inline else queue_size + 2):
            flat = torch.zeros(self.layout.nbytes, dtype=torch.uint8, pin_memory=self._cuda)  # pad bytes stay 0
            self._pool.put((flat, self.layout.views(flat)))
        self._work: queue.Queue = queue.Queue(maxsize=queue_size)
        slots = max(1, min(MAX_CHUNK_STATES, chunk_bytes // self.layout.nbytes))
        self._chunks: queue.Queue = queue.Queue()  # bounded by the chunk buffers: the encoder never waits on a write
        self._free_chunks: queue.Queue = queue.Queue()
        # chunk buffers: one filling, the rest queued or being written; more of them absorb the disk's
        # latency spikes (up to 64 MiB in all), at least 3 whatever the size
        for _ in range(max(3, min(8, (64 << 20) // (slots * self.layout.nbytes)))):
            self._free_chunks.put(np.empty(slots * self.layout.nbytes, dtype=np.uint8))
        self._deferred = opt is not None  # a pre-hook seals each state before the parameters change
        self._pacer = Pacer(self.path, self.every, self._compress)
        self._encoder = None
        if self._inline:
            self._cur, self._prev = (self._pool.get(), self._pool.get())
            self._due: int | None = None
            self._open: ChunkBuilder | None = None
            self._open_lock = threading.Lock()
        else:
            self._encoder = threading.Thread(target=self._guard(self._encode_loop), name="replay-encoder",
                                             daemon=True)
            self._encoder.start()
        self._flusher = threading.Thread(target=self._guard(self._flush_loop), name="replay-flusher", daemon=True)
        self._flusher.start()
        ours, me = {id(m) for m in self.model.modules()}, weakref.ref(self)  # global hooks: hold no Recorder

        def replaced(module: nn.Module, *_: object) -> None:  # a parameter or submodule (re)assigned anywhere
            if id(module) in ours and (rec := me()) is not None:
                rec._dirty = True

        self._hooks += [register_module_parameter_registration_hook(replaced),
                        register_module_module_registration_hook(replaced)]
        if opt is not None:
            self._hooks.append(opt.register_step_pre_hook(lambda *_: self._seal()))
            self._hooks.append(opt.register_step_post_hook(lambda *_: self.capture()))
        self._snapshot(0)

    def _count_skipped_steps(self, wrapper: object) -> None:
        """accelerate's optimizer skips the torch step on AMP overflow: that step becomes a zero-change state."""
        original = wrapper.step

        def step(*args: object, **kwargs: object) -> object:
            before = self.step
            out = original(*args, **kwargs)
            if self.step == before and getattr(wrapper, "step_was_skipped", False):
                self.capture()
            return out

        wrapper.step = step
        self._unpatch = lambda: wrapper.__dict__.pop("step", None)

    def _abandon(self, created: bool) -> None:
        """The constructor failed: stop what started and remove what it wrote, so a retry can succeed."""
        self._closed = True
        for h in self._hooks:
            h.remove()
        if getattr(self, "_flusher", None) is not None and self._flusher.is_alive():
            self._error = self._error or RecordError("abandoned")
            self._chunks.put(_STOP)
            if self._encoder is not None:
                self._encoder.join(timeout=5)
            self._flusher.join(timeout=5)
        for p in self.path.iterdir():
            if p.name == MANIFEST or p.name.startswith(("chunk-", "batches-", ".")):
                p.unlink(missing_ok=True)
        os.close(self._lock)
        if created:
            try:
                self.path.rmdir()
            except OSError:
                pass

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
            self._ids.append(arr.astype(np.int64))

    def capture(self) -> None:
        """Mark one update done (state index += 1) and record the new state if due."""
        self._raise_if_failed()
        if self.recording and self._ids:  # the batch of update `step` (state step -> step + 1)
            with self._batch_lock:
                self._batch_rows.append((self.step, np.concatenate(self._ids)))
            self._ids = []
        self.step += 1
        if self.recording and self.step % self.every == 0:
            self._check_params()
            self._snapshot(self.step)

    def _check_params(self) -> None:
        """Stop if the model's trainable parameters are no longer the recorded ones (state t is kept; what
        follows is not). Cheap on every state: the registration hooks flag a replaced parameter or module at
        once; the full comparison (which walks the model: ~70 µs for a 3-layer MLP, more for big models)
        runs then, and every 64 states for what no hook sees (requires_grad switched)."""
        self._since_check += 1
        if not self._dirty and self._since_check < 64:
            return
        self._dirty, self._since_check = False, 0
        if self._param_signature() != self._signature:
            self._error = self._error or RecordError(self._describe_change())
            self._raise_if_failed()

    def _snapshot(self, t: int) -> None:
        self._seal()
        if self._inline:
            with torch.no_grad():
                for n, b in self._buffers:  # buffers change in forward: copy now
                    self._cur[1][n].copy_(b)
            self._due = t
            if not self._deferred:  # capture() after a manual update: the user says the state is final
                self._seal()
            return
        t_wait = time.perf_counter()
        flat, views = self._get(self._pool)
        waited = time.perf_counter() - t_wait
        versions = [p._version for _, p in self._params]
        with torch.no_grad():
            for n, b in self._buffers:  # buffers change in forward: copy now
                views[n].copy_(b, non_blocking=self._cuda)
            if self._cuda:
                # side stream: the copy overlaps the next forward; the next step's stream waits for it
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    for n, p in self._params:
                        views[n].copy_(p.detach(), non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record()
            elif self._deferred and self.layout.nbytes >= DEFER_BYTES:
                copied = threading.Event()  # the encoder copies while forward/backward runs
            else:  # copy now: a small state copies faster than a thread hand-off
                for n, p in self._params:
                    views[n].copy_(p.detach())
                copied = None
        item = _Pending(t, flat, views, copied, versions)
        if self._deferred:
            self._pending = item  # sealed at the next step's pre-hook (in-place edits until then)
        else:  # capture() after a manual update: the user says the state is final. No pre-hook will
            # seal it, so the next update must not start before the copy is done (a GPU-side wait);
            # sealing it at the next capture() would take that update's values for this state.
            if self._cuda:
                torch.cuda.current_stream().wait_event(copied)
            item.sealed.set()
        t_put = time.perf_counter()
        self._put(self._work, item)
        waited += time.perf_counter() - t_put
        self._pacer.waited(waited, self.layout.nbytes, own=time.perf_counter() - t_wait - waited)

    def _seal(self) -> None:
        """Before the parameters change again: finish the pending copy and re-copy what changed in place."""
        if self._dirty:  # a parameter or module was replaced since the state was captured
            self._check_params()
        if self._inline:
            return self._encode_inline()
        item, self._pending = self._pending, None
        if item is None:
            return
        try:
            if isinstance(item.copied, threading.Event):
                if not item.copied.is_set():  # the encoder is still copying: training waits
                    t_wait = time.perf_counter()
                    while not item.copied.wait(1.0):
                        self._raise_if_failed()
                    self._pacer.waited(time.perf_counter() - t_wait, 0)
            elif item.copied is not None:
                torch.cuda.current_stream().wait_event(item.copied)  # GPU-side wait, no host sync
            changed = [(n, p) for (n, p), v in zip(self._params, item.versions, strict=True) if p._version != v]
            if changed:
                with torch.no_grad():
                    for n, p in changed:
                        item.views[n].copy_(p.detach(), non_blocking=self._cuda)
                if self._cuda:
                    item.patched = torch.cuda.Event()
                    item.patched.record()
        finally:
            item.sealed.set()  # always: the encoder must never wait for a state nobody will seal

    def _encode_inline(self) -> None:
        """Encode the due state from the parameters as they are now (the next forward's), on this thread."""
        if self._due is None:
            return
        t, self._due = self._due, None
        t_own = time.perf_counter()
        (cur, views), prev = self._cur, self._prev[0]
        with torch.no_grad():
            for n, p in self._params:
                views[n].copy_(p.detach())
        buf, waited = None, 0.0
        while True:
            with self._open_lock:  # the flusher may take the open chunk (flush_secs) at any moment
                if self._open is None and buf is not None:
                    self._open, buf = ChunkBuilder(self.layout, buf), None
                chunk = self._open
                if chunk is not None:
                    chunk.add(t, cur.numpy(), prev.numpy() if chunk.steps else None)
                    if chunk.full():
                        self._open = None
                        self._chunks.put((chunk, False))
                    break
            if buf is None:
                t_wait = time.perf_counter()
                buf = self._get(self._free_chunks)  # waits only when writes lag behind
                waited += time.perf_counter() - t_wait
        if buf is not None:
            self._free_chunks.put(buf)
        self._pacer.waited(waited, self.layout.nbytes, own=time.perf_counter() - t_own - waited)
        self._cur, self._prev = self._prev, self._cur

    def _take_open(self, max_age: float) -> ChunkBuilder | None:
        """Inline mode: the open chunk, if its oldest state is max_age old (the flusher's flush_secs clock)."""
        with self._open_lock:
            chunk = self._open
            if chunk is None or not chunk.steps or time.monotonic() - chunk.since < max_age:
                return None
            self._open = None
            return chunk

    def close(self) -> None:
        """Seal the last state, flush the partial chunk, stop the threads, detach the hooks. Idempotent.

        The last state includes in-place changes made up to now: close right after training
        (before, say, loading a best checkpoint into the model).
        """
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        self._unpatch()
        if not self.recording:
            return
        atexit.unregister(self._atexit)
        try:
            if self._error is None:
                self._seal()
        finally:
            self._stop_threads()
            try:
                (self.path / LOCK).unlink(missing_ok=True)
            except OSError:
                pass
            os.close(self._lock)
        self._raise_if_failed()

    def _stop_threads(self) -> None:
        if self._encoder is None:  # inline: the open chunk goes to the flusher, then the flusher stops
            chunk = self._take_open(0.0)
            if chunk is not None:
                self._chunks.put((chunk, True))
            self._chunks.put(_STOP)
            self._flusher.join()
            return
        while self._encoder.is_alive():  # the encoder may be dead (error): don't block on a full queue
            try:
                self._work.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._encoder.join()
        self._flusher.join()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- background threads ----------------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced on the training thread by _raise_if_failed
                self._error = self._error or e
                pending = self._pending
                if pending is not None and isinstance(pending.copied, threading.Event):
                    pending.copied.set()
        return run

    def _wait(self, event: threading.Event, on_tick: Callable[[], None]) -> None:
        while not event.wait(0.25):
            on_tick()
            if self._error is not None:
                raise RecordError("stopped")

    def _encode_loop(self) -> None:
        prev = None  # (flat, views) of the previous state, kept for the next XOR
        chunk: ChunkBuilder | None = None

        def emit(sync: bool) -> None:
            nonlocal chunk
            if chunk is not None and chunk.steps:
                self._put(self._chunks, (chunk, sync))
                chunk = None

        def tick() -> None:  # a chunk whose oldest state is flush_secs old is written now
            if chunk is not None and chunk.steps and time.monotonic() - chunk.since >= self.flush_secs:
                emit(sync=True)

        try:
            while (item := self._next_work(tick)) is not _STOP:
                self._copy_and_wait(item, tick)
                if chunk is None:
                    chunk = ChunkBuilder(self.layout, self._get(self._free_chunks))
                chunk.add(item.t, item.flat.numpy(), prev[0].numpy() if prev is not None and chunk.steps else None)
                if prev is not None:
                    self._pool.put(prev)
                prev = (item.flat, item.views)
                if chunk.full():
                    emit(sync=False)
                else:
                    tick()
        finally:  # also on error: what was encoded is still written
            emit(sync=True)
            self._put(self._chunks, _STOP, force=True)

    def _next_work(self, tick: Callable[[], None]) -> object:
        while True:
            try:
                return self._work.get(timeout=0.25)
            except queue.Empty:
                if self._error is not None:  # the flusher died: nothing more can be written
                    return _STOP
                tick()

    def _copy_and_wait(self, item: _Pending, tick: Callable[[], None]) -> None:
        """Make the deferred copy (CPU), then wait until the training thread has sealed the state."""
        if isinstance(item.copied, threading.Event):  # parameters are not updated until sealed
            with torch.no_grad():
                for n, p in self._params:
                    item.views[n].copy_(p.detach())
            item.copied.set()
        self._wait(item.sealed, tick)
        if self._cuda:  # wait (here, not in training) for the side-stream copies
            item.copied.synchronize()
            if item.patched is not None:
                item.patched.synchronize()

    def _flush_loop(self) -> None:
        unsynced: list[tuple[float, Path]] = []  # written but not fsynced (a killed process keeps them anyway)

        def sync_all() -> None:
            for _, p in unsynced:
                fsync_path(p)
            if unsynced:
                fsync_path(self.path)
            unsynced.clear()

        while True:
            try:
                item = self._chunks.get(timeout=0.25)
            except queue.Empty:
                if self._encoder is None and (chunk := self._take_open(self.flush_secs)) is not None:
                    self._chunks.put((chunk, True))  # inline: the training thread's open chunk is flush_secs old
                elif unsynced and time.monotonic() - unsynced[0][0] >= self.flush_secs:
                    sync_all()
                continue
            if item is _STOP:
                break
            chunk, sync = item
            paths = self._write(chunk, sync)
            if sync:
                sync_all()
            else:
                unsynced += [(time.monotonic(), p) for p in paths]
        try:
            self._write_batches(None, True)  # close: the batches of updates whose end state was not recorded too
        except OSError as e:
            raise _write_failed(self.path, [self.step, self.step], self.chunks_written, e) from None
        sync_all()

    def _write(self, chunk: ChunkBuilder, sync: bool) -> list[Path]:
        """Write a chunk (compressed, if asked) and the batches logged up to its last state; free its buffer."""
        try:
            t0, nbytes, data = time.perf_counter(), chunk.data.nbytes, chunk.data
            if self._compress:
                data = compress(chunk.data, self.layout)
            paths = [write_chunk(self.path, self.layout, chunk.steps, chunk.stored, data,
                                 self._manifest.run_id, sync=sync, compressed=self._compress)]
            self._pacer.wrote(nbytes, time.perf_counter() - t0)
            paths += self._write_batches(chunk.steps[-1], sync)
        except OSError as e:
            raise _write_failed(self.path, chunk.steps, self.chunks_written, e) from None
        finally:
            self._free_chunks.put(chunk.buf)
        self.chunks_written += 1
        return paths

    def _write_batches(self, last_state: int | None, sync: bool) -> list[Path]:
        """Write the logged batches of the updates that end at or before `last_state` (all, if None)."""
        with self._batch_lock:
            n = len(self._batch_rows) if last_state is None else sum(
                1 for t, _ in self._batch_rows if t + 1 <= last_state)
            rows, self._batch_rows = self._batch_rows[:n], self._batch_rows[n:]
        return [write_batches(self.path, rows, self._manifest.run_id, sync=sync)] if rows else []

    # ---- helpers ---------------------------------------------------------------------

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                self._raise_if_failed()

    def _put(self, q: queue.Queue, item: object, force: bool = False) -> None:
        while True:
            try:
                return q.put(item, timeout=1.0)
            except queue.Full:
                if not force:
                    self._raise_if_failed()
                elif not self._flusher.is_alive():
                    return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, RecordError):
                raise RecordError(str(err))
            raise RecordError(f"{self.path}: recording failed in the background: {err!r}") from err

    def _param_signature(self) -> list:
        return [(n, id(p), tuple(p.shape), p.dtype) for n, p in self.model.named_parameters() if p.requires_grad]

    def _describe_change(self) -> str:
        now = {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters() if p.requires_grad}
        was = {n: (tuple(p.shape), p.dtype) for n, p in self._params}
        diff = sorted(set(now) ^ set(was)) or [n for n in now if now[n] != was.get(n)] or ["(a tensor was replaced)"]
        return (f"{self.path}: the model's trainable parameters changed after recording began ({', '.join(diff[:3])}); "
                f"a run records one fixed parameter set — start a new Recorder for the new model")
