"""`replay demo`: the whole product in under a minute on 2 CPU cores, on real data.

Trains the digits MLP with SGD + momentum while recording every step and its batch, computes
train, val, per-class train and per-example val LCA, and returns the frames.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from replay.digits import digits_mlp, train_digits
from replay.engine import compute
from replay.frames import Frames


def run_demo(out: Path, epochs: int = 2) -> Frames:
    out = Path(out)
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the demo's own output: re-running the demo starts over
    shutil.rmtree(out / "lca", ignore_errors=True)
    train_digits(digits_mlp(), str(run_dir), epochs=epochs)
    return compute(run_dir, ["train", "val"], per_class=["train"], per_example=["val"], out=out / "lca",
                   progress=True)
