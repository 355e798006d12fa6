"""The writer of one recording: states into chunk buffers, full or old chunks onto disk, fsync on a clock.

Every state goes through one path, whoever holds its bytes (the training thread for small
CPU states, an encoder thread for big ones, the GPU for CUDA states):

    slot = writer.reserve(t)   # in state order: a place in the open chunk (index 0: the keyframe)
    ... the keyframe, or the XOR with the previous state, goes into slot.array / slot.tensor ...
    writer.commit(slot)        # in the same order; an all-zero delta is kept in the steps only

A chunk holds `chunk_capacity` states (every state has a slot, so a keyframe is known when
the slot is reserved, before its bytes exist: the GPU computes deltas ahead of the host).
When its last slot is committed, or when its oldest state is `flush_secs` old (the clock
thread), it is written by the I/O thread: checksum, temp name, rename, then the logged
batches of the updates it ends. Files are fsynced on the same clock and at close.

Threads are `concurrent.futures` executors: a failed write re-raises itself (`result()`) on
the training thread at its next reserve or at close, as one RecordError line; chunks already
written stay intact. Memory is bounded by the chunk buffers (up to 64 MiB, at least 3):
`reserve` waits for a buffer only when writes lag behind.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from replay import interrupts
from replay.errors import RecordError, os_reason
from replay.recording.rates import RateWatch
from replay.store.atomic import fsync_path
from replay.store.batches import write_batches
from replay.store.chunk import chunk_capacity, write_chunk
from replay.store.compress import compress as zstd_compress
from replay.store.layout import StateLayout

BUFFERS_BYTES = 64 << 20  # chunk buffers in all: absorb the disk's latency spikes
CLOCK_SECS = 0.25  # how often the clock looks at the open chunk's age and unsynced files
now = time.monotonic  # the flush_secs clock (tests drive it: what is written when must not depend on the load)


@dataclass(eq=False)
class _Chunk:
    """A chunk being filled: `reserved` slots handed out, `steps` committed (in order), `stored` with bytes."""

    tensor: torch.Tensor  # [capacity × nbytes] uint8 (pinned for CUDA states)
    capacity: int
    nbytes: int
    reserved: int = 0
    steps: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # slot index of each stored state
    since: float | None = None  # when its first state was committed (the flush_secs clock)
    closing: bool = False

    def __post_init__(self):
        self.array = self.tensor.numpy()

    def in_flight(self) -> bool:
        return len(self.steps) < self.reserved


@dataclass(eq=False)
class Slot:
    """Where state t's bytes go: `array` (numpy) and `tensor` (torch) view the same bytes."""

    chunk: _Chunk
    index: int
    t: int

    @property
    def keyframe(self) -> bool:
        return self.index == 0

    @property
    def array(self) -> np.ndarray:
        nb = self.chunk.nbytes
        return self.chunk.array[self.index * nb:(self.index + 1) * nb]

    @property
    def tensor(self) -> torch.Tensor:
        nb = self.chunk.nbytes
        return self.chunk.tensor[self.index * nb:(self.index + 1) * nb]


def is_zero(delta: np.ndarray) -> bool:
    """An all-zero delta (nothing changed); a changed state shows it in its first 64 KiB: one short pass."""
    words = delta.view(np.uint64)
    return not (words[:8192].any() or words.any())


class Writer:
    """Chunks of one recording (a whole run, or one rank's slice of it), written in the background."""

    def __init__(self, path: Path, layout: StateLayout, run_id: str, *, chunk_bytes: int, flush_secs: float,
                 compress: bool, pinned: bool, rates: RateWatch):
        self.path, self.layout, self.run_id = path, layout, run_id
        self.flush_secs, self.compress, self.rates = flush_secs, compress, rates
        nb = layout.nbytes
        self.capacity = chunk_capacity(layout, chunk_bytes)
        self._free: queue.Queue = queue.Queue()
        for _ in range(max(3, min(8, BUFFERS_BYTES // (self.capacity * nb)))):
            self._free.put(torch.empty(self.capacity * nb, dtype=torch.uint8, pin_memory=pinned))
        self._lock = threading.Lock()  # the open chunk: the clock may close it at any moment
        self._open: _Chunk | None = None
        self._io = cf.ThreadPoolExecutor(1, thread_name_prefix="replay-writer")
        self._writes: deque[cf.Future] = deque()
        self._error: BaseException | None = None
        self._sync_lock = threading.Lock()
        self._unsynced: list[tuple[float, Path]] = []  # written, not yet fsynced (a killed process keeps them)
        self._batch_lock = threading.Lock()
        self._batch_rows: list[tuple[int, np.ndarray]] = []  # (update, ids) not yet written
        self.chunks_written = 0
        self._broken = False  # a write failed: nothing more is written
        self._stop = threading.Event()
        self._clock_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="replay-clock")
        self._clock = self._clock_pool.submit(self._tick)

    # ---- the encoding side (training thread, or one encoder thread) --------------------------------

    def reserve(self, t: int) -> Slot:
        """The slot of state t (states in order). Waits, interruptibly, only when every buffer is being written."""
        self.raise_if_failed()
        with self._lock:
            ch = self._open
            if ch is not None and ch.reserved < ch.capacity:
                ch.reserved += 1
                return Slot(ch, ch.reserved - 1, t)
            if ch is not None:
                self._close(ch, sync=False)
        buf = self._free_buffer()  # nothing is reserved yet: an interrupt here changes nothing
        with self._lock:
            self._open = ch = _Chunk(buf, self.capacity, self.layout.nbytes, reserved=1)
        return Slot(ch, 0, t)

    def commit(self, slot: Slot, zero: bool | None = None) -> None:
        """State `slot.t`'s bytes are in its slot (`zero`: the delta is known to be all zeros, or not)."""
        stored = slot.keyframe or not (is_zero(slot.array) if zero is None else zero)
        with self._lock:
            ch = slot.chunk
            assert slot.index == len(ch.steps), "slots are committed in the order they were reserved"
            if ch.since is None:
                ch.since = now()
            ch.steps.append(slot.t)
            if stored:
                ch.stored.append(slot.t)
                ch.slots.append(slot.index)
            if ch.closing and not ch.in_flight():
                self._submit(ch, sync=False)

    def cancel(self, slot: Slot) -> None:
        """The last reserved slot will not be committed (its state failed before its bytes were complete)."""
        with self._lock:
            ch = slot.chunk
            if slot.index == ch.reserved - 1 and len(ch.steps) == slot.index:
                ch.reserved -= 1
                if ch.closing and not ch.in_flight():
                    self._submit(ch, sync=False)

    def log_batch(self, update: int, ids: np.ndarray) -> None:
        with self._batch_lock:
            self._batch_rows.append((update, ids))

    # ---- background --------------------------------------------------------------------------------

    def _close(self, ch: _Chunk, sync: bool) -> None:
        """(lock held) No more slots: written once every reserved one is committed."""
        if self._open is ch:
            self._open = None
        ch.closing = True
        if not ch.in_flight():
            self._submit(ch, sync)

    def _submit(self, ch: _Chunk, sync: bool) -> None:
        if not ch.steps:
            self._free.put(ch.tensor)
            return
        ch.closing = True
        self._writes.append(self._io.submit(self._write, ch, sync))

    def _tick(self) -> None:
        """The flush_secs clock thread: a look at the clock every CLOCK_SECS."""
        while not self._stop.wait(CLOCK_SECS):
            self.tick()

    def tick(self) -> None:
        """One look at the clock: write the open chunk once its oldest state is flush_secs old, fsync files
        written that long ago. (The clock thread calls it; a test calls it after moving `now`.)"""
        with self._lock:
            ch = self._open
            if ch is not None and ch.since is not None and not ch.in_flight() \
                    and now() - ch.since >= self.flush_secs:
                self._close(ch, sync=True)
        with self._sync_lock:
            old = self._unsynced and now() - self._unsynced[0][0] >= self.flush_secs
        if old:
            self._sync_all()

    def _write(self, ch: _Chunk, sync: bool) -> None:
        """(I/O thread) Write a chunk (compressed, if asked) and the batches logged up to its last state.
        After a failed write nothing more is written: a later chunk would follow a gap."""
        if self._broken:
            self._free.put(ch.tensor)
            return
        try:
            t0 = self.rates.now()
            nb = self.layout.nbytes
            parts = [ch.array[i * nb:(i + 1) * nb] for i in ch.slots]
            data = zstd_compress(np.concatenate(parts), self.layout) if self.compress else parts
            paths = [write_chunk(self.path, self.layout, ch.steps, ch.stored, data, self.run_id, sync=sync,
                                 compressed=self.compress)]
            self.rates.wrote(len(parts) * nb, self.rates.now() - t0)
            paths += self._write_batches(ch.steps[-1], sync)
        except BaseException as e:
            self._broken = True
            raise self._failed(ch.steps, e) if isinstance(e, OSError) else e from None
        finally:
            self._free.put(ch.tensor)
        self.chunks_written += 1
        if sync:
            self._sync_all()
        else:
            with self._sync_lock:
                self._unsynced += [(now(), p) for p in paths]

    def _write_batches(self, last_state: int | None, sync: bool) -> list[Path]:
        """Write the logged batches of the updates that end at or before `last_state` (all, if None)."""
        with self._batch_lock:
            n = len(self._batch_rows) if last_state is None else sum(
                1 for t, _ in self._batch_rows if t + 1 <= last_state)
            rows, self._batch_rows = self._batch_rows[:n], self._batch_rows[n:]
        return [write_batches(self.path, rows, self.run_id, sync=sync)] if rows else []

    def _sync_all(self) -> None:
        with self._sync_lock:
            files, self._unsynced = self._unsynced, []
        for _, p in files:
            fsync_path(p)
        fsync_path(self.path)

    def _failed(self, steps: list[int], e: OSError) -> RecordError:
        """One line for a failed write that says what happened, not always 'free disk space'."""
        return RecordError(f"{self.path}: writing the chunk of steps {steps[0]}..{steps[-1]} failed ({os_reason(e)}); "
                           f"the {self.chunks_written} chunks already written are intact — fix that and record anew")

    # ---- errors, waits, close ----------------------------------------------------------------------

    def _free_buffer(self) -> torch.Tensor:
        while True:
            try:
                return self._free.get(timeout=0.05)
            except queue.Empty:
                self.raise_if_failed()
                interrupts.raise_if_interrupted()

    def raise_if_failed(self) -> None:
        """Re-raise, on the calling (training) thread, the first error of a write or of the clock."""
        while self._writes and self._writes[0].done():
            fut = self._writes.popleft()
            if fut.exception() is not None and self._error is None:
                self._error = fut.exception()
        if self._clock.done() and self._clock.exception() is not None and self._error is None:
            self._error = self._clock.exception()
        if self._error is not None:
            err = self._error
            if isinstance(err, RecordError):
                raise RecordError(str(err))
            raise RecordError(f"{self.path}: recording failed in the background: {err!r}") from err

    def flush(self) -> None:
        """Write the open chunk now and return once every chunk handed to the I/O thread is on disk, fsynced.
        Nothing may be in flight (the snapshot has settled)."""
        self.raise_if_failed()
        with self._lock:
            if self._open is not None:
                self._close(self._open, sync=True)
        for fut in list(self._writes):
            fut.exception()  # waits
        self.raise_if_failed()
        self._sync_all()

    def close(self) -> None:
        """Write the open chunk and every logged batch, fsync everything, stop the threads. Nothing may be in
        flight (the snapshot has committed every slot it reserved)."""
        with self._lock:
            if self._open is not None:
                self._close(self._open, sync=True)
        for fut in list(self._writes):
            fut.exception()  # waits
        self._stop.set()
        self._clock_pool.shutdown(wait=True)
        self._io.shutdown(wait=True)
        try:
            if self._error is None:
                self._write_batches(None, True)  # also the batches of updates whose end state was not recorded
                self._sync_all()
        except OSError as e:
            self._error = self._error or RecordError(
                f"{self.path}: writing the last logged batches failed ({os_reason(e)}); the {self.chunks_written} "
                f"chunks written are intact")
        self.raise_if_failed()

    def abandon(self) -> None:
        """Stop the threads without writing anything more (the Recorder failed to start)."""
        self._stop.set()
        self._clock_pool.shutdown(wait=True)
        self._io.shutdown(wait=True, cancel_futures=True)
