"""Tasks used by the tests (importable as `tasks:NAME` with tests/ on sys.path), registered so that a run
recorded with one of them replays in the tests' own process without `task=`."""

import torch
from torch import nn

import replay

P = 12


class Scale(nn.Module):
    """out = x ⊙ w: with a separable loss, parameter j's share of any loss change is exact."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, P, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([x[:, :P] * self.w, x[:, P:] * self.b], 1)


def quartic(out, y):
    r = out - y
    return (0.25 * r**4 - 0.5 * r**3 + r**2 + 0.3 * r).sum(1)


def poly_data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, P + 3, generator=g, dtype=torch.float64), torch.randn(40, P + 3, generator=g,
                                                                                  dtype=torch.float64)


@replay.register_task
def poly():
    return replay.Task(Scale(), {"train": poly_data()}, loss_fn=quartic, batch_size=16)


class BNDropNet(nn.Module):
    """Batch-norm and dropout: replay must still see a deterministic function of θ."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


@replay.register_task
def bn_drop():
    from replay.digits import load_digits_tensors

    return replay.Task(BNDropNet(), load_digits_tensors(), batch_size=256)


@replay.register_task
def digits_grouped():
    """digits with a user grouping: even vs odd digits."""
    from replay.digits import digits

    t = digits()
    t.groups = {"train": {"parity": t.data["train"][1] % 2}}
    return t


def _float64(task):
    task.model = task.model.double()
    task.data = {k: (x.double(), y) for k, (x, y) in task.data.items()}
    return task


@replay.register_task
def digits64():
    """The digits task in float64: data-parallel sums then agree with one process to ~1e-15."""
    from replay.digits import digits

    return _float64(digits())


@replay.register_task
def bn_drop64():
    return _float64(bn_drop())


@replay.register_task
def digits_dies_on_rank_1():
    """digits whose loss raises on torchrun rank 1 after $REPLAY_TEST_DIE_AFTER calls (when set)."""
    import os

    from replay.digits import digits

    t = digits()
    limit = int(os.environ.get("REPLAY_TEST_DIE_AFTER", "0")) if os.environ.get("RANK") == "1" else 0
    calls, base = [0], t.loss_fn

    def dying(out, y):  # the same code on every rank and run: the task's fingerprint does not change
        calls[0] += 1
        if limit and calls[0] > limit:
            raise RuntimeError("rank 1 dies here")
        return base(out, y)

    t.loss_fn = dying
    return t


@replay.register_task
def digits_dies():
    """digits whose loss raises after $REPLAY_TEST_DIE_AFTER calls (when set): an interrupted compute
    (a RuntimeError; KeyboardInterrupt, as Ctrl-C, with REPLAY_TEST_DIE_WITH=interrupt)."""
    import os

    from replay.digits import digits

    t = digits()
    limit = int(os.environ.get("REPLAY_TEST_DIE_AFTER", "0"))
    ctrl_c = os.environ.get("REPLAY_TEST_DIE_WITH") == "interrupt"
    calls, base = [0], t.loss_fn

    def dying(out, y):  # the same code whether it dies or not: the task's fingerprint does not change
        calls[0] += 1
        if limit and calls[0] > limit:
            raise KeyboardInterrupt if ctrl_c else RuntimeError("the compute dies here")
        return base(out, y)

    t.loss_fn = dying
    return t


@replay.register_task
def digits_nan_example():
    """digits whose validation set holds one example with a NaN pixel: its loss, and val's, are NaN."""
    from replay.digits import digits

    t = digits()
    x, y = t.data["val"]
    x = x.clone()
    x[7, 3] = float("nan")
    t.data = {**t.data, "val": (x, y)}
    return t


@replay.register_task
def golden():
    """The task of tests/golden (tools/make_golden.py): nn.Linear(3, 2) and a fixed quadratic loss."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    return replay.Task(nn.Linear(3, 2), {"train": (x, y)}, loss_fn=lambda out, t: (out - t).square().mean(1))
