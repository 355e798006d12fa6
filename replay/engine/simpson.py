"""Composite Simpson along one step, as pure functions of gradient sums.

Along θ(s) = θ_t + s·Δθ, s ∈ [0, 1], with n (even) sub-intervals of width h = 1/n:

    ∫₀¹ g(s) ds ≈ h/3 · (E + 4·O + 2·M)

E = g(0) + g(1), O = Σ g at odd multiples of h, M = Σ g at interior even multiples of h.
Doubling n keeps every point: the old odd and even interior points become the new even
ones (M' = M + O) and only the new odd points are evaluated (O' = their sum). n = 2 is
plain Simpson, (g(0) + 4·g(½) + g(1))/6, exact for losses polynomial of degree ≤ 4 in θ.
"""

from __future__ import annotations

import torch


def simpson_integral(ends: torch.Tensor, odd: torch.Tensor, mid: torch.Tensor, n: int) -> torch.Tensor:
    """h/3 · (E + 4·O + 2·M) for n sub-intervals; works on [..., P] stacks of gradients."""
    return (ends + 4.0 * odd + 2.0 * mid) / (3.0 * n)


def allocation(g0: torch.Tensor, g1: torch.Tensor, odd: torch.Tensor, mid: torch.Tensor | None, dw: torch.Tensor,
               n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """LCA [..., P] = Δθ ⊙ h/3·(E + 4·O + 2·M) from the gradient sums at n sub-intervals (mid None: M = 0)."""
    out = torch.add(g0, g1, out=out) if out is not None else g0 + g1
    out.add_(odd, alpha=4.0)
    if mid is not None:
        out.add_(mid, alpha=2.0)
    return out.mul_(dw / (3.0 * n))


def refine_points(n: int) -> list[float]:
    """The new evaluation points when going from n to 2n sub-intervals: odd multiples of 1/(2n)."""
    return [(2 * j + 1) / (2 * n) for j in range(n)]


def is_grounded(residual: torch.Tensor, delta_loss: torch.Tensor, tol: float, rtol: float) -> torch.Tensor:
    """|ΔL − ΣLCA| ≤ tol + rtol·|ΔL| (absolute tolerance in loss units, plus an optional relative one)."""
    return residual.abs() <= tol + rtol * delta_loss.abs()
