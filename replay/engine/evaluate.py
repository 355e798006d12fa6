"""Loss values and gradients of every requested loss at one θ, in one pass per data set.

Examples are sorted by their group cell (the combination of all group keys in use) and
batches never straddle cells, so each backward contributes to exactly one cell; at the end
of a cell its gradient sum is added to every loss the cell belongs to (the data set's own
loss, its class, its other groups). All per-class gradients together thus cost one pass,
and the whole-set gradient is their sum — never a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from replay.engine.parallel import Layout, all_reduce, param_pieces, reduce_scatter, shard_batches
from replay.errors import TaskError
from replay.task import Task


@dataclass
class _DataPlan:
    x: torch.Tensor
    y: torch.Tensor
    batches: list[tuple[int, int, int]]  # (start, stop, cell) in the sorted order
    cell_losses: list[list[int]]  # cell -> indices of the losses it adds to


class LossEvaluator:
    """Evaluates `loss_names` (float64) and their gradients (model dtype, flat over `param_names`).

    With a data-parallel `layout`, this process evaluates only its shard of each data set's
    examples; the loss sums are all-reduced and the gradients reduce-scattered, so it returns
    every loss and the whole gradients of its own columns `own` of the flat parameter vector
    (padded to `padded` = world × slice, so that every rank's slice has one size).
    """

    def __init__(self, task: Task, param_names: list[str], datasets: list[str], per_class: list[str],
                 device: torch.device, layout: Layout | None = None):
        self.task, self.device, self.layout = task, device, layout or Layout()
        self.model = task.model.to(device)
        # batch statistics make a batch's composition part of the loss: data shards keep batches whole
        self._keep_batches = task.batchnorm == "batch" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        params = dict(self.model.named_parameters())
        self.params = [params[n] for n in param_names]
        self.numels = [p.numel() for p in self.params]
        self.loss_names: list[str] = []
        self.loss_sizes: list[int] = []
        self.plans = [self._plan(d, d in per_class) for d in datasets]
        self.n_examples = torch.tensor(self.loss_sizes, dtype=torch.float64, device=device)
        P, N = sum(self.numels), self.layout.world if self.layout.shards_data else 1
        S = -(-P // N)
        r = self.layout.rank if N > 1 else 0
        self.own, self.padded = (r * S, (r + 1) * S), N * S
        self._pieces = param_pieces(self.numels, S)
        self.inv_sizes = [1.0 / n for n in self.loss_sizes]
        # gradients are computed in the model's dtype and kept in it (the widest, if mixed);
        # loss values and LCA totals are accumulated in float64 by the caller
        self.grad_dtype = max((p.dtype for p in self.params), key=lambda d: d.itemsize)
        # data mode: this process's partial sums for every rank's slice, [world, L, slice], reduce-scattered
        self._send = (torch.empty(N, len(self.loss_names), S, dtype=self.grad_dtype, device=device)
                      if N > 1 else None)
        _set_deterministic_mode(self.model, task.batchnorm)

    def _add_loss(self, name: str, size: int) -> int:
        self.loss_names.append(name)
        self.loss_sizes.append(size)
        return len(self.loss_names) - 1

    def _plan(self, name: str, per_class: bool) -> _DataPlan:
        x, y = self.task.data[name]
        n = len(y)
        keys = dict(self.task.groups.get(name, {}))
        if per_class:
            if y.dtype.is_floating_point or y.dim() != 1:
                raise TaskError(f"--per-class {name}: targets must be integer class labels, "
                                f"got {y.dtype} {tuple(y.shape)}")
            keys = {"class": y, **keys}
        own = self._add_loss(name, n)
        if keys:
            cols = torch.stack([torch.as_tensor(k).reshape(n).long().cpu() for k in keys.values()], 1)  # [n, G]
            cells, cell_of = torch.unique(cols, dim=0, return_inverse=True)  # cells [C, G], cell_of [n]
            order = torch.sort(cell_of, stable=True).indices
            x, y, cell_of = x[order], y[order], cell_of[order]
            cell_losses = [[own] for _ in range(len(cells))]
            for g, gname in enumerate(keys):
                for v in torch.unique(cols[:, g]).tolist():
                    idx = self._add_loss(f"{name}/{gname}={v}", int((cols[:, g] == v).sum()))
                    for c in torch.nonzero(cells[:, g] == v).flatten().tolist():
                        cell_losses[c].append(idx)
            bounds = torch.nonzero(torch.diff(cell_of)).flatten().add(1).tolist()
        else:
            cell_of = torch.zeros(n, dtype=torch.long)
            cell_losses, bounds = [[own]], []
        bs = self.task.batch_size or n
        batches = []
        for a, b in zip([0] + bounds, bounds + [n], strict=True):
            c = int(cell_of[a])
            batches += [(s, min(s + bs, b), c) for s in range(a, b, bs)]
        batches = shard_batches(batches, self.layout, self._keep_batches)
        lo = batches[0][0] if batches else 0  # data mode: only this rank's examples go to the device
        hi = batches[-1][1] if batches else 0
        batches = [(a - lo, b - lo, c) for a, b, c in batches]
        return _DataPlan(x[lo:hi].to(self.device), y[lo:hi].to(self.device), batches, cell_losses)

    def load(self, theta: torch.Tensor) -> None:
        """Write the flat float64 θ [P] (or padded [≥P]) into the model's parameters (cast to their dtypes)."""
        with torch.no_grad():
            for p, v in zip(self.params, torch.split(theta[:sum(self.numels)], self.numels), strict=True):
                p.copy_(v.view(p.shape))

    def __call__(self, theta: torch.Tensor, out: torch.Tensor | None = None,
                 partial: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses [L] (float64) and gradients [L, own columns] (model dtype) of every loss at θ.

        One pass per data set. `out` is overwritten when given: preallocated buffers spare
        the page faults of a fresh multi-megabyte tensor per evaluation. `partial` (data
        mode): return this rank's part of the losses, for the caller to sum with others.
        """
        self.load(theta)
        L, S = len(self.loss_names), self.own[1] - self.own[0]
        sums = torch.zeros(L, dtype=torch.float64, device=self.device)
        grads = out if out is not None else torch.empty(L, S, dtype=self.grad_dtype, device=self.device)
        target = (self._send if self._send is not None else grads.view(1, L, S)).zero_()
        # views [L, n] of the target, per parameter: where its flat gradient's pieces go
        blocks = [[(target[r, :, a:b], sa, sb) for r, a, b, sa, sb in pieces] for pieces in self._pieces]
        loss_fn = self.task.loss_fn
        for plan in self.plans:
            for p in self.params:
                p.grad = None
            cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, (a, b, c) in enumerate(plan.batches):
                per_example = loss_fn(self.model(plan.x[a:b]), plan.y[a:b])  # [b-a], model dtype
                total = per_example.sum()
                total.backward()  # accumulates into p.grad across the cell's batches
                cell_sum += total.detach().double()
                if i + 1 == len(plan.batches) or plan.batches[i + 1][2] != c:  # end of cell
                    for li in plan.cell_losses[c]:
                        sums[li] += cell_sum
                        for views, p in zip(blocks, self.params, strict=True):
                            if p.grad is not None:  # scaled to a mean
                                g = p.grad.reshape(-1)
                                for v, sa, sb in views:
                                    v[li].add_(g[sa:sb], alpha=self.inv_sizes[li])
                    for p in self.params:
                        p.grad = None
                    cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if self._send is not None:  # each rank holds its shard's share of every sum
            if not partial:
                all_reduce(sums)
            reduce_scatter(grads, self._send)
        return sums / self.n_examples, grads


def _set_deterministic_mode(model: nn.Module, batchnorm: str) -> None:
    """Dropout off; batch-norm per the task's mode, never updating its buffers."""
    model.eval()
    if batchnorm == "batch":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics; running buffers left untouched
