"""Task: how replay rebuilds the model and the named losses of a run.

A task is `module:function` returning `Task(model, data, ...)`. The loss of a data set is
the mean of `loss_fn`'s per-example losses over it — a deterministic function of θ alone,
which is what makes every step's allocation checkable against the real loss change.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from replay.errors import ReplayError, TaskError

BATCHNORM_MODES = ("batch", "running")


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs, targets, reduction="none")


@dataclass
class Task:
    """The model architecture and the data of each named loss.

    - `data`: `{name: (inputs, targets)}` tensors, or `{name: Dataset}` of (input, target) pairs,
      called as `loss_fn(model(inputs), targets)`; or (HF style) `{name: {key: tensor}}` with one
      first dimension, or a dataset of such dicts, called as `loss_fn(model(**batch), batch)`.
    - `loss_fn` → per-example losses [batch] (default: cross-entropy; dict data must name one,
      e.g. `replay.losses.causal_lm`).
    - `batch_size`: evaluation chunking (memory only, except through batch-norm batch statistics).
    - `groups`: `{data_name: {group_name: per-example keys}}`; each key value k gives a loss
      `"{data_name}/{group_name}={k}"` (per-class losses are the group "class" of the targets).
    - `batchnorm`: "batch" — batch statistics of each evaluation batch (as the LCA paper), the
      running buffers never touched; "running" — eval mode with fixed running statistics (the
      model's own, or the last recorded buffers when the run recorded them).
    - `token_loss_fn(outputs, batch) -> (losses [batch, seq], keep [batch, seq] bool)`: per-token
      losses for `per_token` (default for `replay.losses.causal_lm`: `replay.losses.causal_lm_tokens`).
    """

    model: nn.Module
    data: Mapping[str, object]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    batch_size: int | None = None
    groups: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    batchnorm: str = "batch"
    token_loss_fn: Callable | None = field(default=None, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.model, nn.Module):
            raise TaskError(f"Task.model: expected a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.data, Mapping) or not self.data:
            raise TaskError("Task.data: expected a non-empty {loss_name: (inputs, targets)} mapping")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise TaskError(f"Task.batch_size: expected a positive integer, got {self.batch_size!r}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise TaskError(f"Task.batchnorm: expected one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        self.data = {name: as_examples(name, d).tensors for name, d in self.data.items()}
        if self.loss_fn is None:
            dicts = [n for n, d in self.data.items() if isinstance(d, dict)]
            if dicts:
                raise TaskError(f"Task.loss_fn: data set {dicts[0]!r} is a dict of tensors (model(**batch)); pass "
                                f"loss_fn(outputs, batch) returning per-example losses, e.g. replay.losses.causal_lm")
            self.loss_fn = cross_entropy_per_example
        for name, gs in self.groups.items():
            if name not in self.data:
                raise TaskError(f"Task.groups: {name!r} is not a data set (have {sorted(self.data)})")
            n = len(Examples(self.data[name]))
            for g, keys in gs.items():
                if len(keys) != n:
                    raise TaskError(f"Task.groups[{name!r}][{g!r}]: {len(keys)} keys for {n} examples")


class Examples:
    """One data set as replay evaluates it, whichever form the task gave.

    `(inputs, targets)`: a batch is called as `loss_fn(model(x), y)`; a dict of tensors with a
    shared first dimension (HF style): as `loss_fn(model(**batch), batch)`.
    """

    def __init__(self, tensors: tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        t = self.tensors
        return len(next(iter(t.values()))) if isinstance(t, dict) else len(t[0])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Examples:
        t = self.tensors
        return Examples({k: fn(v) for k, v in t.items()} if isinstance(t, dict) else (fn(t[0]), fn(t[1])))

    def take(self, index: torch.Tensor) -> Examples:
        return self._map(lambda v: v[index.to(v.device)])

    def slice(self, a: int, b: int) -> Examples:
        return self._map(lambda v: v[a:b])

    def to(self, device: torch.device) -> Examples:
        return self._map(lambda v: v.to(device))

    def labels(self, name: str) -> torch.Tensor:
        """Per-example class labels [n]: the targets, or batch['labels'] of dict data."""
        t = self.tensors
        if isinstance(t, dict):
            if "labels" not in t:
                raise TaskError(f"--per-class {name}: the data set is a dict without 'labels'; per-class losses "
                                f"need one integer class label per example")
            return t["labels"]
        return t[1]

    def losses(self, model: nn.Module, loss_fn: Callable) -> torch.Tensor:
        """loss_fn's per-example losses of the whole (batch of) examples."""
        t = self.tensors
        if isinstance(t, dict):
            return loss_fn(model(**t), t)
        return loss_fn(model(t[0]), t[1])


def as_examples(name: str, d: object) -> Examples:
    """Validate and normalize one data set of a Task: tensors checked, datasets stacked."""
    if isinstance(d, torch.utils.data.Dataset) or (
            hasattr(d, "__len__") and hasattr(d, "__getitem__") and not isinstance(d, tuple | list | dict)
            and not isinstance(d, torch.Tensor)):
        d = _stack(name, d)
    if isinstance(d, dict):
        return Examples(_check_dict(name, d))
    if not (isinstance(d, tuple | list) and len(d) == 2):
        raise TaskError(f"Task.data[{name!r}]: expected (inputs, targets) tensors, a dict of tensors with one "
                        f"first dimension, or a dataset of either")
    x, y = d
    if len(x) == 0:
        raise TaskError(f"Task.data[{name!r}]: the data set is empty; a loss needs at least one example")
    if len(x) != len(y):
        raise TaskError(f"Task.data[{name!r}]: {len(x)} inputs but {len(y)} targets")
    return Examples((x, y))


def _stack(name: str, d: object) -> tuple | dict:
    """A dataset of (input, target) pairs or of dicts, stacked into tensors once."""
    items = [d[i] for i in range(len(d))]  # type: ignore[arg-type]
    if not items:
        raise TaskError(f"Task.data[{name!r}]: the data set is empty; a loss needs at least one example")
    try:
        if isinstance(items[0], Mapping):
            return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}
        xs, ys = zip(*items, strict=True)
        return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys)
    except (RuntimeError, TypeError, ValueError) as e:
        raise TaskError(f"Task.data[{name!r}]: cannot stack the examples into tensors ({user_error(e)}); give "
                        f"examples of one shape (pad sequences to one length)") from None


def _check_dict(name: str, d: dict) -> dict[str, torch.Tensor]:
    if not d:
        raise TaskError(f"Task.data[{name!r}]: an empty dict; give tensors such as input_ids and labels")
    bad = [k for k, v in d.items() if not isinstance(v, torch.Tensor) or v.dim() == 0]
    if bad:
        raise TaskError(f"Task.data[{name!r}][{bad[0]!r}]: expected a tensor with one row per example, got "
                        f"{type(d[bad[0]]).__name__}")
    sizes = {k: len(v) for k, v in d.items()}
    if len(set(sizes.values())) != 1:
        raise TaskError(f"Task.data[{name!r}]: the tensors differ in their first dimension {sizes}; it must be "
                        f"the number of examples in every one")
    if not next(iter(sizes.values())):
        raise TaskError(f"Task.data[{name!r}]: the data set is empty; a loss needs at least one example")
    return dict(d)


_REGISTRY: dict[str, Callable[[], Task]] = {}
ENTRY_POINTS = "replay.tasks"


def register_task(fn: Callable[[], Task]) -> Callable[[], Task]:
    """Make `fn` a task that a run may name (a decorator): `replay.compute(run)` without `task=` then calls it
    in a process that has imported it. For the CLI (a fresh process), declare it as an entry point of
    your package instead: `[project.entry-points."replay.tasks"] name = "my.tasks:fn"`."""
    if not callable(fn):
        raise TypeError(f"register_task: expected a function returning replay.Task, got {type(fn).__name__}")
    _REGISTRY[f"{fn.__module__}:{fn.__qualname__}"] = fn
    return fn


def _registered(spec: str) -> Callable[[], Task] | None:
    """The function the user made a task under this name: registered in this process (nothing is imported),
    or declared by an installed package's `replay.tasks` entry point (its package is then imported)."""
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINTS):
        if ep.value.replace(" ", "") == spec:
            try:
                return ep.load()
            except Exception as e:  # noqa: BLE001 - the package's own import failed: one line
                raise TaskError(f"task {spec!r} (entry point {ep.name!r}): importing it failed: "
                                f"{user_error(e)}") from None
    return None


def load_task(spec: str | Task, run_dir: Path | None = None, *, named: bool = True, unsigned: str | None = None
              ) -> Task:
    """Import `module:function` and call it.

    `named`: the user named the task (`--task`, `task=`), so the current directory may hold
    it, as for `python -m`. Otherwise the task string comes from the run's manifest, i.e.
    from whoever made the run, and nothing it names is imported or called unless the user
    made it a task: `register_task` in this process, or a `replay.tasks` entry point of an
    installed package (replay's own `replay.digits:digits` is one). A standard-library or
    installed callable (`sys:exit`, `cProfile:main`) is code too: a run is data, never code.
    A run the user recorded is trusted by its signature (`replay.trust`: the caller passes
    named=True); `unsigned` says why a signed run's signature did not count.
    """
    if isinstance(spec, Task):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise TaskError(f"task {spec!r}: expected 'module:function' (e.g. my.tasks:digits)")
    mod_name, fn_name = spec.split(":", 1)
    if named:
        if str(Path.cwd()) not in sys.path:
            sys.path.append(str(Path.cwd()))
        fn = getattr(_import(spec, mod_name), fn_name, None)
    else:
        fn = _registered(spec)
        if fn is None:
            why = (f"the run's task signature {unsigned} (recorded by another user or machine, or its task was "
                   f"edited), and it is not a registered task" if unsigned else "which is not a registered task "
                   "and the run carries no signature of yours")
            raise TaskError(f"{run_dir or 'the run'}: the run names task {spec!r}, {why} (replay never imports or "
                            f"calls what a run names on its own); pass --task {spec} (task={spec!r}) if you trust it")
    if not callable(fn):
        raise TaskError(f"task {spec!r}: {mod_name} has no function {fn_name!r}")
    try:
        task = fn()
    except ReplayError:
        raise
    except Exception as e:
        raise TaskError(f"task {spec!r}: {fn_name}() raised {user_error(e)}") from None
    if not isinstance(task, Task):
        raise TaskError(f"task {spec!r}: returned {type(task).__name__}, expected replay.Task")
    return task


def user_error(e: BaseException) -> str:
    """`Type: message (file:line)` of an exception raised in the user's code: short, one line."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 300:
        msg = msg[:300] + "..."
    where = ""
    if isinstance(e, SyntaxError) and e.filename:
        where = f" ({e.filename}:{e.lineno})"
    elif e.__traceback__ is not None:
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f" ({last.filename}:{last.lineno})"
    return f"{type(e).__name__}: {msg}{where}" if msg else f"{type(e).__name__}{where}"


def _import(spec: str, mod_name: str) -> object:
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and mod_name.startswith(e.name):
            raise TaskError(f"task {spec!r}: cannot import {mod_name!r} ({e}); run from the directory that holds "
                            f"it or put it on PYTHONPATH") from None
        raise TaskError(f"task {spec!r}: importing {mod_name} failed: {user_error(e)}") from None
    except Exception as e:
        raise TaskError(f"task {spec!r}: importing {mod_name} failed: {user_error(e)}") from None
