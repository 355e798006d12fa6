"""The one place the engine calls the user's model and loss: their error as one line naming where.

Evaluation (data-set losses), per-example products and per-token losses all run the task's code on the
task's data; a failure there is the user's to fix, so it becomes a TaskError with their exception's type,
message and line, never a traceback through replay's internals. Losses are checked to be one per example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from replay.errors import ReplayError, TaskError
from replay.task import Examples, user_error


@contextmanager
def user_code(where: str, what: str = "model or loss_fn") -> Iterator[None]:
    """Run the task's code: its exception as `{where}: the task's {what} failed: Type: message (file:line)`."""
    try:
        yield
    except ReplayError:
        raise
    except Exception as e:  # the user's code on the user's data: one line, their error
        raise TaskError(f"{where}: the task's {what} failed: {user_error(e)}") from None


def checked_losses(examples: Examples, model: nn.Module, loss_fn: Callable, where: str) -> torch.Tensor:
    """Per-example losses [B] of `examples`: the user's model and loss_fn, one loss per example."""
    with user_code(where):
        out = examples.losses(model, loss_fn)
    b = len(examples)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (b,):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TaskError(f"loss_fn returned {got} for a batch of {b} examples of {where}; it must return one loss "
                        f"per example, shape ({b},) (e.g. reduction='none')")
    return out
