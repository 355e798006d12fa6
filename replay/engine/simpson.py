"""Composite Simpson along one step, as pure functions of gradient sums.

Along θ(s) = θ_t + s·Δθ, s ∈ [0, 1], with n (even) sub-intervals of width h = 1/n:

    ∫₀¹ g(s) ds ≈ h/3 · (E + 4·O + 2·M)

E = g(0) + g(1), O = Σ g at odd multiples of h, M = Σ g at interior even multiples of h
(`mid`). Doubling n keeps every point: the old odd and even interior points become the new
even ones (M' = M + O) and only the new odd points are evaluated (O' = their sum). n = 2 is
plain Simpson, (g(0) + 4·g(½) + g(1))/6, exact for losses polynomial of degree ≤ 4 in θ.

The state of one step's refinement is a `Level`: the gradient sums [losses, params] at n
sub-intervals. Functions here never evaluate anything; the caller evaluates the points
`refine_points(n)` asks for and passes their sum to `refine`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Level:
    """Simpson's gradient sums at n sub-intervals: ends g(0), g(1); odd; mid (None: M = 0, n = 2)."""

    n: int
    g0: torch.Tensor
    g1: torch.Tensor
    odd: torch.Tensor
    mid: torch.Tensor | None = None


def refine(level: Level, evaluate: Callable[[list[float]], torch.Tensor],
           mid_out: torch.Tensor | None = None) -> Level:
    """The level at 2n sub-intervals: M' = M + O, then O' = evaluate(refine_points(n)), the sum of the
    gradients at the new points.

    M' goes into `mid_out` when given (preallocated; it may be `level.mid` itself). M' is formed
    before `evaluate` runs, so that the new points may be summed into the buffer of the old O.
    """
    if level.mid is None:
        mid = level.odd.clone() if mid_out is None else mid_out.copy_(level.odd)
    else:
        mid = torch.add(level.mid, level.odd, out=mid_out) if mid_out is not None else level.mid + level.odd
    return Level(2 * level.n, level.g0, level.g1, evaluate(refine_points(level.n)), mid)


def refine_points(n: int) -> list[float]:
    """The new evaluation points when going from n to 2n sub-intervals: odd multiples of 1/(2n)."""
    return [(2 * j + 1) / (2 * n) for j in range(n)]


def allocation(level: Level, dw: torch.Tensor, rows: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """LCA [..., P] = Δθ ⊙ h/3·(E + 4·O + 2·M) of the level (of its `rows` only, when given).

    Three passes over [rows, P] (add, add, multiply), in `out` when given.
    """
    pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
    g0, g1, odd = pick(level.g0), pick(level.g1), pick(level.odd)
    out = torch.add(g0, g1, out=out) if out is not None else g0 + g1
    out.add_(odd, alpha=4.0)
    if level.mid is not None:
        out.add_(pick(level.mid), alpha=2.0)
    return out.mul_(dw / (3.0 * level.n))


def simpson_integral(ends: torch.Tensor, odd: torch.Tensor, mid: torch.Tensor, n: int) -> torch.Tensor:
    """h/3 · (E + 4·O + 2·M) for n sub-intervals; works on [..., P] stacks of gradients."""
    return (ends + 4.0 * odd + 2.0 * mid) / (3.0 * n)


def is_grounded(residual: torch.Tensor, delta_loss: torch.Tensor, tol: float, rtol: float) -> torch.Tensor:
    """|ΔL − ΣLCA| ≤ tol + rtol·|ΔL| (absolute tolerance in loss units, plus an optional relative one)."""
    return residual.abs() <= tol + rtol * delta_loss.abs()
