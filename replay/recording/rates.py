"""Notice, once, when recording slows training, and say by how much and what to do.

The recorder must not slow training in silence. When states arrive faster than this machine
can copy, encode and write them, the only remedies are the user's (record every k-th state,
a faster disk), so the recorder measures and tells.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from replay.errors import ReplayWarning

# The one clock of the recorder's rates (training's waits, the encoder's work, the disk's writes): a name
# the tests replace with a clock of their own, so that what the RateWatch decides does not depend on the load.
clock = time.perf_counter


class RateWatch:
    """Notices, once, when training waits for the recorder because states arrive faster than they are written.

    Slowing training in silence is the one thing a recorder must not do: once it has seen 100
    states, or 10 states over 2 seconds (big states arrive slowly: a GPU model of 80 MiB states
    measured 6x slower training within its first 32 states), if the training thread spent over
    10% of its time on the recorder (encoding inline, or waiting for it), or the writer was busy
    over 90% of the time (it is about to fall behind), one warning line gives the rates, the
    shares and the remedy.
    """

    def __init__(self, path: Path, every: int, compressing: bool = False):
        self.path, self.every, self.compressing = path, every, compressing
        self.start = clock()
        self.wait = self.encoding = 0.0
        self.states = 0
        self.bytes = 0
        self.written = self.write_secs = 0.0
        self.warned = False

    @staticmethod
    def now() -> float:
        """The rates' clock (`clock`, read at each call so that a test's replacement is seen everywhere)."""
        return clock()

    def waited(self, secs: float, nbytes: int, encoding: float = 0.0) -> None:
        self.wait += secs
        self.encoding += encoding
        if nbytes:
            self.states += 1
            self.bytes += nbytes
        if self.warned or self.states < 10:
            return
        elapsed = clock() - self.start
        if self.states < 100 and elapsed < 2.0:
            return
        busy = self.write_secs / elapsed
        if (self.wait + self.encoding > 0.1 * elapsed or busy > 0.9) and self.write_secs > 0:
            self.warned = True
            demand = self.bytes / elapsed / 2**20
            supply = self.written / self.write_secs / 2**20
            spent = (self.wait + self.encoding) / elapsed
            k = max(2, math.ceil(1.25 * demand / max(supply, 1e-9)), math.ceil(spent / 0.03))
            warnings.warn(f"{self.path}: recording slows training: states arrive at {demand:,.0f} MiB/s and the disk "
                          f"takes {supply:,.0f} MiB/s here (busy {min(busy, 1):.0%} of the time); the training thread "
                          f"spent {self.encoding / elapsed:.0%} encoding and {self.wait / elapsed:.0%} waiting; record "
                          f"every={k * self.every} to stop slowing training{self._disk_remedy(busy)}", ReplayWarning,
                          stacklevel=5)

    def _disk_remedy(self, busy: float) -> str:
        """The writer is the bottleneck (busy nearly all the time): fewer bytes help too."""
        if busy <= 0.9 or self.compressing:
            return ""
        return ("; the disk is the limit, so Recorder(compress=True) may do (1.6x fewer bytes for float32, ~4x for "
                "bfloat16, at a core per ~470 MB/s)")

    def wrote(self, nbytes: int, secs: float) -> None:
        self.written += nbytes
        self.write_secs += secs
