"""The snapshot fence: the copy of state t, taken while the parameters cannot change.

State t is the parameters as the forward of update t sees them: their values after the
previous `optimizer.step()` plus any in-place change made before the next step begins.
Parameters are read-only from one optimizer step to the next, so a state is complete at the
next step's *pre*-hook (`fence`), or at once when the user calls `capture()` by hand. Buffers
(batch-norm statistics) change during forward, so they are taken at the post-hook (`begin`).

Three ways to take it, chosen by where the parameters live and how big a state is:

- `InlineSnapshot` (CPU, states under DEFER_BYTES): at the fence, one fused copy of every
  parameter into a flat buffer and one XOR with the previous state into the chunk, on the
  training thread: two passes over a small state cost less than waking a thread for it.
- `DeferredSnapshot` (CPU, big states): at the post-hook a thread starts copying while
  forward/backward runs; the fence waits for it and copies again the parameters whose
  version counter (`p._version`) moved meanwhile (in-place edits through `p.data` bypass
  version counters and are missed on this path); an encoder thread XORs it into the chunk.
- `CudaSnapshot`: at the fence, on a side stream, one fused copy of every parameter into a
  flat device buffer, the XOR with the previous state on the GPU (one kernel), and one
  non-blocking copy of the delta into the pinned chunk buffer; the optimizer's next update
  waits GPU-side for the gather only (no host sync on the training thread), and an encoder
  thread commits the slot once its copy event has completed. Two states of GPU memory.

Every path reserves the state's slot before it changes anything and commits it last, and
runs inside the Ctrl-C guard (`replay.interrupts`): an interrupt leaves the state whole or not
begun, never half recorded.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from replay import interrupts
from replay.recording.rates import RateWatch
from replay.recording.writer import Slot, Writer

# CPU states smaller than this are copied on the training thread at the fence (a 1.2 MB copy takes ~0.1 ms
# here, less than handing it to a thread and waiting for it: tools/bench_record.py); larger ones are copied
# by a thread while forward/backward runs.
DEFER_BYTES = 16 << 20


@dataclass(frozen=True)
class Piece:
    """Elements lo..hi (flat) of source tensor `source`, at byte `offset` of the recorded state."""

    source: int
    lo: int
    hi: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...] | None  # the source's shape when the piece is the whole tensor, else None


class Gather:
    """Which elements of which tensors make (part of) one recorded flat state, copied by one fused op.

    `tensors()` gives the current source tensors (the parameters themselves, or each DTensor's
    local shard), so a parameter whose `.data` was replaced is still copied from its new storage.
    """

    def __init__(self, pieces: list[Piece], tensors: Callable[[], list[torch.Tensor]]):
        self.pieces, self.tensors = pieces, tensors
        self.nbytes = sum((p.hi - p.lo) * p.dtype.itemsize for p in pieces)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Typed views of `flat` (uint8) where each piece goes (no copy)."""
        out = []
        for p in self.pieces:
            n = (p.hi - p.lo) * p.dtype.itemsize
            v = flat[p.offset:p.offset + n].view(p.dtype)
            out.append(v.view(p.shape) if p.shape is not None else v)
        return out

    def sources(self) -> list[torch.Tensor]:
        ts = self.tensors()
        return [ts[p.source] if p.shape is not None else ts[p.source].detach().reshape(-1)[p.lo:p.hi]
                for p in self.pieces]

    def copy(self, dst: list[torch.Tensor], non_blocking: bool = False, only: list[int] | None = None) -> None:
        """dst[i] ← piece i (all, or the pieces `only`), one fused op (`torch._foreach_copy_`)."""
        if not dst:
            return
        src = self.sources()
        if only is not None:
            dst, src = [dst[i] for i in only], [src[i] for i in only]
        with torch.no_grad():
            torch._foreach_copy_(dst, src, non_blocking=non_blocking)

    def differs(self, flat: torch.Tensor) -> bool:
        """Whether the tensors now differ, bit for bit, from the state held in `flat` (a fresh copy, once: for
        close, never per step)."""
        now = torch.zeros_like(flat)
        self.copy(self.views(now))
        spans = [slice(p.offset, p.offset + (p.hi - p.lo) * p.dtype.itemsize) for p in self.pieces]
        return any(not torch.equal(now[span], flat[span]) for span in spans)


def whole_pieces(offsets: list[int], tensors: list[torch.Tensor]) -> list[Piece]:
    """Each tensor whole, at its byte offset (the layout of an unsharded state)."""
    return [Piece(i, 0, t.numel(), o, t.dtype, tuple(t.shape)) for i, (o, t) in enumerate(zip(offsets, tensors,
                                                                                               strict=True))]


def _xor(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    np.bitwise_xor(a.view(np.uint64), b.view(np.uint64), out=out.view(np.uint64))


class InOrder:
    """States handed to a worker thread, in order: a failure re-raises on the training thread, at the next
    look (`raise_if_failed`) or when it waits for all of them (`wait`)."""

    def __init__(self):
        self._futures: deque[cf.Future] = deque()

    def add(self, future: cf.Future) -> None:
        self._futures.append(future)

    def raise_if_failed(self) -> None:
        while self._futures and self._futures[0].done():
            self._futures.popleft().result()

    def wait(self) -> None:
        while self._futures:
            self._futures.popleft().result()


class InlineSnapshot:
    """Small CPU states: copied and XOR-encoded on the training thread at the fence."""

    def __init__(self, params: Gather, buffers: Gather, nbytes: int, writer: Writer, rates: RateWatch):
        self.params, self.buffers, self.writer, self.rates, self.nbytes = params, buffers, writer, rates, nbytes
        self._flats = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(2)]  # current, previous (pad stays 0)
        self._views = [(params.views(f), buffers.views(f)) for f in self._flats]
        self.due: int | None = None

    def begin(self, t: int) -> None:
        self.buffers.copy(self._views[0][1])
        self.due = t

    def fence(self) -> None:
        if self.due is None:
            return
        t0 = self.rates.now()
        slot = self.writer.reserve(self.due)  # may wait for a buffer: nothing is changed before it returns
        waited = self.rates.now() - t0
        cur, prev = self._flats[0].numpy(), self._flats[1].numpy()
        try:
            self.params.copy(self._views[0][0])
            if slot.keyframe:
                np.copyto(slot.array, cur)
            else:
                _xor(slot.array, cur, prev)
        except BaseException:
            self.writer.cancel(slot)
            raise
        self.writer.commit(slot)
        self._flats.reverse()  # this state is the previous one of the next
        self._views.reverse()
        self.due = None
        self.rates.waited(waited, self.nbytes, encoding=self.rates.now() - t0 - waited)

    def settle(self) -> None:
        """Every fenced state is committed to the writer (here, at the fence itself)."""

    def moved(self) -> bool:
        """The parameters changed since the last fenced state (an update interrupted after its pre-hook)."""
        return self.params.differs(self._flats[1])

    def drain(self) -> None:
        pass


class DeferredSnapshot:
    """Big CPU states: copied by a thread during forward/backward, encoded by another."""

    def __init__(self, params: Gather, buffers: Gather, nbytes: int, writer: Writer, rates: RateWatch,
                 version_of: Callable[[], list[int]], queue_size: int):
        self.params, self.buffers, self.writer, self.rates, self.nbytes = params, buffers, writer, rates, nbytes
        self.version_of = version_of
        self._pool: queue.Queue = queue.Queue()
        for _ in range(queue_size + 2):  # states in flight, the encoder's previous, one being filled
            flat = torch.zeros(nbytes, dtype=torch.uint8)
            self._pool.put((flat, params.views(flat), buffers.views(flat)))
        self._copier = cf.ThreadPoolExecutor(1, thread_name_prefix="replay-copier")
        self._encoder = cf.ThreadPoolExecutor(1, thread_name_prefix="replay-encoder")
        self._encodes = InOrder()
        self._prev: tuple | None = None  # the encoder's previous state (its staging)
        self._pending: tuple | None = None  # (t, staging, copy future, versions at the post-hook)

    def begin(self, t: int) -> None:
        t0 = self.rates.now()
        staging = self._get()  # may wait: nothing is changed before it returns
        flat, pviews, bviews = staging
        self.buffers.copy(bviews)
        versions = self.version_of()
        fut = self._copier.submit(self.params.copy, pviews)  # parameters are read-only until the fence
        self._pending = (t, staging, fut, versions)
        self.rates.waited(0.0, 0, encoding=self.rates.now() - t0)

    def fence(self) -> None:
        if self._pending is None:
            return
        t, staging, fut, versions = self._pending
        t0 = self.rates.now()
        fut.result()  # the copy of the post-hook (a failure re-raises here)
        waited = self.rates.now() - t0
        changed = [i for i, (a, b) in enumerate(zip(self.version_of(), versions, strict=True)) if a != b]
        if changed:  # changed in place since the post-hook (weight clipping, projections)
            self.params.copy(staging[1], only=changed)
        slot = self.writer.reserve(t)
        self._encodes.add(self._encoder.submit(self._encode, slot, staging))
        self._pending = None
        self._encodes.raise_if_failed()
        self.rates.waited(waited, self.nbytes, encoding=self.rates.now() - t0 - waited)

    def _encode(self, slot: Slot, staging: tuple) -> None:
        """(encoder thread) The state's keyframe or delta into its slot, in state order."""
        cur = staging[0].numpy()
        if slot.keyframe:
            np.copyto(slot.array, cur)
        else:
            _xor(slot.array, cur, self._prev[0].numpy())
        self.writer.commit(slot)
        if self._prev is not None:
            self._pool.put(self._prev)
        self._prev = staging

    def _get(self) -> tuple:
        while True:
            try:
                return self._pool.get(timeout=0.05)
            except queue.Empty:
                self._encodes.raise_if_failed()
                self.writer.raise_if_failed()
                interrupts.raise_if_interrupted()

    def settle(self) -> None:
        """Wait until every fenced state is encoded and committed to the writer (the threads go on)."""
        self._encodes.wait()

    def moved(self) -> bool:
        """The parameters changed since the last fenced state (an update interrupted after its pre-hook)."""
        self.settle()
        return self._prev is not None and self.params.differs(self._prev[0])

    def drain(self) -> None:
        self.settle()
        self._copier.shutdown(wait=True)
        self._encoder.shutdown(wait=True)


class CudaSnapshot:
    """CUDA states: gathered, XORed and copied to the host on a side stream; committed by an encoder thread."""

    def __init__(self, params: Gather, buffers: Gather, nbytes: int, writer: Writer, rates: RateWatch,
                 device: torch.device):
        self.params, self.buffers, self.writer, self.rates, self.nbytes = params, buffers, writer, rates, nbytes
        self._side = torch.cuda.Stream(device)
        # next (the state being taken) and prev (the last one taken; then its delta)
        self._flats = [torch.zeros(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self._views = [(params.views(f), buffers.views(f)) for f in self._flats]
        self._encoder = cf.ThreadPoolExecutor(1, thread_name_prefix="replay-encoder")
        self._commits = InOrder()
        self.due: int | None = None

    def begin(self, t: int) -> None:
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            self.buffers.copy(self._views[0][1], non_blocking=True)
        self.due = t

    def fence(self) -> None:
        if self.due is None:
            return
        t0 = self.rates.now()
        slot = self.writer.reserve(self.due)  # may wait for a host buffer: no GPU work is queued before it
        waited = self.rates.now() - t0
        nxt, prev = self._flats
        current = torch.cuda.current_stream()
        self._side.wait_stream(current)  # the parameters are final (in-place edits included)
        with torch.cuda.stream(self._side):
            self.params.copy(self._views[0][0], non_blocking=True)  # [nbytes] one fused gather
            gathered = torch.cuda.Event()
            gathered.record()
            if slot.keyframe:
                src = nxt
            else:  # the delta, in place of the previous state (one kernel)
                prev.view(torch.int64).bitwise_xor_(nxt.view(torch.int64))
                src = prev
            slot.tensor.copy_(src, non_blocking=True)  # device → pinned chunk slot
            copied = torch.cuda.Event()
            copied.record()
        current.wait_event(gathered)  # the next update may change the parameters once they are gathered
        # stream order keeps the reuse safe: the next gather into `prev` is queued after its copy to the host
        self._flats.reverse()
        self._views.reverse()
        self.due = None
        self._commits.add(self._encoder.submit(self._commit, slot, copied))
        self._commits.raise_if_failed()
        self.rates.waited(waited, self.nbytes, encoding=self.rates.now() - t0 - waited)

    def _commit(self, slot: Slot, copied: torch.cuda.Event) -> None:
        copied.synchronize()  # (encoder thread) the slot's bytes are on the host
        self.writer.commit(slot)

    def settle(self) -> None:
        """Wait until every fenced state is on the host and committed to the writer (the thread goes on)."""
        self._commits.wait()

    def moved(self) -> bool:
        """The parameters changed since the last fenced state (an update interrupted after its pre-hook)."""
        torch.cuda.current_stream().wait_stream(self._side)
        return self.params.differs(self._flats[1])

    def drain(self) -> None:
        self.settle()
        self._encoder.shutdown(wait=True)
