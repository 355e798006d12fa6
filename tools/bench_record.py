"""Training throughput with vs without the Recorder, measured side by side.

Rounds interleave the modes (plain / recorder with the deferred copy that the optimizer
hooks allow / recorder with a synchronous copy via manual capture()) so that machine noise
hits all alike; the median of per-round ratios is printed. Also prints bytes on disk per
parameter per step, and what a byte-shuffled zlib pass would save on these XOR deltas.

    python tools/bench_record.py [--steps 300] [--rounds 7] [--batch 64] [--device cpu]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

import replay


def make(device: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 384), nn.ReLU(), nn.Linear(384, 10))
    model = model.to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train(mode: str, steps: int, batch: int, device: str, out: Path) -> float:
    model, opt = make(device)
    xs = torch.randn(16, batch, 784, device=device)
    ys = torch.randint(0, 10, (16, batch), device=device)
    rec = None
    if mode == "deferred":
        rec = replay.Recorder(model, out, optimizer=opt)
    elif mode == "sync":
        rec = replay.Recorder(model, out)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xs[i % 16]), ys[i % 16]).backward()
        opt.step()
        if mode == "sync":
            rec.capture()
    sync()
    dt = time.perf_counter() - t0  # training time only: close() below flushes the tail
    if rec is not None:
        rec.close()
    return steps * batch / dt


def codec_probe(run_dir: Path) -> None:
    """What compression would buy: byte-shuffle each delta (group byte planes), zlib level 1."""
    run = replay.open_run(run_dir)
    chunk = run.chunks[len(run.chunks) // 2]
    from safetensors import safe_open

    raw = packed = 0
    t0 = time.perf_counter()
    with safe_open(chunk.path, framework="pt") as f:
        for key in f.keys():
            if key.startswith(f"{chunk.first}/") or key.endswith("__pad__"):
                continue  # deltas only
            a = f.get_tensor(key).numpy()
            shuffled = a.view(np.uint8).reshape(-1, a.itemsize).T.copy()
            raw += a.nbytes
            packed += len(zlib.compress(shuffled, 1))
    dt = time.perf_counter() - t0
    print(f"codec probe: byte-shuffled zlib-1 on XOR deltas = {packed / raw:.3f} of raw size, "
          f"{raw / dt / 2**20:.0f} MiB/s on one core (not enabled: see README)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_record_"))
    modes = ["plain", "deferred", "sync"]
    ratios: dict[str, list[float]] = {m: [] for m in modes[1:]}
    try:
        train("plain", 50, a.batch, a.device, tmp / "warm")  # warm-up: allocator, threads
        for r in range(a.rounds):
            tput = {}
            for m in modes if r % 2 == 0 else modes[::-1]:
                tput[m] = train(m, a.steps, a.batch, a.device, tmp / f"{m}{r}")
            for m in modes[1:]:
                ratios[m].append(tput["plain"] / tput[m])
            print(f"round {r}: " + "  ".join(f"{m} {tput[m]:,.0f} ex/s" for m in modes))
        model, _ = make("cpu")
        n = sum(p.numel() for p in model.parameters())
        info = replay.open_run(tmp / "deferred0").info()
        print(f"\nmodel: MLP 784-512-384-10, {n:,} params, batch {a.batch}, device {a.device}, "
              f"{torch.get_num_threads()} torch threads")
        for m in modes[1:]:
            print(f"overhead ratio ({m} copy): {statistics.median(ratios[m]):.3f} "
                  f"(time with recorder / without; median of {a.rounds}, min {min(ratios[m]):.3f})")
        print(f"bytes on disk per parameter per step: {info.bytes_per_param_step:.3f} "
              f"({info.chunks} chunks, {info.steps} states)")
        codec_probe(tmp / "deferred0")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
