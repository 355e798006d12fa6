"""The replay engine: analytic exactness, groundedness on real data, identities, resume."""

import numpy as np
import polars as pl
import pytest
import tasks
import torch
from polars.testing import assert_frame_equal
from safetensors.torch import load_file
from test_exactness import assert_class_identity
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.digits import digits_mlp, train_digits
from replay.errors import ReplayError, TaskError


def record_poly(path, steps=5, scale=0.3):
    m = tasks.Scale()
    g = torch.Generator().manual_seed(1)
    with replay.Recorder(m, path, task="tasks:poly") as rec:
        for _ in range(steps):
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
            rec.capture()
    return replay.open_run(path)


def per_param_terms(state):
    """The quartic loss is separable: parameter j owns the term mean_b f(x_bj·w_j − y_bj)."""
    x, y = tasks.poly_data()
    r = x * torch.cat([state["w"], state["b"]]) - y
    return (0.25 * r**4 - 0.5 * r**3 + r**2 + 0.3 * r).mean(0)


def simpson_on(points, f):
    """The composite rule on a mesh given as its sorted points (ends and midpoints alternate), independently:
    Σ over panels [x₂ₖ, x₂ₖ₊₂] of h/6·(f(x₂ₖ) + 4f(x₂ₖ₊₁) + f(x₂ₖ₊₂))."""
    assert len(points) % 2 == 1 and points[0] == 0.0 and points[-1] == 1.0
    total = 0.0
    for k in range(0, len(points) - 1, 2):
        a, m, b = points[k:k + 3]
        assert m == (a + b) / 2
        total = total + (b - a) / 6 * (f(a) + 4 * f(m) + f(b))
    return total


def test_refined_steps_are_the_composite_rule_per_parameter(tmp_path):
    """Through compute(): a cosine loss refined where its error is; each parameter's dense LCA is the textbook
    composite Simpson rule on that step's points, evaluated here from autograd gradients of the loss itself."""
    run = record_poly(tmp_path / "run", steps=3, scale=0.5)
    x, y = tasks.poly_data()
    loss_fn = lambda o, y: torch.cos(3 * (o - y)).sum(1)  # noqa: E731
    task = replay.Task(tasks.Scale(), {"train": (x, y)}, loss_fn=loss_fn)
    fr = replay.compute(run, task=task, tol=1e-7, max_splits=8, dense=True, out=tmp_path / "lca")
    steps = fr.steps.sort("step").collect()
    assert (steps["splits"] > 2).all()
    dense = {}
    for f in sorted((tmp_path / "lca" / "dense").glob("*.safetensors")):
        dense.update(load_file(f))

    def grad(w):
        w = w.clone().requires_grad_(True)
        return torch.autograd.grad(loss_fn(x * w, y).mean(), w)[0]

    for t, points in enumerate(steps["points"].to_list()):
        assert len(points) == steps["splits"][t] + 1
        w0, w1 = (torch.cat([run.state(s)["w"], run.state(s)["b"]]) for s in (t, t + 1))
        expected = simpson_on(points, lambda s: (w1 - w0) * grad(w0 + s * (w1 - w0)))  # noqa: B023
        torch.testing.assert_close(dense[str(t)][0], expected, rtol=1e-9, atol=1e-12)  # flat order: w, then b


def test_quartic_loss_matches_analytic_allocation_per_step(tmp_path):
    run = record_poly(tmp_path / "run")
    fr = replay.compute(run, dense=True, out=tmp_path / "lca")
    steps = fr.steps.collect()
    assert steps["splits"].to_list() == [2] * 5, "Simpson is exact for degree 4: no refinement"
    assert steps["residual"].abs().max() < 1e-10
    dense = {}
    for f in sorted((tmp_path / "lca" / "dense").glob("*.safetensors")):
        dense.update(load_file(f))
    for t in range(5):
        expected = per_param_terms(run.state(t + 1)) - per_param_terms(run.state(t))
        max_diff = (dense[str(t)][0] - expected).abs().max().item()
        assert max_diff < 1e-10, f"step {t}: max_diff {max_diff:.3e}"
    total = per_param_terms(run.state(5)) - per_param_terms(run.state(0))
    got = torch.tensor(fr.params.sort("tensor", "index", descending=[True, False]).collect()["lca"].to_numpy())
    assert (got - total).abs().max().item() < 1e-10


def test_first_order_is_the_plain_gradient_product(tmp_path):
    run = record_poly(tmp_path / "run", steps=2)
    fr = replay.compute(run, first_order=True, out=tmp_path / "fo")
    steps = fr.steps.collect()
    assert steps["splits"].to_list() == [1, 1]
    x, y = tasks.poly_data()
    st0, st1 = run.state(0), run.state(1)
    w = torch.cat([st0["w"], st0["b"]]).requires_grad_(True)
    g0 = torch.autograd.grad(tasks.quartic(x * w, y).mean(), w)[0]
    expected = (g0 * (torch.cat([st1["w"], st1["b"]]) - w.detach())).sum().item()
    assert steps["lca"][0] == pytest.approx(expected, rel=1e-12)
    assert steps["residual"].abs().max() > 1e-3, "first order is not grounded on big steps"


def test_refinement_and_cap_are_reported(tmp_path):
    run = record_poly(tmp_path / "run", steps=3, scale=0.5)
    cos_task = replay.Task(tasks.Scale(), {"train": tasks.poly_data()},
                           loss_fn=lambda o, y: torch.cos(3 * (o - y)).sum(1))
    fr = replay.compute(run, task=cos_task, tol=1e-7, max_splits=256, out=tmp_path / "a")
    s = fr.steps.collect()
    assert (s["splits"] > 2).all() and s["grounded"].all() and s["residual"].abs().max() <= 1e-7
    capped = replay.compute(run, task=cos_task, tol=1e-12, max_splits=2, out=tmp_path / "b").steps.collect()
    assert capped["splits"].to_list() == [2, 2, 2] and not capped["grounded"].any()
    assert capped["residual"].abs().max() > 1e-12


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "run"
    train_digits(digits_mlp(), str(path), epochs=1)
    return path


def test_digits_grounded_and_per_class_identity(digits_run, tmp_path):
    fr = replay.compute(digits_run, ["train", "val"], per_class=["train"], tol=1e-4, out=tmp_path / "lca")
    steps = fr.steps.collect()
    n_steps = len(replay.open_run(digits_run).steps) - 1
    assert len(steps) == n_steps * 12
    assert steps["grounded"].all(), steps.filter(~pl.col("grounded"))
    assert steps["residual"].abs().max() <= 1e-4
    assert_class_identity(fr, tol=1e-4)
    # params totals = Σ over steps of tensors, for each tensor and loss with per-parameter numbers
    assert fr.meta["per_param"] == ["train", "val"], "default: the data-set losses"
    p = fr.params.group_by("loss", "tensor").agg(pl.col("lca").sum()).sort("loss", "tensor").collect()
    t = (fr.tensors.filter(pl.col("loss").is_in(["train", "val"])).group_by("loss", "tensor")
         .agg(pl.col("lca").sum()).sort("loss", "tensor").collect())
    np.testing.assert_allclose(p["lca"].to_numpy(), t["lca"].to_numpy(), rtol=1e-9, atol=1e-12)
    # frac_helped = Σ n_helped / Σ n_params; null (not 0) for the class losses, which have no counts
    f = fr.tensors.group_by("step", "loss").agg(pl.col("n_helped").sum() / pl.col("n_params").sum())
    j = steps.filter(pl.col("loss").is_in(["train", "val"])).join(f.collect(), on=["step", "loss"])
    np.testing.assert_allclose(j["frac_helped"].to_numpy(), j["n_helped"].to_numpy())
    classes = steps.filter(pl.col("loss").str.contains("/"))
    assert classes["frac_helped"].is_null().all()
    assert fr.tensors.filter(pl.col("loss").str.contains("/")).collect()["n_helped"].is_null().all()


def test_user_groups_one_pass(digits_run, tmp_path):
    fr = replay.compute(digits_run, ["train"], task="tasks:digits_grouped", out=tmp_path / "g")
    assert fr.meta["losses"] == ["train", "train/parity=0", "train/parity=1"]
    s = fr.steps.collect()
    assert s["grounded"].all()
    n_steps = fr.meta["n_steps"]
    assert fr.meta["grad_evals"] < 4 * (n_steps + 1), "groups must not cost extra passes"


def test_batchnorm_and_dropout_model_is_grounded(tmp_path):
    model = tasks.BNDropNet()
    train_digits(model, str(tmp_path / "run"), epochs=1, batch=64, task="tasks:bn_drop", buffers=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    fr = replay.compute(tmp_path / "run", ["train", "val"], tol=1e-4)
    s = fr.steps.collect()
    assert s["grounded"].all() and s["residual"].abs().max() <= 1e-4
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    fr2 = replay.compute(tmp_path / "run", ["val"], task=_running_bn(), out=tmp_path / "running")
    assert fr2.steps.collect()["grounded"].all()


def _running_bn():
    t = tasks.bn_drop()
    t.batchnorm = "running"
    return t


def test_resume_after_interruption_gives_identical_frames(digits_run, tmp_path):
    calls = {"n": 0, "stop": None}
    base = replay.digits.digits()

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-compute
        return torch.nn.functional.cross_entropy(out, y, reduction="none")

    interrupted = replay.Task(base.model, base.data, loss_fn=flaky)
    full = replay.compute(digits_run, ["train"], per_class=["train"], task=interrupted, out=tmp_path / "full",
                          flush_every=5)
    per_eval = calls["n"] / full.meta["grad_evals"]
    calls["n"], calls["stop"] = 0, round(30 * per_eval)  # ~30 evaluations: past a few flushes
    with pytest.raises(KeyboardInterrupt):
        replay.compute(digits_run, ["train"], per_class=["train"], task=interrupted, out=tmp_path / "r",
                       flush_every=5)
    assert (tmp_path / "r" / "progress.json").exists()
    with pytest.raises(ReplayError, match="did not finish"):
        replay.load(tmp_path / "r")
    before = calls["n"]
    resumed = replay.compute(digits_run, ["train"], per_class=["train"], task=interrupted, out=tmp_path / "r",
                             flush_every=5)
    full_calls = full.meta["grad_evals"] * per_eval
    assert calls["n"] - before < full_calls - 10 * per_eval, "resume must skip the flushed steps, not recompute them"
    for name in ("steps", "tensors", "params"):
        a = getattr(full, name).sort(pl.all()).collect()
        b = getattr(resumed, name).sort(pl.all()).collect()
        assert_frame_equal(a, b, check_exact=False, rel_tol=1e-12)


def test_bad_input_is_one_clear_error(digits_run, tmp_path):
    with pytest.raises(TaskError, match=r"unknown loss 'test': the task's data sets are \['train', 'val'\]"):
        replay.compute(digits_run, ["test"])
    with pytest.raises(TaskError, match="cannot import 'no_such_module'"):
        replay.compute(digits_run, task="no_such_module:task")
    with pytest.raises(TaskError, match=r"parameter '0.weight': the task's model has shape \(16, 64\)"):
        replay.compute(digits_run, task=replay.Task(digits_mlp(hidden=16), replay.digits.load_digits_tensors()))
    with pytest.raises(TaskError, match="empty"):
        replay.Task(digits_mlp(), {"train": (torch.zeros(0, 64), torch.zeros(0, dtype=torch.long))})
    with pytest.raises(ReplayError, match="other settings"):
        replay.compute(digits_run, ["train"], out=tmp_path / "x")
        replay.compute(digits_run, ["val"], out=tmp_path / "x")


def test_frames_schema_is_the_contract(digits_run, tmp_path):
    fr = replay.compute(digits_run, ["val"], out=tmp_path / "lca")
    assert fr.steps.collect_schema().names()[:9] == ["step", "loss", "loss_before", "loss_after", "delta_loss",
                                                     "lca", "residual", "splits", "frac_helped"]
    assert fr.tensors.collect_schema().names()[:6] == ["step", "loss", "tensor", "lca", "n_params", "n_helped"]
    assert fr.params.collect_schema().names() == ["loss", "tensor", "index", "lca", "n_helped", "n_steps"]
    for lf in (fr.steps, fr.tensors, fr.params):
        assert lf.collect_schema()["lca"] == pl.Float64
    again = replay.load(tmp_path / "lca")
    assert_frame_equal(again.steps.collect(), fr.steps.collect())


def test_helped_counts_add_up_over_many_steps(tmp_path):
    """Per parameter, n_helped (steps in which its LCA was negative) over 300 steps — past the 255 steps a one-byte
    counter holds — equals the per-step per-tensor counts summed, and the direct count from the dense LCA."""
    m, (x, y) = tasks.Scale(), tasks.poly_data()
    with replay.Recorder(m, tmp_path / "run", task="tasks:poly") as rec:
        for _ in range(300):  # gradient descent: most parameters help in (nearly) every step
            m.zero_grad()
            tasks.quartic(m(x), y).mean().backward()
            with torch.no_grad():
                for p in m.parameters():
                    p -= 1e-3 * p.grad
            rec.capture()
    run = replay.open_run(tmp_path / "run")
    fr = replay.compute(run, dense=True, flush_every=1000, out=tmp_path / "lca")
    per_step = fr.tensors.group_by("tensor").agg(pl.col("n_helped").sum()).sort("tensor").collect()
    totals = fr.params.group_by("tensor").agg(pl.col("n_helped").sum()).sort("tensor").collect()
    assert per_step["n_helped"].to_list() == totals["n_helped"].to_list()
    dense = {}
    for f in sorted((tmp_path / "lca" / "dense").glob("*.safetensors")):
        dense.update(load_file(f))
    direct = sum((dense[str(t)][0] < 0).long() for t in range(300))
    got = fr.params.sort("tensor", "index", descending=[True, False]).collect()["n_helped"].to_numpy()
    assert got.tolist() == direct.tolist() and max(got) > 255


@pytest.mark.parametrize("how", ["cast in the reduction", "blocks of 16 columns"])
def test_per_tensor_sums_agree_however_they_are_cut(digits_run, tmp_path, monkeypatch, how):
    """Per-tensor float64 sums: through float64 scratch blocks (CPU), with the cast inside the reduction (CUDA), or
    in blocks much smaller than a tensor: the same numbers to rounding, and the same refinement decisions."""
    import replay.engine.columns as columns

    def tensors(out):
        fr = replay.compute(digits_run, ["val"], per_class=["val"], per_param="all", out=out)
        return fr.tensors.sort("step", "loss", "tensor").collect(), fr.steps.sort("step", "loss").collect()["splits"]

    a, a_splits = tensors(tmp_path / "a")
    if how == "cast in the reduction":
        monkeypatch.setattr(columns, "CPU_BLOCKS", False)
    else:
        monkeypatch.setattr(columns, "MIN_BLOCK", 16)
        monkeypatch.setattr(columns, "BLOCK_BYTES", 16)
    b, b_splits = tensors(tmp_path / "b")
    np.testing.assert_allclose(b["lca"].to_numpy(), a["lca"].to_numpy(), rtol=1e-12, atol=1e-15)
    assert b_splits.to_list() == a_splits.to_list()
    assert b["n_helped"].to_list() == a["n_helped"].to_list()


def test_a_diverged_run_whose_states_repeat_is_unchanged_not_refined(tmp_path):
    """NaN ≠ NaN: states are compared bit for bit, so a diverged run's repeated NaN states cost nothing."""
    from replay.digits import digits_mlp, load_digits_tensors

    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = load_digits_tensors()["train"]
    with replay.Recorder(model, tmp_path / "run", task="replay.digits:digits") as rec:
        for i in range(20):
            if i < 5:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[:64]), y[:64]).backward()
                opt.step()
            elif i == 5:
                with torch.no_grad():
                    model[0].weight.fill_(float("nan"))  # diverged: every later state is the same NaN bits
            rec.capture()
    fr = replay.compute(tmp_path / "run", ["train"], out=tmp_path / "lca", progress=False)
    s = fr.steps.sort("step").collect()
    assert s["unchanged"].to_list() == [False] * 6 + [True] * 14
    assert (s["splits"][6:] == 0).all()
    assert fr.meta["grad_evals"] <= 2 * 6 + 1 + 6 * 2, "no refinement of steps that cannot ground"


def test_a_nan_example_is_counted_and_shown_not_skipped(tmp_path):
    from replay.digits import digits_mlp, train_digits

    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1, batch=128)
    res = CliRunner().invoke(app, ["compute", str(tmp_path / "run"), "--task", "tasks:digits_nan_example",
                                   "--out", str(tmp_path / "lca"), "--no-progress"])
    assert res.exit_code == 0, res.output
    fr = replay.load(tmp_path / "lca")
    val = fr.steps.filter(pl.col("loss") == "val").collect()
    assert val["residual"].is_nan().all() and (val["splits"] == 2).all(), "NaN is not refined"
    n = len(val)
    assert f"{n} of {2 * n} residuals are not finite" in res.output and "max |residual| nan" in res.output, res.output
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "lca")])
    assert f"max |residual| nan, {n} not finite" in res.output, res.output
