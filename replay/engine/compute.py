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

import errno
import json
import math
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from replay.engine import parallel
from replay.engine.checkpoint import Checkpoint
from replay.engine.evaluate import LossEvaluator
from replay.engine.fingerprint import task_fingerprint
from replay.engine.model_check import check_model
from replay.engine.parallel import Layout
from replay.engine.per_example import PerExample
from replay.engine.simpson import allocation, is_grounded, refine_points, simpson_integral
from replay.errors import ReplayError, ReplayWarning, RunError, TaskError
from replay.frames import Frames, FrameWriter, load, write_meta
from replay.store import Run, open_run
from replay.store.atomic import write_atomic
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
    per_example: list[str] | None = None,
) -> Frames:
    """Compute LCA of `losses` (data set names; default: all of the task's) over the run.

    A step is grounded when |ΔL − ΣLCA| ≤ tol + rtol·|ΔL|; steps that are not are refined
    by composite Simpson up to `max_splits` sub-intervals, and flagged if still not grounded.
    Writes frames to `out` (default RUN/lca) and returns them (see `replay.load`).

    Under torchrun (or in an initialized process group) each process computes blocks of
    consecutive steps; with `data_parallel`, every process computes every step on its shard
    of the data and its slice of the parameters instead. Either way the frames equal a
    single process's, up to the order of float summation (see `engine.parallel`).
    """
    run = run if isinstance(run, Run) else open_run(run)
    _check_settings(device, tol, rtol, max_splits)
    if len(run.steps) < 2:
        raise RunError(f"{run.path}: nothing to compute: {len(run.steps)} state(s) recorded (a step needs two); "
                       f"run `replay verify {run.path}`")
    spec = task if task is not None else run.task
    if spec is None:
        raise TaskError(f"{run.path}: the run names no task; pass task='module:function' (--task)")
    t = load_task(spec, run.path, named=task is not None)
    losses = list(losses) if losses else list(t.data)
    per_class = list(per_class or [])
    for name in losses + per_class:
        if name not in t.data:
            raise TaskError(f"unknown loss {name!r}: the task's data sets are {sorted(t.data)}")
    datasets = losses + [d for d in per_class if d not in losses]
    per_example = list(per_example or [])
    for name in per_example:
        if name not in t.data:
            raise TaskError(f"--per-example {name!r}: the task's data sets are {sorted(t.data)}")
    if per_example and data_parallel:
        raise ReplayError("--per-example with --data-parallel is not supported: use steps mode (the default)")
    check_model(t, run)
    a, b = steps or (None, None)
    todo = [s for s in run.steps[:-1] if (a is None or s >= a) and (b is None or s < b)]
    if not todo:
        raise RunError(f"{run.path}: no step to compute in {a}:{b} (recorded states {run.steps[0]}..{run.steps[-1]})")
    notes = _notes(run, t, todo)
    if t.batchnorm == "running" and run.manifest.buffers:  # the last recorded statistics, for every step
        t.model.load_state_dict(run.state(run.steps[-1], buffers=True), strict=False)
    layout, dev = parallel.join(device, data_parallel)
    try:
        ev = LossEvaluator(t, run.param_names, datasets, per_class, dev, layout)
        out = Path(out) if out is not None else run.path / "lca"
        config = {"run": str(run.path.resolve()), "run_id": run.manifest.run_id,
                  "task": spec if isinstance(spec, str) else "<Task object>",
                  "task_fingerprint": task_fingerprint(t, datasets, run.param_names),
                  "losses": ev.loss_names, "tol": tol, "rtol": rtol, "max_splits": max_splits,
                  "first_order": first_order, "steps": [todo[0], todo[-1]], "batchnorm": t.batchnorm,
                  "batch_size": t.batch_size, "dense": dense, "per_example": per_example}
        try:
            state = Checkpoint(out, config, layout)
            parallel.barrier(layout)  # every rank has read the dir before any writes to it
            if state.complete:
                return load(out)
            return _Replay(run, ev, parallel.segments(todo, layout), out, state, layout, tol, rtol, max_splits,
                           first_order, dense, flush_every, progress, notes, per_example).execute()
        except OSError as e:
            raise _write_failed(out, e) from None
    finally:
        parallel.leave(layout)


def _check_settings(device: str, tol: float, rtol: float, max_splits: int) -> None:
    if not isinstance(max_splits, int) or max_splits < 2 or max_splits & (max_splits - 1):
        raise ValueError(f"max_splits: expected a power of two ≥ 2, got {max_splits}")
    if not (math.isfinite(tol) and math.isfinite(rtol) and tol >= 0 and rtol >= 0):
        raise ValueError(f"tol, rtol: expected finite numbers ≥ 0, got {tol}, {rtol}")
    parallel.parse_device(device)


def _notes(run: Run, t: Task, todo: list[int]) -> dict:
    """What the frames' meta must say about how to read them (and the user hears once, as a warning)."""
    notes: dict = {"every": run.manifest.every, "aliases": run.aliases}
    if run.manifest.every > 1:
        notes["every_note"] = (f"states were recorded every {run.manifest.every} updates: each step's LCA is that of "
                               f"the straight chord between recorded states, not the sum of the updates' LCAs")
    if t.batchnorm == "running":
        if run.manifest.buffers:
            last = run.steps[-1]
            notes["batchnorm_stats"] = f"recorded buffers of state {last} (the last), for every step"
        else:
            notes["batchnorm_stats"] = "the task model's own buffers: the run recorded none"
            warnings.warn(f"{run.path}: batchnorm='running' but the run recorded no buffers, so the running "
                          f"statistics are the task model's own; record with Recorder(buffers=True) or set them "
                          f"in the task", ReplayWarning, stacklevel=3)
    if run.missing is not None:
        first, last = run.missing
        notes["missing_states"] = [first, last]
        warnings.warn(f"{run.path}: states {first}..{last} are missing (a chunk is lost; see `replay verify`): "
                      f"computing steps {todo[0]}..{todo[-1]} only", ReplayWarning, stacklevel=3)
    return notes


def _write_failed(out: Path, e: OSError) -> ReplayError:
    why = {errno.ENOSPC: "no space left on device: free space", errno.EDQUOT: "disk quota exceeded: free space",
           errno.EROFS: "read-only file system: pass another --out", errno.EACCES: "permission denied: pass "
           "another --out", errno.ENOTDIR: "a path component is a file: pass a directory as --out"}.get(
        e.errno, f"{e.strerror or e}")
    where = e.filename or out
    return ReplayError(f"{where}: writing the LCA frames failed ({why}); run the same command again to resume "
                       f"from the last flush")


class _Replay:
    """The step loop of one process over its segments of steps (all steps, or its blocks under torchrun).

    Its [L, S] buffers and totals cover the columns `ev.own` of the flat parameter vector:
    all of them, except in data mode, where each rank owns a slice.
    """

    def __init__(self, run: Run, ev: LossEvaluator, segments: list[list[int]], out: Path, ckpt: Checkpoint,
                 layout: Layout, tol: float, rtol: float, max_splits: int, first_order: bool, dense: bool,
                 flush_every: int, progress: bool, notes: dict, per_example: list[str]):
        self.run, self.ev, self.out, self.ckpt, self.layout, self.notes = run, ev, out, ckpt, layout, notes
        self.per_example = (PerExample(ev.task, ev.model, run.param_names, per_example, ev.device, tol, rtol,
                                       max_splits) if per_example else None)
        self.tol, self.rtol, self.max_splits, self.first_order = tol, rtol, max_splits, first_order
        self.dense, self.flush_every, self.progress = dense, flush_every, progress and layout.rank == 0
        self.dev = ev.device
        left = [[s for s in seg if ckpt.next_step is None or s >= ckpt.next_step] for seg in segments]
        self.segments = [seg for seg in left if seg]
        self.todo = [s for seg in self.segments for s in seg]
        names = [s.name for s in run.manifest.params]
        sizes = [s.numel for s in run.manifest.params]
        self.writer = FrameWriter(out, ev.loss_names, names, sizes, prefix=f"part{layout.tag}")
        self.lo, self.hi = ev.own
        self.P, self.T = sum(sizes), len(sizes)
        self.cut_sizes, self.cut_ids = parallel.slice_cuts(sizes, self.lo, self.hi, self.dev)
        L, S = len(ev.loss_names), self.hi - self.lo
        self.totals = ckpt.totals or {"lca": torch.zeros(L, S, dtype=torch.float64),
                                      "helped": torch.zeros(L, S, dtype=torch.int32),
                                      "n_steps": torch.zeros(1, dtype=torch.int64),
                                      "n_unchanged": torch.zeros(1, dtype=torch.int64)}
        self.totals = {k: v.to(self.dev) for k, v in self.totals.items()}
        self.dense_buf: dict[str, torch.Tensor] = {}
        # [L,S] work buffers in the model's dtype (totals are float64): the two endpoint gradients
        # (swapped each step), Simpson's odd and interior-even sums, a refinement scratch, the allocation
        self.buf = {k: torch.empty(L, S, dtype=ev.grad_dtype, device=self.dev)
                    for k in ("g_a", "g_b", "odd", "mid", "tmp", "lca")}
        self.evals = ckpt.evals  # gradient evaluations, including those before a resume
        self._since_flush = 0

    def _states(self, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Flat float64 states [padded] on the device, in order: steps first..last and the state after last.

        CUDA: decoded one step ahead on a background thread into pinned memory, copied
        non-blocking, so reading overlaps the GPU's work. CPU: decoded inline — there is
        nothing to overlap, and torch ops on a second thread start a second OpenMP team that
        competes with the gradients (measured: 2x slower replay on 2 cores).
        """
        pad = [torch.zeros(self.ev.padded - self.P, dtype=torch.float64)] if self.ev.padded > self.P else []
        flat_states = ((t, torch.cat([v.reshape(-1).double() for v in st.values()] + pad))
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

    def _eval(self, theta: torch.Tensor, out: torch.Tensor, partial: bool = False) -> tuple[torch.Tensor,
                                                                                            torch.Tensor]:
        self.evals += 1
        return self.ev(theta, out, partial=partial)

    def _proj(self, dw: torch.Tensor, *gs: torch.Tensor, partial_losses: torch.Tensor | None = None) -> torch.Tensor:
        """[len(gs), L] float64: each gradient's projection on Δθ; then the losses, if given.

        In data mode each rank projects its own columns and holds its shard's part of the
        losses: one all-reduce sums all of them (small collectives cost ~0.7 ms each on gloo).
        """
        p = torch.stack([g @ dw for g in gs]).double()
        if partial_losses is not None:
            p = torch.cat([p, partial_losses[None]])
        if self.layout.shards_data:
            parallel.all_reduce(p)
        return p

    def _allocate(self, th0: torch.Tensor, d: torch.Tensor, v0: torch.Tensor, g0: torch.Tensor, v1: torch.Tensor,
                  g1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Simpson refined per loss → (lca [L,S], splits [L], grounded [L], the end losses [L]); [L] on the host.

        Each loss keeps the allocation of the first level at which it is grounded (or the last,
        at max_splits), so that requesting more losses never changes another loss's numbers:
        the others' refinement only adds points that this loss no longer uses.
        The refinement test needs only ΣLCA = (E·Δθ + 4·O·Δθ + 2·M·Δθ)/(3n): projections
        [L] of each gradient on Δθ, so [L,S] allocations are formed only for the losses that are
        final, in a preallocated buffer (like every [L,S] here: fresh ones cost page faults).
        `v1` is this rank's part of the end losses in data mode (summed with the projections).
        """
        lca = self.buf["lca"]
        L = lca.shape[0]
        # Δθ of the own columns, in the gradients' dtype (the evaluation points use the float64 d)
        dw = d[self.lo:self.hi].to(lca.dtype)
        if self.first_order:
            p0, v1 = self._proj(dw, g0, partial_losses=v1)
            dl = v1 - v0
            ok = is_grounded(dl - p0, dl, self.tol, self.rtol).cpu()
            return torch.mul(g0, dw, out=lca), torch.ones(L, dtype=torch.int64), ok, v1
        n = 2
        odd, mid, tmp = self.buf["odd"], self.buf["mid"], self.buf["tmp"]
        self._eval(th0 + 0.5 * d, odd, partial=True)  # interior points: gradients only
        p0, p1, odd_d, v1 = self._proj(dw, g0, g1, odd, partial_losses=v1)
        dl = v1 - v0
        ends_d, mid_d = p0 + p1, torch.zeros_like(dl)
        splits, grounded = torch.zeros(L, dtype=torch.int64), torch.zeros(L, dtype=torch.bool)
        while True:
            # host sync: the refinement decision. In data mode every rank decides alike, from the same
            # all-reduced numbers (an all-reduce leaves identical bits on every rank), so none waits alone.
            ok = is_grounded(dl - simpson_integral(ends_d, odd_d, mid_d, n), dl, self.tol, self.rtol).cpu()
            final = (ok | (n >= self.max_splits)) & (splits == 0)  # losses whose allocation is this level's
            m = mid if n > 2 else None
            if bool(final.all()):  # the usual case: every loss at once, in place
                allocation(g0, g1, odd, m, dw, n, out=lca)
            elif bool(final.any()):
                rows = final.nonzero().flatten().to(lca.device)
                lca[rows] = allocation(g0[rows], g1[rows], odd[rows], m[rows] if m is not None else None, dw, n)
            splits[final], grounded[final] = n, ok[final]
            if bool((splits > 0).all()):
                return lca, splits, grounded, v1
            if n == 2:
                mid.copy_(odd)
            else:
                mid += odd
            mid_d += odd_d
            for j, s in enumerate(refine_points(n)):
                self._eval(th0 + s * d, odd if j == 0 else tmp, partial=True)
                if j:
                    odd += tmp
            (odd_d,) = self._proj(dw, odd)
            n *= 2

    def execute(self) -> Frames:
        self._done, self._started, self._last_print = 0, time.perf_counter(), 0.0
        for seg in self.segments:
            self._segment(seg)
        if self.progress and self.todo:
            sys.stderr.write("\n")
        return self._finish()

    def _segment(self, seg: list[int]) -> None:
        """Consecutive steps: the first state is evaluated, then each step's end is the next one's start.

        A step that changed no parameter (θ' = θ bit for bit: a skipped AMP step, an accumulation
        micro-batch captured as a step) needs no evaluation: its LCA is exactly 0 and its end
        gradient is its start's.
        """
        it = self._states(seg[0], seg[-1])
        t0, th0 = next(it)
        v0, g0 = self._eval(th0, self.buf["g_a"])
        for t1, th1 in it:
            if torch.equal(th1, th0):
                L = len(v0)
                self._record(t0, t1, v0, v0, self.buf["lca"].zero_(), torch.zeros(L, dtype=torch.int64),
                             torch.ones(L, dtype=torch.bool))
                v1, g1 = v0, g0
            else:
                d = th1 - th0
                v1, g1 = self._eval(th1, self.buf["g_b" if g0 is self.buf["g_a"] else "g_a"], partial=True)
                lca, splits, ok, v1 = self._allocate(th0, d, v0, g0, v1, g1)
                self._record(t0, t1, v0, v1, lca, splits, ok)
            if self.per_example is not None and self.layout.writes_steps:
                self._record_examples(t0, th0, th1)
            last = t0 == self.todo[-1]
            self._since_flush += 1
            if self._since_flush >= self.flush_every or last:
                self._flush(t1)
            self._done += 1
            if self.progress and (time.perf_counter() - self._last_print > 0.5 or last):
                self._last_print = time.perf_counter()
                _print_progress(self._done, len(self.todo), self._last_print - self._started)
            t0, th0, v0, g0 = t1, th1, v1, g1

    def _record_examples(self, t0: int, th0: torch.Tensor, th1: torch.Tensor) -> None:
        """Per-example LCA of the step (nothing to evaluate when no parameter moved: all zeros)."""
        if torch.equal(th0, th1):
            for name, ex in self.per_example.data.items():
                n, T = len(ex), len(self.per_example.names)
                v = self.per_example.losses(name, th0).cpu().numpy()
                self.writer.add_examples(t0, name, np.zeros((n, T)), v, v, np.zeros(n, np.int64), np.ones(n, bool))
            return
        for name, r in self.per_example.step(th0, th1).items():
            h = {k: v.cpu().numpy() for k, v in r.items()}
            self.writer.add_examples(t0, name, h["lca"], h["before"], h["after"], h["splits"], h["grounded"])

    def _per_tensor(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[L, T] sums of x [L, S] over each tensor's columns (zeros for tensors outside the own slice)."""
        sums = torch.stack([c.sum(1, dtype=dtype) for c in x.split(self.cut_sizes, 1)], 1)
        if self.cut_ids is None:  # the own columns are all the tensors, in order
            return sums
        out = torch.zeros(x.shape[0], self.T + 1, dtype=dtype, device=x.device)  # T: the padding
        return out.index_copy_(1, self.cut_ids, sums)[:, :self.T].contiguous()  # collectives need contiguous

    def _record(self, t0: int, t1: int, v0: torch.Tensor, v1: torch.Tensor, lca: torch.Tensor,
                splits: torch.Tensor, ok: torch.Tensor) -> None:
        """Add the step to the totals and its per-loss and per-tensor sums to the frames."""
        helped = lca < 0
        tl, th = self._per_tensor(lca, torch.float64), self._per_tensor(helped, torch.int64)  # [L,T]
        if splits.any():  # an unchanged step (splits 0) adds nothing, and is no step a parameter could help in
            self.totals["lca"] += lca
            self.totals["helped"] += helped
            self.totals["n_steps"] += 1
        else:
            self.totals["n_unchanged"] += 1
        if self.layout.shards_data:  # each rank summed its slice: rank 0 writes the step (one collective)
            both = torch.stack([tl, th.double()])  # counts are exact in float64
            parallel.reduce_to_first(both)
            tl, th = both[0], both[1].long()
        if self.dense and (full := parallel.gather_columns(lca, self.layout)) is not None:
            self.dense_buf[str(t0)] = full[:, :self.P].to("cpu", torch.float64, copy=True)
        if self.layout.writes_steps:
            host = [x.cpu().numpy() for x in (v0, v1, tl.sum(1), ok, tl, th)]  # one sync per step
            self.writer.add(t0, t1, host[0], host[1], host[2], splits.numpy(), host[3], host[4], host[5])

    def _flush(self, next_step: int) -> None:
        ck = self.ckpt
        ck.parts += self.writer.flush(ck.seq)
        if self.dense and self.dense_buf:
            (self.out / "dense").mkdir(exist_ok=True)
            rel = f"dense/part{self.layout.tag}-{ck.seq:06d}.safetensors"
            write_atomic(self.out / rel, save(self.dense_buf, metadata={"losses": json.dumps(self.ev.loss_names)}))
            ck.parts.append(rel)
            self.dense_buf = {}
        ck.seq += 1
        ck.save(next_step, self.totals, self.evals)
        self._since_flush = 0

    def _finish(self) -> Frames:
        """params rows (own slice, or the totals summed onto rank 0 in steps mode), meta.json, then the
        resume state goes."""
        lay = self.layout
        totals = {**self.totals, "evals": torch.tensor([self.evals], dtype=torch.int64, device=self.dev)}
        if lay.shards_steps:
            parallel.reduce_to_first(*(totals[k] for k in sorted(totals)))
        tot = {k: v.cpu() for k, v in totals.items()}
        n_steps = int(tot["n_steps"].item())
        if lay.rank == 0 or lay.shards_data:
            own = max(0, min(self.hi, self.P) - self.lo)  # the last slice may end in padding
            self.writer.write_params(tot["lca"][:, :own].numpy(), tot["helped"][:, :own].numpy(), n_steps,
                                     start=self.lo)
        parallel.barrier(lay)  # every params part is written
        if lay.rank == 0:
            write_meta(self.out, {"complete": True, "config": self.ckpt.config, "losses": self.ev.loss_names,
                                  "loss_sizes": self.ev.loss_sizes, "n_steps": n_steps + int(tot["n_unchanged"]),
                                  "n_unchanged": int(tot["n_unchanged"]),
                                  "tensors": self.writer.tensor_names, "run": str(self.run.path.resolve()),
                                  "grad_evals": int(tot["evals"].item()), "processes": lay.world,
                                  "parallel": lay.mode, **self.notes})
        parallel.barrier(lay)  # meta.json is written: every rank may load, and drop its resume state
        self.ckpt.remove()
        return load(self.out)


def _print_progress(done: int, total: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    sys.stderr.write(f"\rreplay compute: {done}/{total} steps  {rate:.2f} steps/s  ETA {eta:,.0f}s   ")
    sys.stderr.flush()
