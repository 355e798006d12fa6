"""How a data set's examples are grouped and batched for one evaluation pass (`engine.evaluate`).

A data set has its own loss and, with group keys (classes, named groups), one loss per key value. A *cell* is a
combination of key values: every example belongs to exactly one, and a cell adds to its data set's loss and to
one loss per key. The batches follow from how the pass computes: the data set's own batches (products summed by
group; batch-norm batch statistics, where a batch's composition is part of the loss), examples sorted by cell
with batches never straddling cells (a backward per cell), or sorted by cell with the data set's batches, each
cell a segment of them (`engine.segments`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from replay.engine.parallel import Placement, shard_batches
from replay.errors import TaskError
from replay.task import Examples, Task

MIXED = -1  # a batch's cell when it holds several (batch-norm batch statistics): see DataPlan.mixed


@dataclass
class DataPlan:
    """One data set of a compute: its examples, their cells (the combination of its group keys) and the losses each
    cell adds to, and how its examples are batched (`arrange`)."""

    name: str
    examples: Examples  # this rank's examples, on the device, in evaluation order
    batches: list[tuple[int, int, int]]  # (start, stop, cell) in evaluation order
    cell_losses: list[list[int]]  # cell -> indices of the losses it adds to (the data set's own loss first)
    mixed: dict[int, list[tuple[int, torch.Tensor]]]  # batch start -> (cell, positions in the batch), MIXED batches
    cell_of: torch.Tensor  # [n] each example's cell, in the data set's order (before any sorting)
    members: torch.Tensor  # [n, G] each example's group loss per group key (data set's order)
    ghost: bool = False  # group losses from the examples' products (see LossEvaluator._ghost_pass)
    keep_rows: bool = False  # its examples are rows too: each whole pass keeps their values and products
    # per-parameter group losses from one backward per batch (see LossEvaluator._segmented_pass): batches over the
    # examples sorted by cell, straddling cells, and per batch its cells' rows (lo, hi, cell, the cell's last rows)
    segmented: bool = False
    segments: list[list[tuple[int, int, int, bool]]] | None = None
    cell_batches: list[tuple[int, int, int]] | None = None  # the batches of a backward per cell (the fallback)


def data_plan(task: Task, name: str, per_class: bool, add_loss: Callable[[str, int], int]) -> DataPlan:
    """The data set's losses (its own, then one per group value: each registered by `add_loss(name, size)`, which
    gives its index) and each example's cell and groups."""
    examples = Examples(task.data[name])
    n = len(examples)
    keys = dict(task.groups.get(name, {}))
    if per_class:
        keys = {"class": _class_labels(name, examples.labels(name)), **keys}
    whole = add_loss(name, n)
    cell_of = torch.zeros(n, dtype=torch.long)
    cell_losses: list[list[int]] = [[whole]]
    members = torch.zeros(n, 0, dtype=torch.long)
    if keys:
        cols = torch.stack([torch.as_tensor(k).reshape(n).long().cpu() for k in keys.values()], 1)  # [n, G]
        cells, cell_of = torch.unique(cols, dim=0, return_inverse=True)  # cells [C, G], cell_of [n]
        cell_losses = [[whole] for _ in range(len(cells))]
        members = torch.empty_like(cols)
        for g, gname in enumerate(keys):
            for v in torch.unique(cols[:, g]).tolist():
                idx = add_loss(f"{name}/{gname}={v}", int((cols[:, g] == v).sum()))
                members[cols[:, g] == v, g] = idx
                for c in torch.nonzero(cells[:, g] == v).flatten().tolist():
                    cell_losses[c].append(idx)
    return DataPlan(name, examples, [], cell_losses, {}, cell_of, members)


def arrange(plan: DataPlan, batch_size: int | None, place: Placement, batch_stats: bool, device: torch.device
            ) -> None:
    """The plan's batches, in evaluation order, and this rank's examples on the device.

    Group losses from products, or batch statistics: the data set's own batches. Otherwise sorted by
    cell, batches never straddling cells, so that each backward is one cell's (or, `plan.segmented`, the data
    set's batches over that order, each cell a segment of them)."""
    examples, cell_of, members, n = plan.examples, plan.cell_of, plan.members, len(plan.examples)
    bs = batch_size or n
    mixed: dict[int, list[tuple[int, torch.Tensor]]] = {}
    if plan.ghost:
        batches = [(a, min(a + bs, n), 0) for a in range(0, n, bs)]
    elif batch_stats:  # the data set's own batches, whatever the groups
        _check_batch_sizes(plan.name, n, bs)
        batches = []
        for a in range(0, n, bs):
            cs = torch.unique(cell_of[a:a + bs])
            if len(cs) == 1:
                batches.append((a, min(a + bs, n), int(cs[0])))
            else:
                batches.append((a, min(a + bs, n), MIXED))
                mixed[a] = [(int(c), torch.nonzero(cell_of[a:a + bs] == c).flatten()) for c in cs]
    else:  # sorted by cell, batches never straddle cells: one backward per batch
        order = torch.sort(cell_of, stable=True).indices
        examples, cell_of, members = examples.take(order), cell_of[order], members[order]
        bounds = torch.nonzero(torch.diff(cell_of)).flatten().add(1).tolist()
        batches = []
        for a, b in zip([0] + bounds, bounds + [n], strict=True):
            batches += [(s, min(s + bs, b), int(cell_of[a])) for s in range(a, b, bs)]
        if plan.segmented:  # the same order, the data set's batches: each batch's cells are segments of it
            plan.cell_batches = batches
            starts = [0] + bounds
            batches = [(s, min(s + bs, n), MIXED) for s in range(0, n, bs)]
    if plan.segmented:  # (one process: the rows are the data set's)
        plan.segments = [_segments_of(a, b, starts, bounds + [n], cell_of) for a, b, _ in batches]
    batches = shard_batches(batches, place, batch_stats)
    lo = batches[0][0] if batches else 0  # data mode: only this rank's examples go to the device
    hi = batches[-1][1] if batches else 0
    plan.mixed = {a - lo: [(c, i.to(device)) for c, i in segs] for a, segs in mixed.items() if lo <= a < hi}
    plan.batches = [(a - lo, b - lo, c) for a, b, c in batches]
    plan.examples = examples.slice(lo, hi).to(device)
    plan.members = members[lo:hi].to(device)


def _segments_of(a: int, b: int, starts: list[int], stops: list[int], cell_of: torch.Tensor
                 ) -> list[tuple[int, int, int, bool]]:
    """The cells' rows within batch a..b of examples sorted by cell (cell k: starts[k]..stops[k]): (lo, hi relative
    to a, cell, whether its last rows)."""
    out = []
    for lo, hi in zip(starts, stops, strict=True):
        if hi <= a or lo >= b:
            continue
        out.append((max(lo, a) - a, min(hi, b) - a, int(cell_of[lo]), hi <= b))
    return out


def _class_labels(name: str, y: torch.Tensor) -> torch.Tensor:
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dim() != 1:
        raise TaskError(f"--per-class {name}: targets must be integer class labels [n], "
                        f"got {y.dtype} {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise TaskError(f"--per-class {name}: labels must be >= 0, found {int(y.min())} "
                        f"(an ignore label such as -1 or -100 is not a class)")
    return y


def _check_batch_sizes(name: str, n: int, bs: int) -> None:
    if n % bs == 1 or bs == 1:
        raise TaskError(f"data set {name!r}: {n} examples in batches of {bs} leave a batch of 1 example, and "
                        f"batch-norm with batch statistics needs at least 2 per batch; choose another "
                        f"Task.batch_size (or batchnorm='running')")
