"""per_param: per-parameter totals only for the losses that report them, so memory is O(parameters) whatever the
number of group losses; the reported losses' numbers do not depend on which others are computed."""

import weakref

import numpy as np
import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import replay
from replay.digits import digits_mlp, train_digits
from replay.errors import TaskError


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("pp") / "run"
    train_digits(digits_mlp(), str(path), epochs=1, batch=128)
    return path


def test_reported_losses_do_not_depend_on_the_others(digits_run, tmp_path):
    alone = replay.compute(digits_run, ["train", "val"], out=tmp_path / "a")
    with_classes = replay.compute(digits_run, ["train", "val"], per_class=["train"], out=tmp_path / "b")
    everything = replay.compute(digits_run, ["train", "val"], per_class=["train"], per_param="all",
                                out=tmp_path / "c")
    assert with_classes.meta["per_param"] == ["train", "val"]
    assert len(everything.meta["per_param"]) == 12
    keep = pl.col("loss").is_in(["train", "val"])
    for name, keys in (("steps", ["step", "loss"]), ("tensors", ["step", "loss", "tensor"]),
                       ("params", ["loss", "tensor", "index"])):
        a = getattr(with_classes, name).filter(keep).sort(keys).collect()
        c = getattr(alone, name).filter(keep).sort(keys).collect()
        assert_frame_equal(a, c, check_exact=True)  # bit for bit: class losses change no reported number
        # (per-parameter class losses need their own gradients: train's examples are then sorted by class, so
        # its sums are associated differently: rounding)
        b = getattr(everything, name).filter(keep).sort(keys).collect()
        assert a.select(keys).equals(b.select(keys))
        assert np.allclose(a["lca"].to_numpy(), b["lca"].to_numpy(), rtol=1e-5, atol=1e-8)
    p = everything.params.collect()
    assert p["loss"].n_unique() == 12 and with_classes.params.collect()["loss"].unique().sort().to_list() == \
        ["train", "val"]
    c = with_classes.tensors.filter(pl.col("loss") == "train/class=3").collect()
    d = everything.tensors.filter(pl.col("loss") == "train/class=3").collect()
    assert c["n_helped"].is_null().all() and d["n_helped"].is_not_null().all()
    assert (c["lca"] - d["lca"]).abs().max() < 1e-9, "projections and per-parameter sums agree to rounding"


def test_unknown_per_param_names_are_refused(digits_run, tmp_path):
    with pytest.raises(TaskError, match=r"--per-param 'train/class=42': not a loss of this compute"):
        replay.compute(digits_run, ["train"], per_class=["train"], per_param=["train/class=42"], out=tmp_path / "x")
    fr = replay.compute(digits_run, ["train"], per_class=["train"], per_param=["train/class=3"], out=tmp_path / "y")
    assert fr.params.collect()["loss"].unique().to_list() == ["train/class=3"]


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (an independent allocation count: every op's
    outputs, freed when their storage dies)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, tuple | list) else [out]):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                st = t.untyped_storage()
                try:
                    key = st.data_ptr()
                except RuntimeError:  # forward-mode AD's wrapper tensors: their values are plain tensors,
                    continue  # counted when created
                if key and key not in self._seen and st.nbytes():
                    self._seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out

    def _free(self, key, n):
        self._seen.discard(key)
        self.live -= n


def _grouped_task(groups: int) -> replay.Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2000, 64, generator=g), torch.randint(0, 10, (2000,), generator=g)
    keys = {"train": {"g": torch.arange(2000) % groups}} if groups else {}
    return replay.Task(model, {"train": (x, y)}, batch_size=500, groups=keys)


def test_memory_with_100_group_losses_stays_that_of_one_loss(tmp_path):
    """A 1.1M-parameter MLP: the peak bytes a compute allocates with 100 group losses are within 1.3x of the
    peak with none (today's per-loss [P] buffers would make it ~100x)."""
    task = _grouped_task(0)
    with replay.Recorder(task.model, tmp_path / "run") as rec:
        for _ in range(2):
            with torch.no_grad():
                for p in task.model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            rec.capture()
    peaks = {}
    for groups in (0, 100):
        meter = LiveBytes()
        with meter:
            fr = replay.compute(tmp_path / "run", task=_grouped_task(groups), out=tmp_path / f"lca{groups}",
                                progress=False)
        peaks[groups] = meter.peak
        assert len(fr.meta["losses"]) == 1 + groups
    assert peaks[100] <= 1.3 * peaks[0], f"peak bytes {peaks[100]:,} with 100 groups vs {peaks[0]:,} without"


def test_point_gradients_over_the_memory_budget_are_evaluated_again_bit_for_bit(digits_run, tmp_path, monkeypatch):
    """A refined step keeps its points' [K, P] gradients for the per-parameter allocation only up to
    KEEP_GRAD_BYTES; past it they are evaluated again: the same frames bit for bit, more evaluations."""
    from replay.engine import steps

    kw = dict(per_class=["train"], tol=1e-6, max_splits=16)
    a = replay.compute(digits_run, ["train", "val"], out=tmp_path / "a", **kw)
    monkeypatch.setattr(steps, "KEEP_GRAD_BYTES", 1)  # nothing beyond the start, end and midpoint
    b = replay.compute(digits_run, ["train", "val"], out=tmp_path / "b", **kw)
    assert a.steps.select((pl.col("splits") > 2).sum()).collect().item() > 0, "some steps are refined"
    for name, keys in (("steps", ["step", "loss"]), ("tensors", ["step", "loss", "tensor"]),
                       ("params", ["loss", "tensor", "index"])):
        assert_frame_equal(getattr(a, name).sort(keys).collect(), getattr(b, name).sort(keys).collect(),
                           check_exact=True)
    assert b.meta["grad_evals"] > a.meta["grad_evals"]


def test_projections_taken_only_where_a_per_parameter_loss_refines_change_no_allocation(digits_run, tmp_path,
                                                                                      monkeypatch):
    """The per-parameter losses' projections per tensor come from their kept gradients, only at steps where one of
    them is refined (steps.LAZY_PROJECTIONS): every allocation, residual and split equals, bit for bit, a compute
    that projects them at every evaluation; the error estimate of a step at plain Simpson (Simpson against the
    trapezoid, now from the gradients' sums) agrees to float32 rounding of the largest |lca|."""
    import replay.engine.steps as steps

    kw = dict(per_class=["train"], per_param="all", tol=2e-6, max_splits=8)
    lazy = replay.compute(digits_run, ["train", "val"], out=tmp_path / "lazy", **kw)
    monkeypatch.setattr(steps, "LAZY_PROJECTIONS", False)
    eager = replay.compute(digits_run, ["train", "val"], out=tmp_path / "eager", **kw)
    st = lazy.steps.collect()
    assert (st["splits"] > 2).any() and (st["splits"] == 2).any(), "some step-losses refine, some do not"
    keys = {"steps": ["step", "loss"], "tensors": ["step", "loss", "tensor"], "params": ["loss", "tensor", "index"]}
    for name, k in keys.items():
        a, b = getattr(lazy, name).sort(k).collect(), getattr(eager, name).sort(k).collect()
        assert_frame_equal(a.drop("lca_error", strict=False), b.drop("lca_error", strict=False), check_exact=True)
    a, b = lazy.tensors.sort(keys["tensors"]).collect(), eager.tensors.sort(keys["tensors"]).collect()
    diff = (a["lca_error"] - b["lca_error"]).abs().max()
    assert diff <= 1e-6 * a["lca"].abs().max(), f"max_diff {diff:.2e}"
