"""Per-example LCA: each example's own loss change along a step, allocated to every tensor.

For example i and tensor T along θ(s) = θ_t + s·Δθ:

    LCA_{i,T} = ∫₀¹ Δθ_T · ∂ℓ_i/∂θ_T (θ(s)) ds ≈ h/3 · (E + 4·O + 2·M) of d_{i,T}(s) = Δθ_T · ∇_T ℓ_i(θ(s))

d_{·,T}(s) for all examples of a batch is one forward-mode product (`torch.func.jvp`) with the
tangent Δθ restricted to T: memory stays that of a forward over one batch, whatever the number
of examples or parameters (per-sample gradients would hold examples × parameters). Each step
has its own points (Δθ changes, so the end of one step is not the start of the next), and the
refinement is per example: an example whose Σ_T LCA misses its own loss change by more than
tol + rtol·|Δℓ_i| gets more points, the others do not. One example's loss is far less smooth
than a mean (ReLU kinks), so it needs more points than the data set's loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from replay.engine.simpson import refine_points
from replay.errors import TaskError
from replay.task import Examples, Task, user_error
from replay.wrappers import unwrap_model


class PerExample:
    """Per-example, per-tensor LCA of the examples of `datasets`, step by step."""

    def __init__(self, task: Task, model: nn.Module, param_names: list[str], datasets: list[str],
                 device: torch.device, tol: float, rtol: float, max_splits: int):
        if task.batchnorm == "batch" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise TaskError("per-example LCA needs one loss per example, and batch-norm with batch statistics makes "
                            "every example's loss depend on its batch; use Task(batchnorm='running')")
        self.model, self.loss_fn, self.device = model, task.loss_fn, device
        self.names = list(param_names)
        inner = unwrap_model(model)
        self.prefix = "" if inner is model else "_orig_mod."  # functional_call on the module that is called
        params = dict(inner.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.numels = [params[n].numel() for n in self.names]
        self.dtypes = [params[n].dtype for n in self.names]
        self.tol, self.rtol, self.max_splits = tol, rtol, max_splits
        self.data = {d: Examples(task.data[d]).to(device) for d in datasets}
        self.batch = {d: task.batch_size or len(self.data[d]) for d in datasets}
        self._vmap_ok = True

    def _params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta[:sum(self.numels)], self.numels)
        return {self.prefix + n: v.view(s).to(dt) for n, v, s, dt in zip(self.names, parts, self.shapes, self.dtypes,
                                                                          strict=True)}

    def _point(self, name: str, theta: torch.Tensor, delta: dict[str, torch.Tensor],
               rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Losses [m] and directional derivatives d [m, T] (float64) of examples `rows` at θ."""
        params = self._params(theta)
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        examples, bs = self.data[name].take(rows), self.batch[name]
        values, derivs = [], []
        for a in range(0, len(rows), bs):
            batch = examples.slice(a, a + bs)

            def losses(p: dict[str, torch.Tensor], batch: Examples = batch) -> torch.Tensor:
                t = batch.tensors
                out = functional_call(self.model, p, (), t) if isinstance(t, dict) else \
                    functional_call(self.model, p, (t[0],))
                return self.loss_fn(out, t if isinstance(t, dict) else t[1])

            value, d = self._products(losses, params, zeros, delta)
            values.append(value.detach().double())
            derivs.append(d.double())
        return torch.cat(values), torch.cat(derivs)

    def _products(self, losses: object, params: dict, zeros: dict, delta: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [m], d [m, T]): the T forward-mode products, batched in one vmap when the model allows it
        (a T-fold tangent costs T × the parameters' memory: up to 256 MiB), else one after another."""
        keys = list(params)
        if self._vmap_ok and len(keys) * sum(v.numel() * v.element_size() for v in params.values()) <= 256 << 20:
            tangents = {k: torch.stack([delta[k] if j == i else zeros[k] for j in range(len(keys))])
                        for i, k in enumerate(keys)}
            try:
                value, d = vmap(lambda t: jvp(losses, (params,), (t,)), randomness="same")(tangents)
                return value[0], d.T
            except (RuntimeError, NotImplementedError, ValueError):  # an op without a batching rule
                self._vmap_ok = False
        cols = []
        for key in keys:  # one forward-mode product per tensor: Δθ restricted to it
            try:
                value, d = jvp(losses, (params,), ({**zeros, key: delta[key]},))
            except (NotImplementedError, RuntimeError) as e:
                if "forward AD" not in str(e) and "forward-mode" not in str(e):
                    raise
                raise TaskError(f"per-example LCA differentiates forward (torch.func.jvp), which an op of the task's "
                                f"model does not support ({user_error(e)}); use an implementation that does (for HF "
                                f"attention: attn_implementation='eager')") from None
            cols.append(d)
        return value, torch.stack(cols, 1)

    def losses(self, name: str, theta: torch.Tensor) -> torch.Tensor:
        """Every example's loss [n] (float64) at θ: forward only."""
        params, ex, bs = self._params(theta), self.data[name], self.batch[name]
        out = []
        with torch.no_grad():
            for a in range(0, len(ex), bs):
                t = ex.slice(a, a + bs).tensors
                y = functional_call(self.model, params, (), t) if isinstance(t, dict) else \
                    functional_call(self.model, params, (t[0],))
                out.append(self.loss_fn(y, t if isinstance(t, dict) else t[1]).double())
        return torch.cat(out)

    def step(self, th0: torch.Tensor, th1: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per data set: lca [n, T], before/after losses [n], splits [n], grounded [n] (float64 / int / bool)."""
        d = th1 - th0
        delta = self._params(d)
        out = {}
        for name, examples in self.data.items():
            n_ex = len(examples)
            rows = torch.arange(n_ex, device=self.device)
            v0, d0 = self._point(name, th0, delta, rows)
            v1, d1 = self._point(name, th1, delta, rows)
            _, odd = self._point(name, th0 + 0.5 * d, delta, rows)
            ends, mid = d0 + d1, torch.zeros_like(odd)
            splits = torch.full((n_ex,), 2, dtype=torch.int64, device=self.device)
            dl = v1 - v0
            n = 2
            while True:
                lca = (ends + 4.0 * odd + 2.0 * mid) / (3.0 * splits[:, None])
                ok = (dl - lca.sum(1)).abs() <= self.tol + self.rtol * dl.abs()
                # a non-finite loss (a NaN example) cannot be grounded by more points
                todo = torch.nonzero(~ok & (splits == n) & torch.isfinite(dl - lca.sum(1))).flatten()
                if n >= self.max_splits or len(todo) == 0:
                    break
                # refine only the examples that miss: the old points become interior even ones
                mid[todo] += odd[todo]
                new = torch.zeros(len(todo), odd.shape[1], dtype=odd.dtype, device=self.device)
                for s in refine_points(n):
                    new += self._point(name, th0 + s * d, delta, todo)[1]
                odd[todo] = new
                splits[todo] = 2 * n
                n *= 2
            out[name] = {"lca": lca, "before": v0, "after": v1, "splits": splits, "grounded": ok}
        return out
