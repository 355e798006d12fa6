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

    Points arrive as (s, values [R] float64, projections [R, C] float64). Nothing here evaluates
    anything: `plan()` says which points the next round needs, the caller evaluates them and
    passes them to `add()`.
    """

    def __init__(self, ends: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 mid: tuple[torch.Tensor, torch.Tensor], max_splits: int):
        (v0, d0), (v1, d1) = ends
        self.s: list[float] = [0.0, 1.0, 0.5]
        self.index = {0.0: 0, 1.0: 1, 0.5: 2}
        self.values = [v0, v1, mid[0]]  # [R] each
        self.proj = [d0, d1, mid[1]]  # [R, C] each
        self.nodes = [Node(0, 2, 1, 0)]
        R = v0.shape[0]
        self.leaf = torch.ones(R, 1, dtype=torch.bool, device=v0.device)
        self.budget = max(1, max_splits // 2)  # panels per row
        self.final = torch.zeros(R, dtype=torch.bool, device=v0.device)  # rows whose panels are settled
        # [R] per point: the rows evaluated there (a refined point is evaluated only for the rows whose panels
        # use it; the others hold 0 there, and get their values when a later split of theirs needs the point)
        self.have = [torch.ones(R, dtype=torch.bool, device=v0.device) for _ in range(3)]
        self.coarser = (d0 + d1) / 2.0  # [R, C] the previous estimate: trapezoid on the ends
        self._idx: tuple[torch.Tensor, torch.Tensor] | None = None  # see _index
        self._allocs: torch.Tensor | None = None  # [nodes, R, C] of node_allocations, and the points added to since
        self._dirty: set[int] = set()
        self._pending: list[tuple[int, int]] = []  # (node, child) splits waiting for their midpoints

    @property
    def delta(self) -> torch.Tensor:
        return self.values[1] - self.values[0]

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3] the (a, m, b) point indices of every panel and [N] their widths, on the rows' device (kept
        until the mesh grows)."""
        if self._idx is None or self._idx[0].shape[0] != len(self.nodes):
            dev = self.leaf.device
            self._idx = (torch.tensor([(n.a, n.m, n.b) for n in self.nodes], dtype=torch.long, device=dev),
                         torch.tensor([n.h for n in self.nodes], dtype=self.values[0].dtype, device=dev))
        return self._idx

    def node_allocations(self) -> torch.Tensor:
        """[nodes, R, C]: every panel's allocation for every row, h/6·(d(a) + 4·d(m) + d(b)) (the same arithmetic
        per element as `panel_simpson`), kept between calls: only new panels and those on a point that has
        been added to since are computed again, in one set of ops."""
        idx, h = self._index()
        N, cached = idx.shape[0], self._allocs
        if cached is None:
            todo = torch.arange(N, device=idx.device)
        else:
            dirty = torch.tensor(sorted(self._dirty), dtype=torch.long, device=idx.device)
            old = torch.isin(idx[:cached.shape[0]], dirty).any(1)
            todo = torch.cat([torch.nonzero(old).flatten(), torch.arange(cached.shape[0], N, device=idx.device)])
        self._dirty = set()
        if cached is not None and len(todo) == 0:
            return cached
        sub = idx[todo]
        proj = torch.stack(self.proj)  # [points, R, C]
        fresh = (proj[sub[:, 0]] + 4.0 * proj[sub[:, 1]] + proj[sub[:, 2]]) * (h[todo] / 6.0).view(-1, 1, 1)
        if cached is None or cached.shape[0] < N:
            grown = fresh.new_empty(N, *fresh.shape[1:])
            if cached is not None:
                grown[:cached.shape[0]] = cached
            cached = grown
        cached[todo] = fresh
        self._allocs = cached
        return cached

    def allocation(self) -> torch.Tensor:
        """[R, C]: each row's allocation over its own panels."""
        return torch.einsum("rn,nrc->rc", self.leaf.to(self.proj[0].dtype), self.node_allocations())

    def residual(self) -> torch.Tensor:
        return self.delta - self.allocation().sum(-1)

    def splits(self) -> torch.Tensor:
        """[R] sub-intervals of each row (2 per panel)."""
        return 2 * self.leaf.sum(1)

    def plan(self, tol: float, rtol: float, override: torch.Tensor | None = None
             ) -> list[tuple[float, torch.Tensor]]:
        """Split, for every unsettled row that is not grounded, its panels whose residual exceeds their fair
        share (largest first, within its budget); settle the others. Returns the points to evaluate, each with
        the rows [R] bool that need it (rows whose panels now use it and that were not evaluated there).

        `override` [R]: residuals to judge groundedness by instead, where not NaN (the per-parameter
        losses' own float64 sums at plain Simpson: they decide as they always did).
        """
        alloc = self.node_allocations()  # [N, R, C]
        total = torch.einsum("rn,nrc->rc", self.leaf.to(alloc.dtype), alloc)
        dl = self.delta
        res = dl - total.sum(-1)
        if override is not None:
            res = torch.where(torch.isnan(override), res, override)
        finite = torch.isfinite(res)
        ok = is_grounded(res, dl, tol, rtol)
        panels = self.leaf.sum(1)
        active = ~self.final & ~ok & finite & (panels < self.budget)
        self.final |= ~active
        if not bool(active.any()):  # host sync: the refinement decision
            return []
        v = torch.stack(self.values)  # [points, R]
        idx, h = self._index()
        node_res = ((v[idx[:, 2]] - v[idx[:, 0]]) - alloc.sum(-1)).T.abs()  # [R, N]
        deep = torch.tensor([n.depth >= MAX_DEPTH for n in self.nodes], device=v.device)
        share = (tol + rtol * dl.abs())[:, None] * h[None, :]
        cand = self.leaf & ~deep & active[:, None]
        over = cand & (node_res > share)
        # a row not grounded has a panel over its share unless rounding hides it: then its worst panel
        hidden = active & ~over.any(1)
        over |= cand & hidden[:, None] & (node_res == torch.where(cand, node_res, -1.0).max(1, keepdim=True).values)
        room = (self.budget - panels).clamp(min=0)
        score = torch.where(over, node_res, torch.full_like(node_res, -1.0))
        order = torch.argsort(-score, dim=1, stable=True)  # largest first, leftmost nodes first on ties
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=v.device).expand_as(order))
        chosen = over & (rank < room[:, None])
        self.final |= active & ~chosen.any(1)
        rows_split = chosen.any(1)
        self.coarser = torch.where(rows_split[:, None], total, self.coarser)
        new_points: list[float] = []
        for i in torch.nonzero(chosen.any(0)).flatten().tolist():  # each node split by some row
            kids = self._children(i, new_points)
            rows = chosen[:, i]
            self.leaf[rows, i] = False
            for k in kids:
                self.leaf[rows, k] = True
        return self._missing()

    def _missing(self) -> list[tuple[float, torch.Tensor]]:
        """(s, rows) for every point some row's panels use without its values there, in the order of s's creation."""
        idx, _ = self._index()
        uses = self.leaf.T.to(torch.int32)  # [N, R]
        count = torch.zeros(len(self.s), uses.shape[1], dtype=torch.int32, device=uses.device)
        for k in range(3):
            count.index_add_(0, idx[:, k], uses)
        need = (count > 0) & ~torch.stack(self.have)  # [points, R]
        return [(self.s[i], need[i]) for i in torch.nonzero(need.any(1)).flatten().tolist()]

    def _children(self, i: int, new_points: list[float]) -> tuple[int, int]:
        n = self.nodes[i]
        if n.children is None:
            sa, sm, sb = self.s[n.a], self.s[n.m], self.s[n.b]
            kids = []
            for lo, hi, lo_s, hi_s in ((n.a, n.m, sa, sm), (n.m, n.b, sm, sb)):
                mid = (lo_s + hi_s) / 2.0
                if mid not in self.index:
                    self.index[mid] = len(self.s)
                    self.s.append(mid)
                    self.values.append(None)
                    self.proj.append(None)
                    self.have.append(torch.zeros_like(self.have[0]))
                    new_points.append(mid)
                self.nodes.append(Node(lo, self.index[mid], hi, n.depth + 1))
                kids.append(len(self.nodes) - 1)
            n.children = (kids[0], kids[1])
            grow = torch.zeros(self.leaf.shape[0], 2, dtype=torch.bool, device=self.leaf.device)
            self.leaf = torch.cat([self.leaf, grow], 1)
        return n.children

    def add(self, s: float, values: torch.Tensor, proj: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """The point's values [R] and projections [R, C], real for `rows` (all when None); kept for those rows
        only (the others: 0, or what an earlier evaluation there gave them)."""
        i = self.index[s]
        if rows is None:
            rows = torch.ones_like(self.have[i])
        if self.values[i] is None:
            self.values[i], self.proj[i] = values.new_zeros(values.shape), proj.new_zeros(proj.shape)
        self.values[i] = torch.where(rows, values, self.values[i])
        self.proj[i] = torch.where(rows[:, None], proj, self.proj[i])
        self.have[i] = self.have[i] | rows
        self._dirty.add(i)

    def error(self) -> torch.Tensor:
        """[R, C] |A(final) − A(one round coarser)| (never refined: Simpson against the trapezoid)."""
        return (self.allocation() - self.coarser).abs()

    def weights(self, rows: torch.Tensor) -> torch.Tensor:
        """[len(rows), points] each point's weight in the rows' allocation: Σ over their panels of h/6 at the ends,
        4h/6 at the midpoint (for per-parameter allocations: Δθ ⊙ Σ_p w_p g_p)."""
        w = torch.zeros(len(rows), len(self.s), dtype=torch.float64)
        leaf = self.leaf[rows.to(self.leaf.device)].cpu()
        for i, n in enumerate(self.nodes):
            on = leaf[:, i].double()
            if not bool(on.any()):
                continue
            w[:, n.a] += on * (n.h / 6.0)
            w[:, n.m] += on * (4.0 * n.h / 6.0)
            w[:, n.b] += on * (n.h / 6.0)
        return w


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
    leaf = mesh.leaf.cpu()
    out = []
    for r in range(leaf.shape[0]):
        used = set()
        for i in torch.nonzero(leaf[r]).flatten().tolist():
            n = mesh.nodes[i]
            used |= {mesh.s[n.a], mesh.s[n.m], mesh.s[n.b]}
        out.append(sorted(used))
    return out
