"""compute(): replay a run and allocate each step's loss change to every parameter.

Per step t → t' (consecutive recorded states), for all losses at once (L losses, P params):

    g0 [L,P]  gradient at θ_t          reused: it was the previous step's end
    g1 [L,P]  gradient at θ_t'         1 evaluation
    O  [L,P]  gradient at the midpoint 1 evaluation   → plain Simpson, 2 evaluations per step
    while some loss is not grounded and n < max_splits: n *= 2, evaluate n/2 new points
    lca [L,P] = Δθ ⊙ h/3·(E + 4·O + 2·M)   (float64)

Only per-loss and per-tensor sums leave the device each step (one sync); per-parameter
totals stay on the device until the end. Frames are flushed as parquet parts with a
checkpoint of the totals, so an interrupted compute resumes from its last flush.
Under torchrun the steps (or each step's data) are shared among processes: see `parallel`.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from replay.engine import parallel
from replay.engine.evaluate import LossEvaluator
from replay.engine.parallel import Layout
from replay.engine.simpson import is_grounded, refine_points, simpson_integral
from replay.errors import ReplayError, RunError, TaskError
from replay.frames import Frames, FrameWriter, load, write_meta
from replay.store import Run, open_run
from replay.store.manifest import write_atomic
from replay.task import Task, load_task


def compute(
    run: str | Path | Run,
    losses: list[str] | None = None,
    per_class: list[str] | None = None,
    *,
    task: str | Task | None = None,
    device: str = "cpu",
    tol: float = 1e-4,
    rtol: float = 0.0,
    max_splits: int = 32,
    first_order: bool = False,
    steps: tuple[int | None, int | None] | None = None,
    out: str | Path | None = None,
    dense: bool = False,
    flush_every: int = 100,
    progress: bool = False,
    data_parallel: bool = False,
) -> Frames:
    """Compute LCA of `losses` (data set names; default: all of the task's) over the run.

    A step is grounded when |ΔL − ΣLCA| ≤ tol + rtol·|ΔL|; steps that are not are refined
    by composite Simpson up to `max_splits` sub-intervals, and flagged if still not grounded.
    Writes frames to `out` (default RUN/lca) and returns them (see `replay.load`).

    Under torchrun (or in an initialized process group) each process computes a contiguous
    block of the steps; with `data_parallel`, every process computes every step on its shard
    of the data instead. Either way the frames equal a single process's, up to the order of
    float summation.
    """
    run = run if isinstance(run, Run) else open_run(run)
    if max_splits < 2 or max_splits & (max_splits - 1):
        raise ValueError(f"max_splits: expected a power of two ≥ 2, got {max_splits}")
    if tol < 0 or rtol < 0:
        raise ValueError(f"tol, rtol: expected ≥ 0, got {tol}, {rtol}")
    spec = task if task is not None else run.task
    if spec is None:
        raise TaskError(f"{run.path}: the run names no task; pass task='module:function' (--task)")
    t = load_task(spec, run.path)
    losses = list(losses) if losses else list(t.data)
    per_class = list(per_class or [])
    for name in losses + per_class:
        if name not in t.data:
            raise TaskError(f"unknown loss {name!r}: the task's data sets are {sorted(t.data)}")
    datasets = losses + [d for d in per_class if d not in losses]
    _check_model(t, run)
    a, b = steps or (None, None)
    todo = [s for s in run.steps[:-1] if (a is None or s >= a) and (b is None or s < b)]
    if not todo:
        raise RunError(f"{run.path}: no step to compute in {a}:{b} (recorded states {run.steps[0]}..{run.steps[-1]})")
    if t.batchnorm == "running" and run.manifest.buffers:
        t.model.load_state_dict(run.state(run.steps[-1], buffers=True), strict=False)
    layout, dev = parallel.join(device, data_parallel)
    try:
        ev = LossEvaluator(t, run.param_names, datasets, per_class, dev, layout)
        out = Path(out) if out is not None else run.path / "lca"
        config = {"run": str(run.path.resolve()), "task": spec if isinstance(spec, str) else "<Task object>",
                  "losses": ev.loss_names, "tol": tol, "rtol": rtol, "max_splits": max_splits,
                  "first_order": first_order, "steps": [todo[0], todo[-1]], "batchnorm": t.batchnorm,
                  "batch_size": t.batch_size, "dense": dense}
        state = _Checkpoint(out, config, layout)
        parallel.barrier(layout)  # every rank has read the dir before any writes to it
        if state.complete:
            return load(out)
        return _Replay(run, ev, parallel.segments(todo, layout), out, state, layout, tol, rtol, max_splits,
                       first_order, dense, flush_every, progress).execute()
    finally:
        parallel.leave(layout)


def _check_model(task: Task, run: Run) -> None:
    have = {n: p for n, p in task.model.named_parameters() if p.requires_grad}
    for s in run.manifest.params:
        p = have.get(s.name)
        if p is None:
            raise TaskError(f"the task's model has no parameter {s.name!r} recorded in {run.path}; "
                            f"is --task the model that was trained?")
        if tuple(p.shape) != s.shape:
            raise TaskError(f"parameter {s.name!r}: the task's model has shape {tuple(p.shape)}, "
                            f"the run recorded {s.shape}; is --task the model that was trained?")


class _Checkpoint:
    """progress{tag}.json + totals{tag}-{next}.safetensors in the lca dir: what a resume needs.

    One set per writing rank (tag '-r001' in steps mode, '' otherwise); a resume must use
    the layout that wrote them, since the blocks of steps depend on the number of processes.
    """

    def __init__(self, out: Path, config: dict, layout: Layout):
        self.out, self.config, self.layout, self.tag = out, config, layout, layout.tag
        self.parts: list[str] = []
        self.next_step: int | None = None
        self.seq = self.evals = 0
        self.complete = False
        self.totals: dict[str, torch.Tensor] | None = None
        meta, prog = out / "meta.json", out / f"progress{self.tag}.json"
        found = sorted(out.glob("progress*.json")) if out.is_dir() else []
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("config") != config:
                raise ReplayError(f"{out}: holds LCA computed with other settings; choose another --out or delete it")
            self.complete = bool(m.get("complete"))
        elif out.exists() and any(out.iterdir()) and not found:
            raise ReplayError(f"{out}: exists and is not an lca dir; choose another --out")
        if self.complete:
            return
        self._check_layout(found)
        if prog.is_file():
            p = json.loads(prog.read_text())
            if p["config"] != config:
                raise ReplayError(f"{out}: holds an unfinished compute with other settings; "
                                  f"choose another --out or delete it")
            self.parts, self.next_step, self.seq, self.evals = p["parts"], p["next_step"], p["seq"], p["evals"]
            if layout.writes:
                self.totals = load_file(out / p["totals"])
                keep = set(self.parts)
                for f in (self.own_files("steps/part", ".parquet") + self.own_files("tensors/part", ".parquet")
                          + self.own_files("dense/part", ".safetensors")):
                    if str(f.relative_to(out)) not in keep:
                        f.unlink()  # written after the last checkpoint: will be recomputed

    def _check_layout(self, found: list[Path]) -> None:
        expected = {f"progress{t}.json" for t in self.layout.tags()}
        blocks = self.layout.world if self.layout.shards_steps else None
        stray = [f.name for f in found if f.name not in expected]
        if not stray and all(json.loads(f.read_text()).get("blocks") == blocks for f in found):
            return
        was = ("torchrun with one block of steps per process" if any("-r" in f.name for f in found)
               else "one process (or --data-parallel)")
        raise ReplayError(f"{self.out}: holds an unfinished compute started by {was} "
                          f"({', '.join(f.name for f in found)}); resume it with the same processes and mode, "
                          f"or delete {self.out}")

    def own_files(self, stem: str, suffix: str) -> list[Path]:
        """This rank's files `{stem}{tag}-NNN{suffix}` (the '' tag must not match '-r001' files)."""
        d, name = (self.out / stem).parent, Path(stem).name
        pat = re.compile(rf"{re.escape(name + self.tag)}-\d+{re.escape(suffix)}")
        return [f for f in d.glob(f"{name}*{suffix}") if pat.fullmatch(f.name)] if d.is_dir() else []

    def save(self, next_step: int, totals: dict[str, torch.Tensor], evals: int) -> None:
        name = f"totals{self.tag}-{next_step:010d}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in totals.items()}, self.out / name)
        prog = {"config": self.config, "parts": self.parts, "next_step": next_step, "seq": self.seq, "totals": name,
                "evals": evals, "blocks": self.layout.world if self.layout.shards_steps else None}
        write_atomic(self.out / f"progress{self.tag}.json", json.dumps(prog).encode())
        for old in self.own_files("totals", ".safetensors"):
            if old.name != name:
                old.unlink()

    def remove(self) -> None:
        """The compute is complete (meta.json written): the resume state goes."""
        for f in self.own_files("totals", ".safetensors"):
            f.unlink()
        (self.out / f"progress{self.tag}.json").unlink(missing_ok=True)


class _Replay:
    """The step loop of one process over its segments of steps (all steps, or its blocks under torchrun)."""

    def __init__(self, run: Run, ev: LossEvaluator, segments: list[list[int]], out: Path, ckpt: _Checkpoint,
                 layout: Layout,
                 tol: float, rtol: float, max_splits: int, first_order: bool, dense: bool, flush_every: int,
                 progress: bool):
        self.run, self.ev, self.out, self.ckpt, self.layout = run, ev, out, ckpt, layout
        self.tol, self.rtol, self.max_splits, self.first_order = tol, rtol, max_splits, first_order
        self.dense, self.flush_every, self.progress = dense, flush_every, progress and layout.rank == 0
        self.dev = ev.device
        left = [[s for s in seg if ckpt.next_step is None or s >= ckpt.next_step] for seg in segments]
        self.segments = [seg for seg in left if seg]
        self.todo = [s for seg in self.segments for s in seg]
        names = [s.name for s in run.manifest.params]
        self.sizes = sizes = [s.numel for s in run.manifest.params]
        self.writer = FrameWriter(out, ev.loss_names, names, sizes, prefix=f"part{layout.tag}")
        L, P = len(ev.loss_names), sum(sizes)
        self.totals = ckpt.totals or {"lca": torch.zeros(L, P, dtype=torch.float64),
                                      "helped": torch.zeros(L, P, dtype=torch.int32),
                                      "n_steps": torch.zeros(1, dtype=torch.int64)}
        self.totals = {k: v.to(self.dev) for k, v in self.totals.items()}
        self.dense_buf: dict[str, torch.Tensor] = {}
        # [L,P] work buffers in the model's dtype (totals are float64): the two endpoint gradients
        # (swapped each step), Simpson's odd and interior-even sums, a refinement scratch, the allocation
        self.buf = {k: torch.empty(L, P, dtype=ev.grad_dtype, device=self.dev)
                    for k in ("g_a", "g_b", "odd", "mid", "tmp", "lca")}
        self.evals = ckpt.evals  # gradient evaluations, including those before a resume

    def _states(self, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Flat float64 states [P] on the device, in order: steps first..last and the state after last.

        CUDA: decoded one step ahead on a background thread into pinned memory, copied
        non-blocking, so reading overlaps the GPU's work. CPU: decoded inline — there is
        nothing to overlap, and torch ops on a second thread start a second OpenMP team that
        competes with the gradients (measured: 2x slower replay on 2 cores).
        """
        flat_states = ((t, torch.cat([v.reshape(-1).double() for v in st.values()]))
                       for t, st in self.run.states(first, last + 1 + self.run.manifest.every))
        if self.dev.type != "cuda":
            yield from flat_states
            return
        q: queue.Queue = queue.Queue(maxsize=2)

        def produce():
            try:
                for t, flat in flat_states:
                    q.put((t, flat.pin_memory()))
            except BaseException as e:  # surfaced in the consumer
                q.put(e)
            q.put(None)

        threading.Thread(target=produce, daemon=True, name="replay-prefetch").start()
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            t, flat = item
            yield t, flat.to(self.dev, non_blocking=True)

    def _eval(self, theta: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.evals += 1
        return self.ev(theta, out)

    def _allocate(self, th0: torch.Tensor, d: torch.Tensor, v0: torch.Tensor, g0: torch.Tensor, v1: torch.Tensor,
                  g1: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Simpson (refined until grounded) → (lca [L,P], splits, grounded [L]).

        The refinement test needs only ΣLCA = (E·Δθ + 4·O·Δθ + 2·M·Δθ)/(3n): projections
        [L] of each gradient on Δθ, so the [L,P] allocation is formed once, at the end, in a
        preallocated buffer (like every [L,P] here: fresh ones cost page faults).
        """
        dl = v1 - v0
        lca = self.buf["lca"]
        d = d.to(lca.dtype)  # Δθ is exact in float64; the products run in the gradients' dtype
        if self.first_order:
            torch.mul(g0, d, out=lca)
            return lca, 1, is_grounded(dl - lca.sum(1, dtype=torch.float64), dl, self.tol, self.rtol)
        n = 2
        odd, mid, tmp = self.buf["odd"], self.buf["mid"].zero_(), self.buf["tmp"]
        self._eval(th0 + 0.5 * d, odd)
        proj = lambda g: (g @ d).double()  # noqa: E731  [L]: a gradient's projection on Δθ
        ends_d, odd_d, mid_d = proj(g0) + proj(g1), proj(odd), torch.zeros_like(dl)
        while True:
            ok = is_grounded(dl - simpson_integral(ends_d, odd_d, mid_d, n), dl, self.tol, self.rtol)
            # host sync: the refinement decision (rank 0's in data mode, where every rank must agree)
            if n >= self.max_splits or parallel.agree(bool(ok.all()), self.layout, self.dev):
                torch.add(g0, g1, out=lca).add_(odd, alpha=4.0).add_(mid, alpha=2.0)  # E + 4·O + 2·M
                return lca.mul_(d).div_(3.0 * n), n, ok
            mid += odd
            mid_d += odd_d
            for j, s in enumerate(refine_points(n)):
                self._eval(th0 + s * d, odd if j == 0 else tmp)
                if j:
                    odd += tmp
            odd_d = proj(odd)
            n *= 2

    def execute(self) -> Frames:
        self._done, self._started, self._last_print = 0, time.perf_counter(), 0.0
        for seg in self.segments:
            self._segment(seg)
        if self.progress and self.todo:
            sys.stderr.write("\n")
        return self._finish()

    def _segment(self, seg: list[int]) -> None:
        """Consecutive steps: the first state is evaluated, then each step's end is the next one's start."""
        it = self._states(seg[0], seg[-1])
        t0, th0 = next(it)
        v0, g0 = self._eval(th0, self.buf["g_a"])
        for t1, th1 in it:
            d = th1 - th0
            v1, g1 = self._eval(th1, self.buf["g_b" if g0 is self.buf["g_a"] else "g_a"])
            lca, splits, ok = self._allocate(th0, d, v0, g0, v1, g1)
            last = t0 == self.todo[-1]
            if self.layout.writes:  # data mode: ranks other than 0 only help with the gradients
                self._record(t0, t1, v0, v1, lca, splits, ok)
                if len(self.writer) >= self.flush_every or last:
                    self._flush(t1)
            self._done += 1
            if self.progress and (time.perf_counter() - self._last_print > 0.5 or last):
                self._last_print = time.perf_counter()
                _print_progress(self._done, len(self.todo), self._last_print - self._started)
            t0, th0, v0, g0 = t1, th1, v1, g1

    def _record(self, t0: int, t1: int, v0: torch.Tensor, v1: torch.Tensor, lca: torch.Tensor, splits: int,
                ok: torch.Tensor) -> None:
        """Add the step to the totals and its per-loss and per-tensor sums to the frames."""
        helped = lca < 0
        tl = torch.stack([c.sum(1, dtype=torch.float64) for c in lca.split(self.sizes, 1)], 1)  # [L,T]
        th = torch.stack([c.sum(1) for c in helped.split(self.sizes, 1)], 1)
        self.totals["lca"] += lca
        self.totals["helped"] += helped
        self.totals["n_steps"] += 1
        if self.dense:
            self.dense_buf[str(t0)] = lca.to("cpu", torch.float64, copy=True)
        host = [x.cpu().numpy() for x in (v0, v1, tl.sum(1), ok, tl, th)]  # one sync per step
        self.writer.add(t0, t1, host[0], host[1], host[2], splits, host[3], host[4], host[5])

    def _flush(self, next_step: int) -> None:
        ck = self.ckpt
        ck.parts += self.writer.flush(ck.seq)
        if self.dense and self.dense_buf:
            (self.out / "dense").mkdir(exist_ok=True)
            rel = f"dense/part{self.layout.tag}-{ck.seq:06d}.safetensors"
            save_file(self.dense_buf, self.out / rel, metadata={"losses": json.dumps(self.ev.loss_names)})
            ck.parts.append(rel)
            self.dense_buf = {}
        ck.seq += 1
        ck.save(next_step, self.totals, self.evals)

    def _finish(self) -> Frames:
        """Totals (summed onto rank 0 in steps mode) → params and meta.json; then the resume state goes."""
        lay = self.layout
        totals = {**self.totals, "evals": torch.tensor([self.evals], dtype=torch.int64, device=self.dev)}
        parallel.reduce_to_first(totals, lay)
        if lay.rank == 0:
            tot = {k: v.cpu() for k, v in totals.items()}
            n_steps = int(tot["n_steps"].item())
            self.writer.write_params(tot["lca"].numpy(), tot["helped"].numpy(), n_steps)
            write_meta(self.out, {"complete": True, "config": self.ckpt.config, "losses": self.ev.loss_names,
                                  "loss_sizes": self.ev.loss_sizes, "n_steps": n_steps,
                                  "tensors": self.writer.tensor_names, "run": str(self.run.path.resolve()),
                                  "grad_evals": int(tot["evals"].item()), "processes": lay.world,
                                  "parallel": lay.mode})
        parallel.barrier(lay)  # meta.json is written: every rank may load, and drop its resume state
        if lay.writes:
            self.ckpt.remove()
        return load(self.out)


def _print_progress(done: int, total: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    sys.stderr.write(f"\rreplay compute: {done}/{total} steps  {rate:.2f} steps/s  ETA {eta:,.0f}s   ")
    sys.stderr.flush()
