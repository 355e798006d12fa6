"""Replay speed and memory on the digits toys and on models people train, side by side in one run.

Workloads (built here, nothing downloaded):
  mlp, cnn   the digits MLP / CNN, train + val + per-class train (12 losses)
  resnet20   the LCA paper's CIFAR ResNet-20 (tools/paper.py) on synthetic, class-structured
             CIFAR-shaped images, train + val + per-class train, batch-norm batch statistics
  lm         a nanoGPT-shaped causal LM (6 layers, 6 heads, width 384, context 256, vocab 65,
             tied embedding, SDPA attention: ~10.7M params), train and val, replay.losses.causal_lm

For each, per round and implementation (this tree, and with --against DIR an older checkout,
each in its own fresh process so that peak memory is its own):
  seconds per replayed step and gradient evaluations per step;
  (a) overhead factor = replay seconds / (gradient evaluations × one plain forward+backward over
      the same data): in the engine's batches (the data set's own) and in large batches.
      1.0 means the engine adds nothing to the gradients it cannot avoid;
  (b) speed-up over the paper's loop (every loss its own pass, gradients at start, midpoint and
      end of every step), against replay at the same rule (plain Simpson, --max-splits 2) and
      against replay refining to tol;
  peak RSS of the compute process (and peak CUDA memory on a GPU).

--memory instead measures peak RSS against the number of group losses (0, 100, 1000 random groups
of train, per_param left at its default), each compute in a fresh process.

--per-example (digits, or the LM) / --per-token (the LM): compute `val` with and without per-example
(per-token) val, per tree, and (this tree) the cost of one point for all examples: the per-example
products of one batch set (`engine.ghost`) against a plain forward+backward over val.

    python tools/bench_replay.py --model mlp --repeat 3 [--against /tmp/old-checkout]
    python tools/bench_replay.py --model resnet20 --examples 1000 --steps 4 --threads 1
    python tools/bench_replay.py --model lm --examples 16 --context 128 --steps 3
    python tools/bench_replay.py --memory --model mlp --hidden 2000
    python tools/bench_replay.py --per-example --model cnn [--against /tmp/old-checkout]
    python tools/bench_replay.py --per-token --model lm --examples 8 --context 64
    python tools/bench_replay.py --nproc 2 [--data-parallel] --model cnn      # torchrun scaling
    python tools/bench_replay.py --model cnn --groups 100 --per-param all    # 100 per-parameter group losses
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
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

HERE = Path(__file__).resolve().parent

# ---- workloads --------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in self.qkv(x).split(c, 2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT's shape: learned positions, pre-norm blocks, the output layer tied to the embedding."""

    def __init__(self, layers: int = 6, heads: int = 6, width: int = 384, context: int = 256, vocab: int = 65):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln_f, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.head(self.ln_f(self.blocks(self.wte(input_ids) + self.wpe(pos))))


def markov_text(n: int, context: int, vocab: int, seed: int) -> torch.Tensor:
    """Sequences of a sparse random Markov chain (each token has 4 likely successors): learnable text."""
    g = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, vocab, (vocab, 4), generator=g)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, context, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, context):
        nxt = succ[out[:, t - 1], torch.randint(0, 4, (n,), generator=g)]
        noise = torch.rand(n, generator=g) < 0.1
        out[:, t] = torch.where(noise, torch.randint(0, vocab, (n,), generator=g), nxt)
    return out


def cifar_like(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-shaped [n, 3, 32, 32] images: a smooth per-class pattern plus noise, so the loss falls."""
    g = torch.Generator().manual_seed(99)
    protos = nn.functional.interpolate(torch.randn(classes, 3, 4, 4, generator=g), size=32, mode="bilinear")
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return protos[y] + 1.5 * torch.randn(n, 3, 32, 32, generator=g), y


def clusters(n: int, seed: int, classes: int, dim: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, dim] points around one random centre per class (the wide MLP's data)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(98))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, dim, generator=g), y


def make_model(a) -> nn.Module:
    torch.manual_seed(0)
    if a.model == "wide":
        return nn.Sequential(nn.Linear(64, 1400), nn.ReLU(), nn.Linear(1400, 1400), nn.ReLU(),
                             nn.Linear(1400, a.classes))
    if a.model == "resnet18":
        import torchvision
        return torchvision.models.resnet18(num_classes=a.classes)
    if a.model == "resnet20":
        sys.path.insert(0, str(HERE))
        if not hasattr(replay, "register_task"):  # an older replay measured beside this one (--against)
            replay.register_task = lambda f: f
        from paper import resnet20_model
        return resnet20_model()
    if a.model == "lm":
        return GPT(layers=a.layers, heads=a.heads, width=a.width, context=a.context)
    from replay.digits import digits_cnn, digits_mlp
    return digits_cnn() if a.model == "cnn" else digits_mlp(a.hidden)


def make_data(a) -> dict:
    if a.model in ("resnet20", "resnet18"):
        return {"train": cifar_like(a.examples, 1, a.classes),
                "val": cifar_like(max(a.examples // 10, 100), 2, a.classes)}
    if a.model == "wide":
        return {"train": clusters(a.examples, 1, a.classes), "val": clusters(a.examples // 4, 2, a.classes)}
    if a.model == "lm":
        return {"train": {"input_ids": markov_text(a.examples, a.context, 65, 1)},
                "val": {"input_ids": markov_text(a.examples, a.context, 65, 2)}}
    from replay.digits import load_digits_tensors
    return load_digits_tensors()


def make_task(a, groups: int = 0) -> replay.Task:
    data = make_data(a)
    kw: dict = {}
    if a.model == "lm":
        kw.update(loss_fn=replay.losses.causal_lm, batch_size=a.batch)
    elif a.model in ("resnet20", "resnet18"):
        kw.update(batch_size=a.batch, batchnorm=a.bn)
    elif a.model == "wide":
        kw.update(batch_size=a.batch or None)
    if groups:
        d = data["train"]
        n = len(next(iter(d.values()))) if isinstance(d, dict) else len(d[1])
        kw["groups"] = {"train": {"g": torch.randint(0, groups, (n,), generator=torch.Generator().manual_seed(5))}}
    return replay.Task(make_model(a), data, **kw)


def losses_of(a) -> dict:
    if a.only in ("train", "classes"):  # --class-cost: train alone, or train and its classes
        return {"losses": ["train"], "per_class": ["train"] if a.only == "classes" else []}
    return {"losses": ["train", "val"], "per_class": [] if a.model == "lm" or a.memory or a.groups else ["train"]}


def record(a, path: Path) -> None:
    """Train `a.steps` optimizer steps (SGD+momentum; AdamW for the LM) on the task's train set, recorded."""
    if a.model in ("mlp", "cnn"):
        from replay.digits import train_digits
        train_digits(make_model(a), str(path), epochs=a.epochs, task="bench_replay:task")
        return
    torch.manual_seed(1)
    model, data = make_model(a), make_data(a)["train"]
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-3) if a.model == "lm"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    n = len(data["input_ids"]) if a.model == "lm" else len(data[1])
    bs = min(n, 8 if a.model == "lm" else 128)
    model.train()
    with replay.Recorder(model, path, optimizer=opt):
        for _ in range(a.steps):
            i = torch.randint(0, n, (bs,))
            opt.zero_grad()
            if a.model == "lm":
                batch = {"input_ids": data["input_ids"][i]}
                replay.losses.causal_lm(model(**batch), batch).mean().backward()
            else:
                nn.functional.cross_entropy(model(data[0][i]), data[1][i]).backward()
            opt.step()


# ---- what is timed ----------------------------------------------------------------------------


def loss_of(a, model: nn.Module, batch) -> torch.Tensor:
    """Sum of per-example losses of one batch, as the engine would evaluate it."""
    if a.model == "lm":
        return replay.losses.causal_lm(model(**batch), batch).sum()
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="sum")


def batches_of(a, task: replay.Task, device: str, big: bool) -> list:
    """Every data set cut into the engine's batches (the data set's own, task.batch_size: class and group losses,
    per-parameter ones too, come from them), or into batches of `a.big_batch` examples (big=True)."""
    out = []
    for name, d in task.data.items():
        if name not in ("train", "val"):
            continue
        n = len(next(iter(d.values()))) if isinstance(d, dict) else len(d[1])
        bs = a.big_batch if big else (task.batch_size or n)
        out += [take(d, torch.arange(i, min(i + bs, n)), device) for i in range(0, n, bs)]
    return out


def take(d, idx: torch.Tensor, device: str):
    return {k: v[idx].to(device) for k, v in d.items()} if isinstance(d, dict) else tuple(v[idx].to(device) for v in d)


def plain_fb(a, task: replay.Task, device: str, big: bool) -> float:
    """Median seconds of one plain forward+backward over train and val, nothing else."""
    model = task.model.to(device)
    model.eval() if task.batchnorm != "batch" else model.train()
    batches = batches_of(a, task, device, big)

    def once():
        for b in batches:
            loss_of(a, model, b).backward()
        model.zero_grad(set_to_none=True)

    return median_seconds(once, a.unit_repeat, device)


def median_seconds(fn, repeat: int, device: str) -> float:
    """Median wall time of fn() over `repeat` runs after one warm-up, synchronized on CUDA."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paper_loop(a, run_dir: Path, device: str) -> float:
    """The paper's algorithm as one would write it: every loss its own pass, the gradient at the start,
    the midpoint and the end of every step, Simpson's weights. Returns seconds."""
    task = make_task(a)
    model = task.model.to(device)
    model.eval() if task.batchnorm != "batch" else model.train()
    params = dict(model.named_parameters())
    losses = []
    for name in ("train", "val"):
        d = task.data[name]
        losses.append(d)
        if name in losses_of(a)["per_class"]:
            losses += [(d[0][d[1] == k], d[1][d[1] == k]) for k in range(10)]
    bs = task.batch_size

    def chunks(d):
        if isinstance(d, dict):
            n = len(next(iter(d.values())))
            return n, [{k: v[i:i + (bs or n)].to(device) for k, v in d.items()} for i in range(0, n, bs or n)]
        n = len(d[1])
        return n, [(d[0][i:i + (bs or n)].to(device), d[1][i:i + (bs or n)].to(device)) for i in range(0, n, bs or n)]

    prepared = [chunks(d) for d in losses]
    run = replay.open_run(run_dir)
    names = run.param_names
    t0 = time.perf_counter()
    prev = None
    for _, state in run.states():
        cur = [state[k].to(device).double() for k in names]
        if prev is not None:
            mid = [(x + y) / 2 for x, y in zip(prev, cur, strict=True)]
            for n, batches in prepared:
                gs = []
                for theta in (prev, mid, cur):
                    with torch.no_grad():
                        for k, v in zip(names, theta, strict=True):
                            params[k].copy_(v)
                    model.zero_grad(set_to_none=True)
                    for b in batches:
                        (loss_of(a, model, b) / n).backward()
                    gs.append([params[k].grad.double() for k in names])
                [((g0 + 4 * g1 + g2) / 6 * (y - x)).sum().item()
                 for g0, g1, g2, x, y in zip(*gs, prev, cur, strict=True)]
        prev = cur
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# ---- child processes: one measurement each, in a fresh interpreter ------------------------------


def child(a) -> None:
    job, out = a.child
    torch.set_num_threads(a.threads)
    run = Path(a.run)
    result: dict = {}
    if job == "record":
        record(a, run)
    elif job == "compute":
        task = make_task(a, a.groups)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if a.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        kw = {"per_param": a.per_param} if a.per_param else {}
        fr = replay.compute(run, **losses_of(a), task=task, device=a.device, out=Path(out).with_suffix(".lca"),
                            max_splits=a.max_splits, tol=a.tol, **kw)
        result["seconds"] = time.perf_counter() - t0
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["setup_rss_mib"] = rss0 / 1024
        if a.device.startswith("cuda"):
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["grad_evals"] = fr.meta["grad_evals"]
        st = fr.steps.collect()
        result["steps"] = st["step"].n_unique()
        result["grounded"] = float(st["grounded"].mean())
        result["losses"] = st["loss"].n_unique()
        # points per step: the distinct s of all its rows but the start (the previous step's end)
        pts = st.group_by("step").agg(pl.col("points").explode().unique().len() - 1)["points"].sort().to_list()
        result["points"] = [pts[int(q * (len(pts) - 1))] for q in (0.0, 0.5, 0.9, 1.0)]
        if a.units:
            result["unit"] = plain_fb(a, make_task(a), a.device, False)
            result["unit_big"] = plain_fb(a, make_task(a), a.device, True)
    elif job == "paper":
        result["seconds"] = paper_loop(a, run, a.device)
    elif job in ("rows", "norows"):
        task = make_task(a)
        kw = {} if job == "norows" else ({"per_token": ["val"]} if a.rows == "token" else {"per_example": ["val"]})
        t0 = time.perf_counter()
        fr = replay.compute(run, ["val"], task=task, device=a.device, out=Path(out).with_suffix(".lca"), **kw)
        result["seconds"] = time.perf_counter() - t0
        result["grad_evals"] = fr.meta["grad_evals"]
        rows = fr.tokens if a.rows == "token" else fr.example_steps
        if job == "rows" and rows is not None:
            r = rows.collect()
            result["grounded"] = float(r["grounded"].mean())
            result["points"] = float(r["splits"].mean()) + 1
        if job == "rows" and a.rows == "example" and importlib.util.find_spec("replay.engine.ghost"):
            result |= one_point(a, run)
    Path(out).write_text(json.dumps(result))


def one_point(a, run_dir: Path) -> dict:
    """Seconds of one point for every val example (ghost products, every tensor) against one plain
    forward+backward over val in the same batches, both medians of a.unit_repeat."""
    from replay.engine.ghost import ExampleProducts
    from replay.task import Examples

    task = make_task(a)
    model = task.model.to(a.device).eval()
    run = replay.open_run(run_dir)
    names = run.param_names
    st0, st1 = run.state(run.steps[0]), run.state(run.steps[1])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in st0:
                p.copy_(st0[n])
    dirs = [{n: (st1[n] - st0[n]).to(a.device) for n in names}]
    from replay.task import cross_entropy_per_example

    products = ExampleProducts(model, names, task.loss_fn or cross_entropy_per_example, torch.device(a.device))
    data = Examples(task.data["val"]).to(a.device)
    bs = task.batch_size or len(data)

    def ghost():
        for i in range(0, len(data), bs):
            products(data.slice(i, i + bs), dirs)

    def plain():
        for i in range(0, len(data), bs):
            b = data.slice(i, i + bs).tensors
            loss_of(a, model, b).backward()
        model.zero_grad(set_to_none=True)

    out = {name: median_seconds(fn, a.unit_repeat, a.device) for name, fn in (("point", ghost), ("plain", plain))}
    out["fast_tensors"] = len(names) - len(products.fallback)
    out["tensors"] = len(names)
    return out


def rows_cost(a, trees: dict[str, Path], tmp: Path) -> None:
    for name, tree in trees.items():
        launch(a, tree, "record", tmp, f"record-{name}", run=tmp / f"run-{name}")
    res: dict[str, list] = {n: [] for n in trees}
    for r in range(a.repeat):
        for name, tree in trees.items():
            without = launch(a, tree, "norows", tmp, f"n-{name}-{r}", run=tmp / f"run-{name}")
            with_ = launch(a, tree, "rows", tmp, f"r-{name}-{r}", run=tmp / f"run-{name}")
            res[name].append((without, with_))
            print(f"round {r} {name}: without {without['seconds']:.2f}s, with per-{a.rows} val "
                  f"{with_['seconds']:.2f}s", flush=True)
    med = statistics.median
    print(f"\n{describe(a)}, device {a.device}, {a.threads} thread(s): per-{a.rows} LCA of val")
    print("| tree | compute with / without | points per row and step | rows grounded | one point for all "
          "examples / plain forward+backward |")
    print("|---|---|---|---|---|")
    for name, xs in res.items():
        ratio = med(w["seconds"] / n["seconds"] for n, w in xs)
        w = xs[0][1]
        pt = f"{w['point'] / w['plain']:.2f}x ({w['fast_tensors']}/{w['tensors']} tensors by one backward)" \
            if "point" in w else "—"
        pts = f"{w['points']:.2f}" if "points" in w else "—"
        grounded = f"{w['grounded']:.2%}" if "grounded" in w else "—"
        print(f"| {name} | {ratio:.2f}x | {pts} | {grounded} | {pt} |")


def launch(a, tree: Path, job: str, tmp: Path, tag: str, **over) -> dict:
    """Run one job of this script in a fresh process that imports replay from `tree`."""
    out = tmp / f"{tag}.json"
    args = {**vars(a), **over}
    cmd = [sys.executable, str(HERE / "bench_replay.py"), "--child", job, str(out)]
    for k in ("model", "hidden", "epochs", "examples", "steps", "context", "batch", "big_batch", "device",
              "threads", "max_splits", "tol", "groups", "run", "unit_repeat", "rows", "classes", "bn", "only",
              "per_param", "layers", "heads", "width"):
        cmd += [f"--{k.replace('_', '-')}", str(args[k])]
    cmd += ["--units"] if args.get("units") else []
    cmd += ["--memory"] if a.memory else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(HERE)]), "OMP_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
    if p.returncode:
        sys.exit(f"error: {job} in {tree} failed:\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def describe(a) -> str:
    n = sum(p.numel() for p in make_model(a).parameters())
    what = {"mlp": f"digits MLP hidden {a.hidden}", "cnn": "digits CNN",
            "resnet20": f"CIFAR ResNet-20, {a.examples} train examples, BN {a.bn} statistics, batch {a.batch}",
            "resnet18": f"torchvision ResNet-18, {a.classes} classes, {a.examples} 32x32 train examples, BN {a.bn} "
                        f"statistics, batch {a.batch}",
            "wide": f"MLP 64-1400-1400-{a.classes}, {a.examples} train examples, batch {a.batch}",
            "lm": f"nanoGPT-shaped LM {a.layers}L/{a.heads}H/{a.width}, context {a.context}, {a.examples} sequences "
                  f"per set, batch {a.batch}"}[a.model]
    return f"{what} ({n:,} params)"


def speed(a, trees: dict[str, Path], tmp: Path) -> None:
    for name, tree in trees.items():
        launch(a, tree, "record", tmp, f"record-{name}", run=tmp / f"run-{name}")
    rows: dict[str, list[dict]] = {n: [] for n in trees}
    papers, plains = [], []
    for r in range(a.repeat):
        for name, tree in trees.items():
            rows[name].append(launch(a, tree, "compute", tmp, f"c-{name}-{r}", run=tmp / f"run-{name}", units=True))
            x = rows[name][-1]
            print(f"round {r} {name}: {x['seconds']:.2f}s, {x['grad_evals']} evals, unit {x['unit'] * 1e3:.1f} ms "
                  f"(big {x['unit_big'] * 1e3:.1f}), peak RSS {x['peak_rss_mib']:.0f} MiB", flush=True)
        if a.no_paper:
            continue
        plains.append(launch(a, trees["new"], "compute", tmp, f"plain-{r}", run=tmp / "run-new", max_splits=2)
                      ["seconds"])
        papers.append(launch(a, trees["new"], "paper", tmp, f"paper-{r}", run=tmp / "run-new")["seconds"])
        print(f"round {r}: paper's loop {papers[-1]:.2f}s, replay at plain Simpson {plains[-1]:.2f}s", flush=True)
    med = statistics.median
    print(f"\n{describe(a)}, device {a.device}, {a.threads} thread(s), tol {a.tol}, {a.repeat} rounds (medians)")
    print("| tree | losses | steps | s/step | evals/step | points per step (min / median / p90 / max) | overhead "
          f"(engine batches) | overhead (batch {a.big_batch}) | peak RSS MiB | grounded |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, xs in rows.items():
        steps = xs[0]["steps"]
        f = med(x["seconds"] / (x["grad_evals"] * x["unit"]) for x in xs)
        fb = med(x["seconds"] / (x["grad_evals"] * x["unit_big"]) for x in xs)
        print(f"| {name} | {xs[0]['losses']} | {steps} | {med(x['seconds'] for x in xs) / steps:.3f} | "
              f"{xs[0]['grad_evals'] / steps:.2f} | {' / '.join(map(str, xs[0]['points']))} | {f:.3f} | {fb:.3f} | "
              f"{med(x['peak_rss_mib'] for x in xs):.0f} | {xs[0]['grounded']:.1%} |")
    if a.no_paper:
        return
    ours = med(x["seconds"] for x in rows["new"])
    print(f"(b) speed-up over the paper's loop: {med(papers) / med(plains):.2f}x at its own rule (plain Simpson), "
          f"{med(papers) / ours:.2f}x refining to tol {a.tol}")


def class_cost(a, trees: dict[str, Path], tmp: Path) -> None:
    """Seconds of compute with train alone and with train and its class losses, per tree, interleaved."""
    for name, tree in trees.items():
        launch(a, tree, "record", tmp, f"record-{name}", run=tmp / f"run-{name}")
    got: dict[tuple[str, str], list[dict]] = {}
    for r in range(a.repeat):
        for name, tree in trees.items():
            for only in ("train", "classes"):
                x = launch(a, tree, "compute", tmp, f"k-{name}-{only}-{r}", run=tmp / f"run-{name}", only=only)
                got.setdefault((name, only), []).append(x)
                print(f"round {r} {name} {only}: {x['seconds']:.2f}s, {x['grad_evals']} evals, "
                      f"peak RSS {x['peak_rss_mib']:.0f} MiB", flush=True)
    med = statistics.median
    print(f"\n{describe(a)}, device {a.device}, {a.threads} thread(s), tol {a.tol}, {a.repeat} rounds (medians)")
    print("| tree | losses | evals | train alone s | with classes s | ratio | peak RSS MiB (alone / classes) |")
    print("|---|---|---|---|---|---|---|")
    for name in trees:
        alone, cls = got[(name, "train")], got[(name, "classes")]
        ratio = med(c["seconds"] / t["seconds"] for t, c in zip(alone, cls, strict=True))
        print(f"| {name} | {cls[0]['losses']} | {alone[0]['grad_evals']} / {cls[0]['grad_evals']} | "
              f"{med(x['seconds'] for x in alone):.2f} | {med(x['seconds'] for x in cls):.2f} | {ratio:.2f} | "
              f"{med(x['peak_rss_mib'] for x in alone):.0f} / {med(x['peak_rss_mib'] for x in cls):.0f} |")


def batch_statistics(model: nn.Module) -> nn.Module:
    """The model as replay evaluates it with batchnorm='batch': eval mode, batch-norm on each batch's statistics."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
    return model


def bn_cells(a) -> None:
    """Batch-norm batch statistics: what the per-class gradients of one batch cost, measured side by side. The
    classes of a batch are coupled through its statistics, so each needs its own backward through the batch;
    the question is only whether torch can batch those backward passes (is_grads_batched, vmap over the
    cotangents) cheaper than one after another."""
    torch.set_num_threads(a.threads)
    task = make_task(a)
    model = batch_statistics(task.model)
    x, y = (v[:a.batch] for v in task.data["train"])
    params = list(model.parameters())
    classes = torch.unique(y)
    masks = torch.stack([(y == c).to(x.dtype) for c in classes])  # [C, B]

    def per_example():
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def forward_only():
        with torch.no_grad():
            per_example()

    def one_backward():
        torch.autograd.grad(per_example().sum(), params)

    def per_class():  # today's cells: one forward, one backward per class present
        losses = per_example()
        for k in range(len(classes)):
            torch.autograd.grad((losses * masks[k]).sum(), params, retain_graph=k + 1 < len(classes))

    def per_class_activations():  # no weight gradients (biases only): about what ghost products would need
        losses = per_example()
        small = [q for q in params if q.dim() == 1]
        for k in range(len(classes)):
            torch.autograd.grad((losses * masks[k]).sum(), small, retain_graph=k + 1 < len(classes))

    def batched():  # all classes in one vmapped backward
        torch.autograd.grad(per_example(), params, grad_outputs=masks, is_grads_batched=True)

    print(f"{describe(a)}: one batch of {len(y)} examples, {len(classes)} classes, {a.threads} thread(s), "
          f"medians of {a.repeat}")
    base = median_seconds(one_backward, a.repeat, a.device)
    for name, fn in (("forward", forward_only), ("forward + one backward", one_backward),
                     ("forward + a backward per class (today)", per_class),
                     ("forward + a backward per class, no weight gradients (biases only)", per_class_activations),
                     ("forward + one vmapped backward of all classes (is_grads_batched)", batched)):
        try:
            t = median_seconds(fn, a.repeat, a.device)
            print(f"| {name} | {t * 1e3:.0f} ms | {t / base:.2f}x |", flush=True)
        except (RuntimeError, NotImplementedError) as e:
            print(f"| {name} | failed: {str(e).splitlines()[0][:100]} | |", flush=True)


def memory(a, trees: dict[str, Path], tmp: Path) -> None:
    for name, tree in trees.items():
        launch(a, tree, "record", tmp, f"record-{name}", run=tmp / f"run-{name}")
    print(f"{describe(a)}, device {a.device}, losses train + val + G random groups of train, per_param default")
    print("| tree | G | losses | peak RSS MiB | above setup MiB | ratio to G=0 |")
    print("|---|---|---|---|---|---|")
    for name, tree in trees.items():
        base = None
        for g in a.group_counts:
            x = launch(a, tree, "compute", tmp, f"m-{name}-{g}", run=tmp / f"run-{name}", groups=g)
            above = x["peak_rss_mib"] - x["setup_rss_mib"]
            base = base if base is not None else x["peak_rss_mib"]
            cuda = f" (CUDA {x['peak_cuda_mib']:.0f} MiB)" if "peak_cuda_mib" in x else ""
            print(f"| {name} | {g} | {x['losses']} | {x['peak_rss_mib']:.0f}{cuda} | {above:.0f} | "
                  f"{x['peak_rss_mib'] / base:.2f} |", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options (with each workload's defaults filled in); tools/bench_richardson.py shares them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["mlp", "cnn", "resnet20", "lm", "wide", "resnet18"], default="mlp")
    ap.add_argument("--classes", type=int, default=0, help="wide / resnet18: classes (default 100 / 1000)")
    ap.add_argument("--bn", choices=["batch", "running"], default="", help="resnet: batch-norm statistics "
                    "(default batch for resnet20, running for resnet18)")
    ap.add_argument("--class-cost", action="store_true", help="train alone against train and its class losses")
    ap.add_argument("--bn-cells", action="store_true", help="batch statistics: the per-class backward passes of "
                    "one batch, one after another against one vmapped pass")
    ap.add_argument("--only", default="", help=argparse.SUPPRESS)
    ap.add_argument("--no-paper", action="store_true", help="skip the paper's loop (long runs)")
    ap.add_argument("--layers", type=int, default=6, help="lm: layers")
    ap.add_argument("--heads", type=int, default=6, help="lm: heads")
    ap.add_argument("--width", type=int, default=384, help="lm: width")
    ap.add_argument("--per-param", default="", choices=["", "all", "datasets"],
                    help="which losses report per-parameter numbers (all: like-for-like with the paper's loop)")
    ap.add_argument("--hidden", type=int, default=256, help="digits MLP width")
    ap.add_argument("--epochs", type=int, default=1, help="digits: epochs recorded")
    ap.add_argument("--examples", type=int, default=0, help="resnet20/lm: train examples (default 10000 / 64)")
    ap.add_argument("--steps", type=int, default=6, help="resnet20/lm: optimizer steps recorded")
    ap.add_argument("--context", type=int, default=256, help="lm: sequence length")
    ap.add_argument("--batch", type=int, default=0, help="the task's evaluation batch size")
    ap.add_argument("--big-batch", type=int, default=0, help="the large batch of the second overhead factor")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-splits", type=int, default=32)
    ap.add_argument("--unit-repeat", type=int, default=5)
    ap.add_argument("--against", type=Path, help="an older checkout to measure beside this one")
    ap.add_argument("--memory", action="store_true", help="peak RSS against the number of group losses")
    ap.add_argument("--group-counts", type=int, nargs="+", default=[0, 100, 1000])
    ap.add_argument("--per-example", action="store_true", help="the cost of per-example val")
    ap.add_argument("--per-token", action="store_true", help="the cost of per-token val (the LM)")
    ap.add_argument("--rows", default="", help=argparse.SUPPRESS)
    ap.add_argument("--nproc", type=int, default=0, help="torchrun scaling with this many processes")
    ap.add_argument("--data-parallel", action="store_true")
    ap.add_argument("--groups", type=int, default=0, help="train's losses: G random groups instead of its classes "
                    "(with --per-param all: per-parameter group losses)")
    ap.add_argument("--run", default="", help=argparse.SUPPRESS)
    ap.add_argument("--units", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.examples = a.examples or {"resnet20": 10_000, "lm": 64, "wide": 2000, "resnet18": 1000}.get(a.model, 0)
    a.batch = a.batch or {"resnet20": 500, "lm": 16, "wide": 500, "resnet18": 250}.get(a.model, 0)
    a.classes = a.classes or {"wide": 100, "resnet18": 1000}.get(a.model, 10)
    a.bn = a.bn or ("running" if a.model == "resnet18" else "batch")
    a.big_batch = a.big_batch or {"resnet20": 2000, "lm": 64}.get(a.model, 4096)
    return a


def main() -> None:
    a = parse_args()
    global ARGS
    ARGS = a
    if a.child:
        return child(a)
    if a.worker:
        return worker(a)
    if a.nproc:
        return scaling(a)
    if a.bn_cells:
        return bn_cells(a)
    tmp = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    trees = {"new": HERE.parent} | ({"old": a.against.resolve()} if a.against else {})
    try:
        if a.per_example or a.per_token:
            a.rows = "token" if a.per_token else "example"
            rows_cost(a, trees, tmp)
        else:
            (class_cost if a.class_cost else memory if a.memory else speed)(a, trees, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- (c) torchrun scaling ----------------------------------------------------------------------

ARGS = None


def task() -> replay.Task:
    """The task a run recorded by this benchmark names (registered in the processes that replay it)."""
    return make_task(ARGS)


def worker(a) -> None:
    """One torchrun process: time compute from a barrier after start-up to a barrier at the end."""
    import torch.distributed as dist

    run, out, timing = a.worker
    dist.init_process_group("nccl" if a.device.startswith("cuda") else "gloo")
    t = make_task(a)
    dist.barrier()
    t0 = time.perf_counter()
    fr = replay.compute(run, **losses_of(a), task=t, device=a.device, out=out, data_parallel=a.data_parallel)
    dist.barrier()
    if dist.get_rank() == 0:
        Path(timing).write_text(json.dumps({"seconds": time.perf_counter() - t0, "grad_evals": fr.meta["grad_evals"]}))
    dist.destroy_process_group()


def scaling(a) -> None:
    """torchrun with 1 and with N processes, interleaved rounds, medians."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_replay_"))
    try:
        record(a, tmp / "run")
        threads = max(1, (os.cpu_count() or 1) // a.nproc)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(HERE)}
        n_steps = len(replay.open_run(tmp / "run").steps) - 1

        def go(n: int, r: int) -> dict:
            out, timing = tmp / f"lca-n{n}-r{r}", tmp / f"time-n{n}-r{r}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   __file__, "--worker", str(tmp / "run"), str(out), str(timing), "--model", a.model,
                   "--hidden", str(a.hidden), "--device", a.device] + (["--data-parallel"] if a.data_parallel else [])
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            return json.loads(timing.read_text())

        one, many = [], []
        for r in range(a.repeat):
            one.append(go(1, r))
            many.append(go(a.nproc, r))
            print(f"round {r}: 1 process {one[-1]['seconds']:.2f}s  {a.nproc} processes {many[-1]['seconds']:.2f}s")
        t1 = statistics.median(x["seconds"] for x in one)
        tn = statistics.median(x["seconds"] for x in many)
        mode = "data (a shard of every step's data each)" if a.data_parallel else "steps (blocks dealt in turn)"
        print(f"\ntorchrun, mode {mode}, device {a.device}, {threads} thread(s) per process, {n_steps} steps")
        print(f"1 process: {n_steps / t1:.1f} steps/s; {a.nproc} processes: {n_steps / tn:.1f} steps/s")
        print(f"(c) scaling efficiency: {t1 / (a.nproc * tn):.3f}  (target >= 0.85)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
