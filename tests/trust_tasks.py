"""A task no one registered (tests/test_trust.py): only a signature of the user's, or --task, may call it."""

import torch
from torch import nn

import replay


def linear():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(0)
    return replay.Task(nn.Linear(4, 3), {"train": (x, y)})


def other():
    raise AssertionError("an edited task string must never be called")
