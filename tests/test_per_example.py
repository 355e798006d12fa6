"""Per-example LCA: each example's own loss change, allocated per step and tensor, checked against the loss
evaluated directly per example, the data set's own LCA, and an analytic separable loss."""

import numpy as np
import polars as pl
import pytest
import tasks
import torch
from test_engine import record_poly
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.digits import digits_mlp, load_digits_tensors, train_digits
from replay.errors import ReplayError, TaskError


def per_example_terms(state):
    """The quartic loss is separable: example i's loss is Σ_j f(x_ij·w_j − y_ij); tensor w owns its j < 12."""
    x, y = tasks.poly_data()
    r = x * torch.cat([state["w"], state["b"]]) - y
    f = 0.25 * r**4 - 0.5 * r**3 + r**2 + 0.3 * r  # [examples, 15]
    return torch.stack([f[:, :tasks.P].sum(1), f[:, tasks.P:].sum(1)], 1)  # [examples, tensors w, b]


@pytest.mark.parametrize("products", ["batched", "one-by-one"])
def test_analytic_separable_loss_per_example_and_tensor(tmp_path, products, monkeypatch):
    if products == "one-by-one":  # a model whose ops have no vmap rule: the products run one after another
        import replay.engine.ghost as pe

        def no_vmap(*args, **kwargs):
            raise NotImplementedError("no batching rule")

        monkeypatch.setattr(pe, "vmap", no_vmap)
    run = record_poly(tmp_path / "run", steps=4)
    fr = replay.compute(run, per_example=["train"], out=tmp_path / "lca")
    ex = fr.examples.collect()
    assert ex.columns == ["step", "loss", "example", "tensor", "lca"] and ex["lca"].dtype == pl.Float64
    es = fr.example_steps.collect()
    assert (es["splits"] == 2).all(), "Simpson is exact for a quartic: no example needs refinement"
    for t in range(4):
        expected = per_example_terms(run.state(t + 1)) - per_example_terms(run.state(t))  # [40, 2]
        got = (ex.filter(pl.col("step") == t).pivot(on="tensor", index="example", values="lca").sort("example")
               .select("w", "b").to_numpy())
        max_diff = np.abs(got - expected.numpy()).max()
        assert max_diff < 1e-10, f"step {t}: max_diff {max_diff:.3e}"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("pe") / "run"
    train_digits(digits_mlp(), str(path), epochs=1, batch=128)
    return path


def test_per_example_lca_matches_the_loss_evaluated_directly(digits_run, tmp_path):
    tol = 1e-4
    fr = replay.compute(digits_run, ["val"], per_example=["val"], out=tmp_path / "lca", tol=tol)
    es = fr.example_steps.collect()
    run = replay.open_run(digits_run)
    n_steps = len(run.steps) - 1
    x, y = load_digits_tensors()["val"]
    assert len(es) == n_steps * len(y) and es["grounded"].all()
    assert es["residual"].abs().max() <= tol

    def losses(t):  # every example's loss evaluated directly
        m = digits_mlp()
        m.load_state_dict(run.state(t))
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(x), y, reduction="none").double().numpy()

    totals = fr.examples.group_by("example").agg(pl.col("lca").sum()).sort("example").collect()["lca"].to_numpy()
    direct = losses(run.steps[-1]) - losses(0)
    assert np.abs(totals - direct).max() <= n_steps * tol, "Σ over steps and tensors = ℓ_i(θ_T) − ℓ_i(θ_0)"
    first = es.filter(pl.col("step") == 0).sort("example")["loss_before"].to_numpy()
    np.testing.assert_allclose(first, losses(0), rtol=1e-6)
    # the mean over examples is the data set's LCA (each within its own residual)
    mean = es.group_by("step").agg(pl.col("lca").mean()).sort("step")["lca"].to_numpy()
    val = fr.steps.sort("step").collect()["lca"].to_numpy()
    assert np.abs(mean - val).max() <= 2 * tol
    # per tensor: the examples' mean is the data set's per-tensor LCA up to the same residuals
    pt = fr.examples.group_by("step", "tensor").agg(pl.col("lca").mean()).collect()
    dt = fr.tensors.filter(pl.col("loss") == "val").select("step", "tensor", pl.col("lca").alias("ds")).collect()
    j = pt.join(dt, on=["step", "tensor"])
    assert len(j) == n_steps * 6 and (j["lca"] - j["ds"]).abs().max() <= 2 * tol


def test_per_example_refinement_looks_at_the_examples(digits_run, tmp_path):
    fr = replay.compute(digits_run, ["val"], per_example=["val"], out=tmp_path / "lca", tol=1e-6)
    es = fr.example_steps.collect()
    assert es["splits"].max() > fr.steps.collect()["splits"].max(), "single examples need more points (ReLU kinks)"
    assert es.filter(pl.col("grounded"))["residual"].abs().max() <= 1e-6
    assert (~es["grounded"]).sum() == es.filter(pl.col("splits") == 32).filter(~pl.col("grounded")).height


@pytest.mark.parametrize("per_param", [None, []])
def test_rows_share_the_data_sets_own_pass(digits_run, tmp_path, monkeypatch, per_param):
    """Where the data set is a loss of the compute, its rows take their start, midpoint and end values and
    products from the data set's own pass (one forward and backward per point, the gradient and every example's
    products), not from a pass of their own: the rows are bit for bit those computed alone, and the rows'
    own evaluation is never called (refinement rounds aside)."""
    from replay.engine.rows import ExampleIntegrand

    calls = [0]
    own = ExampleIntegrand.__call__

    def counted(self, *a, **k):
        calls[0] += 1
        return own(self, *a, **k)

    monkeypatch.setattr(ExampleIntegrand, "__call__", counted)
    alone = replay.compute(digits_run, ["train"], per_example=["val"], out=tmp_path / "alone", steps=(0, 8))
    assert calls[0] > 0
    calls[0] = 0
    kw = {} if per_param is None else {"per_param": per_param}
    shared = replay.compute(digits_run, ["train", "val"], per_example=["val"], out=tmp_path / "shared",
                            steps=(0, 8), **kw)
    assert calls[0] == 0, "the rows' base points came from the data set's pass"
    a, b = (f.example_steps.sort("step", "example").collect() for f in (alone, shared))
    assert a.equals(b), "bit for bit the rows computed on their own"
    ea, eb = (f.examples.sort("step", "example", "tensor").collect() for f in (alone, shared))
    assert ea.equals(eb)
    # and the data set's own numbers are those of a compute without rows (to float64 reassociation where its
    # projections are sums of the examples' products: per_param=[])
    plain = replay.compute(digits_run, ["train", "val"], out=tmp_path / "plain", steps=(0, 8), **kw)
    sa, sb = (f.steps.filter(pl.col("loss") == "val").sort("step").collect() for f in (plain, shared))
    np.testing.assert_array_equal(sa["loss_before"].to_numpy(), sb["loss_before"].to_numpy())
    scale = np.abs(sa["lca"].to_numpy()).max()
    np.testing.assert_allclose(sa["lca"].to_numpy(), sb["lca"].to_numpy(), rtol=0, atol=1e-12 if per_param is None
                               else 1e-6 * scale)


class Centered(torch.nn.Module):
    """fc1's outputs are centred over the batch: every example's loss reads every example's fc1 output, so fc1's
    one-backward products are no example's own (the first batch's check sends them to the forward-mode product)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h - h.mean(0, keepdim=True)))


def test_rows_of_a_data_set_whose_check_fails_evaluate_on_their_own(tmp_path):
    """A data set there for its rows whose first batch's check sends a tensor to the slow product goes back to plain
    backward passes (its own numbers those of a compute without rows), and its rows, computed on their own from
    then on, are those of a compute where the data set is no loss of it."""
    train_digits(Centered(), str(tmp_path / "run"), epochs=1, batch=256)
    task = lambda: replay.Task(Centered(), load_digits_tensors())  # noqa: E731
    with pytest.warns(UserWarning, match="disagree with each example"):
        shared = replay.compute(tmp_path / "run", ["train", "val"], task=task(), per_example=["val"],
                                out=tmp_path / "shared", steps=(0, 4))
    with pytest.warns(UserWarning, match="disagree"):
        alone = replay.compute(tmp_path / "run", ["train"], task=task(), per_example=["val"], out=tmp_path / "alone",
                               steps=(0, 4))
    plain = replay.compute(tmp_path / "run", ["train", "val"], task=task(), out=tmp_path / "plain", steps=(0, 4))
    a, b = (f.example_steps.sort("step", "example").collect() for f in (alone, shared))
    np.testing.assert_allclose(a["lca"].to_numpy(), b["lca"].to_numpy(), rtol=0, atol=1e-12)
    assert a["splits"].equals(b["splits"])
    sa, sb = (f.steps.filter(pl.col("loss") == "val").sort("step").collect() for f in (plain, shared))
    np.testing.assert_allclose(sa["lca"].to_numpy(), sb["lca"].to_numpy(), rtol=0, atol=1e-12)
    assert len(b) == 4 * len(load_digits_tensors()["val"][1]) and b["grounded"].mean() > 0.9


def test_per_example_cli_and_refusals(digits_run, tmp_path):
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--loss", "val", "--per-example", "val",
                                   "--out", str(tmp_path / "cli"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert replay.load(tmp_path / "cli").examples.select(pl.len()).collect().item() > 0
    with pytest.raises(TaskError, match="per-example"):
        replay.compute(digits_run, ["val"], per_example=["test"], out=tmp_path / "x")
    with pytest.raises(ReplayError, match="data-parallel"):
        replay.compute(digits_run, ["val"], per_example=["val"], data_parallel=True, out=tmp_path / "y")
    bn = tmp_path / "bn"
    train_digits(tasks.BNDropNet(), str(bn), epochs=1, batch=512, task="tasks:bn_drop")
    with pytest.raises(TaskError, match="batch-norm with batch statistics"):
        replay.compute(bn, ["val"], per_example=["val"], out=tmp_path / "z")


def test_unchanged_steps_have_zero_per_example_lca(tmp_path):
    from test_exactness import train_with_accumulation

    train_with_accumulation(tmp_path / "run", capture_micro_batches=True)  # every other step changes nothing
    fr = replay.compute(tmp_path / "run", ["val"], per_example=["val"], out=tmp_path / "lca")
    es = fr.example_steps.sort("step", "example").collect()
    still = es.filter(pl.col("step") % 2 == 0)
    assert (still["lca"] == 0).all() and (still["splits"] == 0).all() and still["grounded"].all()
    assert (still["loss_before"] == still["loss_after"]).all()
    # the loss there is the example's own, continuous with the steps around it
    nxt = es.filter(pl.col("step") % 2 == 1).with_columns(pl.col("step") - 1)
    j = still.join(nxt, on=["step", "example"])
    np.testing.assert_allclose(j["loss_after"].to_numpy(), j["loss_before_right"].to_numpy(), rtol=1e-6)
