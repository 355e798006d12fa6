"""Ctrl-C never lands in the middle of recording a state: KeyboardInterrupt is held until the hook is done.

A notebook user interrupts a cell and runs it again; a loop catches KeyboardInterrupt and
goes on. Python raises it at whatever bytecode the main thread is at, so an interrupt
inside a recorder hook could leave half a state: a step counted but not stored, a chunk
whose steps do not match its name, a delta against the wrong previous state. The recorder's
hooks therefore run inside `held()`: a SIGINT that arrives meanwhile is remembered, and the
handler that was installed is called when the hook has finished — the state is then whole
(or was never begun), and the KeyboardInterrupt propagates from the hook as usual.

Cheap enough for every step: the wrapper handler is installed once (and again whenever
someone else installed theirs, as ipykernel does before each cell), and a section costs a
flag and one `_signal.getsignal` (~60 ns). Only the main thread receives signals, so other
threads need nothing. Waits inside a section call `raise_if_interrupted()` at points where
nothing has been changed yet, so that Ctrl-C still works while training waits for a slow disk.
"""

from __future__ import annotations

import _signal
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Holder:
    """The one SIGINT handler of this process that can hold an interrupt: it wraps the previous handler."""

    def __init__(self):
        self.depth = 0
        self.pending: tuple[int, object] | None = None
        self.previous: object = signal.default_int_handler

    def __call__(self, signum: int, frame: object) -> None:
        if self.depth:
            self.pending = (signum, frame)  # delivered when the section ends
        else:
            self._deliver(signum, frame)

    def _deliver(self, signum: int, frame: object) -> None:
        prev = self.previous
        if callable(prev):
            prev(signum, frame)
        elif prev == signal.SIG_DFL:  # the default action (terminate): let it happen as it would have
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.raise_signal(signal.SIGINT)
        # SIG_IGN: nothing

    def install(self) -> bool:
        """Wrap the current handler (main thread only); False where we cannot (another thread, no SIGINT)."""
        current = _signal.getsignal(signal.SIGINT)
        if current is self:
            return True
        if threading.current_thread() is not threading.main_thread():
            return False
        if current is None:  # installed by C code, not Python: leave it alone
            return False
        self.previous = current
        signal.signal(signal.SIGINT, self)
        return True

    def release(self) -> None:
        if self.pending is not None:
            signum, frame = self.pending
            self.pending = None
            self._deliver(signum, frame)


_holder = _Holder()


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT for the duration (nested sections hold until the outermost ends)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or _signal.getsignal(signal.SIGINT) is not _holder and not _holder.install():
        yield
        return
    _holder.depth += 1
    try:
        yield
    finally:
        _holder.depth -= 1
        if not _holder.depth:
            _holder.release()


def raise_if_interrupted() -> None:
    """Inside `held()`, at a point where nothing has changed yet: deliver a held interrupt now."""
    if _holder.pending is not None and threading.current_thread() is threading.main_thread():
        depth, _holder.depth = _holder.depth, 0
        try:
            _holder.release()
        finally:
            _holder.depth = depth


def interrupted() -> bool:
    """Whether an interrupt is being held (for waits that want to give up early)."""
    return _holder.pending is not None
