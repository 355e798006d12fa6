"""Replay speed, measured side by side in one process.

(a) overhead factor = replay wall time / (gradient evaluations done × time of one plain
    forward+backward over the same data): how much the engine adds beyond the gradients
    it cannot avoid (reading states, Simpson, per-tensor sums, frames). Target ≤ 1.15.
(b) speed-up over a straightforward implementation that evaluates each loss (train, val,
    every class) in its own pass with three gradients per step (start, midpoint, end).

Both on a digits MLP or CNN run recorded here (train + val + per-class train: 12 losses).

(c) with --nproc N: scaling efficiency of torchrun = N-process throughput / (N × 1-process
    throughput), both launched by torchrun with the same threads per process (cores / N), timed
    inside the processes from a barrier after start-up to the end of compute. Also the speed-up
    over one plain process using every core, which is what a user compares against.

    python tools/bench_replay.py [--model mlp|cnn] [--hidden 256] [--epochs 1] [--device cpu] [--repeat 3]
    python tools/bench_replay.py --nproc 2 [--data-parallel] [--model cnn] [--epochs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from torch import nn

import replay
from replay.digits import digits_cnn, digits_mlp, load_digits_tensors, train_digits
from replay.engine.evaluate import LossEvaluator


def plain_fb(ev, device: str, full_batch: bool) -> float:
    """Seconds of one plain forward+backward over every data set, nothing else.

    full_batch=False uses exactly the engine's batches (group-sorted, split at class
    boundaries): the gradient evaluation it cannot avoid. full_batch=True: one batch per set.
    """
    model = ev.model
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    batches = [pl.examples.tensors if full_batch else pl.examples.slice(a, b).tensors for pl in ev.plans
               for (a, b, _) in ([(0, len(pl.examples), 0)] if full_batch else pl.batches)]

    def once():
        for x, y in batches:
            nn.functional.cross_entropy(model(x), y, reduction="none").sum().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        once()
    sync()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def naive(run_dir: Path, model: nn.Module, data: dict, device: str) -> float:
    """Each loss in its own pass, 3 gradients per step, nothing reused. Returns seconds."""
    run = replay.open_run(run_dir)
    model = model.to(device).eval()
    params = list(model.parameters())
    xt, yt = data["train"]
    losses = {"train": data["train"], "val": data["val"]}
    for k in range(10):
        losses[f"train/class={k}"] = (xt[yt == k], yt[yt == k])

    def grad_at(theta: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            for p, v in zip(params, theta, strict=True):
                p.copy_(v)
        loss = nn.functional.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, params)

    t0 = time.perf_counter()
    states = [[v.to(device) for v in st.values()] for _, st in run.states()]
    for s0, s1 in zip(states[:-1], states[1:], strict=True):
        mid = [(a + b) / 2 for a, b in zip(s0, s1, strict=True)]
        for x, y in losses.values():
            g = [grad_at(th, x, y) for th in (s0, mid, s1)]
            lca = [(a + 4 * m + b) / 6 * (v1 - v0) for a, m, b, v0, v1 in zip(*g, s0, s1, strict=True)]
            _ = [t.sum().item() for t in lca]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


LOSSES = {"losses": ["train", "val"], "per_class": ["train"]}


def worker(a) -> None:
    """One torchrun process: time compute from a barrier after start-up to a barrier at the end."""
    import torch.distributed as dist

    run, out, timing = a.worker
    dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    task = task_obj()
    dist.barrier()
    t0 = time.perf_counter()
    fr = replay.compute(run, **LOSSES, task=task, device=a.device, out=out, data_parallel=a.data_parallel)
    dist.barrier()
    seconds = time.perf_counter() - t0
    if dist.get_rank() == 0:
        Path(timing).write_text(json.dumps({"seconds": seconds, "grad_evals": fr.meta["grad_evals"]}))
    dist.destroy_process_group()


def scaling(a, tmp: Path) -> None:
    """(c): torchrun with 1 and with N processes, interleaved rounds, medians."""
    threads = max(1, (os.cpu_count() or 1) // a.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    n_steps = len(replay.open_run(tmp / "run").steps) - 1

    def launch(n: int, r: int) -> dict:
        out, timing = tmp / f"lca-n{n}-r{r}", tmp / f"time-n{n}-r{r}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), __file__,
               "--worker", str(tmp / "run"), str(out), str(timing), "--model", a.model, "--hidden", str(a.hidden),
               "--device", a.device] + (["--data-parallel"] if a.data_parallel else [])
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(timing.read_text())

    one, many, plain = [], [], []
    for r in range(a.repeat):
        one.append(launch(1, r))
        many.append(launch(a.nproc, r))
        t0 = time.perf_counter()  # one process, every core: no torchrun
        replay.compute(tmp / "run", **LOSSES, task=task_obj(), device=a.device, out=tmp / f"plain{r}")
        plain.append(time.perf_counter() - t0)
        print(f"round {r}: 1 process {one[-1]['seconds']:.2f}s  {a.nproc} processes {many[-1]['seconds']:.2f}s  "
              f"1 process on all {os.cpu_count()} cores {plain[-1]:.2f}s")
    t1 = statistics.median(x["seconds"] for x in one)
    tn = statistics.median(x["seconds"] for x in many)
    mode = "data (a shard of every step's data each)" if a.data_parallel else "steps (blocks dealt in turn)"
    print(f"\ntorchrun, mode {mode}, device {a.device}, {threads} thread(s) per process, {n_steps} steps, 12 losses")
    print(f"1 process: {n_steps / t1:.1f} steps/s ({one[0]['grad_evals']} evals); "
          f"{a.nproc} processes: {n_steps / tn:.1f} steps/s ({many[0]['grad_evals']} evals)")
    print(f"(c) scaling efficiency: {t1 / (a.nproc * tn):.3f}  (target >= 0.85)")
    print(f"    speed-up over one process using all {os.cpu_count()} cores: {statistics.median(plain) / tn:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    ap.add_argument("--hidden", type=int, default=256, help="MLP width")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=0, help="measure torchrun scaling with this many processes")
    ap.add_argument("--data-parallel", action="store_true", help="with --nproc: shard each step's data instead")
    ap.add_argument("--per-example", action="store_true", help="measure the cost of --per-example val instead")
    ap.add_argument("--worker", nargs=3, metavar=("RUN", "OUT", "TIMING"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    globals()["HIDDEN"], globals()["MODEL"] = a.hidden, a.model
    if a.worker:
        return worker(a)
    tmp = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    try:
        task = "bench_replay:task_obj"  # stored in the run; compute below passes the Task itself
        train_digits(make_model(), str(tmp / "run"), epochs=a.epochs, task=task)
        if a.nproc:
            return scaling(a, tmp)
        if a.per_example:
            return per_example_cost(a, tmp)
        data = {k: (x.to(a.device), y.to(a.device)) for k, (x, y) in load_digits_tensors().items()}
        print("replay: 2 gradient evaluations per step + refinement; naive: 3 per step per loss")
        n_steps = len(replay.open_run(tmp / "run").steps) - 1
        ours, theirs, plain, factors, factors_full = [], [], [], [], []
        for r in range(a.repeat):
            t0 = time.perf_counter()
            fr = replay.compute(tmp / "run", ["train", "val"], per_class=["train"], task=task_obj(),
                                device=a.device, out=tmp / f"lca{r}")
            ours.append(time.perf_counter() - t0)
            evals = fr.meta["grad_evals"]
            ev = LossEvaluator(task_obj(), replay.open_run(tmp / "run").param_names, ["train", "val"],
                               ["train"], torch.device(a.device))
            unit, unit_full = plain_fb(ev, a.device, False), plain_fb(ev, a.device, True)
            factors.append(ours[-1] / (evals * unit))
            factors_full.append(ours[-1] / (evals * unit_full))
            theirs.append(naive(tmp / "run", make_model(), data, a.device))
            t0 = time.perf_counter()  # the naive's own rule: plain Simpson, no refinement
            replay.compute(tmp / "run", ["train", "val"], per_class=["train"], task=task_obj(),
                           device=a.device, max_splits=2, out=tmp / f"plain{r}")
            plain.append(time.perf_counter() - t0)
            print(f"round {r}: replay {ours[-1]:.2f}s ({evals} evals, unit {unit * 1e3:.2f} ms)  "
                  f"naive {theirs[-1]:.2f}s")
        n_params = sum(p.numel() for p in make_model().parameters())
        grounded = fr.steps.select(pl.col("grounded").mean()).collect().item()
        name = "CNN" if a.model == "cnn" else f"MLP hidden {a.hidden}"
        print(f"\ndigits {name} ({n_params:,} params), {n_steps} steps, 12 losses "
              f"(train, val, 10 classes), device {a.device}")
        print(f"(a) overhead factor: {statistics.median(factors):.3f}  "
              f"(replay time / (gradient evaluations x one plain forward+backward over train+val in the "
              f"engine's batches)); vs full-batch forward+backward: {statistics.median(factors_full):.3f}")
        print(f"    gradient evaluations per step: {evals / n_steps:.2f} (2 = plain Simpson with endpoint reuse)")
        speedup = statistics.median(theirs) / statistics.median(plain)
        print(f"(b) speed-up over naive per-loss 3-gradient replay: {speedup:.2f}x at the same rule "
              f"(plain Simpson, --max-splits 2); {statistics.median(theirs) / statistics.median(ours):.2f}x "
              f"with refinement to tol 1e-4, which the naive loop does not reach")
        print(f"    grounded at tol 1e-4: {grounded:.1%} of step-losses")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def per_example_cost(a, tmp: Path) -> None:
    """Cost of --per-example val: total ratio, (a) evaluation points per step, (b) cost of one point."""
    import resource

    from replay.engine.per_example import PerExample

    run = replay.open_run(tmp / "run")
    with_pe, without = [], []
    for r in range(a.repeat):
        t0 = time.perf_counter()
        base = replay.compute(tmp / "run", ["val"], task=task_obj(), device=a.device, out=tmp / f"base{r}")
        without.append(time.perf_counter() - t0)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        fr = replay.compute(tmp / "run", ["val"], task=task_obj(), device=a.device, out=tmp / f"pe{r}",
                            per_example=["val"])
        with_pe.append(time.perf_counter() - t0)
        print(f"round {r}: without {without[-1]:.2f}s  with --per-example val {with_pe[-1]:.2f}s")
    es = fr.example_steps.collect()
    n_steps, n_ex = len(run.steps) - 1, es["example"].n_unique()
    # points per step: 3 for every example, then n/2 more for each example refined from n to 2n
    extra = sum(int((es["splits"] >= 2 * n).sum()) * n for n in (2, 4, 8, 16)) / n_ex / n_steps
    ev = LossEvaluator(task_obj(), run.param_names, ["val"], [], torch.device(a.device))
    pe = PerExample(ev.task, ev.model, run.param_names, ["val"], torch.device(a.device), 1e-4, 0.0, 32)
    theta = torch.cat([v.reshape(-1).double() for v in run.state(0).values()]).to(a.device)
    d = torch.cat([v.reshape(-1).double() for v in run.state(1).values()]).to(a.device) - theta
    rows = torch.arange(n_ex, device=a.device)
    delta = pe._params(d)
    unit = plain_fb(ev, a.device, False)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    pe._point("val", theta, delta, rows)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        pe._point("val", theta, delta, rows)
    sync()
    point = (time.perf_counter() - t0) / 5
    print(f"\n--per-example val ({n_ex} examples, {len(run.param_names)} tensors, {n_steps} steps): "
          f"{statistics.median(with_pe) / statistics.median(without):.2f}x the compute without it")
    print(f"(a) evaluation points per step per example: {3 + extra:.2f} (3 = plain Simpson, no endpoint reuse: "
          f"the direction changes every step); the data set's own: {base.meta['grad_evals'] / n_steps:.2f}")
    print(f"(b) one point for every example: {point * 1e3:.1f} ms = {point / unit:.1f}x a plain forward+backward "
          f"over val ({unit * 1e3:.2f} ms): one forward-mode product per tensor")
    print(f"peak RSS after the per-example compute: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} "
          f"MiB (before it: {rss0 / 1024:.0f} MiB); memory holds one batch of examples, not examples x parameters")


HIDDEN, MODEL = 256, "mlp"


def make_model() -> nn.Module:
    return digits_cnn() if MODEL == "cnn" else digits_mlp(HIDDEN)


def task_obj() -> replay.Task:
    return replay.Task(make_model(), load_digits_tensors())


if __name__ == "__main__":
    main()
