"""Simpson's rule on an adaptive mesh of panels shared by many rows: `Mesh` holds one step's refinement (its
points, panels and per-row budgets, grown by `refine`); `panel_simpson` and `is_grounded` are pure functions.

Along θ(s) = θ_t + s·Δθ, s ∈ [0, 1], a row r (a loss, an example, a token) has per column c (a
tensor, or the total) the directional derivative d_rc(s) = Δθ_c · ∇_c ℓ_r(θ(s)). A panel [a, b]
with midpoint m allocates by Simpson's rule

    A_rc(panel) = (b − a)/6 · (d_rc(a) + 4·d_rc(m) + d_rc(b)),

exact for losses polynomial of degree ≤ 4 in θ. Because every point's loss is known, every
panel's own residual is measurable: r_r(panel) = (ℓ_r(b) − ℓ_r(a)) − Σ_c A_rc(panel).

**Refinement, per row, where the error is.** A row starts with one panel [0, 1] (plain Simpson, 3
points). Until |Σ panels r_r| ≤ tol_r (grounded), each round splits the row's panels whose own
|residual| exceeds their fair share tol_r·(b − a) (the largest first, within the row's budget of
`max_splits` sub-intervals = max_splits/2 panels); a split panel's two halves need their
midpoints evaluated. A smooth step refines everywhere, exactly as uniform composite Simpson; a
kink or a rough stretch gets its points where it is. Rows share the points (one evaluation
serves every row), but each row's panels depend on its own residuals only, so requesting more
rows never changes another row. A row keeps the panels of the round at which it is grounded.

**What remains, per column** (`error`): |A(final panels) − A(the row's panels one round
coarser)|, the change of the last refinement; for a row never refined, the change from the
trapezoid rule on the ends to Simpson (a conservative estimate: the trapezoid's own error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

MAX_DEPTH = 30  # panels of width 2⁻³⁰: far below any useful resolution (and exact in float64)


def panel_simpson(da: torch.Tensor, dm: torch.Tensor, db: torch.Tensor, h: float) -> torch.Tensor:
    """h/6·(d(a) + 4·d(m) + d(b)) for any stack of projections."""
    return (da + 4.0 * dm + db) * (h / 6.0)


def is_grounded(residual: torch.Tensor, delta_loss: torch.Tensor, tol: float, rtol: float) -> torch.Tensor:
    """|ΔL − ΣLCA| ≤ tol + rtol·|ΔL| (absolute tolerance in loss units, plus an optional relative one)."""
    return residual.abs() <= tol + rtol * delta_loss.abs()


@dataclass
class Node:
    """A panel [a, b] with midpoint m (indices into the mesh's points) at depth `depth` (width 2⁻ᵈᵉᵖᵗʰ)."""

    a: int
    m: int
    b: int
    depth: int
    children: tuple[int, int] | None = None

    @property
    def h(self) -> float:
        return 2.0 ** -self.depth


class Mesh:
    """The points and panels of one step for R rows and C columns, and each row's panels (`leaf` [R, nodes]).

    Points arrive as (s, values [R] float64, projections [R, C] float64), torch tensors on any device.
    Nothing here evaluates anything: `plan()` says which points the next round needs, the caller
    evaluates them and passes them to `add()`. The bookkeeping is numpy on the host: a round is a few
    dozen operations on arrays of [panels × rows × columns], where each torch op's fixed cost (2-7 µs on
    the CPU, a launch on a GPU) made the mesh ~15% of a per-example compute; what leaves is torch again,
    on the points' device. The points' values, projections and evaluated rows, the panels' point indices
    and their allocations live in arrays grown by doubling; `nodes` keeps each panel's children.
    """

    def __init__(self, ends: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 mid: tuple[torch.Tensor, torch.Tensor], max_splits: int):
        (v0, d0), (v1, d1) = ends
        self.device = v0.device
        R = v0.shape[0]
        self.s: list[float] = [0.0, 1.0, 0.5]
        self.index = {0.0: 0, 1.0: 1, 0.5: 2}
        # per point (the first len(s) of a capacity): values [R], projections [R, C], and the rows evaluated there
        # (a refined point is evaluated only for the rows whose panels use it; the others hold 0 there, and get
        # their values when a later split of theirs needs the point)
        self._v = np.zeros((8, R))
        self._p = np.zeros((8, *d0.shape))
        self._have = np.zeros((8, R), dtype=bool)
        for i, (v, d) in enumerate(((v0, d0), (v1, d1), mid)):
            self._v[i], self._p[i] = _host(v), _host(d)
        self._have[:3] = True
        self.nodes = [Node(0, 2, 1, 0)]
        self._uses: list[list[int]] = [[0], [0], [0]]  # per point: the panels on it
        # per panel (the first len(nodes)): its (a, m, b) point indices, width, and whether it is at MAX_DEPTH
        self._idx = np.zeros((8, 3), dtype=np.int64)
        self._idx[0] = (0, 2, 1)
        self._h = np.zeros(8)
        self._h[0] = 1.0
        self._deep = np.zeros(8, dtype=bool)
        self._leaf = np.zeros((R, 8), dtype=bool)  # [R, capacity]: each row's panels
        self._leaf[:, 0] = True
        self.budget = max(1, max_splits // 2)  # panels per row
        self.final = np.zeros(R, dtype=bool)  # rows whose panels are settled
        self.coarser = (self._p[0] + self._p[1]) / 2.0  # [R, C] the previous estimate: trapezoid on the ends
        self._allocs: np.ndarray | None = None  # [capacity, R, C] of node_allocations: the first _n_allocs are
        self._n_allocs = 0  # current but for the panels on a point added to since (_dirty)
        self._dirty: set[int] = set()
        self._total: np.ndarray | None = None  # _allocation() of the current leaf and points, but for the rows
        self._stale = np.zeros(R, dtype=bool)  # whose panels or values changed since (computed again alone)

    # ---- what leaves: torch, on the points' device ------------------------------------------------------

    def _out(self, x: np.ndarray) -> torch.Tensor:
        """A copy (the caller may change it; the mesh's arrays stay its own)."""
        return torch.from_numpy(np.array(x)).to(self.device)

    @property
    def leaf(self) -> np.ndarray:
        """[R, nodes] bool: the panels of each row (a view: writable)."""
        return self._leaf[:, :len(self.nodes)]

    @property
    def values(self) -> torch.Tensor:
        """[points, R]"""
        return self._out(self._v[:len(self.s)])

    @property
    def delta(self) -> torch.Tensor:
        return self._out(self._v[1] - self._v[0])

    def node_allocations(self) -> torch.Tensor:
        """[nodes, R, C]: every panel's allocation for every row, h/6·(d(a) + 4·d(m) + d(b))."""
        return self._out(self._node_allocations())

    def allocation(self) -> torch.Tensor:
        """[R, C]: each row's allocation over its own panels (the caller's to change)."""
        return self._out(self._allocation())

    def residual(self) -> torch.Tensor:
        return self._out(self._residual())

    def splits(self) -> torch.Tensor:
        """[R] sub-intervals of each row (2 per panel)."""
        return self._out(2 * self.leaf.sum(1))

    def error(self) -> torch.Tensor:
        """[R, C] |A(final) − A(one round coarser)| (never refined: Simpson against the trapezoid)."""
        return self._out(np.abs(self._allocation() - self.coarser))

    # ---- the host arrays ------------------------------------------------------------------------------

    def _node_allocations(self) -> np.ndarray:
        """[nodes, R, C] (the same arithmetic per element as `panel_simpson`), kept between calls: only new panels
        and those on a point that has been added to since are computed again, in one set of ops."""
        N, done = len(self.nodes), self._n_allocs
        again = sorted({k for i in self._dirty for k in self._uses[i] if k < done})
        self._dirty = set()
        if done == N and not again:
            return self._allocs[:N]
        todo = np.array(again + list(range(done, N)), dtype=np.int64)
        sub = self._idx[todo]
        proj = self._p
        fresh = (proj[sub[:, 0]] + 4.0 * proj[sub[:, 1]] + proj[sub[:, 2]]) * (self._h[todo] / 6.0)[:, None, None]
        if self._allocs is None or self._allocs.shape[0] < N:
            grown = np.empty((max(8, 2 * N), *fresh.shape[1:]))
            if self._allocs is not None:
                grown[:done] = self._allocs[:done]
            self._allocs = grown
        self._allocs[todo] = fresh
        self._n_allocs = N
        return self._allocs[:N]

    def _allocation(self) -> np.ndarray:
        """[R, C] each row's sum over its own panels, panel by panel in order; kept until a point or a row's panels
        change."""
        alloc = self._node_allocations()  # [N, R, C]
        if self._total is None:
            self._total = np.where(self.leaf.T[:, :, None], alloc, 0.0).sum(0)
        elif self._stale.any():  # (each row's sum is its own: the same numbers as computing all rows)
            rows = np.nonzero(self._stale)[0]
            self._total[rows] = np.where(self.leaf[rows].T[:, :, None], alloc[:, rows], 0.0).sum(0)
        self._stale[:] = False
        return self._total

    def _residual(self) -> np.ndarray:
        return (self._v[1] - self._v[0]) - self._allocation().sum(-1)

    def plan(self, tol: float, rtol: float, override: torch.Tensor | None = None
             ) -> list[tuple[float, torch.Tensor]]:
        """Split, for every unsettled row that is not grounded, its panels whose residual exceeds their fair
        share (largest first, within its budget); settle the others. Returns the points to evaluate, each with
        the rows [R] bool (on the points' device) that need it (rows whose panels now use it and that were not
        evaluated there).

        `override` [R]: residuals to judge groundedness by instead, where not NaN (the per-parameter
        losses' own float64 sums at plain Simpson: they decide as they always did).
        """
        total = self._allocation()
        alloc = self._node_allocations()  # [N, R, C]
        dl = self._v[1] - self._v[0]
        res = dl - total.sum(-1)
        if override is not None:
            over_res = _host(override)
            res = np.where(np.isnan(over_res), res, over_res)
        with np.errstate(invalid="ignore"):
            ok = np.abs(res) <= tol + rtol * np.abs(dl)
        leaf = self.leaf
        panels = leaf.sum(1)
        active = ~self.final & ~ok & np.isfinite(res) & (panels < self.budget)
        self.final |= ~active
        if not active.any():
            return []
        act = np.nonzero(active)[0]  # the rows that plan a split (the others are settled): [A]
        v = self._v
        N = len(self.nodes)
        idx, h = self._idx[:N], self._h[:N]
        with np.errstate(invalid="ignore"):
            node_res = np.abs((v[idx[:, 2]][:, act] - v[idx[:, 0]][:, act]) - alloc[:, act].sum(-1)).T  # [A, N]
            share = (tol + rtol * np.abs(dl[act]))[:, None] * h[None, :]
            cand = leaf[act] & ~self._deep[:N]
            over = cand & (node_res > share)
            # a row not grounded has a panel over its share unless rounding hides it: then its worst panel
            hidden = ~over.any(1)
            if hidden.any():
                worst = np.where(cand, node_res, -1.0).max(1, keepdims=True)
                over |= cand & hidden[:, None] & (node_res == worst)
        room = np.clip(self.budget - panels[act], 0, None)
        chosen = over  # [A, N]
        if (over.sum(1) > room).any():  # some row has more panels over their share than budget left
            score = np.where(over, node_res, -1.0)
            order = np.argsort(-score, axis=1, kind="stable")  # largest first, leftmost nodes first on ties
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.broadcast_to(np.arange(N), order.shape), axis=1)
            chosen = over & (rank < room[:, None])
        splits_a = chosen.any(1)
        self.final[act[~splits_a]] = True
        rows_split = act[splits_a]
        self.coarser[rows_split] = total[rows_split]
        split = np.nonzero(chosen.any(0))[0]  # each node split by some row
        kids = np.array([self._children(i) for i in split.tolist()], dtype=np.int64).reshape(-1, 2)
        grow = len(self.nodes) - N
        if grow:  # the new panels' indices, widths and depths, and no row on them yet
            new = self.nodes[N:]
            for name in ("_idx", "_h", "_deep"):
                self._grow(name, N + grow)
            self._idx[N:N + grow] = [(n.a, n.m, n.b) for n in new]
            self._h[N:N + grow] = [n.h for n in new]
            self._deep[N:N + grow] = [n.depth >= MAX_DEPTH for n in new]
            if self._leaf.shape[1] < N + grow:
                more = np.zeros((self._leaf.shape[0], max(N + grow, 2 * self._leaf.shape[1])), dtype=bool)
                more[:, :N] = self._leaf[:, :N]
                self._leaf = more
        by = np.zeros((len(self.final), len(split)), dtype=bool)  # [R, split nodes]: the rows that split each
        by[act] = chosen[:, split]
        leaf = self.leaf
        leaf[:, split] &= ~by
        for k in (0, 1):
            leaf[:, kids[:, k]] |= by
        self._stale[rows_split] = True
        # the points the new panels miss: their midpoints, for the rows that split their parent (the other points
        # of every row's panels were evaluated for it in earlier rounds; distinct panels have distinct midpoints)
        mids = np.array([self.nodes[k].m for k in kids.reshape(-1).tolist()], dtype=np.int64)
        need = np.repeat(by.T, 2, axis=0) & ~self._have[mids]  # [2 × split nodes, R]
        order = np.argsort(mids, kind="stable")
        return [(self.s[mids[j]], self._out(need[j])) for j in order.tolist() if need[j].any()]

    def _missing(self) -> list[tuple[float, torch.Tensor]]:
        """(s, rows) for every point some row's panels use without its values there, in the order of s's creation
        (a recount over every panel: `plan` finds the same from the panels it made)."""
        N = len(self.nodes)
        idx = self._idx[:N]
        uses = self.leaf.T.astype(np.int32)  # [N, R]
        count = np.zeros((len(self.s), uses.shape[1]), dtype=np.int32)
        for k in range(3):
            np.add.at(count, idx[:, k], uses)
        need = (count > 0) & ~self._have[:len(self.s)]  # [points, R]
        return [(self.s[i], self._out(need[i])) for i in np.nonzero(need.any(1))[0].tolist()]

    def _grow(self, name: str, size: int) -> None:
        """The array `name` holds at least `size` entries along its first dimension (doubling, zeros)."""
        buf = getattr(self, name)
        if buf.shape[0] < size:
            more = np.zeros((max(size, 2 * buf.shape[0]), *buf.shape[1:]), dtype=buf.dtype)
            more[:buf.shape[0]] = buf
            setattr(self, name, more)

    def _children(self, i: int) -> tuple[int, int]:
        """The two halves of panel i (made, with any new midpoints, on its first split)."""
        n = self.nodes[i]
        if n.children is None:
            sa, sm, sb = self.s[n.a], self.s[n.m], self.s[n.b]
            kids = []
            for lo, hi, lo_s, hi_s in ((n.a, n.m, sa, sm), (n.m, n.b, sm, sb)):
                mid = (lo_s + hi_s) / 2.0
                if mid not in self.index:
                    self.index[mid] = len(self.s)
                    self.s.append(mid)
                    self._uses.append([])
                    if len(self.s) > self._v.shape[0]:
                        for name in ("_v", "_p", "_have"):
                            self._grow(name, len(self.s))
                k = len(self.nodes)
                self.nodes.append(Node(lo, self.index[mid], hi, n.depth + 1))  # (its arrays: by plan)
                for pt in (lo, self.index[mid], hi):
                    self._uses[pt].append(k)
                kids.append(k)
            n.children = (kids[0], kids[1])
        return n.children

    def add(self, s: float, values: torch.Tensor, proj: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The point's values [R] and projections [R, C], real for `rows` (all when None); kept for those rows
        only (the others: 0, or what an earlier evaluation there gave them)."""
        i = self.index[s]
        if rows is None:
            self._v[i], self._p[i] = _host(values), _host(proj)
            self._have[i] = True
            self._stale[:] = True
        else:
            r = _host(rows).astype(bool)
            self._v[i] = np.where(r, _host(values), self._v[i])
            self._p[i] = np.where(r[:, None], _host(proj), self._p[i])
            self._have[i] |= r
            self._stale |= r
        self._dirty.add(i)

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), points] each point's weight in the rows' allocation: Σ over their panels of h/6 at the ends,
        4h/6 at the midpoint (for per-parameter allocations: Δθ ⊙ Σ_p w_p g_p). On the host."""
        w = torch.zeros(len(rows), len(self.s), dtype=torch.float64)
        leaf = torch.from_numpy(self.leaf[torch.as_tensor(rows).cpu().numpy()])
        for i, n in enumerate(self.nodes):
            on = leaf[:, i].double()
            if not bool(on.any()):
                continue
            w[:, n.a] += on * (n.h / 6.0)
            w[:, n.m] += on * (4.0 * n.h / 6.0)
            w[:, n.b] += on * (n.h / 6.0)
        return w


def _host(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """A tensor's values as a float64 (or bool) numpy array on the host (a device tensor: one copy, a sync)."""
    if isinstance(x, np.ndarray):
        return x
    x = x.detach()
    if x.dtype != torch.bool:
        x = x.to(torch.float64)
    return x.cpu().numpy()


def refine(mesh: Mesh, point: Callable[[float, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
           tol: float, rtol: float, override: torch.Tensor | None = None, many: Callable | None = None) -> None:
    """Evaluate the points the mesh asks for until every row is grounded or out of budget: `point(s, rows)`
    evaluates at least the rows [R] that need the point and returns (values, projections, the rows it
    evaluated), which the mesh keeps. `many(points)`, when given, evaluates a whole round at once (one such
    triple per point), or returns None to leave the round to `point`."""
    while points := mesh.plan(tol, rtol, override):
        override = None
        got = many(points) if many is not None and len(points) > 1 else None
        for (s, rows), res in zip(points, got or [None] * len(points), strict=True):
            mesh.add(s, *(res if res is not None else point(s, rows)))


def points_of(mesh: Mesh) -> list[list[float]]:
    """Per row, the s of the points its panels used (sorted)."""
    leaf = mesh.leaf
    out = []
    for r in range(leaf.shape[0]):
        used = set()
        for i in np.nonzero(leaf[r])[0].tolist():
            n = mesh.nodes[i]
            used |= {mesh.s[n.a], mesh.s[n.m], mesh.s[n.b]}
        out.append(sorted(used))
    return out
