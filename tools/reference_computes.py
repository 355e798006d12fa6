"""Reference computes: the same runs computed by two checkouts, their frames compared column by column.

An engine change that should keep every number (to float32 reassociation) is checked here, not by eye:

    python tools/reference_computes.py make /tmp/ref-new                       # this tree
    PYTHONPATH=/tmp/old python tools/reference_computes.py make /tmp/ref-old   # an older checkout
    python tools/reference_computes.py compare /tmp/ref-old /tmp/ref-new

`make` records the runs once (under OUT/runs, or reuses those of --runs DIR so that both trees replay the
same bytes) and computes each workload into OUT/<name>. `compare` prints, per workload and frame, the
largest difference of each float column relative to the frame's largest |lca| (the issue's measure:
"≤ 1e-6 of the largest |lca|"), and how many rows differ in their integer and boolean columns (splits,
grounded, points).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import polars as pl
import torch
from torch import nn

import replay

HERE = Path(__file__).resolve().parent
KEYS = {"steps": ["step", "loss"], "tensors": ["step", "loss", "tensor"], "params": ["loss", "tensor", "index"],
        "examples": ["step", "loss", "example", "tensor"], "example_steps": ["step", "loss", "example"],
        "tokens": ["step", "loss", "example", "position"]}


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 64, 10))


def groups(n: int, k: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(5))


def workloads() -> dict:
    """name -> (run, task factory, compute keyword arguments)."""
    from replay.digits import digits_cnn, digits_mlp, load_digits_tensors

    def digits(model, **kw):
        return lambda: replay.Task(model(), load_digits_tensors(), **kw)

    def grouped(model=lambda: digits_mlp(64)):
        data = load_digits_tensors()
        return replay.Task(model(), data, groups={"train": {"g": groups(len(data["train"][1]), 100)}})

    def lm():
        sys.path.insert(0, str(HERE))
        from bench_replay import GPT, markov_text
        torch.manual_seed(0)
        data = {"train": {"input_ids": markov_text(16, 32, 65, 1)}, "val": {"input_ids": markov_text(16, 32, 65, 2)}}
        return replay.Task(GPT(layers=2, heads=2, width=32, context=32), data, loss_fn=replay.losses.causal_lm,
                           batch_size=8)

    mlp, cnn = digits(lambda: digits_mlp(64)), digits(digits_cnn)
    classes = {"losses": ["train", "val"], "per_class": ["train"]}
    return {
        "mlp": ("mlp", mlp, classes),
        "mlp-per-param-all": ("mlp", mlp, {**classes, "per_param": "all"}),
        "mlp-per-param-none": ("mlp", mlp, {**classes, "per_param": []}),
        "mlp-per-example": ("mlp", mlp, {"losses": ["val"], "per_example": ["val"]}),
        "mlp-per-example-classes": ("mlp", mlp, {"losses": ["train", "val"], "per_class": ["train"],
                                                 "per_example": ["val"]}),
        "mlp-100-groups": ("mlp", grouped, {"losses": ["train", "val"]}),
        "mlp-tol-1e-6": ("mlp", mlp, {**classes, "tol": 1e-6, "max_splits": 8}),
        "cnn": ("cnn", cnn, {**classes, "tol": 1e-5}),
        "cnn-per-param-all": ("cnn", cnn, {**classes, "per_param": "all", "tol": 1e-5}),
        "cnn-100-groups-per-param-all": ("cnn", lambda: grouped(digits_cnn), {**classes, "per_param": "all"}),
        "bn-batch": ("bn", digits(bn_net, batch_size=200), {**classes, "max_splits": 8}),
        "bn-running": ("bn", digits(bn_net, batch_size=200, batchnorm="running"), {**classes, "max_splits": 8}),
        "lm-per-example": ("lm", lm, {"losses": ["train", "val"], "per_example": ["val"], "max_splits": 8}),
    }


def record(name: str, path: Path) -> None:
    from replay.digits import digits_cnn, digits_mlp, train_digits

    if name in ("mlp", "cnn", "bn"):
        model = {"mlp": lambda: digits_mlp(64), "cnn": digits_cnn, "bn": bn_net}[name]()
        train_digits(model, str(path), epochs=1, batch=100, task="x:y")
        return
    sys.path.insert(0, str(HERE))
    from bench_replay import GPT, markov_text
    torch.manual_seed(0)
    model = GPT(layers=2, heads=2, width=32, context=32)
    data = markov_text(16, 32, 65, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with replay.Recorder(model, path, optimizer=opt, task="x:y"):
        for i in range(6):
            batch = {"input_ids": data[(2 * i) % 16:(2 * i) % 16 + 4]}
            opt.zero_grad()
            replay.losses.causal_lm(model(**batch), batch).mean().backward()
            opt.step()


def make(out: Path, runs: Path | None, only: list[str]) -> None:
    torch.set_num_threads(1)
    runs = runs or out / "runs"
    for name, (run, task, kw) in workloads().items():
        if only and name not in only:
            continue
        if not (runs / run).exists():
            record(run, runs / run)
        shutil.rmtree(out / name, ignore_errors=True)
        replay.compute(runs / run, task=task(), out=out / name, **kw)
        print(f"{name}: computed", flush=True)


def compare(a: Path, b: Path) -> None:
    worst = 0.0
    for name in workloads():
        if not (a / name).exists() or not (b / name).exists():
            continue
        fa, fb = replay.load(a / name), replay.load(b / name)
        for frame, keys in KEYS.items():
            x, y = getattr(fa, frame), getattr(fb, frame)
            if x is None or y is None:
                continue
            x, y = x.collect(), y.collect()
            if x.height == 0 and y.height == 0:
                continue
            if x.height != y.height:
                print(f"{name} {frame}: {x.height} rows against {y.height}")
                worst = float("inf")
                continue
            j = x.join(y, on=keys, how="inner", suffix="_b")
            scale = max(float(x["lca"].abs().max()), 1e-300)
            parts = []
            for c in x.columns:
                if c in keys or c + "_b" not in j.columns:
                    continue
                if x.schema[c] == pl.Float64:
                    d = float((j[c] - j[c + "_b"]).abs().max() or 0.0)
                    parts.append(f"{c} {d / scale:.1e}")
                    if c in ("lca", "lca_error", "residual"):
                        worst = max(worst, d / scale)
                else:
                    n = int((j[c] != j[c + "_b"]).sum() or 0)
                    if n:
                        parts.append(f"{c}: {n} rows differ")
            print(f"{name} {frame} ({x.height} rows, max |lca| {scale:.2e}): {', '.join(parts)}")
    print(f"largest lca/residual difference relative to the frame's largest |lca|: {worst:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["make", "compare"])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--runs", type=Path, help="record the runs here (or reuse them)")
    ap.add_argument("--only", nargs="*", default=[])
    a = ap.parse_args()
    if a.what == "make":
        make(a.dirs[0], a.runs, a.only)
    else:
        compare(*a.dirs)


if __name__ == "__main__":
    main()
