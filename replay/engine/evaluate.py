"""Loss values and gradients of every requested loss at one θ, in one pass per data set.

Examples are sorted by their group cell (the combination of all group keys in use) and
batches never straddle cells, so each backward contributes to exactly one cell; at the end
of a cell its gradient sum is added to every loss the cell belongs to (the data set's own
loss, its class, its other groups). All per-class gradients together thus cost one pass,
and the whole-set gradient is their sum — never a second pass.

Batch-norm with batch statistics makes a batch's composition part of every example's
loss, so there the batches stay those of the data set's own order (requesting a class
loss must never change the train loss): each batch is one forward, and one backward per
group cell present in it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from replay.engine.parallel import Placement, param_pieces, shard_batches
from replay.errors import ReplayError, TaskError
from replay.task import Examples, Task, user_error
from replay.wrappers import unwrap_model

MIXED = -1  # a batch's cell when it holds several (batch-norm batch statistics): see _DataPlan.mixed


@dataclass
class _DataPlan:
    name: str
    examples: Examples  # this rank's examples, on the device, in evaluation order
    batches: list[tuple[int, int, int]]  # (start, stop, cell) in evaluation order
    cell_losses: list[list[int]]  # cell -> indices of the losses it adds to (the data set's own loss first)
    mixed: dict[int, list[tuple[int, torch.Tensor]]]  # batch start -> (cell, positions in the batch), MIXED batches


class LossEvaluator:
    """Evaluates `loss_names` (float64) and their gradients (model dtype, flat over `param_names`).

    With a data-parallel `place`, this process evaluates only its shard of each data set's
    examples; the loss sums are all-reduced and the gradients reduce-scattered, so it returns
    every loss and the whole gradients of its own columns `own` of the flat parameter vector
    (padded to `padded` = world × slice, so that every rank's slice has one size).
    """

    def __init__(self, task: Task, param_names: list[str], datasets: list[str], per_class: list[str],
                 device: torch.device, place: Placement | None = None):
        self.task, self.device, self.place = task, device, place or Placement()
        self.model = task.model.to(device)
        # batch statistics make a batch's composition part of the loss: batches are never regrouped
        # by class, and data shards keep them whole
        self._batch_stats = task.batchnorm == "batch" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        params = dict(unwrap_model(self.model).named_parameters())
        self.params = [params[n] for n in param_names]
        self.numels = [p.numel() for p in self.params]
        self.loss_names: list[str] = []
        self.loss_sizes: list[int] = []
        self.plans = [self._plan(d, d in per_class) for d in datasets]
        self.n_examples = torch.tensor(self.loss_sizes, dtype=torch.float64, device=device)
        P, N = sum(self.numels), self.place.world if self.place.shards_data else 1
        S = -(-P // N)
        r = self.place.rank if N > 1 else 0
        self.own, self.padded = (r * S, (r + 1) * S), N * S
        self._pieces = param_pieces(self.numels, S)
        self.inv_sizes = [1.0 / n for n in self.loss_sizes]
        # gradients are computed in the model's dtype and kept in it (the widest, if mixed);
        # loss values and LCA totals are accumulated in float64 by the caller
        self.grad_dtype = max((p.dtype for p in self.params), key=lambda d: d.itemsize)
        # data mode: this process's partial sums for every rank's slice, [world, L, slice], reduce-scattered
        self._send = (torch.empty(N, len(self.loss_names), S, dtype=self.grad_dtype, device=device)
                      if N > 1 else None)
        # one flat gradient buffer [P] that every p.grad is a view of: backward accumulates a cell's
        # gradient into it in place (no allocation per cell), and it goes into each loss in one add per
        # rank slice, not one per parameter. Mixed parameter dtypes keep per-parameter gradients.
        uniform = len({(p.dtype, p.device) for p in self.params}) == 1
        self._flat = torch.zeros(P, dtype=self.grad_dtype, device=device) if uniform else None
        self._views: list[torch.Tensor] | None = None  # the p.grad views of _flat during an evaluation
        self._flat_pieces = [(r, 0, min(P, (r + 1) * S) - r * S, r * S, min(P, (r + 1) * S))
                             for r in range(N) if r * S < P]
        _set_deterministic_mode(self.model, task.batchnorm)

    def _add_loss(self, name: str, size: int) -> int:
        self.loss_names.append(name)
        self.loss_sizes.append(size)
        return len(self.loss_names) - 1

    def _plan(self, name: str, per_class: bool) -> _DataPlan:
        examples = Examples(self.task.data[name])
        n = len(examples)
        keys = dict(self.task.groups.get(name, {}))
        if per_class:
            keys = {"class": _class_labels(name, examples.labels(name)), **keys}
        own = self._add_loss(name, n)
        cell_of = torch.zeros(n, dtype=torch.long)
        cell_losses: list[list[int]] = [[own]]
        if keys:
            cols = torch.stack([torch.as_tensor(k).reshape(n).long().cpu() for k in keys.values()], 1)  # [n, G]
            cells, cell_of = torch.unique(cols, dim=0, return_inverse=True)  # cells [C, G], cell_of [n]
            cell_losses = [[own] for _ in range(len(cells))]
            for g, gname in enumerate(keys):
                for v in torch.unique(cols[:, g]).tolist():
                    idx = self._add_loss(f"{name}/{gname}={v}", int((cols[:, g] == v).sum()))
                    for c in torch.nonzero(cells[:, g] == v).flatten().tolist():
                        cell_losses[c].append(idx)
        bs = self.task.batch_size or n
        mixed: dict[int, list[tuple[int, torch.Tensor]]] = {}
        if self._batch_stats:  # the data set's own batches, whatever the groups
            _check_batch_sizes(name, n, bs)
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
            examples, cell_of = examples.take(order), cell_of[order]
            bounds = torch.nonzero(torch.diff(cell_of)).flatten().add(1).tolist()
            batches = []
            for a, b in zip([0] + bounds, bounds + [n], strict=True):
                batches += [(s, min(s + bs, b), int(cell_of[a])) for s in range(a, b, bs)]
        batches = shard_batches(batches, self.place, self._batch_stats)
        lo = batches[0][0] if batches else 0  # data mode: only this rank's examples go to the device
        hi = batches[-1][1] if batches else 0
        mixed = {a - lo: [(c, i.to(self.device)) for c, i in segs] for a, segs in mixed.items() if lo <= a < hi}
        batches = [(a - lo, b - lo, c) for a, b, c in batches]
        return _DataPlan(name, examples.slice(lo, hi).to(self.device), batches, cell_losses, mixed)

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
        # views [L, n] of the target, per parameter, where its gradient's pieces go: needed only without
        # the flat gradient buffer (mixed parameter dtypes)
        blocks = [] if self._flat is not None else [[(target[r, :, a:b], sa, sb) for r, a, b, sa, sb in pieces]
                                                     for pieces in self._pieces]
        for plan in self.plans:
            if plan.mixed:
                self._mixed_pass(plan, sums, target, blocks)
            else:
                self._sorted_pass(plan, sums, target, blocks)
        for p in self.params:  # the views must not outlive the evaluation (a later one re-binds them)
            p.grad = None
        self._views = None
        if self._send is not None:  # each rank holds its shard's share of every sum
            if not partial:
                self.place.sum_shards(sums)
            self.place.sum_scattered(grads, self._send)
        return sums / self.n_examples, grads


    def _losses(self, plan: _DataPlan, a: int, b: int) -> torch.Tensor:
        """Per-example losses [b-a] of examples a..b: the user's model and loss_fn, checked."""
        try:
            per_example = plan.examples.slice(a, b).losses(self.model, self.task.loss_fn)
        except ReplayError:
            raise
        except Exception as e:  # the user's code on the user's data: one line, their error
            raise TaskError(f"data set {plan.name!r}, examples {a}..{b - 1}: the task's model or loss_fn failed: "
                            f"{user_error(e)}") from None
        if not isinstance(per_example, torch.Tensor) or tuple(per_example.shape) != (b - a,):
            got = tuple(per_example.shape) if isinstance(per_example, torch.Tensor) else type(per_example).__name__
            raise TaskError(f"loss_fn returned {got} for a batch of {b - a} examples of {plan.name!r}; it must "
                            f"return one loss per example, shape ({b - a},) (e.g. reduction='none')")
        return per_example

    def _start_cell(self) -> None:
        """Zero the gradients a cell accumulates: the flat buffer (its views are p.grad), or per-parameter ones."""
        if self._flat is None:
            for p in self.params:
                p.grad = None
            return
        self._flat.zero_()
        if self._views is None:  # bound once per evaluation; a cell's end checks they still are
            self._views = [v.view(p.shape) for p, v in zip(self.params, self._flat.split(self.numels), strict=True)]
            for p, v in zip(self.params, self._views, strict=True):
                p.grad = v

    def _add_grads(self, target: torch.Tensor, blocks: list, cell_losses: list[int]) -> None:
        """Add one cell's gradient sums (accumulated since _start_cell) to every loss it belongs to, as a mean."""
        if self._flat is not None:
            for p, v in zip(self.params, self._views, strict=True):
                if p.grad is not v:  # user code replaced p.grad during the cell: take what it holds too
                    if p.grad is not None:
                        v.add_(p.grad.reshape(v.shape))
                    p.grad = v
            for li in cell_losses:
                for r, a, b, fa, fb in self._flat_pieces:
                    target[r, li, a:b].add_(self._flat[fa:fb], alpha=self.inv_sizes[li])
            return
        for li in cell_losses:
            for views, p in zip(blocks, self.params, strict=True):
                if p.grad is not None:
                    g = p.grad.reshape(-1)
                    for v, sa, sb in views:
                        v[li].add_(g[sa:sb], alpha=self.inv_sizes[li])

    def _sorted_pass(self, plan: _DataPlan, sums: torch.Tensor, target: torch.Tensor, blocks: list) -> None:
        """Batches sorted by cell: gradients accumulate over a cell's batches, added once per cell."""
        self._start_cell()
        cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (a, b, c) in enumerate(plan.batches):
            total = self._losses(plan, a, b).sum()  # model dtype
            total.backward()  # accumulates into p.grad across the cell's batches
            cell_sum += total.detach().double()
            if i + 1 == len(plan.batches) or plan.batches[i + 1][2] != c:  # end of cell
                for li in plan.cell_losses[c]:
                    sums[li] += cell_sum
                self._add_grads(target, blocks, plan.cell_losses[c])
                self._start_cell()
                cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)

    def _mixed_pass(self, plan: _DataPlan, sums: torch.Tensor, target: torch.Tensor, blocks: list) -> None:
        """The data set's own batches (batch statistics): one forward each, one backward per cell in it."""
        own = plan.cell_losses[0][0]
        for a, b, c in plan.batches:
            per_example = self._losses(plan, a, b)
            sums[own] += per_example.sum().detach().double()  # as without groups, to the bit
            segs = plan.mixed.get(a) or [(c, None)]
            for k, (cell, pos) in enumerate(segs):
                part = per_example.sum() if pos is None else per_example[pos].sum()
                self._start_cell()
                part.backward(retain_graph=k + 1 < len(segs))
                for li in plan.cell_losses[cell][1:]:
                    sums[li] += part.detach().double()
                self._add_grads(target, blocks, plan.cell_losses[cell])


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


def _set_deterministic_mode(model: nn.Module, batchnorm: str) -> None:
    """Dropout off; batch-norm per the task's mode, never updating its buffers."""
    model.eval()
    if batchnorm == "batch":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics; running buffers left untouched
