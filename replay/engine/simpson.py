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
    passes them to `add()`. The points' values, projections and evaluated rows, the panels' point
    indices and their allocations live in tensors grown by doubling (a round costs a few ops, not
    one per point or panel); `nodes` keeps each panel's children for the splits.
    """

    def __init__(self, ends: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 mid: tuple[torch.Tensor, torch.Tensor], max_splits: int):
        (v0, d0), (v1, d1) = ends
        R, dev = v0.shape[0], v0.device
        self.s: list[float] = [0.0, 1.0, 0.5]
        self.index = {0.0: 0, 1.0: 1, 0.5: 2}
        # per point (the first len(s) of a capacity): values [R], projections [R, C], and the rows evaluated there
        # (a refined point is evaluated only for the rows whose panels use it; the others hold 0 there, and get
        # their values when a later split of theirs needs the point)
        self._v = torch.zeros(8, R, dtype=v0.dtype, device=dev)
        self._p = torch.zeros(8, *d0.shape, dtype=d0.dtype, device=dev)
        self._have = torch.zeros(8, R, dtype=torch.bool, device=dev)
        for i, (v, d) in enumerate(((v0, d0), (v1, d1), mid)):
            self._v[i], self._p[i] = v, d
        self._have[:3] = True
        self.nodes = [Node(0, 2, 1, 0)]
        self._uses: list[list[int]] = [[0], [0], [0]]  # per point: the panels on it
        # per panel (the first len(nodes)): its (a, m, b) point indices, width, and whether it is at MAX_DEPTH
        self._idx = torch.zeros(8, 3, dtype=torch.long, device=dev)
        self._idx[0] = torch.tensor([0, 2, 1])
        self._h = torch.zeros(8, dtype=v0.dtype, device=dev)
        self._h[0] = 1.0
        self._deep = torch.zeros(8, dtype=torch.bool, device=dev)
        self.leaf = torch.ones(R, 1, dtype=torch.bool, device=dev)
        self.budget = max(1, max_splits // 2)  # panels per row
        self.final = torch.zeros(R, dtype=torch.bool, device=dev)  # rows whose panels are settled
        self.coarser = (d0 + d1) / 2.0  # [R, C] the previous estimate: trapezoid on the ends
        self._allocs: torch.Tensor | None = None  # [capacity, R, C] of node_allocations: the first _n_allocs are
        self._n_allocs = 0  # current but for the panels on a point added to since (_dirty)
        self._dirty: set[int] = set()
        self._total: torch.Tensor | None = None  # allocation() of the current leaf and points

    @property
    def values(self) -> torch.Tensor:
        """[points, R]"""
        return self._v[:len(self.s)]

    @property
    def delta(self) -> torch.Tensor:
        return self._v[1] - self._v[0]

    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3] the (a, m, b) point indices of every panel and [N] their widths, on the rows' device."""
        N = len(self.nodes)
        return self._idx[:N], self._h[:N]

    def node_allocations(self) -> torch.Tensor:
        """[nodes, R, C]: every panel's allocation for every row, h/6·(d(a) + 4·d(m) + d(b)) (the same arithmetic
        per element as `panel_simpson`), kept between calls: only new panels and those on a point that has
        been added to since are computed again, in one set of ops."""
        idx, h = self._index()
        N, done = idx.shape[0], self._n_allocs
        again = sorted({k for i in self._dirty for k in self._uses[i] if k < done})
        self._dirty = set()
        if done == N and not again:
            return self._allocs[:N]
        todo = torch.tensor(again + list(range(done, N)), dtype=torch.long, device=idx.device)
        sub = idx[todo]
        proj = self._p[:len(self.s)]  # [points, R, C]
        fresh = (proj[sub[:, 0]] + 4.0 * proj[sub[:, 1]] + proj[sub[:, 2]]) * (h[todo] / 6.0).view(-1, 1, 1)
        if self._allocs is None or self._allocs.shape[0] < N:
            grown = fresh.new_empty(max(8, 2 * N), *fresh.shape[1:])
            if self._allocs is not None:
                grown[:done] = self._allocs[:done]
            self._allocs = grown
        self._allocs[todo] = fresh
        self._n_allocs = N
        return self._allocs[:N]

    def allocation(self) -> torch.Tensor:
        """[R, C]: each row's allocation over its own panels (the caller's to change)."""
        return self._allocation().clone()

    def _allocation(self) -> torch.Tensor:
        """allocation(), kept until a point or a row's panels change."""
        if self._total is None:
            alloc = self.node_allocations()
            self._total = torch.einsum("rn,nrc->rc", self.leaf.to(alloc.dtype), alloc)
        return self._total

    def residual(self) -> torch.Tensor:
        return self.delta - self._allocation().sum(-1)

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
        total = self._allocation()
        alloc = self.node_allocations()  # [N, R, C]
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
        v = self.values  # [points, R]
        idx, h = self._index()
        N = idx.shape[0]
        node_res = ((v[idx[:, 2]] - v[idx[:, 0]]) - alloc.sum(-1)).T.abs()  # [R, N]
        share = (tol + rtol * dl.abs())[:, None] * h[None, :]
        cand = self.leaf & ~self._deep[:N] & active[:, None]
        over = cand & (node_res > share)
        # a row not grounded has a panel over its share unless rounding hides it: then its worst panel
        hidden = active & ~over.any(1)
        if bool(hidden.any()):
            over |= cand & hidden[:, None] & (node_res == torch.where(cand, node_res, -1.0).max(1, keepdim=True).values)
        room = (self.budget - panels).clamp(min=0)
        chosen = over
        if bool((over.sum(1) > room).any()):  # some row has more panels over their share than budget left
            score = torch.where(over, node_res, torch.full_like(node_res, -1.0))
            order = torch.argsort(-score, dim=1, stable=True)  # largest first, leftmost nodes first on ties
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(order.shape[1], device=v.device).expand_as(order))
            chosen = over & (rank < room[:, None])
        self.final |= active & ~chosen.any(1)
        rows_split = chosen.any(1)
        self.coarser = torch.where(rows_split[:, None], total, self.coarser)
        split = torch.nonzero(chosen.any(0)).flatten()  # each node split by some row
        kids = torch.tensor([self._children(i) for i in split.tolist()], dtype=torch.long).view(-1, 2)
        grow = len(self.nodes) - N
        if grow:  # the new panels' indices, widths and depths, and no row on them yet
            new = self.nodes[N:]
            for name in ("_idx", "_h", "_deep"):
                self._grow(name, N + grow)
            self._idx[N:N + grow] = torch.tensor([(n.a, n.m, n.b) for n in new], dtype=torch.long)
            self._h[N:N + grow] = torch.tensor([n.h for n in new], dtype=self._h.dtype)
            self._deep[N:N + grow] = torch.tensor([n.depth >= MAX_DEPTH for n in new])
            self.leaf = torch.cat([self.leaf, self.leaf.new_zeros(self.leaf.shape[0], grow)], 1)
        kids = kids.to(v.device)
        by = chosen[:, split]  # [R, split nodes]: the rows that split each
        self.leaf[:, split] &= ~by
        for k in (0, 1):
            self.leaf[:, kids[:, k]] |= by
        self._total = None
        return self._missing()

    def _missing(self) -> list[tuple[float, torch.Tensor]]:
        """(s, rows) for every point some row's panels use without its values there, in the order of s's creation."""
        idx, _ = self._index()
        uses = self.leaf.T.to(torch.int32)  # [N, R]
        count = torch.zeros(len(self.s), uses.shape[1], dtype=torch.int32, device=uses.device)
        for k in range(3):
            count.index_add_(0, idx[:, k], uses)
        need = (count > 0) & ~self._have[:len(self.s)]  # [points, R]
        return [(self.s[i], need[i]) for i in torch.nonzero(need.any(1)).flatten().tolist()]

    def _grow(self, name: str, size: int) -> None:
        """The buffer `name` holds at least `size` entries along its first dimension (doubling, zeros)."""
        buf = getattr(self, name)
        if buf.shape[0] < size:
            more = buf.new_zeros(max(size, 2 * buf.shape[0]), *buf.shape[1:])
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
                    for name in ("_v", "_p", "_have"):
                        self._grow(name, len(self.s))
                k = len(self.nodes)
                self.nodes.append(Node(lo, self.index[mid], hi, n.depth + 1))  # (its tensors: by plan)
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
            rows = torch.ones_like(self._have[i])
        self._v[i] = torch.where(rows, values, self._v[i])
        self._p[i] = torch.where(rows[:, None], proj, self._p[i])
        self._have[i] |= rows
        self._dirty.add(i)
        self._total = None

    def error(self) -> torch.Tensor:
        """[R, C] |A(final) − A(one round coarser)| (never refined: Simpson against the trapezoid)."""
        return (self._allocation() - self.coarser).abs()

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
