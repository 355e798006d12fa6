"""Recorder: capture trainable parameters after every optimizer step, off the training thread.

Threads and buffers (S = bytes of one flat state, see `store.layout`):

    training thread ──post-hook──> staging buffer from a bounded pool (blocks = backpressure)
        CPU:  parameters are read-only until the next optimizer.step(), so only a *request*
              is queued; the encoder thread copies them while forward/backward runs, and a
              step *pre*-hook waits for that copy before the parameters change again.
        CUDA: a non-blocking copy into pinned memory on a side stream, fenced by an event
              that the next step's stream waits on (no host sync on the training thread).
        buffers (BN statistics) change during forward, so they are copied in the hook itself.
    encoder thread: XOR of the new state with the previous one into the chunk buffer
    flusher thread: CRC-32, write to a temp name, fsync, rename (store.chunk.write_chunk)

Memory is bounded: `queue` staging states plus three chunk buffers of ≤ `chunk_bytes`.

Under torch.distributed (DDP) every rank holds the same parameters, so one rank records
(`rank`, default 0); on the others the Recorder only counts steps — no fence, threads or
files — and so can never make them wait.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from replay.errors import RecordError
from replay.store.chunk import write_chunk
from replay.store.layout import StateLayout, spec_of
from replay.store.manifest import MANIFEST, Manifest

# Chosen by tools/bench_chunks.py (2.4 MB states, this 2-core box): write throughput is the
# disk's (350-790 MB/s, noise) from 4 MiB up at every size, while run.state(t) grows with the
# chunk (1.7 ms at 4 MiB, 9.7 at 8, 14 at 16, 22 at 32): 8 MiB keeps random access cheap and
# the file count moderate. Capped in states so that a tiny model does not keep thousands of
# steps unflushed (what a SIGKILL would lose).
DEFAULT_CHUNK_BYTES = 8 << 20
MAX_CHUNK_STATES = 1024
_STOP = object()


def _check_arguments(model: nn.Module, every: int, task: str | None, chunk_bytes: int, queue_size: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an integer ≥ 1, got {every!r}")
    if task is not None and (not isinstance(task, str) or ":" not in task):
        raise ValueError(f"task: expected 'module:function', got {task!r}")
    if chunk_bytes < 1 or queue_size < 1:
        raise ValueError(f"chunk_bytes and queue_size must be ≥ 1, got {chunk_bytes}, {queue_size}")


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


class Recorder:
    """Record `model`'s trainable parameters into the run directory `path`.

    With `optimizer`, every `optimizer.step()` is captured automatically; without, call
    `capture()` after each update. State 0 (the parameters now) is captured on creation.
    Only states 0, every, 2·every, ... are stored. Use as a context manager or call `close()`.
    A DistributedDataParallel model is recorded under its inner module's names, by process
    `rank` only (with the same code on every process; `recording` says which one this is).
    """

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = 1,
        task: str | None = None,
        metadata: dict | None = None,
        buffers: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        queue_size: int = 4,
        rank: int = 0,
    ):
        _check_arguments(model, every, task, chunk_bytes, queue_size)
        if isinstance(model, DistributedDataParallel):
            model = model.module  # same tensors; names without the wrapper's "module." prefix
        _refuse_sharded(model)
        self.path, self.model, self.every, self.step = Path(path), model, every, 0
        self._closed, self._hooks = False, []
        self._error: BaseException | None = None
        self.chunks_written = 0
        self.recording = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == rank
        if not self.recording:  # another process records this run: only count the steps
            if optimizer is not None:
                self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.capture()))
            return
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            what = "already holds a run" if (self.path / MANIFEST).exists() else "is not an empty directory"
            raise RecordError(f"{self.path}: {what}; record into a new directory (runs are never overwritten)")
        self._params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._buffers = list(model.named_buffers()) if buffers else []
        if not self._params:
            raise RecordError("model has no trainable parameters (requires_grad=True); nothing to record")
        specs = [spec_of(n, p) for n, p in self._params] + [spec_of(n, b, "buffer") for n, b in self._buffers]
        self.layout = StateLayout(specs)
        self._signature = self._param_signature()
        self.path.mkdir(parents=True, exist_ok=True)
        Manifest(specs, every=every, task=task, torch_version=torch.__version__,
                 metadata=dict(metadata or {}), chunk_bytes=chunk_bytes).write(self.path)

        device = self._params[0][1].device
        self._cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self._cuda else None
        # staging pool: the states in flight + the encoder's "previous" + one being filled
        self._pool: queue.Queue = queue.Queue()
        for _ in range(queue_size + 2):
            flat = torch.zeros(self.layout.nbytes, dtype=torch.uint8, pin_memory=self._cuda)  # pad bytes stay 0
            self._pool.put((flat, self.layout.views(flat)))
        self._work: queue.Queue = queue.Queue(maxsize=queue_size)
        self._slots = max(1, min(MAX_CHUNK_STATES, chunk_bytes // self.layout.nbytes))
        self._chunks: queue.Queue = queue.Queue(maxsize=1)
        self._free_chunks: queue.Queue = queue.Queue()
        for _ in range(3):
            self._free_chunks.put(np.empty(self._slots * self.layout.nbytes, dtype=np.uint8))
        self._fence: threading.Event | torch.cuda.Event | None = None

        self._encoder = threading.Thread(target=self._guard(self._encode_loop), name="replay-encoder", daemon=True)
        self._flusher = threading.Thread(target=self._guard(self._flush_loop), name="replay-flusher", daemon=True)
        self._encoder.start()
        self._flusher.start()
        if optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self._wait_fence()))
            self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.capture()))
        self._snapshot(0, deferred=False)
        ref = weakref.ref(self)
        self._atexit = lambda: (r := ref()) is not None and r.close()
        atexit.register(self._atexit)

    # ---- training thread -------------------------------------------------------------

    def capture(self) -> None:
        """Mark one update done (state index += 1) and record the new state if due."""
        self._raise_if_failed()
        self.step += 1
        if self.recording and self.step % self.every == 0:
            # deferred only when a pre-hook guards the next update (optimizer given)
            self._snapshot(self.step, deferred=bool(self._hooks))

    def _snapshot(self, t: int, deferred: bool) -> None:
        self._wait_fence()
        flat, views = self._get(self._pool)
        with torch.no_grad():
            for n, b in self._buffers:  # buffers change in forward: copy now
                views[n].copy_(b, non_blocking=self._cuda)
            if self._cuda:
                # side stream: the copy overlaps the next forward; the event fences the next step
                self._side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self._side):
                    for n, p in self._params:
                        views[n].copy_(p.detach(), non_blocking=True)
                    ev = torch.cuda.Event()
                    ev.record()
                self._fence = ev
                self._put(self._work, (t, flat, views, ev))
            elif deferred:
                fence = threading.Event()
                self._fence = fence
                self._put(self._work, (t, flat, views, fence))
            else:
                for n, p in self._params:
                    views[n].copy_(p.detach())
                self._put(self._work, (t, flat, views, None))

    def _wait_fence(self) -> None:
        fence, self._fence = self._fence, None
        if fence is None:
            return
        if isinstance(fence, threading.Event):
            while not fence.wait(1.0):
                self._raise_if_failed()
        else:
            torch.cuda.current_stream().wait_event(fence)  # GPU-side wait, no host sync

    def close(self) -> None:
        """Flush the partial chunk, stop the threads, detach the hooks. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for h in self._hooks:
            h.remove()
        if not self.recording:
            return
        atexit.unregister(self._atexit)
        if self._error is None:
            self._wait_fence()
        while self._encoder.is_alive():  # the encoder may be dead (error): don't block on a full queue
            try:
                self._work.put(_STOP, timeout=0.1)
                break
            except queue.Full:
                continue
        self._encoder.join()
        self._flusher.join()
        self._raise_if_failed()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- background threads ----------------------------------------------------------

    def _guard(self, fn: Callable[[], None]) -> Callable[[], None]:
        def run():
            try:
                fn()
            except BaseException as e:  # surfaced on the training thread by _raise_if_failed
                self._error = e
                if isinstance(self._fence, threading.Event):
                    self._fence.set()
        return run

    def _encode_loop(self) -> None:
        nb = self.layout.nbytes
        prev = None  # (flat, views) of the previous state, kept for the next XOR
        buf, steps, stored = None, [], []
        try:
            while (item := self._work.get()) is not _STOP:
                t, flat, views, fence = item
                if isinstance(fence, threading.Event):  # deferred copy: parameters frozen until set()
                    # (a numpy copy here, or SCHED_IDLE for this thread, measured slower: tools/bench_record.py)
                    with torch.no_grad():
                        for n, p in self._params:
                            views[n].copy_(p.detach())
                    fence.set()
                elif fence is not None:
                    fence.synchronize()  # CUDA: wait (here, not in training) for the side-stream copy
                if buf is None:
                    buf = self._get(self._free_chunks)
                cur, i = flat.numpy(), len(stored)
                slot = buf[i * nb:(i + 1) * nb]
                if not steps:  # keyframe
                    np.copyto(slot, cur)
                    stored.append(t)
                else:
                    np.bitwise_xor(cur, prev[0].numpy(), out=slot)
                    if slot.view(np.uint64).any():  # an all-zero delta (skipped step) stores nothing
                        stored.append(t)
                steps.append(t)
                if prev is not None:
                    self._pool.put(prev)
                prev = (flat, views)
                if len(stored) == self._slots or len(steps) == MAX_CHUNK_STATES:
                    self._put(self._chunks, (buf, steps, stored))
                    buf, steps, stored = None, [], []
                # state t came from the tensors step t updated, so it is kept; what follows is not
                if self._param_signature() != self._signature:
                    raise RecordError(self._describe_change())
        finally:  # also on error: what was encoded is still written
            if steps:
                self._put(self._chunks, (buf, steps, stored))
            self._put(self._chunks, _STOP)

    def _flush_loop(self) -> None:
        nb = self.layout.nbytes
        while (item := self._chunks.get()) is not _STOP:
            buf, steps, stored = item
            try:
                write_chunk(self.path, self.layout, steps, stored, buf[: len(stored) * nb])
            except OSError as e:
                raise RecordError(
                    f"{self.path}: writing the chunk of steps {steps[0]}..{steps[-1]} failed ({e.strerror or e}); "
                    f"the {self.chunks_written} chunks already written are intact — free disk space and record anew"
                ) from None
            self.chunks_written += 1
            self._free_chunks.put(buf)

    # ---- helpers ---------------------------------------------------------------------

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                self._raise_if_failed()

    def _put(self, q: queue.Queue, item: object) -> None:
        while True:
            try:
                return q.put(item, timeout=1.0)
            except queue.Full:
                self._raise_if_failed()

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

