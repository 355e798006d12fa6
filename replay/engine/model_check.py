"""The task's model against the run: the trained architecture, tied and frozen as in training.

A parameter the run did not record would keep the task's initial value in silence, and a
tie that differs changes which tensor a gradient belongs to; both are refused, one line each.
"""

from __future__ import annotations

from replay.errors import TaskError
from replay.store import Run
from replay.task import Task
from replay.wrappers import unwrap_model


def check_model(task: Task, run: Run) -> None:
    """The task's model must be the trained architecture: every recorded parameter, and no other
    trainable one (it would keep the task's initial value in silence), tied as in training."""
    model = unwrap_model(task.model)
    have = dict(model.named_parameters(remove_duplicate=False))
    recorded = {s.name: s for s in run.manifest.params}
    hint = "is --task the model that was trained?"
    for name, s in recorded.items():
        p = have.get(name)
        if p is None:
            raise TaskError(f"the task's model has no parameter {name!r} recorded in {run.path}; {hint}")
        if tuple(p.shape) != s.shape:
            raise TaskError(f"parameter {name!r}: the task's model has shape {tuple(p.shape)}, "
                            f"the run recorded {s.shape}; {hint}")
        p.requires_grad_(True)  # trained, so it needs its gradient even if the task built it frozen
    for alias, target in run.aliases.items():
        if alias in have and have[alias] is not have[target]:
            raise TaskError(f"parameter {alias!r} was tied to {target!r} in training (one tensor), but the task's "
                            f"model holds them as two tensors; tie them in the task (e.g. tie_weights())")
    frozen = set(run.manifest.frozen)
    for name, p in have.items():
        if name in recorded or name in run.aliases or not p.requires_grad:
            continue
        tied_to = next((r for r in recorded if have[r] is p), None)
        if tied_to is not None:
            raise TaskError(f"parameter {name!r} is tied to {tied_to!r} in the task's model, but training recorded "
                            f"no such tie; untie them in the task as in training")
        if name in frozen:  # frozen in training as well: a constant, the task's own value
            p.requires_grad_(False)
            continue
        raise TaskError(f"parameter {name!r} of the task's model is trainable but {run.path} did not record it, so "
                        f"replay would keep its initial value; if it was frozen in training, call "
                        f"requires_grad_(False) on it in the task (it keeps the task's value), else {hint}")
