"""Every analysis against frames whose answers are known by construction."""

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

import replay
from replay import analysis
from replay.cli import app
from replay.frames import Frames


def frames_from(tensor_rows, param_rows, step_rows=None):
    """Frames built by hand: tensors (step, loss, tensor, lca, n_params, n_helped), params rows."""
    tensors = pl.DataFrame(tensor_rows, schema=["step", "loss", "tensor", "lca", "n_params", "n_helped"], orient="row")
    if step_rows is None:
        step_rows = (tensors.group_by("step", "loss").agg(pl.col("lca").sum(), (pl.col("n_helped").sum() /
                     pl.col("n_params").sum()).alias("frac_helped"))
                     .with_columns(loss_before=pl.lit(1.0), delta_loss=pl.col("lca") + 1e-6, residual=pl.lit(1e-6),
                                   splits=pl.lit(2), grounded=pl.lit(True))
                     .with_columns(loss_after=pl.col("loss_before") + pl.col("delta_loss")))
    params = pl.DataFrame(param_rows, schema=["loss", "tensor", "index", "lca", "n_helped", "n_steps"], orient="row")
    return Frames(path=None, steps=step_rows.lazy(), tensors=tensors.lazy(), params=params.lazy(),
                  meta={"losses": sorted(tensors["loss"].unique().to_list()), "n_steps": tensors["step"].n_unique()})


@pytest.fixture
def fr():
    # 2 steps, 2 layers, train and val. layer "a" helps both; layer "b" helps train, hurts val
    t = [(0, "train", "a", -3.0, 2, 2), (0, "train", "b", -1.0, 2, 1), (1, "train", "a", -1.0, 2, 1),
         (1, "train", "b", 0.5, 2, 0), (0, "val", "a", -2.0, 2, 2), (0, "val", "b", 0.5, 2, 0),
         (1, "val", "a", -0.5, 2, 1), (1, "val", "b", 0.5, 2, 1)]
    p = [("train", "a", 0, -3.5, 2, 2), ("train", "a", 1, -0.5, 1, 2), ("train", "b", 0, -0.5, 1, 2),
         ("train", "b", 1, 0.0, 0, 2), ("val", "a", 0, -2.0, 2, 2), ("val", "a", 1, -0.5, 1, 2),
         ("val", "b", 0, 0.6, 0, 2), ("val", "b", 1, 0.4, 1, 2)]
    return frames_from(t, p)


def test_groundedness(fr):
    g = analysis.groundedness(fr).filter(pl.col("loss") == "train").row(0, named=True)
    assert g["steps"] == 2 and g["lca"] == pytest.approx(-4.5) and g["frac_grounded"] == 1.0
    assert g["max_abs_residual"] == pytest.approx(1e-6) and g["max_splits"] == 2


def test_helped_fraction(fr):
    h = analysis.helped_fraction(fr).filter(pl.col("loss") == "train").row(0, named=True)
    assert h["frac_param_steps_helped"] == pytest.approx(4 / 8)  # helped: 2+1+1+0 of 8 parameter-steps
    assert h["min_step_frac"] == pytest.approx(1 / 4) and h["max_step_frac"] == pytest.approx(3 / 4)


def test_param_help_histogram(fr):
    h = analysis.param_help_histogram(fr, "train", bins=2)  # fractions 1, .5, .5, 0
    assert h["n_params"].to_list() == [1, 3] and h["frac_params"].sum() == pytest.approx(1.0)


def test_lca_stats(fr):
    s = analysis.lca_stats(fr, "train").row(0, named=True)
    assert s["total"] == pytest.approx(-4.5) and s["mean"] == pytest.approx(-4.5 / 4)
    assert s["frac_params_helped_in_total"] == pytest.approx(3 / 4)
    assert s["share_top1pct"] == pytest.approx(3.5 / 4.5)  # the single most helpful parameter


def test_layer_totals_and_hurting(fr):
    lt = analysis.layer_totals(fr).filter(pl.col("loss") == "val")
    assert dict(zip(lt["tensor"], lt["lca"], strict=True)) == {"a": -2.5, "b": 1.0}
    assert lt.filter(pl.col("tensor") == "a")["lca_per_param"].item() == pytest.approx(-1.25)
    assert lt["share"].sum() == pytest.approx(1.0)
    assert analysis.hurting_layers(fr, "val")["tensor"].to_list() == ["b"]
    assert analysis.hurting_layers(fr, "train").is_empty()


def test_peak_moments(fr):
    pk = analysis.peak_moments(fr).filter(pl.col("loss") == "train")
    assert dict(zip(pk["tensor"], pk["step"], strict=True)) == {"a": 0, "b": 0}


def test_train_vs_val_and_overfit_params(fr):
    tv = analysis.train_vs_val(fr)
    assert tv.filter(pl.col("overfit"))["tensor"].to_list() == ["b"]
    op = analysis.overfit_params(fr)
    assert op.select("tensor", "index").rows() == [("b", 0)]  # helped train (-0.5), hurt val (+0.6)


def test_prune_candidates(fr):
    pc = analysis.prune_candidates(fr, "train")
    b = pc.filter(pl.col("tensor") == "b").row(0, named=True)
    assert b["never_helped"] == 1 and b["hurt_or_idle_total"] == 1 and b["frac_never_helped"] == 0.5


def test_synchronization_detects_shared_peaks_and_not_independent_ones():
    rng = np.random.default_rng(1)
    n, layers = 60, 4
    shared = np.zeros(n)
    shared[[7, 21, 40, 52]] = -10.0  # all layers learn at the same four moments
    rows_sync, rows_indep = [], []
    for j in range(layers):
        noise = rng.normal(0, 0.1, n)
        indep = noise.copy()
        indep[rng.choice(n, 4, replace=False)] = -10.0
        for t in range(n):
            rows_sync.append((t, "train", f"l{j}", float(shared[t] + noise[t]), 1, 0))
            rows_indep.append((t, "train", f"l{j}", float(indep[t]), 1, 0))
    s = analysis.synchronization(frames_from(rows_sync, []), "train", top=4, permutations=300)
    i = analysis.synchronization(frames_from(rows_indep, []), "train", top=4, permutations=300)
    assert s["overlap"].item() == 1.0 and s["p_value"].item() < 0.01
    assert i["p_value"].item() > 0.05


def test_oscillation_counts_direction_reversals(tmp_path):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    with replay.Recorder(model, tmp_path / "run") as rec:
        for delta in ([1, 1], [-1, 1], [1, 1], [-1, 1]):  # w0 zig-zags (3 reversals), w1 climbs
            with torch.no_grad():
                model.weight += torch.tensor([delta], dtype=torch.float32)
            rec.capture()
    osc = analysis.oscillation(replay.open_run(tmp_path / "run"))
    assert osc.row(0, named=True) == {"tensor": "weight", "flips": 3, "frac_reversals": 0.5}


def test_demo_and_summary_cli(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"])
    assert res.exit_code == 0, res.output
    assert "Groundedness per loss" in res.output and "replay summary" in res.output
    fr = replay.load(tmp_path / "demo" / "lca")
    assert fr.steps.select(pl.col("grounded").all()).collect().item()
    assert set(fr.meta["losses"]) == {"train", "val"} | {f"train/class={k}" for k in range(10)}
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "demo" / "lca")])
    assert res.exit_code == 0 and "Per-layer LCA (train" in res.output
    res = CliRunner().invoke(app, ["summary", str(tmp_path)])
    assert res.exit_code == 1 and "not an lca dir" in res.output


def test_plot_writes_every_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from replay.digits import digits_mlp, train_digits

    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1)
    replay.compute(tmp_path / "run", ["train", "val"], out=tmp_path / "lca")
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "lca")])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in (tmp_path / "lca" / "plots").glob("*.png"))
    assert names == ["layer_totals.png", "layer_trajectories.png", "lca_histogram.png", "peak_moments.png",
                     "percent_helped.png", "train_vs_val.png"]
    assert all((tmp_path / "lca" / "plots" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    res = CliRunner().invoke(app, ["plot", str(tmp_path / "lca"), "--loss", "nope"])
    assert res.exit_code == 1 and "not in this lca dir" in res.output


# ---- per-example analyses, on hand-built frames with known answers ------------------------------------

@pytest.fixture
def ex_frames():
    examples = pl.DataFrame({
        "step": [0, 0, 0, 0, 1, 1, 1, 1], "loss": ["val"] * 8, "example": [0, 1, 0, 1, 0, 1, 0, 1],
        "tensor": ["a", "a", "b", "b", "a", "a", "b", "b"],
        "lca": [-1.0, 0.5, 0.2, -0.1, -0.5, 0.25, 0.3, -0.4],
    })  # totals: a: ex0 -1.5, ex1 +0.75; b: ex0 +0.5, ex1 -0.5
    example_steps = pl.DataFrame({
        "step": [0, 0, 1, 1], "loss": ["val"] * 4, "example": [0, 1, 0, 1],
        "delta_loss": [-0.8, 0.4, -0.2, -0.15],
    })
    steps = pl.DataFrame({"step": [0, 1, 0, 1], "loss": ["train", "train", "val", "val"],
                          "delta_loss": [-0.5, 0.1, -0.2, -0.175]})
    return Frames(Path("."), steps.lazy(), pl.LazyFrame(), pl.LazyFrame(), {}, examples.lazy(), example_steps.lazy())


def test_example_extremes(ex_frames):
    e = analysis.example_extremes(ex_frames, "val", top=1)
    rows = {(r["tensor"], r["kind"]): (r["example"], r["lca"]) for r in e.iter_rows(named=True)}
    assert rows == {("a", "helped"): (0, -1.5), ("a", "hurt"): (1, 0.75), ("b", "helped"): (1, -0.5),
                    ("b", "hurt"): (0, pytest.approx(0.5))}


def test_forgetting_events(ex_frames):
    f = analysis.forgetting_events(ex_frames, "val")
    # step 0 lowered train (-0.5) but raised example 1 (+0.4); step 1 raised train: not a candidate
    assert f.rows() == [(0, 1, 0.4, -0.5)]


def test_batches_behind(ex_frames):
    batches = pl.DataFrame({"step": [0, 0, 1], "example": [7, 9, 3]})
    b = analysis.batches_behind(ex_frames, batches, "val", top=2)
    assert b["step"].to_list() == [0, 1] and b["examples"].to_list() == [[7, 9], [3]]
    b = analysis.batches_behind(ex_frames, batches, "val", steps=(1, 2), top=2)
    assert b["step"].to_list() == [1]


def test_plots_stay_readable_with_many_tensors(tmp_path):
    """80 tensors: named lines for the largest few plus one 'rest', bounded figure heights, no layout warnings,
    and the figures say when steps were not grounded."""
    pytest.importorskip("matplotlib")
    import struct
    import warnings

    from replay.plot import TOP, plot_all, top_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()) for _ in range(40)],
                                torch.nn.Linear(6, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for _ in range(6):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    task = replay.Task(model, {"train": (x, y)})
    fr = replay.compute(tmp_path / "run", ["train"], task=task, out=tmp_path / "lca", tol=1e-12, max_splits=2)
    assert fr.tensors.select("tensor").unique().collect().height == 82
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tight-layout or legend warning fails the test
        files = plot_all(fr, tmp_path / "plots")
    for f in files:
        w, h = struct.unpack(">II", f.read_bytes()[16:24])
        assert h < 2000 and w < 2000, (f.name, w, h)
    top, rest = top_tensors(analysis.layer_totals(fr).filter(pl.col("loss") == "train"), TOP)
    assert len(top) == TOP and len(rest) == 82 - TOP
