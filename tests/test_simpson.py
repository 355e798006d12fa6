"""The method alone (engine.simpson): Simpson panels refined where the error is, on analytic integrands.

The integrand of a row and column is d(s) = Δθ_c · ∂ℓ/∂θ_c along the step; here it is given in
closed form, with its exact integral, so every check is against an independent reference.
"""

import math

import pytest
import torch

from replay.engine.simpson import Mesh, is_grounded, panel_simpson, refine


def run_mesh(f, F, rows, cols, tol=1e-8, max_splits=32):
    """A mesh over d(s) = f(s) [rows, cols] whose row losses are F(s) [rows] (F' = Σ_c f)."""
    calls = []

    def point(s, rows):
        calls.append(s)
        return F(s), f(s), torch.ones_like(rows)

    mesh = Mesh(((F(0.0), f(0.0)), (F(1.0), f(1.0))), (F(0.5), f(0.5)), max_splits)
    refine(mesh, point, tol, 0.0)
    return mesh, calls


def test_simpson_is_exact_for_degree_four_and_grounded_means_within_tol():
    f = lambda s: torch.tensor([[4 * s**3 - 3 * s**2 + 1.0]], dtype=torch.float64)  # noqa: E731
    F = lambda s: torch.tensor([s**4 - s**3 + s], dtype=torch.float64)  # noqa: E731
    mesh, calls = run_mesh(f, F, 1, 1)
    assert calls == [] and mesh.splits().tolist() == [2], "plain Simpson, no refinement"
    assert mesh.allocation().item() == pytest.approx(1.0, abs=1e-15)
    assert panel_simpson(torch.tensor(0.0), torch.tensor(0.125), torch.tensor(1.0), 1.0).item() == pytest.approx(0.25)
    assert is_grounded(torch.tensor([1e-5, -2e-4]), torch.tensor([1.0, 1.0]), 1e-4, 0.0).tolist() == [True, False]
    assert is_grounded(torch.tensor([-2e-4]), torch.tensor([1.0]), 1e-4, 1e-3).tolist() == [True]


def test_smooth_rows_refine_like_the_uniform_composite_rule():
    """cos: every panel misses equally, so the mesh doubles everywhere (the uniform composite rule), and the
    allocation approaches the exact integral at n⁻⁴."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(2, 20, generator=g, dtype=torch.float64)
    delta = torch.linspace(0.5, 3.0, 20, dtype=torch.float64)
    f = lambda s: -torch.sin(theta + s * delta) * delta  # noqa: E731 - Δ_c · ∂/∂θ_c Σ cos(θ)
    F = lambda s: torch.cos(theta + s * delta).sum(1)  # noqa: E731
    mesh, _ = run_mesh(f, F, 2, 20, tol=1e-9)
    exact = torch.cos(theta + delta) - torch.cos(theta)
    points = sorted(mesh.s)
    n = len(points) - 1
    assert points == [k / n for k in range(n + 1)], "a uniform mesh"
    err = (mesh.allocation() - exact).abs()
    assert (err <= delta.abs() ** 5 / (180 * n**4) + 1e-14).all(), "within the composite rule's error bound"


def test_a_kink_gets_its_points_where_it_is():
    """ℓ(s) = Σ_c w_c·|s − 1/3|: the derivative jumps at 1/3 (not a dyadic point). Uniform composite Simpson
    converges at O(h) there; refining where the panels miss grounds it within the same budget of 32
    sub-intervals (33 points)."""
    c = torch.tensor([1 / 3, 1 / 3], dtype=torch.float64)
    w = torch.tensor([1.0, 0.5], dtype=torch.float64)
    f = lambda s: (w * torch.sign(s - c)).view(1, 2)  # noqa: E731
    F = lambda s: (w * (s - c).abs()).sum().view(1)  # noqa: E731
    mesh, calls = run_mesh(f, F, 1, 2, tol=1e-3, max_splits=32)
    exact = w * ((1 - c).abs() - c.abs())
    res = (F(1.0) - F(0.0) - mesh.allocation().sum()).abs().item()
    assert res <= 1e-3 and mesh.splits().item() <= 32, (res, mesh.splits())
    assert (mesh.allocation()[0] - exact).abs().max() < 1e-3
    near = sum(1 for s in mesh.s if abs(s - 1 / 3) < 0.05)
    assert near > len(mesh.s) / 2, "most points went next to the kinks"

    def uniform(n):
        pts = [k / n for k in range(n + 1)]
        wts = [1 if k in (0, n) else 4 if k % 2 else 2 for k in range(n + 1)]
        return sum(wk * f(s)[0] for wk, s in zip(wts, pts, strict=True)) / (3 * n)

    assert (uniform(32) - exact).abs().sum() > 10 * (mesh.allocation()[0] - exact).abs().sum(), \
        "uniform refinement with the same budget is far off"
    need = next(n for n in (2 ** k for k in range(1, 20)) if (uniform(n) - exact).abs().sum() <= 1e-3)
    assert need >= 16 * 32, f"uniform needs {need} sub-intervals"


def test_rows_are_independent_and_keep_their_first_grounded_panels():
    """Each row's panels depend on its own residuals only: adding a rough row changes no smooth row's numbers."""
    smooth_f = lambda s: torch.tensor([[2 * s, 1.0]], dtype=torch.float64)  # noqa: E731
    smooth_F = lambda s: torch.tensor([s**2 + s], dtype=torch.float64)  # noqa: E731
    c = 0.41

    def both_f(s):
        return torch.cat([smooth_f(s), torch.tensor([[math.copysign(1.0, s - c), 0.0]], dtype=torch.float64)])

    def both_F(s):
        return torch.cat([smooth_F(s), torch.tensor([abs(s - c)], dtype=torch.float64)])

    alone, _ = run_mesh(smooth_f, smooth_F, 1, 2)
    together, calls = run_mesh(both_f, both_F, 2, 2)
    assert len(calls) > 0, "the rough row refined"
    assert together.splits().tolist()[0] == 2 and alone.splits().tolist() == [2]
    assert torch.equal(together.allocation()[0], alone.allocation()[0]), "bit for bit"


def test_the_error_column_bounds_the_true_error_of_each_column():
    """Per column, the estimate (the change of the last refinement, or Simpson against the trapezoid) is at
    least the true error of the allocation on analytic cases."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(3, 8, generator=g, dtype=torch.float64)
    delta = torch.randn(3, 8, generator=g, dtype=torch.float64) * 2
    f = lambda s: -torch.sin(theta + s * delta) * delta  # noqa: E731
    F = lambda s: torch.cos(theta + s * delta).sum(1)  # noqa: E731
    exact = torch.cos(theta + delta) - torch.cos(theta)
    for tol in (1e-2, 1e-5, 1e-8):
        mesh, _ = run_mesh(f, F, 3, 8, tol=tol)
        true = (mesh.allocation() - exact).abs()
        assert (mesh.error() >= true - 1e-15).all(), f"tol {tol}: {(true - mesh.error()).max():.2e}"
        assert mesh.error().max() < 100 * max(tol, 1e-10) + 1e-12 or mesh.splits().max() == 32


def test_a_row_out_of_budget_stops_and_a_non_finite_row_is_not_refined():
    nan_f = lambda s: torch.tensor([[float("nan")], [math.copysign(1.0, s - 0.3)]], dtype=torch.float64)  # noqa: E731
    nan_F = lambda s: torch.tensor([float("nan"), abs(s - 0.3)], dtype=torch.float64)  # noqa: E731
    mesh, _ = run_mesh(nan_f, nan_F, 2, 1, tol=1e-14, max_splits=8)
    assert mesh.splits().tolist() == [2, 8]


def test_a_refined_point_is_evaluated_only_for_the_rows_that_need_it():
    """Rows with kinks at different places: each refined point is asked for the rows whose panels use it only,
    and a row that later needs a point another row asked for first gets it then. The point function returns
    NaN for every row it was not asked for: the allocation equals, bit for bit, that of evaluating every row
    at every point (each row's own exact d(s)). A row whose panels come to use a point it lacks is asked for
    it (forced here: in a refinement the rows split shared panels in the same round)."""
    kinks = torch.tensor([0.3, 0.71, 0.52, 0.13, 0.9, 0.26], dtype=torch.float64)
    w = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.05, 2.0], dtype=torch.float64)[:, None] * torch.ones(6, 3,
                                                                                                   dtype=torch.float64)
    f = lambda s: w * torch.sign(torch.tensor(s, dtype=torch.float64) - kinks)[:, None]  # noqa: E731
    F = lambda s: w.sum(1) * (torch.tensor(s, dtype=torch.float64) - kinks).abs()  # noqa: E731
    asked: list[tuple[float, list[bool]]] = []

    def partial(s, rows):
        asked.append((s, rows.tolist()))
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return torch.where(rows, F(s), nan), torch.where(rows[:, None], f(s), nan), rows

    def full(s, rows):
        return F(s), f(s), torch.ones_like(rows)

    meshes = []
    for point in (partial, full):
        mesh = Mesh(((F(0.0), f(0.0)), (F(1.0), f(1.0))), (F(0.5), f(0.5)), 32)
        refine(mesh, point, 1e-6, 0.0)
        meshes.append(mesh)
    a, b = meshes
    assert torch.equal(a.allocation(), b.allocation()) and torch.equal(a.splits(), b.splits())
    assert not torch.isnan(a.allocation()).any()
    assert any(not all(r) for _, r in asked), "some points are evaluated for some rows only"
    for s, _ in asked:  # never a row twice at one point
        assert sum(r for s2, rr in asked if s2 == s for r in rr) == sum(
            any(rr[i] for s2, rr in asked if s2 == s) for i in range(6))
    # a row whose panels come to use a point evaluated for other rows only is asked for it, and then uses it
    s, rows = next((s, r) for s, r in asked if not all(r))
    i, r = a.index[s], rows.index(False)
    j = next(j for j, n in enumerate(a.nodes) if i in (n.a, n.m, n.b))
    a.leaf[r, j] = True
    missing = dict(a._missing())
    assert missing[s].tolist() == [k == r for k in range(6)]
    for t, rows in missing.items():
        a.add(t, *full(t, rows)[:2], rows)
    n = a.nodes[j]
    want = panel_simpson(f(a.s[n.a])[r], f(a.s[n.m])[r], f(a.s[n.b])[r], n.h)
    assert torch.equal(a.node_allocations()[j, r], want) and not a._missing()


def test_the_points_a_round_asks_for_are_those_the_rows_panels_miss():
    """plan() finds the points the new panels miss from the panels it made; a recount over every panel of every row
    (`_missing`) finds the same, round after round, with each point evaluated only for the rows that asked."""
    kinks = torch.tensor([0.3, 0.71, 0.52, 0.13, 0.9, 0.26, 0.5001], dtype=torch.float64)
    f = lambda s: torch.sign(torch.tensor(s, dtype=torch.float64) - kinks)[:, None].repeat(1, 2)  # noqa: E731
    F = lambda s: 2 * (torch.tensor(s, dtype=torch.float64) - kinks).abs()  # noqa: E731
    mesh = Mesh(((F(0.0), f(0.0)), (F(1.0), f(1.0))), (F(0.5), f(0.5)), 32)
    rounds, partial = 0, 0
    while points := mesh.plan(1e-6, 0.0):
        want = mesh._missing()
        assert [(s, r.tolist()) for s, r in points] == [(s, r.tolist()) for s, r in want]
        partial += sum(not bool(r.all()) for _, r in points)
        for s, rows in points:
            mesh.add(s, torch.where(rows, F(s), torch.nan), torch.where(rows[:, None], f(s), torch.nan), rows)
        rounds += 1
    assert rounds >= 3 and partial > 0 and not torch.isnan(mesh.allocation()).any()
