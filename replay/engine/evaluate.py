"""Loss values, per-tensor projections and (for per-parameter losses) gradients of every loss at one θ, in
one pass per data set.

Group losses (classes, named groups) come, where they can, from the examples' products: the data
set's own batches, one forward and one backward each, give every example's per-tensor directional
derivatives (`ghost.ExampleProducts`), and a group's projections are their sum by index, so 1, 100
or 1,000 groups cost one pass, and requesting them never changes the data set's own numbers.

A group loss that reports per parameter needs its whole gradient: the examples are sorted by their group
cell (the combination of all group keys in use, `plans`) and, where cells are small, each cell's gradient
is a sum over its rows of the data set's batches (`segments`: one forward and one backward per batch);
otherwise (big cells, a tensor no one-backward rule covers, a compiled model) batches never straddle
cells, so each backward contributes to exactly one cell; at the end of a cell its gradient sum goes to
every loss the cell belongs to. Batch-norm with batch statistics makes
a batch's composition part of every example's loss, so there the batches stay those of the data
set's own order (requesting a class loss must never change the train loss): each batch is one
forward, and one backward per group cell present in it.

What a loss receives depends on what it reports (`per_param`):
- a per-parameter loss (default: the data-set losses): its whole gradient [P];
- any other loss: only its projections onto the step's direction(s) per tensor, [directions × T].
  So memory is O(P) whatever the number of group losses.

A refinement point may want only some losses (`need`): a data set whose own loss is not among them
evaluates only the examples of the wanted groups, without parameter gradients.

Loss values are float64 sums of the examples' losses, whatever the batches.
"""

from __future__ import annotations

import torch
from torch import nn

from replay.engine.columns import Columns
from replay.engine.ghost import ExampleProducts
from replay.engine.parallel import Placement
from replay.engine.plans import DataPlan, arrange, data_plan
from replay.engine.segments import SegmentGrads, covered
from replay.engine.user_code import checked_losses
from replay.task import Task
from replay.wrappers import unwrap_model

# Per-parameter group losses come from segments of the data set's batches, except in a model with convolutions whose
# cells hold this many examples or more on average: those keep a backward per cell. Measured on the CPU (1 thread),
# per evaluation of the digits train set, 10 classes of 140: MLP 10.0 ms by segments against 13.0 by cells (a whole
# compute 1.72 s against 1.85), CNN 54 against 46 (a batch of all 1,400 examples is slower per example there than
# the cells' 140; cut to the cells' size the two ways are within 1%); 100 groups of 14: MLP 3.9 s against 4.8, CNN
# 2.9 against 4.4 for the whole compute.
SEGMENT_CELLS_BELOW = 128


class LossEvaluator:
    """Evaluates `loss_names`: values (float64), projections per tensor (float64) onto given directions, and
    the gradients (model dtype, flat over `param_names`) of the losses in `per_param` (`per_param`: their indices).

    With a data-parallel `place`, this process evaluates only its shard of each data set's
    examples; the loss sums and projections are all-reduced and the gradients reduce-scattered,
    so it returns every loss and projection and the whole gradients of its held columns `own` of
    the flat parameter vector (padded to `padded` = world × slice, so that every rank's slice
    has one size).
    """

    def __init__(self, task: Task, param_names: list[str], datasets: list[str], per_class: list[str],
                 device: torch.device, place: Placement | None = None, per_param: object = "datasets",
                 row_sets: list[str] | tuple = ()):
        self.task, self.device, self.place = task, device, place or Placement()
        self.model = task.model.to(device)
        # batch statistics make a batch's composition part of the loss: batches are never regrouped
        # by class, and data shards keep them whole
        self.batch_stats = task.batchnorm == "batch" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        params = dict(unwrap_model(self.model).named_parameters())
        self.params = [params[n] for n in param_names]
        self.numels = [p.numel() for p in self.params]
        self.loss_names: list[str] = []
        self.loss_sizes: list[int] = []
        self.plans = [data_plan(task, d, d in per_class, self._add_loss) for d in datasets]
        self.n_examples = torch.tensor(self.loss_sizes, dtype=torch.float64, device=device)
        L = len(self.loss_names)
        wanted = datasets if per_param == "datasets" else (self.loss_names if per_param == "all" else per_param)
        self.per_param = [i for i, n in enumerate(self.loss_names) if n in set(wanted)]  # losses with [P] gradients
        self._per_param_slot = {li: k for k, li in enumerate(self.per_param)}
        self.products = None  # ExampleProducts, when some data set's group losses come from them
        self.segment_grads: SegmentGrads | None = None  # per-parameter group gradients from one backward
        self._rows: list[tuple] = []  # (data set, θ, directions, origin, values, projections): see shared_rows
        self._theta: torch.Tensor | None = None
        self._dirs_in: torch.Tensor | None = None
        self._origin: tuple | None = None
        self._loaded: tuple | None = None  # (θ, versions) of the last load
        for plan in self.plans:
            rows = plan.name in row_sets and not self.place.shards_data
            plan.ghost = self._ghost_groups(plan, param_names, rows)
            plan.keep_rows = rows and plan.ghost
            plan.segmented = not plan.ghost and self._segmented_groups(plan, param_names)
            arrange(plan, task.batch_size, self.place, self.batch_stats, device)
        P, N = sum(self.numels), self.place.world if self.place.shards_data else 1
        S = -(-P // N)
        r = self.place.rank if N > 1 else 0
        self.columns, self.padded = (r * S, (r + 1) * S), N * S
        self.inv_sizes = [1.0 / n for n in self.loss_sizes]
        # gradients are computed in the model's dtype and kept in it (the widest, if mixed);
        # loss values (float64 sums of the examples' losses, whatever their batches), projections and LCA totals are
        # accumulated in float64
        self.grad_dtype = max((p.dtype for p in self.params), key=lambda d: d.itemsize)
        K = len(self.per_param)
        # data mode: this process's partial sums for every rank's slice, [world, K, slice], reduce-scattered
        self._send = (torch.empty(N, K, S, dtype=self.grad_dtype, device=device) if N > 1 and K else None)
        # one flat gradient buffer [P] that every p.grad is a view of: backward accumulates a cell's
        # gradient into it in place (no allocation per cell), and it goes into each loss in one add per
        # rank slice, not one per parameter. Mixed parameter dtypes keep per-parameter gradients, copied
        # into it at the end of a cell.
        self._uniform = len({(p.dtype, p.device) for p in self.params}) == 1
        self._flat = torch.zeros(P, dtype=self.grad_dtype, device=device)
        self._views: list[torch.Tensor] | None = None  # the p.grad views of _flat during an evaluation
        self._flat_pieces = [(r, 0, min(P, (r + 1) * S) - r * S, r * S, min(P, (r + 1) * S))
                             for r in range(N) if r * S < P]
        self.cols_all = Columns(self.numels, 0, P, device, rows=2)  # a cell's projections (all columns)
        self.cols_held = Columns(self.numels, self.columns[0], min(self.columns[1], P), device,
                                 rows=max(2, len(self.per_param)))  # (the per-parameter losses' projections)
        self._dirs: torch.Tensor | None = None  # [D, P] this evaluation's directions (gradient dtype)
        self._prod: torch.Tensor | None = None  # [D, P] scratch for a cell's products
        self._proj: torch.Tensor | None = None  # [D, L, T] this evaluation's projections
        self._is_proj = torch.tensor([i not in self._per_param_slot for i in range(L)])
        self._own: dict[str, tuple | None] = {}  # data set → its cells' own rows and weights (see _own_slots)
        _set_deterministic_mode(self.model, task.batchnorm)

    def _add_loss(self, name: str, size: int) -> int:
        self.loss_names.append(name)
        self.loss_sizes.append(size)
        return len(self.loss_names) - 1

    def _ghost_groups(self, plan: DataPlan, param_names: list[str], rows: bool = False) -> bool:
        """Whether the plan's group losses (or, `rows`, its examples' rows) come from the examples' products: it
        has some, none reports per parameter (those need their own gradients), examples do not share batch
        statistics, and every tensor has a one-backward rule (otherwise the forward-mode product per batch and
        tensor would cost more than a backward per cell). A compiled model keeps its own forward: the cells'."""
        if (plan.members.shape[1] == 0 and not rows) or self.batch_stats or unwrap_model(self.model) is not self.model:
            return False
        if any(li in self._per_param_slot for cell in plan.cell_losses for li in cell[1:]):
            return False
        return not self._products(param_names).fallback

    def _products(self, param_names: list[str]) -> ExampleProducts:
        """The model's per-example products and their layer rules (made once, shared by every plan)."""
        if self.products is None:
            self.products = ExampleProducts(self.model, param_names, self.task.loss_fn, self.device)
        return self.products

    def _segmented_groups(self, plan: DataPlan, param_names: list[str]) -> bool:
        """Whether the plan's per-parameter group losses come from one backward per batch (`segments`): it has
        groups, examples do not share batch statistics, one dtype and device, and every tensor has a rule."""
        if plan.members.shape[1] == 0 or self.batch_stats or unwrap_model(self.model) is not self.model:
            return False
        if len({(p.dtype, p.device) for p in self.params}) != 1 or self.place.shards_data:  # (data mode: cells)
            return False
        products = self._products(param_names)
        if not covered(products):
            return False
        if len(plan.examples) >= SEGMENT_CELLS_BELOW * len(plan.cell_losses) and \
                any(kind == "conv" for _, kind, _, _ in products.uses):  # big cells of a CNN: a backward each
            return False
        if self.segment_grads is None:
            self.segment_grads = SegmentGrads(self.products, self.params)
        return True

    def load(self, theta: torch.Tensor) -> None:
        """Write the flat float64 θ [P] (or padded [≥P]) into the model's parameters (cast to their dtypes); nothing
        to do when they hold it already (the same tensor, neither it nor a parameter changed since: a refinement
        round of the rows loads the step's start again and again)."""
        if self._loaded is not None and self._loaded[0] is theta and self._loaded[1] == self._versions(theta):
            return
        with torch.no_grad():
            for p, v in zip(self.params, torch.split(theta[:sum(self.numels)], self.numels), strict=True):
                p.copy_(v.view(p.shape))
        self._loaded = (theta, self._versions(theta))

    def _versions(self, theta: torch.Tensor) -> tuple[int, ...]:
        """θ's and every parameter's version counter (torch counts each in-place change)."""
        return (theta._version, *(p._version for p in self.params))

    def __call__(self, theta: torch.Tensor, dirs: torch.Tensor, out: torch.Tensor | None = None,
                 need: torch.Tensor | None = None, origin: tuple | None = None, project: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values [L] float64, projections [D, L, T] float64 onto `dirs` [D, ≥P], gradients [K, held columns]
        of the per-parameter losses (model dtype, or None when there are none)) at θ.

        One pass per data set. `out` [K, held columns] is overwritten when given: preallocated buffers
        spare the page faults of a fresh multi-megabyte tensor per evaluation. In data mode the values
        and projections of every shard are summed in one all-reduce.

        `need` [L] bool: only these losses are wanted (none per-parameter): a data set whose own loss is not
        among them evaluates only the examples of the wanted groups, without parameter gradients; the other
        losses' numbers are then meaningless (0 or partial) and no gradients are returned.

        `origin` (θ0, s, [directions]): θ is θ0 + s·Δθ and `dirs` those directions stacked, as the caller formed
        them; the examples' rows kept from this pass are then found by those tensors (`shared_rows`).

        `project=False`: the per-parameter losses' projections are left 0 (the caller takes them from the
        gradients when it needs them: `projections`).
        """
        self.load(theta)
        self._theta, self._dirs_in, self._origin = theta, dirs, origin
        wanted = None if need is None else set(torch.nonzero(need.cpu()).flatten().tolist())
        if wanted is not None and wanted & set(self.per_param):
            raise AssertionError("a partial evaluation has no per-parameter losses")
        L, S = len(self.loss_names), self.columns[1] - self.columns[0]
        K = len(self.per_param) if wanted is None else 0
        P = sum(self.numels)
        D = dirs.shape[0]
        sums = torch.zeros(L, dtype=torch.float64, device=self.device)
        grads = (out if out is not None else torch.empty(K, S, dtype=self.grad_dtype, device=self.device)) if K \
            else None
        target = None
        if K:
            target = (self._send if self._send is not None else grads.view(1, K, S)).zero_()
        self._dirs = dirs[:, :P].to(self.grad_dtype)  # (a view when the caller passes them in this dtype)
        if self._prod is None or self._prod.shape[0] != D:
            self._prod = torch.empty(D, P, dtype=self.grad_dtype, device=self.device)
        self._proj = torch.zeros(D, L, len(self.numels), dtype=torch.float64, device=self.device)
        self._passes(wanted, sums, target)
        for p in self.params:  # the views must not outlive the evaluation (a later one re-binds them)
            p.grad = None
        self._views = None
        if self._send is not None and K:  # each rank holds its shard's share of every sum
            self.place.sum_scattered(grads, self._send)
        if K and project:  # the per-parameter losses' projections, from their (whole, reduced) gradients
            lo, hi = self.columns[0], min(self.columns[1], P)
            for d in range(D):
                self._proj[d, self.per_param] = self.cols_held.dot_sums(grads[:, :hi - lo], self._dirs[d, lo:hi])
        proj = self._proj
        if self.place.shards_data:  # shards' cell projections and slices' projections, summed in one call
            both = torch.cat([proj.reshape(-1), sums])
            self.place.sum_shards(both)
            proj, sums = both[:-L].view_as(proj), both[-L:]
        self._proj = None
        return sums / self.n_examples, proj, grads

    def projections(self, grads: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        """[K, T] float64 projections of per-parameter gradients [K, held columns] onto `direction` [≥P], summed over
        ranks' slices: the numbers an evaluation with `project=True` gives them, bit for bit."""
        P = sum(self.numels)
        lo, hi = self.columns[0], min(self.columns[1], P)
        proj = self.cols_held.dot_sums(grads[:, :hi - lo], direction[lo:hi].to(self.grad_dtype))
        if self.place.shards_data:
            self.place.sum_shards(proj)
        return proj

    def shared_rows(self, name: str, theta: torch.Tensor | tuple[torch.Tensor, float, torch.Tensor],
                    dirs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values [n] float64, projections [D, n, T] float64) of data set `name`'s examples at θ onto `dirs`, kept
        from a whole evaluation of that point since the last `forget_rows` (None if there was none): the
        examples' rows take them from the data set's own pass instead of a forward and backward of their own.
        `theta` may be (θ0, s, Δθ) for θ0 + sΔθ. A pass whose `origin` names the same tensors is found by them;
        any other by comparing the values (θ0 + sΔθ formed only where its first elements match)."""
        P = sum(self.numels)
        for n, th, dd, origin, v, d in self._rows:
            if n != name or dd.shape[0] != len(dirs):
                continue
            if origin is not None and len(origin[2]) == len(dirs) and all(
                    x is y for x, y in zip(origin[2], dirs, strict=True)):  # the same step's tensors: decided by them
                if isinstance(theta, tuple) and theta[0] is origin[0] and theta[2] is origin[2][0]:
                    if theta[1] == origin[1]:
                        return v, d
                    continue
                if theta is th:
                    return v, d
            if isinstance(theta, tuple):
                th0, sv, step = theta
                if not torch.equal(th[:8], th0[:8] + sv * step[:8]):  # (elementwise: the same bits as in full)
                    continue
                theta = th0 + sv * step
            if (th is theta or torch.equal(th[:P], theta[:P])) and all(
                    torch.equal(dd[k, :P], x[:P]) for k, x in enumerate(dirs)):
                return v, d
        return None

    def forget_rows(self) -> None:
        """The step is done: the examples' values and products kept for its rows go."""
        self._rows = []

    def round(self, theta: torch.Tensor, d: torch.Tensor, points: list[tuple[float, torch.Tensor]]
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """A refinement round of group losses at once: every (point, example of a group that needs it) pair at
        θ + sΔθ in batches of pairs (`ExampleProducts.at_points`), not one evaluation per point. Per point
        (values [L], projections [L, T], its rows). None where it cannot: a point needs a data set's own loss
        or a group whose data set is not evaluated by products, data-parallel shards, or the model refuses."""
        if self.products is None or self.place.shards_data:
            return None
        for _, rows in points:
            for plan in self.plans:
                mine = {li for cell in plan.cell_losses for li in cell}
                need = {i for i in torch.nonzero(rows.cpu()).flatten().tolist() if i in mine}
                if need and (not plan.ghost or plan.cell_losses[0][0] in need):
                    return None
        self.load(theta)
        names, P = self.products.names, sum(self.numels)
        direction = {n: v.view(p.shape).to(p.dtype) for n, v, p in zip(names, d[:P].split(self.numels), self.params,
                                                                       strict=True)}
        L, T = len(self.loss_names), len(self.numels)
        out = [(torch.zeros(L, dtype=torch.float64, device=self.device),
                torch.zeros(L, T, dtype=torch.float64, device=self.device), rows) for _, rows in points]
        for plan in self.plans:
            if not plan.ghost:
                continue
            pair_s, pair_ex, pair_pt = [], [], []
            for j, (sv, rows) in enumerate(points):
                wanted = torch.nonzero(rows.to(plan.members.device)).flatten()
                idx = torch.nonzero(torch.isin(plan.members, wanted).any(1)).flatten()
                pair_s.append(torch.full((len(idx),), sv, dtype=torch.float64, device=idx.device))
                pair_ex.append(idx)
                pair_pt.append(torch.full((len(idx),), j, dtype=torch.long, device=idx.device))
            ss, ex, pt = torch.cat(pair_s), torch.cat(pair_ex), torch.cat(pair_pt)
            bs = self.task.batch_size or max(1, len(plan.examples))
            for a in range(0, len(ss), bs):
                got = self.products.at_points(plan.examples.take(ex[a:a + bs]), ss[a:a + bs], direction)
                if got is None:
                    return None
                values, dd = got
                for j in torch.unique(pt[a:a + bs]).tolist():
                    sel = pt[a:a + bs] == j
                    for m in plan.members[ex[a:a + bs][sel]].T:  # one index per group key
                        out[j][0].index_add_(0, m, values[sel])
                        out[j][1].index_add_(0, m, dd[sel])
        scale = 1.0 / self.n_examples
        return [(v * scale, pr * scale[:, None], rows) for v, pr, rows in out]

    def _passes(self, wanted: set[int] | None, sums: torch.Tensor, target: torch.Tensor | None) -> None:
        """Each data set's pass: all of it, or (`wanted`) only the examples of the wanted groups of a data set
        whose own loss is not wanted, or none."""
        for plan in self.plans:
            part = None  # the plan's wanted losses, when only some of its groups are
            if wanted is not None and plan.cell_losses[0][0] not in wanted:
                part = wanted & {li for cell in plan.cell_losses for li in cell}
                if not part:
                    continue
            if plan.ghost and (plan.members.shape[1] or not self.products.fallback):
                # (a data set there only for its rows goes back to plain backward passes once the first batch's
                # check has sent a tensor to the slow product: the rows then evaluate on their own)
                self._ghost_pass(plan, sums, target, part)
            elif plan.segmented:
                self._segmented_pass(plan, sums, target, part)
            elif plan.mixed:
                self._mixed_pass(plan, sums, target, part)
            else:
                self._sorted_pass(plan, sums, target, part)

    def _losses(self, plan: DataPlan, a: int, b: int) -> torch.Tensor:
        """Per-example losses [b-a] of examples a..b: the user's model and loss_fn, checked."""
        return checked_losses(plan.examples.slice(a, b), self.model, self.task.loss_fn,
                              f"data set {plan.name!r}, examples {a}..{b - 1}")

    def _start_cell(self) -> None:
        """Zero the gradients a cell accumulates: the flat buffer (its views are p.grad), or per-parameter ones."""
        if not self._uniform:
            for p in self.params:
                p.grad = None
            return
        self._flat.zero_()
        if self._views is None:  # bound once per evaluation; a cell's end checks they still are
            self._views = [v.view(p.shape) for p, v in zip(self.params, self._flat.split(self.numels), strict=True)]
            for p, v in zip(self.params, self._views, strict=True):
                p.grad = v

    def _add_grads(self, target: torch.Tensor | None, cell_losses: list[int]) -> None:
        """One cell's gradient sum (accumulated since _start_cell) into every loss it belongs to, as a mean:
        whole into the per-parameter losses, as projections [D, T] into the others."""
        if self._uniform:
            for p, v in zip(self.params, self._views, strict=True):
                if p.grad is not v:  # user code replaced p.grad during the cell: take what it holds too
                    if p.grad is not None:
                        v.add_(p.grad.reshape(v.shape))
                    p.grad = v
        else:  # mixed dtypes: the per-parameter gradients into the flat buffer, in its dtype
            for p, v in zip(self.params, self._flat.split(self.numels), strict=True):
                v.copy_(p.grad.reshape(-1)) if p.grad is not None else v.zero_()
        flat = self._flat
        proj_rows = []
        for li in cell_losses:
            k = self._per_param_slot.get(li)
            if k is None:
                proj_rows.append(li)
                continue
            if target is None:  # a partial evaluation: no per-parameter loss is wanted
                continue
            for r, a, b, fa, fb in self._flat_pieces:
                target[r, k, a:b].add_(flat[fa:fb], alpha=self.inv_sizes[li])
        if proj_rows:  # the cell's projections per tensor, taken once, then scaled into each loss
            torch.mul(self._dirs, flat, out=self._prod)
            cell = self.cols_all.sums(self._prod)  # [D, T] float64
            for li in proj_rows:
                self._proj[:, li].add_(cell, alpha=self.inv_sizes[li])

    def _sorted_pass(self, plan: DataPlan, sums: torch.Tensor, target: torch.Tensor | None,
                     part: set[int] | None = None) -> None:
        """Batches sorted by cell: gradients accumulate over a cell's batches, added once per cell (`part`: only
        the cells of these losses)."""
        self._start_cell()
        cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (a, b, c) in enumerate(plan.batches):
            if part is not None and not part.intersection(plan.cell_losses[c]):
                continue  # (a cell's batches are consecutive: all of them are skipped)
            losses = self._losses(plan, a, b)
            losses.sum().backward()  # accumulates into p.grad across the cell's batches
            cell_sum += losses.detach().double().sum()
            if i + 1 == len(plan.batches) or plan.batches[i + 1][2] != c:  # end of cell
                cell_sum = self._end_cell(plan, c, part, cell_sum, sums, target)

    def _end_cell(self, plan: DataPlan, c: int, part: set[int] | None, cell_sum: torch.Tensor, sums: torch.Tensor,
                  target: torch.Tensor | None) -> torch.Tensor:
        """Cell c is summed: its loss sum and gradient into each of its losses (`part`: those of them only); the next
        cell starts (a zero loss sum is returned)."""
        cell = plan.cell_losses[c] if part is None else [li for li in plan.cell_losses[c] if li in part]
        for li in cell:
            sums[li] += cell_sum
        self._add_grads(target, cell)
        self._start_cell()
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def _segmented_pass(self, plan: DataPlan, sums: torch.Tensor, target: torch.Tensor | None,
                        part: set[int] | None = None) -> None:
        """The data set's batches over its examples sorted by cell: one forward and one backward (activation
        gradients) each, every cell's gradient summed over its rows (`segments`), added into its losses at its last
        rows (`part`: only the cells of these losses). The first batch's gradients are checked against autograd's;
        where they disagree the plan goes back to a backward per cell (`_sorted_pass`), for good."""
        seg = self.segment_grads
        own = self._own_slots(plan) if part is None and target is not None else None
        if own is None:
            self._start_cell()
        else:  # each cell's gradient straight into its group's row (see _own_slots)
            slots, together, weights = own
            views: list[list[torch.Tensor] | None] = [None] * len(slots)
        cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for (a, b, _), rows in zip(plan.batches, plan.segments, strict=True):
            rows = rows if part is None else [r for r in rows if part.intersection(plan.cell_losses[r[2]])]
            if not rows:
                continue
            where = f"data set {plan.name!r}, examples {a}..{b - 1}"
            examples = plan.examples.slice(a, b)
            values = seg.batch(examples, where).double()
            if not seg.checked and not seg.check(examples, rows[0][0], rows[0][1], where):
                plan.segmented, plan.batches = False, plan.cell_batches
                return self._sorted_pass(plan, sums, target, part)  # (nothing of this pass was added yet)
            for lo, hi, c, last in rows:
                cell_sum += values[lo:hi].sum()
                if own is None:
                    seg.add(lo, hi, self._views)
                    if last:
                        cell_sum = self._end_cell(plan, c, part, cell_sum, sums, target)
                    continue
                whole, group = plan.cell_losses[c]
                if views[c] is None:
                    views[c] = [v.view(p.shape) for v, p in zip(target[0, slots[c]].split(self.numels), self.params,
                                                                 strict=True)]
                seg.add(lo, hi, views[c], self.inv_sizes[group])
                if last:
                    sums[whole] += cell_sum
                    sums[group] += cell_sum
                    cell_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        if own is not None:  # the data set's mean gradient: its groups' means weighted by their sizes
            whole = plan.cell_losses[0][0]
            target[0, self._per_param_slot[whole]].addmv_(target[0, together].t(), weights)

    def _own_slots(self, plan: DataPlan) -> tuple[list[int], slice | list[int], torch.Tensor] | None:
        """(per cell, the per-parameter gradients' row of its group loss; those rows as one index, a slice where they
        are consecutive; the weights [cells] of the groups in the data set's mean) where every cell is the only cell
        of a per-parameter group loss of its own (one group key: a like-for-like compute's classes), the data set's
        loss is per-parameter too and this process holds every column. The cells' gradients then go straight into
        their rows, scaled (no buffer to clear and add per cell), and the data set's is their weighted sum; else
        None."""
        if plan.name not in self._own:
            slot, whole = self._per_param_slot, plan.cell_losses[0][0]
            groups = [cell[1] if len(cell) == 2 and cell[0] == whole else -1 for cell in plan.cell_losses]
            ok = (whole in slot and all(g in slot for g in groups) and len(set(groups)) == len(groups)
                  and self._flat_pieces == [(0, 0, sum(self.numels), 0, sum(self.numels))])
            own = None
            if ok:
                rows = [slot[g] for g in groups]
                weights = torch.tensor([self.inv_sizes[whole] / self.inv_sizes[g] for g in groups],
                                       dtype=self.grad_dtype, device=self.device)
                k0 = rows[0]
                together = slice(k0, k0 + len(rows)) if rows == list(range(k0, k0 + len(rows))) else rows
                own = (rows, together, weights)
            self._own[plan.name] = own
        return self._own[plan.name]

    def _ghost_pass(self, plan: DataPlan, sums: torch.Tensor, target: torch.Tensor | None,
                    part: set[int] | None = None) -> None:
        """The data set's own batches, one forward and one backward each: every example's per-tensor products
        with the directions (`ghost.ExampleProducts`), summed into each group loss by index (so 1 or 1,000
        groups cost the same), and the batch's gradient into the data set's loss when it is per-parameter.
        `part`: only the examples of these groups, no gradient."""
        whole = plan.cell_losses[0][0]
        grad = whole in self._per_param_slot and part is None
        if grad:
            self._start_cell()
        dirs = self._direction_dicts()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        whole_proj = torch.zeros(self._proj.shape[0], self._proj.shape[2], dtype=torch.float64, device=self.device)
        examples, members, batches = plan.examples, plan.members, plan.batches
        if part is not None:
            wanted = torch.tensor(sorted(part), device=members.device)
            idx = torch.nonzero(torch.isin(members, wanted).any(1)).flatten()
            examples, members = examples.take(idx), members[idx]
            bs = self.task.batch_size or len(idx)
            batches = [(a, min(a + bs, len(idx)), 0) for a in range(0, len(idx), bs)]
        keep = [] if plan.keep_rows and part is None else None
        for a, b, _ in batches:
            losses, d = self.products.batch_products(examples.slice(a, b), dirs, accumulate=grad,
                                                     where=f"data set {plan.name!r}, examples {a}..{b - 1}")
            values = losses.double()
            if keep is not None:
                keep.append((values, d))
            total += values.sum()
            for m in members[a:b].T:  # one index per group key
                sums.index_add_(0, m, values)
                self._proj.index_add_(1, m, d)
            if not grad:
                whole_proj += d.sum(1)
        groups = sorted({li for cell in plan.cell_losses for li in cell[1:]})
        inv = torch.tensor([self.inv_sizes[li] for li in groups], dtype=torch.float64, device=self.device)
        self._proj[:, groups] *= inv.view(1, -1, 1)
        if part is not None:
            return
        if keep:
            self._rows.append((plan.name, self._theta, self._dirs_in, self._origin, torch.cat([v for v, _ in keep]),
                               torch.cat([d for _, d in keep], 1)))
        sums[whole] += total
        if grad:
            self._add_grads(target, [whole])
        else:
            self._proj[:, whole] += whole_proj * self.inv_sizes[whole]

    def _direction_dicts(self) -> list[dict[str, torch.Tensor]]:
        """This evaluation's directions as {recorded name: Δθ shaped and typed as the parameter}."""
        names = self.products.names
        return [{n: v.view(p.shape).to(p.dtype) for n, v, p in zip(names, row.split(self.numels), self.params,
                                                                    strict=True)} for row in self._dirs]

    def _mixed_pass(self, plan: DataPlan, sums: torch.Tensor, target: torch.Tensor | None,
                    part: set[int] | None = None) -> None:
        """The data set's own batches (batch statistics): one forward each, one backward per cell in it (`part`:
        only the batches and cells of these losses)."""
        whole = plan.cell_losses[0][0]
        for a, b, c in plan.batches:
            segs = plan.mixed.get(a) or [(c, None)]
            if part is not None:
                segs = [(cell, pos) for cell, pos in segs if part.intersection(plan.cell_losses[cell])]
                if not segs:
                    continue
            per_example = self._losses(plan, a, b)
            values = per_example.detach().double()
            sums[whole] += values.sum()
            for k, (cell, pos) in enumerate(segs):
                piece = per_example.sum() if pos is None else per_example[pos].sum()
                self._start_cell()
                piece.backward(retain_graph=k + 1 < len(segs))
                losses = plan.cell_losses[cell] if part is None else [li for li in plan.cell_losses[cell] if li in part]
                for li in losses[1:] if part is None else losses:
                    sums[li] += values.sum() if pos is None else values[pos].sum()
                self._add_grads(target, losses)


def _set_deterministic_mode(model: nn.Module, batchnorm: str) -> None:
    """Dropout off; batch-norm per the task's mode, never updating its buffers."""
    model.eval()
    if batchnorm == "batch":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False  # batch statistics; running buffers left untouched
