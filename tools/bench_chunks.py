"""Chunk size: write throughput (incl. fsync) vs random-access latency of run.state(t).

Records a synthetic 0.6M-parameter state stream at several chunk sizes through the real
Recorder (manual capture, no training) and prints, side by side, MB/s written and the
mean time of run.state(t) for random t. Larger chunks amortize per-file costs (header,
fsync, rename); random access decodes half a chunk on average.

    python tools/bench_chunks.py [--states 200]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--states", type=int, default=200)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128], help="chunk sizes, MiB")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_chunks_"))
    model = nn.Sequential(nn.Linear(784, 512), nn.Linear(512, 384), nn.Linear(384, 10))
    mb = sum(p.numel() for p in model.parameters()) * 4 / 1e6
    print(f"state: {mb:.2f} MB, {a.states} states per size")
    print(f"{'chunk MiB':>9} {'states/chunk':>12} {'write MB/s':>10} {'state(t) ms':>11}")
    try:
        for size_mib in a.sizes:
            out = tmp / f"c{size_mib}"
            t0 = time.perf_counter()
            with replay.Recorder(model, out, chunk_bytes=size_mib << 20) as rec:
                for _ in range(a.states):
                    with torch.no_grad():
                        for p in model.parameters():
                            p.add_(1e-3)
                    rec.capture()
            write = a.states * mb / (time.perf_counter() - t0)
            run = replay.open_run(out)
            rng = random.Random(0)
            ts = [rng.choice(run.steps) for _ in range(20)]
            t0 = time.perf_counter()
            for t in ts:
                run.state(t)
            access = (time.perf_counter() - t0) / len(ts) * 1e3
            per = len(run.steps) / len(run.chunks)
            print(f"{size_mib:>9} {per:>12.1f} {write:>10.0f} {access:>11.1f}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
