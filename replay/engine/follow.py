"""`replay compute RUN --follow`: keep up with a run while it is being recorded.

Each round computes the steps recorded so far into the one lca dir (a finished lca dir of a run that
has grown is extended, `lcadir.resume`), then waits until more states are on disk or the Recorder
has closed the run; the last round, after the close, computes the rest. The frames at the end are
those of one compute of the finished run. Ctrl-C ends it like any compute: every finished step is
kept, and the same command resumes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

from replay.engine.compute import compute
from replay.errors import RunError
from replay.frames import Frames
from replay.store import open_run

POLL_SECS = 2.0  # how often a followed run is looked at for new states


def follow(run: str | Path, losses: list[str] | None = None, per_class: list[str] | None = None, *,
           wait: Callable[[float], None] = time.sleep, on_round: Callable[[Frames], None] | None = None,
           **options: object) -> Frames:
    """Compute `run` as it grows (see `replay.compute` for `options`, but `steps`) until its Recorder closes it.

    `wait(POLL_SECS)` is called between looks at the run (a test passes its own); `on_round(frames)` after each
    round that computed something."""
    if options.get("steps") is not None:
        raise RunError("--follow computes every step as it is recorded: drop --steps")
    path = Path(run)
    frames, r = None, open_run(path)
    while True:
        live = r.live
        if len(r.steps) >= 2:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*being recorded right now")
                frames = compute(r, losses, per_class, **options)
            if on_round is not None:
                on_round(frames)
        if not live:
            if frames is None:
                raise RunError(f"{path}: nothing to compute: the run ended with {len(r.steps)} state(s)")
            return frames
        seen = len(r.steps)
        while True:  # until more states are on disk, or the run is closed
            wait(POLL_SECS)
            r = open_run(path)
            if len(r.steps) > seen or not r.live:
                break
