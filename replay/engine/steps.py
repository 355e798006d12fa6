"""The step loop: states in order, each step's points evaluated, refined where the error is, allocated.

Per step t → t' of one segment (consecutive recorded states), for every row of an integrand
(the losses of the data sets; and, per data set asked, its examples or its tokens):

    start  θ_t: the previous step's end, already evaluated (and projected onto this step's Δθ)
    end    θ_t': evaluated once, projected onto Δθ_t and onto the next moving step's Δθ (reused)
    mid    θ_t + ½Δθ: plain Simpson, 2 evaluations per step
    refine `simpson.Mesh.plan`: the panels that miss get their midpoints, row by row
    allocate per tensor from the projections; per parameter (the `per_param` losses) from their gradients,
           Δθ ⊙ Σ_p w_p g_p with the mesh's weights (a step grounded at plain Simpson: the plain
           formula Δθ ⊙ (g_0 + 4 g_m + g_1)/6, bit for bit)

A step whose states are equal bit for bit (a skipped AMP step) is not evaluated: LCA exactly 0.
Only [rows × tensors] sums leave the device per step (one sync); gradients [K × P] are kept for
the per-parameter losses only, one per point of the step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from replay import interrupts
from replay.engine.columns import simpson_sums
from replay.engine.evaluate import LossEvaluator
from replay.engine.ledger import Ledger, StepLCA
from replay.engine.parallel import Placement
from replay.engine.rows import RowLoop
from replay.engine.settings import Settings
from replay.engine.simpson import Mesh, is_grounded, points_of, refine
from replay.frames import Frames
from replay.progress import StepProgress
from replay.store import Run

# Per-parameter losses keep each refined point's gradients [K, P] until the step's mesh is final (a panel may
# still be split, and its allocation needs them). Past this many bytes a point's gradients are dropped and
# evaluated again for the allocation: memory stays bounded (a 10.7M-parameter LM refined to 32 panels held
# 2.8 GB of them) at the cost of evaluations only where a step needs that many points.
KEEP_GRAD_BYTES = 1 << 30
# The per-parameter losses' projections per tensor are taken from their gradients only where a step of theirs is
# refined (each is a pass over [K × P] per direction; at plain Simpson their own float64 sums decide and allocate).
# False: every evaluation projects them (the same numbers: a test compares the two).
LAZY_PROJECTIONS = True


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """θ' = θ bit for bit (host sync). NaN ≠ NaN, so values cannot tell a diverged run's repeated states."""
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


@dataclass
class Point:
    """A step's start point, carried from the previous step's end: values [R], projections [R, C] onto this
    step's Δθ, and (data sets) the per-parameter gradients [K, S]."""

    values: torch.Tensor
    proj: torch.Tensor
    grads: torch.Tensor | None = None


class StepLoop:
    """The step loop of one process over its segments of steps (all steps, or its blocks under torchrun)."""

    def __init__(self, run: Run, ev: LossEvaluator, segments: list[list[int]], ledger: Ledger, place: Placement,
                 st: Settings, rows: list[RowLoop] | None = None):
        self.run, self.ev, self.ledger, self.place, self.rows = run, ev, ledger, place, rows or []
        self.tol, self.rtol, self.max_splits, self.first_order = st.tol, st.rtol, st.max_splits, st.first_order
        self.flush_every, self.progress = st.flush_every, st.progress and place.rank == 0
        self.dev = ev.device
        nxt = ledger.ckpt.next_step
        ledger.ckpt.check_resumed(sum(1 for seg in segments for s in seg if nxt is not None and s < nxt),
                                  f"{ledger.out}/progress{place.tag}.json")
        # the first state of a resumed segment was evaluated before the interruption (as the previous step's
        # end): evaluated again, it is not counted, so grad_evals is that of an uninterrupted compute
        self._resumed_at = nxt
        left = [[s for s in seg if nxt is None or s >= nxt] for seg in segments]
        self.segments = [seg for seg in left if seg]
        self.todo = [s for seg in self.segments for s in seg]
        self.lo, self.hi = ev.columns
        K, S = len(ev.per_param), self.hi - self.lo
        # [K, S] per-parameter buffers in the gradients' dtype, preallocated (fresh ones cost page faults):
        # the two endpoint gradients (swapped each step), the allocation, and a pool for the other points
        mk = lambda: torch.empty(K, S, dtype=ev.grad_dtype, device=self.dev)  # noqa: E731
        self._ends = [mk(), mk()] if K else [None, None]
        self._alloc = mk() if K else None
        self._pool: list[torch.Tensor] = []
        self.evals = ledger.ckpt.evals  # gradient evaluations, including those before a resume
        self.lazy = LAZY_PROJECTIONS and K > 0 and not self.first_order  # (see LAZY_PROJECTIONS)

    # ---- states -----------------------------------------------------------------------------------

    def _states(self, first: int, last: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Flat float64 states [padded] on the device, in order: steps first..last and the state after last.

        CUDA: decoded one step ahead on a background thread into pinned memory, copied
        non-blocking, so reading overlaps the GPU's work. CPU: decoded inline — there is
        nothing to overlap, and torch ops on a second thread start a second OpenMP team that
        competes with the gradients (measured: 2x slower replay on 2 cores).
        """
        P = self.ledger.P
        layout = self.run.layout
        pad = torch.zeros(self.ev.padded - P, dtype=torch.float64) if self.ev.padded > P else None
        views_of = layout.views

        def flat64(flat: torch.Tensor) -> torch.Tensor:
            views = views_of(flat)
            parts = [views[n].reshape(-1).double() for n in self.run.param_names]
            return torch.cat(parts + ([pad] if pad is not None else []))

        flat_states = ((t, flat64(flat)) for t, flat in
                       self.run.flat_states(first, last + 1 + self.run.manifest.every))
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

    # ---- evaluation ----------------------------------------------------------------------------------

    def _eval(self, theta: torch.Tensor, dirs: list[torch.Tensor], grads: torch.Tensor | None,
              need: torch.Tensor | None = None, at: tuple[torch.Tensor, float] | None = None, project: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One evaluation at θ onto `dirs`; `at` (θ0, s): θ is θ0 + s·dirs[0] (the rows find the pass by these
        tensors); `project=False`: no projections for the per-parameter losses (see `_allocate`)."""
        self.evals += 1
        return self.ev(theta, torch.stack(dirs), grads, need, origin=None if at is None else (*at, dirs),
                       project=project)

    def _spare(self) -> torch.Tensor | None:
        if not self.ev.per_param:
            return None
        return self._pool.pop() if self._pool else torch.empty_like(self._ends[0])

    # ---- one step ----------------------------------------------------------------------------------

    def _allocate(self, th0: torch.Tensor, d: torch.Tensor, start: Point, end: Point) -> StepLCA:
        """Simpson on the step's mesh, refined per loss until grounded (or out of budget)."""
        ev, K = self.ev, len(self.ev.per_param)
        pp = torch.tensor(ev.per_param, dtype=torch.long)
        dw = d[self.lo:self.hi].to(ev.grad_dtype) if K else None  # Δθ of the held columns, gradients' dtype
        dl = end.values - start.values
        if self.first_order:
            return self._first_order(start, end, pp, dw, dl)
        gm = self._spare()
        vm, pm, gm = self._eval(th0 + 0.5 * d, [d], gm, at=(th0, 0.5), project=not self.lazy)
        grads = {0.0: start.grads, 1.0: end.grads, 0.5: gm}
        override = root = trap = root_sums = None
        if K:  # the per-parameter losses decide at plain Simpson on their own float64 sums
            root, root_sums, trap, override = self._plain(start, end, pm[0], gm, d, dw, dl, pp)
        mesh = Mesh(((start.values, start.proj), (end.values, end.proj)), (vm, pm[0]), self.max_splits)

        point = self._point(th0, d, grads, pp, len(dl))
        refine(mesh, point, self.tol, self.rtol, override, many=self._round(th0, d, pp))
        tensor_lca = mesh.allocation()
        splits = mesh.splits().cpu()
        alloc = None
        if K:
            once = splits[pp] == 2
            if bool(once.all()):
                alloc, sums = root, root_sums
            else:
                alloc = self._alloc if bool((~once).all()) else root.clone()
                w = mesh.weights(pp).to(ev.grad_dtype)  # [K, points]
                rows = torch.nonzero(~once).flatten().tolist()
                self._weighted(alloc, rows, w, mesh.s, grads, lambda s: th0 + s * d, d)
                for k in rows:
                    alloc[k].mul_(dw)
                sums = self._sums(alloc)
            tensor_lca[pp] = sums
        for s, g in grads.items():  # the inner points' buffers go back to the pool
            if s not in (0.0, 1.0) and g is not None:
                self._pool.append(g)
        grounded = is_grounded(dl - tensor_lca.sum(1), dl, self.tol, self.rtol).cpu()
        error = mesh.error()
        if trap is not None:  # per-parameter losses at plain Simpson: Simpson against the trapezoid, from their sums
            once = (splits[pp] == 2).to(trap.device)  # [K]
            error[pp.to(trap.device)[once]] = (root_sums[once] - trap[once]).abs()
        return StepLCA(alloc, tensor_lca, error, splits, grounded, end.values, points_of(mesh))

    def _first_order(self, start: Point, end: Point, pp: torch.Tensor, dw: torch.Tensor | None, dl: torch.Tensor
                     ) -> StepLCA:
        """--first-order: the start's gradient alone (no midpoint), its error against the trapezoid."""
        lca = start.proj
        trap = (start.proj + end.proj) / 2.0
        tensor_lca, error = lca.clone(), (lca - trap).abs()
        alloc = torch.mul(start.grads, dw, out=self._alloc) if len(pp) else None
        if len(pp):
            tensor_lca[pp] = self._sums(alloc)
        splits = torch.ones(len(dl), dtype=torch.int64)
        grounded = is_grounded(dl - tensor_lca.sum(1), dl, self.tol, self.rtol).cpu()
        return StepLCA(alloc, tensor_lca, error, splits, grounded, end.values, [[0.0]] * len(dl))

    def _plain(self, start: Point, end: Point, pm: torch.Tensor, gm: torch.Tensor, d: torch.Tensor, dw: torch.Tensor,
               dl: torch.Tensor, pp: torch.Tensor) -> tuple:
        """The per-parameter losses at plain Simpson: (Δθ ⊙ (g0 + 4 gm + g1)/6 [K, held columns], its float64 sums
        per tensor [K, T], the trapezoid's [K, T] (lazy projections only), the residuals [L] they decide by (NaN for
        the other losses)). Where one of them refines, its projections at the three points are taken now."""
        ev = self.ev
        root = self._alloc
        root_sums, trap = simpson_sums(self.ledger.cols, start.grads, end.grads, gm, dw, root)
        self.place.sum_shards(root_sums, trap)  # (data mode: each rank summed its slice)
        trap = trap if self.lazy else None  # (for their error where not refined)
        override = torch.full_like(dl, float("nan"))
        override[pp] = dl[pp] - root_sums.sum(1)
        if self.lazy and not bool(is_grounded(override[pp], dl[pp], self.tol, self.rtol).all()):
            # (host sync) one refines: the mesh needs their projections at the step's three points
            for proj, g in ((start.proj, start.grads), (end.proj, end.grads), (pm, gm)):
                proj[pp] = ev.projections(g, d)
        return root, root_sums, trap, override

    def _round(self, th0: torch.Tensor, d: torch.Tensor, pp: torch.Tensor) -> Callable:
        """A refinement round in which no per-parameter loss needs a point: its group losses' (point, example)
        pairs in one pass (`LossEvaluator.round`, one evaluation), or None to evaluate point by point."""
        def many(points: list) -> list | None:
            if any(bool(rows.cpu()[pp].any()) for _, rows in points):
                return None
            got = self.ev.round(th0, d, points)
            if got is not None:
                self.evals += 1
            return got

        return many

    def _point(self, th0: torch.Tensor, d: torch.Tensor, grads: dict, pp: torch.Tensor, rows: int) -> Callable:
        """The refinement's evaluation at θ0 + sΔθ: of every loss where a per-parameter loss needs the point (its
        gradients, kept in `grads` within KEEP_GRAD_BYTES), else of the rows that need it only (a data set whose
        own loss is grounded evaluates only the examples of its groups that are not)."""
        per_param = torch.zeros(rows, dtype=torch.bool)
        per_param[pp] = True
        held = [3]  # [K, P] gradients held: start, end, midpoint

        def point(s: float, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            need = need.cpu()
            if bool((need & per_param).any()) or bool(need.all()):
                v, p, g = self._eval(th0 + s * d, [d], self._spare(), at=(th0, s))
                need = torch.ones_like(need)
            else:
                v, p, g = self._eval(th0 + s * d, [d], None, need)
            if g is not None and (held[0] + 1) * g.numel() * g.element_size() <= KEEP_GRAD_BYTES:
                grads[s] = g
                held[0] += 1
            elif g is not None:  # over the budget: evaluated again for the allocation, if its rows need it
                self._pool.append(g)
            return v, p[0], need.to(v.device)

        return point

    def _weighted(self, alloc: torch.Tensor, rows: list[int], w: torch.Tensor, points: list[float], grads: dict,
                  at: Callable[[float], torch.Tensor], d: torch.Tensor) -> None:
        """alloc[k] = Σ_p w[k, p] g_p for the rows k, each row's terms in the points' order; a point whose
        gradients were dropped over the memory budget is evaluated again, used, and released at once."""
        for k in rows:
            alloc[k].zero_()
        for i, s in enumerate(points):
            need = [k for k in rows if float(w[k, i]) != 0.0]
            if not need:
                continue
            g = grads.get(s)
            again = g is None
            if again:
                _, _, g = self._eval(at(s), [d], self._spare())
            for k in need:
                alloc[k].add_(g[k], alpha=float(w[k, i]))
            if again:
                self._pool.append(g)

    def _sums(self, alloc: torch.Tensor) -> torch.Tensor:
        """[K, T] float64 per-tensor sums of a per-parameter allocation (summed over ranks' slices in data mode)."""
        sums = self.ledger.tensor_sums(alloc)
        self.place.sum_shards(sums)
        return sums

    # ---- segments -----------------------------------------------------------------------------------

    def execute(self, notes: dict) -> Frames:
        self._done = 0
        self._progress = StepProgress(len(self.todo)) if self.progress and self.todo else None
        self._last_t1: int | None = None
        try:
            for seg in self.segments:
                self._segment(seg)
        except KeyboardInterrupt:  # keep every step computed so far (each is whole: see _segment)
            if self.ledger.unflushed and self._last_t1 is not None:
                with interrupts.held():
                    self.ledger.flush(self._last_t1, self._evals_done)  # (not the interrupted step's)
            raise
        finally:
            if self._progress is not None:
                self._progress.close()
        return self.ledger.finish(self.evals, str(self.run.path.resolve()), notes)

    def _segment(self, seg: list[int]) -> None:
        """Consecutive steps: the first moving state is evaluated, then each step's end is the next one's start
        (projected onto the next moving step's direction when it is evaluated: states are read ahead)."""
        start: Point | None = None
        values = None  # the loss before the first moving step, when the segment begins with unchanged ones
        for kind, t0, th0, t1, th1, d_next in self._steps(seg):
            if kind == "unchanged":  # no parameter moved: nothing to evaluate, LCA exactly 0
                if start is None and values is None:  # a segment that begins unchanged: its start, once
                    v0, p0, g0 = self._eval(th0, [d_next if d_next is not None else torch.zeros_like(th0)],
                                            self._ends[0], project=not self.lazy)
                    if t0 == self._resumed_at:
                        self.evals -= 1
                    values = v0
                    if d_next is not None:  # (projected onto the first moving step's direction)
                        start = Point(v0, p0[0], g0)
                with interrupts.held():  # a step is in the frames whole or not at all
                    self.ledger.record(t0, t1, start.values if start is not None else values, None)
                    for r in self.rows:
                        r.unchanged(t0, t1, th0)
                    self._after_step(t0, t1)
                continue
            d = th1 - th0
            if start is None:
                v0, p0, g0 = self._eval(th0, [d], self._ends[0], at=(th0, 0.0), project=not self.lazy)
                if t0 == self._resumed_at:
                    self.evals -= 1
                start = Point(v0, p0[0], g0)
            end_buf = self._ends[1] if start.grads is self._ends[0] else self._ends[0]
            v1, p1, g1 = self._eval(th1, [d] + ([d_next] if d_next is not None else []), end_buf, at=(th1, 0.0),
                                    project=not self.lazy)
            step = self._allocate(th0, d, start, Point(v1, p1[0], g1))
            commits = [r.step(t0, t1, th0, th1, d, d_next) for r in self.rows]
            self.ev.forget_rows()
            with interrupts.held():  # a step is in the frames whole or not at all
                self.ledger.record(t0, t1, start.values, step)
                for commit in commits:
                    commit()
                self._after_step(t0, t1)
            start = Point(v1, p1[1] if d_next is not None else p1[0], g1)

    def _after_step(self, t0: int, t1: int) -> None:
        self._last_t1, self._evals_done = t1, self.evals
        last = t0 == self.todo[-1]
        if self.ledger.unflushed >= self.flush_every or last:
            self.ledger.flush(t1, self.evals)
        self._done += 1
        if self._progress is not None:
            self._progress.update(self._done)

    def _steps(self, seg: list[int]) -> Iterator[tuple]:
        """("moving" | "unchanged", t0, θ0, t1, θ1, Δθ of the next moving step or None) for each step.

        Between two moving steps the states are all equal (unchanged steps), so the next direction is
        the first state that differs from the current one, minus it: only that state is read ahead,
        whatever the length of the run of equal states.
        """
        it = self._states(seg[0], seg[-1])
        cur_t, cur = next(it)
        pending = None  # a moving step (t0, θ0, t1, θ1) waiting for the next direction
        while True:
            equal: list[int] = []
            after = next(it, None)
            while after is not None and same_bits(after[1], cur):
                equal.append(after[0])
                after = next(it, None)
            d_next = after[1] - cur if after is not None else None
            if pending is not None:
                yield ("moving", *pending, d_next)
            prev = cur_t
            for t in equal:
                yield "unchanged", prev, cur, t, cur, d_next
                prev = t
            if after is None:
                return
            pending = (prev, cur, after[0], after[1])
            cur_t, cur = after
