"""The task's model against the run: the trained architecture, tied and frozen as in training.

A parameter the run did not record would keep the task's initial value in silence, and a
tie that differs changes which tensor a gradient belongs to; both are refused, one line each.
"""

from __future__ import annotations

from torch import nn

from replay.errors import TaskError
from replay.store import Run
from replay.store.constants import mismatched
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


CONSTANTS_MODES = ("check", "warn")


def check_constants(task: Task, run: Run, mode: str = "check") -> str | None:
    """The frozen parameters and unrecorded buffers the replayed loss depends on must be training's (their
    state-0 checksums in the manifest): a task whose frozen base came from another seed replays "grounded"
    with the learning gone. Refused in one line naming them; with mode 'warn', the line is returned instead.

    Batch-norm running statistics are never compared: training changes them every step, so state 0's are no
    reference. In batch-statistics mode they are not read, recorded buffers replace them, and without recorded
    buffers the task's own are used for every step (`running_stats_note` says which ones).
    """
    if mode not in CONSTANTS_MODES:
        raise TaskError(f"constants: expected one of {CONSTANTS_MODES}, got {mode!r}")
    recorded = run.manifest.constants
    if not recorded:
        return None  # a run of an earlier replay: nothing to compare with
    model = unwrap_model(task.model)
    bad = mismatched(recorded, model, set(_running_stats(model)))
    if not bad:
        return None
    kinds = {recorded[n]["kind"] for n in bad}
    what = " and ".join(sorted({"frozen": "frozen parameters", "buffer": "buffers"}[k] for k in kinds))
    line = (f"{len(bad)} {what} of the task's model differ from the ones training used ({', '.join(bad[:4])}"
            f"{', ...' if len(bad) > 4 else ''}): the replayed losses would not be training's; build the task's "
            f"model with the trained model's frozen weights and buffers (the same base checkpoint), or pass "
            f"constants='warn' (--constants warn) to replay anyway")
    if mode == "check":
        raise TaskError(line)
    return line


def _running_stats(model: nn.Module) -> list[str]:
    """Names of the batch-norm statistics buffers (running mean, variance, counter) of `model`."""
    return [f"{mname}.{b}" if mname else b for mname, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, _ in m.named_buffers(recurse=False)]


def running_stats_note(task: Task, run: Run) -> tuple[str, bool]:
    """(what the frames' meta says, whether the user must hear it) of the running statistics a
    batchnorm='running' replay uses when the run recorded no buffers: the task model's own. Those of state 0
    (the initial ones, as a freshly built model has) are untrained: a warning says how to give trained ones."""
    model = unwrap_model(task.model)
    names = _running_stats(model)
    recorded = {n: c for n, c in (run.manifest.constants or {}).items() if n in names}
    advice = ("record with Recorder(buffers=True), or load the trained model's running statistics into the "
              "task's model")
    if not recorded:  # a run recorded without constants' checksums: nothing tells which statistics these are
        return f"the task model's own running statistics, for every step; if they are not trained ones, {advice}", True
    if not mismatched(recorded, model):
        return (f"the task model's running statistics, which are state 0's (the initial ones), for every step; "
                f"{advice}"), True
    return "the task model's own running statistics (not state 0's), for every step", False
