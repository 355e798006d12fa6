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

import math
import queue
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from replay.engine import parallel
from replay.engine.checkpoint import Checkpoint
from replay.engine.evaluate import LossEvaluator
from replay.engine.fingerprint import task_fingerprint
from replay.engine.ledger import Ledger, StepLCA
from replay.engine.model_check import check_constants, check_model
from replay.engine.parallel import Placement
from replay.engine.per_example import PerExample
from replay.engine.simpson import Level, allocation, is_grounded, refine
from replay.errors import ReplayError, ReplayWarning, RunError, TaskError, os_reason
from replay.frames import Frames, load
from replay.lcadir import LcaDirDamaged
from replay.store import Run, open_run
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
    restart: bool = False,
    constants: str = "check",
) -> Frames:
    """Compute LCA of `losses` (data set names; default: all of the task's) over the run.

    A step is grounded when |ΔL − ΣLCA| ≤ tol + rtol·|ΔL|; steps that are not are refined
    by composite Simpson up to `max_splits` sub-intervals, and flagged if still not grounded.
    Writes frames to `out` (default RUN/lca) and returns them (see `replay.load`). An interrupted
    compute resumes when run again with the same settings; `restart` replaces what `out` holds.
    The task's frozen parameters and buffers must be training's (`constants='warn'`: a warning).

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
    constants_note = check_constants(t, run, constants)
    a, b = steps or (None, None)
    todo = [s for s in run.steps[:-1] if (a is None or s >= a) and (b is None or s < b)]
    if not todo:
        raise RunError(f"{run.path}: no step to compute in {a}:{b} (recorded states {run.steps[0]}..{run.steps[-1]})")
    notes = _notes(run, t, todo)
    if constants_note:
        notes["constants_note"] = constants_note
        warnings.warn(f"{run.path}: {constants_note}", ReplayWarning, stacklevel=2)
    if t.batchnorm == "running" and run.manifest.buffers:  # the last recorded statistics, for every step
        t.model.load_state_dict(run.state(run.steps[-1], buffers=True), strict=False)
    place, dev = parallel.join(device, data_parallel)
    try:
        ev = LossEvaluator(t, run.param_names, datasets, per_class, dev, place)
        out = Path(out) if out is not None else run.path / "lca"
        config = {"run_id": run.manifest.run_id,
                  "task": spec if isinstance(spec, str) else "<Task object>",
                  "task_fingerprint": task_fingerprint(t, datasets, run.param_names),
                  "losses": ev.loss_names, "tol": tol, "rtol": rtol, "max_splits": max_splits,
                  "first_order": first_order, "steps": [todo[0], todo[-1]], "batchnorm": t.batchnorm,
                  "batch_size": t.batch_size, "dense": dense, "per_example": per_example}
        state = None
        try:
            state = Checkpoint(out, config, place, restart)
            place.barrier()  # every rank has read the dir before any writes to it
            if state.complete:
                return load(out)
            ledger = Ledger(out, ev.loss_names, ev.loss_sizes, [s.name for s in run.manifest.params],
                            [s.numel for s in run.manifest.params], ev.own, dev, state, place, dense)
            pe = (PerExample(ev.task, ev.model, run.param_names, per_example, ev.device, tol, rtol, max_splits)
                  if per_example else None)
            return _StepLoop(run, ev, parallel.segments(todo, place), ledger, place, tol, rtol, max_splits,
                             first_order, flush_every, progress, pe).execute(notes)
        except OSError as e:
            raise _write_failed(out, e) from None
        finally:
            if state is not None:
                state.release()
    finally:
        parallel.leave(place)


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
    where = e.filename or out
    return ReplayError(f"{where}: writing the LCA frames failed ({os_reason(e)}); fix that and run the same command "
                       f"again to resume from the last flush")


class _StepLoop:
    """The step loop of one process over its segments of steps (all steps, or its blocks under torchrun).

    Per step: the end point's gradients (the start's are the previous end's), Simpson refined
    per loss until every loss is grounded (`_allocate`), then the ledger. Its [L, S] buffers
    cover the columns `ev.own` of the flat parameter vector: all of them, except in data mode.
    """

    def __init__(self, run: Run, ev: LossEvaluator, segments: list[list[int]], ledger: Ledger, place: Placement,
                 tol: float, rtol: float, max_splits: int, first_order: bool, flush_every: int, progress: bool,
                 per_example: PerExample | None):
        self.run, self.ev, self.ledger, self.place, self.per_example = run, ev, ledger, place, per_example
        self.tol, self.rtol, self.max_splits, self.first_order = tol, rtol, max_splits, first_order
        self.flush_every, self.progress = flush_every, progress and place.rank == 0
        self.dev = ev.device
        nxt = ledger.ckpt.next_step
        done = sum(1 for seg in segments for s in seg if nxt is not None and s < nxt)
        if nxt is not None and done != ledger.ckpt.steps_done:
            raise LcaDirDamaged(f"{ledger.out}/progress{place.tag}.json: it says {ledger.ckpt.steps_done} steps are "
                                f"done before step {nxt}, this compute has {done} there; the compute cannot resume "
                                f"from it: run the same command with --restart to start over")
        # the first state of a resumed segment was evaluated before the interruption (as the previous step's
        # end): evaluated again, it is not counted, so grad_evals is that of an uninterrupted compute
        self._resumed_at = nxt
        left = [[s for s in seg if nxt is None or s >= nxt] for seg in segments]
        self.segments = [seg for seg in left if seg]
        self.todo = [s for seg in self.segments for s in seg]
        self.lo, self.hi = ev.own
        L, S = len(ev.loss_names), self.hi - self.lo
        # [L,S] work buffers in the gradients' dtype, preallocated (fresh ones cost page faults): the two
        # endpoint gradients (swapped each step), Simpson's odd and interior-even (mid) sums, a scratch for
        # summing new points, the allocation, and (on first use) the allocation of the losses still refining
        self.buf = {k: torch.empty(L, S, dtype=ev.grad_dtype, device=self.dev)
                    for k in ("g_a", "g_b", "odd", "mid", "tmp", "lca")}
        self.evals = ledger.ckpt.evals  # gradient evaluations, including those before a resume

    def _states(self, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Flat float64 states [padded] on the device, in order: steps first..last and the state after last.

        CUDA: decoded one step ahead on a background thread into pinned memory, copied
        non-blocking, so reading overlaps the GPU's work. CPU: decoded inline — there is
        nothing to overlap, and torch ops on a second thread start a second OpenMP team that
        competes with the gradients (measured: 2x slower replay on 2 cores).
        """
        P = self.ledger.P
        pad = [torch.zeros(self.ev.padded - P, dtype=torch.float64)] if self.ev.padded > P else []
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

    def _points(self, th0: torch.Tensor, d: torch.Tensor, points: list[float]) -> torch.Tensor:
        """Σ of the gradients at θ_t + s·Δθ for s in points (interior points: gradients only), in buf['odd']."""
        odd, tmp = self.buf["odd"], self.buf["tmp"]
        for j, s in enumerate(points):
            self._eval(th0 + s * d, odd if j == 0 else tmp, partial=True)
            if j:
                odd += tmp
        return odd

    def _allocate(self, th0: torch.Tensor, d: torch.Tensor, v0: torch.Tensor, g0: torch.Tensor, v1: torch.Tensor,
                  g1: torch.Tensor) -> StepLCA:
        """Simpson refined per loss, each loss until its allocation is grounded (or n = max_splits).

        Each loss keeps the allocation of the first level at which it is grounded, so that
        requesting more losses never changes another loss's numbers: the others' refinement only
        adds points that this loss no longer uses. The test is on the float64 per-tensor sums of
        the allocation itself, the numbers the frames report. `v1` is this rank's part of the end
        losses in data mode (summed with the first level's sums: one collective per level).
        """
        lca = self.buf["lca"]
        L = lca.shape[0]
        dw = d[self.lo:self.hi].to(lca.dtype)  # Δθ of the own columns, in the gradients' dtype
        tensor_lca = torch.empty(L, self.ledger.T, dtype=torch.float64, device=self.dev)
        splits, grounded = torch.zeros(L, dtype=torch.int64), torch.zeros(L, dtype=torch.bool)
        if self.first_order:
            level, cand = None, torch.mul(g0, dw, out=lca)
        else:
            level = Level(2, g0, g1, self._points(th0, d, [0.5]))
            cand = allocation(level, dw, out=lca)
        pending = torch.arange(L)  # the losses whose allocation is not final yet (host)
        v1_known = not self.place.shards_data
        while True:
            sums = self.ledger.tensor_sums(cand)  # [pending, T]
            if not v1_known:  # data mode: the shards' end losses and the slices' sums, in one all-reduce
                both = torch.cat([sums.reshape(-1), v1])
                self.place.sum_shards(both)
                sums, v1, v1_known = both[:-L].view_as(sums), both[-L:], True
            else:
                self.place.sum_shards(sums)
            # host sync: the refinement decision. In data mode every rank decides alike, from the same
            # all-reduced numbers (an all-reduce leaves identical bits on every rank), so none waits alone.
            dl = (v1 - v0)[pending.to(v1.device)]
            ok = is_grounded(dl - sums.sum(1), dl, self.tol, self.rtol).cpu()
            n = 1 if level is None else level.n
            # a loss that is not finite (a diverged step, a NaN example) cannot be grounded by more points
            finite = torch.isfinite(dl - sums.sum(1)).cpu()
            final = ok | (n >= self.max_splits) | (level is None) | ~finite
            done = pending[final]
            if cand is not lca:
                lca.index_copy_(0, done.to(lca.device), cand[final.to(cand.device)])
            tensor_lca.index_copy_(0, done.to(self.dev), sums[final.to(sums.device)])
            splits[done], grounded[done] = n, ok[final]
            pending = pending[~final]
            if not len(pending):
                return StepLCA(lca, tensor_lca, splits, grounded, v1)
            level = refine(level, lambda points: self._points(th0, d, points), mid_out=self.buf["mid"])
            if "cand" not in self.buf:
                self.buf["cand"] = torch.empty_like(lca)
            cand = allocation(level, dw, rows=pending.to(lca.device), out=self.buf["cand"][:len(pending)])

    def execute(self, notes: dict) -> Frames:
        self._done, self._started, self._last_print = 0, time.perf_counter(), 0.0
        for seg in self.segments:
            self._segment(seg)
        if self.progress and self.todo:
            sys.stderr.write("\n")
        return self.ledger.finish(self.evals, str(self.run.path.resolve()), notes)

    def _segment(self, seg: list[int]) -> None:
        """Consecutive steps: the first state is evaluated, then each step's end is the next one's start.

        A step that changed no parameter (θ' = θ bit for bit: a skipped AMP step, an accumulation
        micro-batch captured as a step) needs no evaluation: its LCA is exactly 0 and its end
        gradient is its start's.
        """
        it = self._states(seg[0], seg[-1])
        t0, th0 = next(it)
        v0, g0 = self._eval(th0, self.buf["g_a"])
        if t0 == self._resumed_at:
            self.evals -= 1
        for t1, th1 in it:
            if _same_bits(th1, th0):  # (NaN ≠ NaN, so values cannot tell a diverged run's repeated states)
                self.ledger.record(t0, t1, v0, None)
                v1, g1 = v0, g0
            else:
                v1, g1 = self._eval(th1, self.buf["g_b" if g0 is self.buf["g_a"] else "g_a"], partial=True)
                step = self._allocate(th0, th1 - th0, v0, g0, v1, g1)
                self.ledger.record(t0, t1, v0, step)
                v1 = step.loss_after
            if self.per_example is not None and self.place.writes_steps:
                self._record_examples(t0, th0, th1)
            last = t0 == self.todo[-1]
            self.ledger.since_flush += 1
            if self.ledger.since_flush >= self.flush_every or last:
                self.ledger.flush(t1, self.evals)
            self._done += 1
            if self.progress and (time.perf_counter() - self._last_print > 0.5 or last):
                self._last_print = time.perf_counter()
                _print_progress(self._done, len(self.todo), self._last_print - self._started)
            t0, th0, v0, g0 = t1, th1, v1, g1

    def _record_examples(self, t0: int, th0: torch.Tensor, th1: torch.Tensor) -> None:
        """Per-example LCA of the step (nothing to evaluate when no parameter moved: all zeros)."""
        pe = self.per_example
        if _same_bits(th0, th1):
            for name, ex in pe.data.items():
                n, T = len(ex), len(pe.names)
                v = pe.losses(name, th0)
                z = torch.zeros(n, dtype=torch.int64)
                self.ledger.record_examples(t0, name, {"lca": torch.zeros(n, T, dtype=torch.float64), "before": v,
                                                       "after": v, "splits": z, "grounded": z == 0})
            return
        for name, r in pe.step(th0, th1).items():
            self.ledger.record_examples(t0, name, r)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """θ' = θ bit for bit (host sync)."""
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


def _print_progress(done: int, total: int, elapsed: float) -> None:
    rate = done / max(elapsed, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    sys.stderr.write(f"\rreplay compute: {done}/{total} steps  {rate:.2f} steps/s  ETA {eta:,.0f}s   ")
    sys.stderr.flush()
