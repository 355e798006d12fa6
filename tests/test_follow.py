"""--follow: compute a run while it is recorded, round by round, into one lca dir; at the end the frames are
those of one compute of the finished run. Training is driven by the test's own `wait` (no clock, no sleep)."""

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal

import replay
from replay.engine.follow import follow
from replay.errors import RunError


def test_follow_keeps_up_and_ends_as_one_compute(tmp_path):
    from replay.digits import digits, digits_mlp, load_digits_tensors

    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = load_digits_tensors()["train"]
    rec = replay.Recorder(model, tmp_path / "run", optimizer=opt, chunk_bytes=1 << 16)
    done = [0]

    def train(updates: int) -> None:
        for _ in range(updates):
            i = 32 * (done[0] % 40)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
            done[0] += 1

    train(5)
    rec.flush()
    looks, rounds = [], []

    def wait(secs: float) -> None:  # between looks at the run: training goes on
        looks.append(secs)
        if len(looks) == 2:
            return  # a look that finds nothing new: the follower waits again
        train(4)
        if len(looks) < 5:
            rec.flush()
        else:
            rec.close()

    fr = follow(tmp_path / "run", ["train"], per_class=["train"], task=digits(), out=tmp_path / "lca", wait=wait,
                on_round=lambda f: rounds.append(f.steps.select(pl.col("step").max()).collect().item()))
    assert replay.open_run(tmp_path / "run").steps == list(range(22))
    assert rounds == [3, 7, 11, 15, 20], "each round computes the steps whose both states are on disk"
    one = replay.compute(tmp_path / "run", ["train"], per_class=["train"], task=digits(), out=tmp_path / "one")
    for name, keys in (("steps", ["step", "loss"]), ("tensors", ["step", "loss", "tensor"]),
                       ("params", ["loss", "tensor", "index"])):
        assert_frame_equal(getattr(fr, name).collect().sort(keys), getattr(one, name).collect().sort(keys),
                           check_exact=True)
    assert fr.meta["grad_evals"] == one.meta["grad_evals"]


def test_follow_refuses_steps(tmp_path):
    with pytest.raises(RunError, match="drop --steps"):
        follow(tmp_path / "run", steps=(0, 3))
