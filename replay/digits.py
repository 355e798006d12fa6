"""scikit-learn's bundled digits (8×8 images, 10 classes): real data with no download.

Used by `replay demo` and the tests. The task function `digits` is what a recorded demo
run names (`replay.digits:digits`), so `replay compute RUN` can rebuild model and data.
"""

from __future__ import annotations

import torch
from torch import nn

from replay.errors import ReplayError
from replay.task import Task, register_task

N_VAL = 397  # of 1797 examples: 1400 train, 397 val


def load_digits_tensors() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (x, y), 'val': (x, y)}: pixels scaled to [0, 1], a fixed shuffle."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ReplayError("the digits data set needs scikit-learn: pip install 'replay-lca[demo]'") from None
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"train": (x[N_VAL:], y[N_VAL:]), "val": (x[:N_VAL], y[:N_VAL])}


def digits_mlp(hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def digits_cnn(seed: int = 0) -> nn.Module:
    """A small CNN on the 8×8 images (inputs stay flat [N, 64]): ~10k parameters, much more
    compute per parameter than the MLP, as convolutional nets have."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


@register_task
def digits() -> Task:
    """The demo's task: the MLP architecture and the train/val losses."""
    return Task(digits_mlp(), load_digits_tensors())


def train_digits(model: nn.Module, recorder_path: str | None = None, *, epochs: int = 2, batch: int = 32,
                 lr: float = 0.05, task: str = "replay.digits:digits", seed: int = 0,
                 **recorder_kwargs: object) -> nn.Module:
    """SGD + momentum on the digits train split, recording every step into `recorder_path`."""
    from replay.record import Recorder

    x, y = load_digits_tensors()["train"]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    rec = Recorder(model, recorder_path, optimizer=opt, task=task, **recorder_kwargs) if recorder_path else None
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            if rec is not None:
                rec.log_batch(idx)  # which examples this step learns from: run.batches
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    if rec is not None:
        rec.close()
    return model
