"""A compute's progress on stderr: a live bar on a terminal (rich), plain lines in a log file.

A `\\r`-rewritten line is right for a terminal and wrong for `replay compute ... 2> log`, where it
becomes one endless line; so when stderr is not a terminal, a plain line is written at every
tenth of the steps (and at least every LOG_SECS), each on its own line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

LOG_SECS = 60.0  # in a log, a line at least this often


class StepProgress:
    """`update(done)` after each step; `close()` at the end (or on an error: the bar is taken down)."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.start = self._last = time.monotonic()
        self._next_tenth = 1
        self._bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("replay compute"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("steps  {task.fields[rate]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task("steps", total=total, rate="")
            self._bar.start()

    def update(self, done: int) -> None:
        now = time.monotonic()
        rate = done / max(now - self.start, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=f"{rate:.2f} steps/s")
            return
        tenth = done * 10 // max(self.total, 1)
        if tenth >= self._next_tenth or now - self._last >= LOG_SECS or done == self.total:
            self._next_tenth, self._last = tenth + 1, now
            eta = (self.total - done) / max(rate, 1e-9)
            self.stream.write(f"replay compute: {done}/{self.total} steps, {rate:.2f} steps/s, ETA {eta:,.0f} s\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
