"""Would compressing the recorded XOR deltas pay? Bytes per parameter per step and encode/decode
throughput per core, measured on real recorded runs (digits MLP, 64-256-256-10).

For each optimizer (SGD + momentum, Adam, AdamW) and dtype (float32, bfloat16) it records a run,
rebuilds each step's XOR delta (what a chunk stores), and compresses it with zstd:

  raw          the delta bytes as stored (little-endian elements)
  planes       the same bytes grouped by byte plane (all elements' byte 0, then byte 1, ...): the
               high bytes (sign, exponent) of a small update are mostly zero, the low ones noise
  diff         instead of XOR, the integer difference of the bit patterns (current - previous, as a
               signed integer of the element's width), byte planes, zstd
  H0 bound     the order-0 entropy of each byte plane (XOR and diff): the size any per-plane entropy
               coder (Huffman, ANS: ZipNN's approach) can reach at best, without zstd's matching

Throughput is single-threaded (one zstd context), on the whole state, warm; the byte-plane grouping
is counted in the encoding time.

    pip install zstandard
    python tools/bench_compress.py [--steps 88] [--levels 1 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import replay
from replay.digits import digits_mlp, load_digits_tensors

try:
    import zstandard
except ImportError:
    raise SystemExit("this benchmark needs zstandard: pip install zstandard") from None


def record(path: Path, opt_name: str, dtype: torch.dtype, steps: int) -> None:
    model = digits_mlp(256).to(dtype)
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
           "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01)}[opt_name](model.parameters())
    x, y = load_digits_tensors()["train"]
    g = torch.Generator().manual_seed(0)
    with replay.Recorder(model, path, optimizer=opt):
        for _ in range(steps):
            idx = torch.randint(0, len(y), (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx]).backward()
            opt.step()


INT = {2: np.int16, 4: np.int32, 8: np.int64}


def deltas(path: Path, diff: bool = False) -> tuple[list[np.ndarray], int]:
    """Each step's XOR delta (or integer difference of the bit patterns) as [elements, itemsize] uint8 (per
    tensor, concatenated), and the parameter count."""
    out, prev = [], None
    for _, st in replay.open_run(path).states():
        flat = np.concatenate([v.contiguous().view(torch.uint8).numpy().reshape(-1, v.element_size())
                               for v in st.values()])
        if prev is not None:
            if diff:
                w = flat.shape[1]
                d = flat.copy().view(INT[w]) - prev.view(INT[w])  # wraps: exactly invertible
                out.append(d.view(np.uint8).reshape(-1, w))
            else:
                out.append(flat ^ prev)
        prev = flat
    return out, len(prev)


def entropy_bound(ds: list[np.ndarray], n_params: int) -> float:
    """Bytes per parameter per step at the order-0 entropy of each byte plane (a lower bound for any coder
    that codes each plane's bytes independently)."""
    bits = 0.0
    for d in ds:
        for plane in d.T:
            counts = np.bincount(plane, minlength=256)
            p = counts[counts > 0] / plane.size
            bits += -(p * np.log2(p)).sum() * plane.size
    return bits / 8 / len(ds) / n_params


def measure(ds: list[np.ndarray], n_params: int, level: int, planes: bool) -> dict[str, float]:
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    sizes, enc, dec, blobs = [], [], [], []
    for d in ds:
        t0 = time.perf_counter()  # the grouping by byte plane is part of the encoding's cost
        b = np.ascontiguousarray(d.T if planes else d).reshape(-1)
        z = cctx.compress(b.data)
        enc.append(time.perf_counter() - t0)
        blobs.append(b)
        t0 = time.perf_counter()
        dctx.decompress(z)  # decoding also ungroups the planes: about one copy more
        dec.append(time.perf_counter() - t0)
        sizes.append(len(z))
    raw = sum(b.nbytes for b in blobs)
    return {"bytes_per_param_step": sum(sizes) / len(blobs) / n_params, "ratio": raw / sum(sizes),
            "enc_mb_s": raw / sum(enc) / 1e6, "dec_mb_s": raw / sum(dec) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=88)
    ap.add_argument("--levels", type=int, nargs="+", default=[1])
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_compress_"))
    t0 = time.perf_counter()
    xor_rates = []
    try:
        print(f"digits MLP 64-256-256-10, {a.steps} steps, batch 32; zstd {zstandard.__version__}, one core")
        print(f"{'optimizer':9s} {'dtype':9s} {'layout':7s} {'level':>5s} {'B/param/step':>13s} {'ratio':>6s} "
              f"{'encode MB/s':>12s} {'decode MB/s':>12s}")
        for opt_name in ("sgd", "adam", "adamw"):
            for dtype in (torch.float32, torch.bfloat16):
                path = tmp / f"{opt_name}-{dtype}"
                record(path, opt_name, dtype, a.steps)
                ds, n = deltas(path)
                a0 = np.concatenate(ds[:4]).reshape(-1)
                t1 = time.perf_counter()
                np.bitwise_xor(a0, a0[::-1], out=np.empty_like(a0))
                xor_rates.append(a0.nbytes / (time.perf_counter() - t1) / 1e6)
                dd, _ = deltas(path, diff=True)
                for layout, data, planes in (("raw", ds, False), ("planes", ds, True), ("diff", dd, True)):
                    for level in a.levels:
                        m = measure(data, n, level, planes)
                        print(f"{opt_name:9s} {str(dtype)[6:]:9s} {layout:7s} {level:5d} "
                              f"{m['bytes_per_param_step']:13.3f} {m['ratio']:6.2f} {m['enc_mb_s']:12.0f} "
                              f"{m['dec_mb_s']:12.0f}")
                for layout, data in (("xor", ds), ("diff", dd)):
                    print(f"{opt_name:9s} {str(dtype)[6:]:9s} {'H0 ' + layout:7s} {'-':>5s} "
                          f"{entropy_bound(data, n):13.3f}")
        print(f"\nuncompressed: {4:.3f} (float32) / {2:.3f} (bfloat16) bytes per parameter per step; the XOR "
              f"itself runs at ~{statistics.median(xor_rates):,.0f} MB/s here ({time.perf_counter() - t0:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
