"""Training throughput with vs without the Recorder, measured side by side, and where the time goes.

Rounds interleave the modes so that machine noise hits all alike; the median of per-round
ratios is printed:
  plain     no recording
  clone     a bare copy of the parameters on the training thread every `every` steps (the floor of
            any recorder that copies on that thread; to host memory, from a GPU)
  recorder  replay.Recorder with the optimizer (deferred copy, sealed at the next step)
Then a breakdown: the cost per state of each piece of the background work (copy, XOR,
zero test, checksum, write), against the time of one training step.

    python tools/bench_record.py [--model mlp512|mlp784|mlp4k] [--device cuda] [--every k] [--batch 64]
                                 [--threads 1] [--steps 300]

With --ddp N: N DDP processes (torchrun, gloo; 1 thread each), interleaved rounds of plain training,
rank 0 recording whole states (`Recorder(rank=0)`) and sharded recording (the default under DDP:
each rank its 1/N of every state); per-rank slowdown against plain and bytes written per rank.

    python tools/bench_record.py --ddp 2 [--model mlp512] [--steps 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import xxhash
from torch import nn

import replay

MODELS = {"mlp512": (64, 512, 512, 10), "mlp784": (784, 512, 384, 10),
          "mlp4k": (1024, 4096, 4096, 10)}  # 21M parameters: a GPU-sized step


def make(name: str, device: str):
    torch.manual_seed(0)
    d = MODELS[name]
    layers = []
    for a, b in zip(d[:-1], d[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def train(mode: str, model_name: str, steps: int, batch: int, device: str, out: Path, every: int = 1,
          compress: bool = False) -> float:
    model, opt = make(model_name, device)
    xs = torch.randn(16, batch, MODELS[model_name][0], device=device)
    ys = torch.randint(0, 10, (16, batch), device=device)
    rec = replay.Recorder(model, out, optimizer=opt, every=every, compress=compress) if mode == "recorder" else None
    params = [p for p in model.parameters()]
    copies = [torch.empty_like(p, device="cpu") for p in params]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xs[i % 16]), ys[i % 16]).backward()
        opt.step()
        if mode == "clone" and i % every == 0:
            with torch.no_grad():
                for c, p in zip(copies, params, strict=True):
                    c.copy_(p)
    sync()
    dt = time.perf_counter() - t0  # training time only: close() below flushes the tail
    if rec is not None:
        rec.close()
    return dt / steps


def breakdown(model_name: str, step_s: float, out: Path) -> None:
    """Per state: each background piece on a state of this model, in µs and as a share of a training step."""
    model, _ = make(model_name, "cpu")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    nb = flat.numel() * 4
    cur = flat.view(torch.uint8).numpy().copy()
    prev = (cur ^ np.random.default_rng(0).integers(0, 2, nb, dtype=np.uint8))
    dst = np.empty_like(cur)
    big = np.empty(nb * 16, dtype=np.uint8)

    def t(fn, n=50):
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    pieces = {
        "copy (params -> staging)": t(lambda: torch.from_numpy(dst).copy_(flat.view(torch.uint8))),
        "XOR with previous": t(lambda: np.bitwise_xor(cur, prev, out=dst)),
        "zero test (any)": t(lambda: dst.view(np.uint64).any()),
        "checksum (xxHash3)": t(lambda: xxhash.xxh3_64(dst).hexdigest()),
    }
    path = out / "w.bin"

    def write():
        with open(path, "wb") as f:
            f.write(big)

    pieces["write (page cache, per state)"] = t(write, 10) / 16
    print(f"\nbreakdown per state ({nb / 2**20:.2f} MiB), one training step = {step_s * 1e6:,.0f} µs:")
    for k, v in pieces.items():
        print(f"  {k:32s} {v * 1e6:8.0f} µs  {v / step_s:6.1%} of a step")


def ddp_worker(a) -> None:
    """One of the --ddp processes: every mode in every round; rank 0 prints the table."""

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    out = Path(a.ddp_worker)
    modes = ["plain", "rank0", "shard"]
    secs: dict[str, list[float]] = {m: [] for m in modes}

    def run(mode: str, path: Path, steps: int) -> float:
        model, _ = make(a.model, "cpu")
        model = DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(rank)
        xs, ys = torch.randn(16, a.batch, MODELS[a.model][0], generator=g), torch.randint(0, 10, (16, a.batch))
        rec = (None if mode == "plain" else
               replay.Recorder(model, path, optimizer=opt, **({"rank": 0} if mode == "rank0" else {})))
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xs[i % 16]), ys[i % 16]).backward()
            opt.step()
        dt = time.perf_counter() - t0
        if rec is not None:
            rec.close()
        dist.barrier()
        return dt / steps

    run("plain", out / "warm", 30)
    for r in range(a.rounds):
        for m in modes if r % 2 == 0 else modes[::-1]:
            secs[m].append(run(m, out / f"{m}{r}", a.steps))
    mine = {m: [v / p for v, p in zip(secs[m], secs["plain"], strict=True)] for m in modes[1:]}
    written = {"rank0": sum(f.stat().st_size for f in (out / "rank00").glob("chunk-*")) if rank == 0 else 0,
               "shard": sum(f.stat().st_size for f in (out / "shard0" / f"shard-{rank}-of-{world}").glob("chunk-*"))}
    rows = [None] * world
    dist.all_gather_object(rows, {"ratios": mine, "written": written, "plain": statistics.median(secs["plain"])})
    if rank == 0:
        n = sum(p.numel() for p in make(a.model, "cpu")[0].parameters())
        print(f"DDP {world} ranks (gloo, 1 thread each), model {a.model} ({n:,} params), batch {a.batch} per rank, "
              f"{a.steps} steps, {a.rounds} rounds (medians of per-round ratios)")
        print("| rank | plain ms/step | rank 0 records (slowdown) | sharded (slowdown) | bytes written, rank 0 "
              "records | bytes written, sharded |")
        print("|---|---|---|---|---|---|")
        for r, x in enumerate(rows):
            print(f"| {r} | {x['plain'] * 1e3:.3f} | {statistics.median(x['ratios']['rank0']):.3f}x | "
                  f"{statistics.median(x['ratios']['shard']):.3f}x | {x['written']['rank0'] / 2**20:.1f} MiB | "
                  f"{x['written']['shard'] / 2**20:.1f} MiB |")
    dist.destroy_process_group()


def ddp(a) -> None:
    import subprocess
    import sys

    tmp = Path(tempfile.mkdtemp(prefix="bench_record_ddp_"))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.ddp),
               __file__, "--ddp-worker", str(tmp), "--model", a.model, "--steps", str(a.steps), "--rounds",
               str(a.rounds), "--batch", str(a.batch)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mlp512", choices=sorted(MODELS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=1, help="Recorder(every=k)")
    ap.add_argument("--compress", action="store_true", help="Recorder(compress=True)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ddp", type=int, default=0, help="measure N-rank DDP recording (rank 0 vs sharded)")
    ap.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ddp_worker:
        return ddp_worker(a)
    if a.ddp:
        return ddp(a)
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_record_"))
    modes = ["plain", "clone", "recorder"]
    ratios: dict[str, list[float]] = {m: [] for m in modes[1:]}
    plain_times = []
    caught = warnings.catch_warnings(record=True)  # the recorder's "recording slows training" line: shown once, below
    said = caught.__enter__()
    warnings.simplefilter("always")
    try:
        train("plain", a.model, 50, a.batch, a.device, tmp / "warm")  # warm-up: allocator, threads
        for r in range(a.rounds):
            secs = {}
            for m in modes if r % 2 == 0 else modes[::-1]:
                secs[m] = train(m, a.model, a.steps, a.batch, a.device, tmp / f"{m}{r}", a.every, a.compress)
            for m in modes[1:]:
                ratios[m].append(secs[m] / secs["plain"])
            plain_times.append(secs["plain"])
            print(f"round {r}: " + "  ".join(f"{m} {secs[m] * 1e3:.3f} ms/step" for m in modes))
        model, _ = make(a.model, "cpu")
        n = sum(p.numel() for p in model.parameters())
        info = replay.open_run(tmp / "recorder0").info()
        print(f"\nmodel {a.model} {MODELS[a.model]}, {n:,} params, batch {a.batch}, every {a.every}, "
              f"{'compressed, ' if a.compress else ''}"
              f"device {a.device}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} cores")
        for m in modes[1:]:
            print(f"slowdown ({m}): {statistics.median(ratios[m]):.3f}x "
                  f"(time per step with / without; median of {a.rounds}, range {min(ratios[m]):.3f}-"
                  f"{max(ratios[m]):.3f})")
        print(f"bytes on disk per parameter per step: {info.bytes_per_param_step:.3f} "
              f"({info.chunks} chunks, {info.steps} states)")
        breakdown(a.model, statistics.median(plain_times), tmp)
        waits = [str(w.message) for w in said if "recording slows training" in str(w.message)]
        print(f"\nthe recorder warned in {len(waits)} of {a.rounds} runs" + (f"; first: {waits[0]}" if waits else ""))
    finally:
        caught.__exit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
