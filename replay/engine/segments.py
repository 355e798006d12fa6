"""Per-parameter gradients of groups of examples from one backward per batch ("segments").

A layer's parameter gradient is a sum over the examples of a product of the layer's input a_i and the
gradient b_i of the loss at its output (examples do not mix inside these layers, so b's rows are each
example's own): for a Linear, ∇W = Σ_i b_iᵀ a_i. With a batch's examples sorted by their group cell, a
cell's gradient is that sum over its rows alone, a segment of the batch. So one forward and one backward of
the data set's own batches (activation gradients only) give every cell's gradient, however many cells a
batch holds, where a backward per cell took as many passes as cells (a per-parameter class loss of the
digits MLP: 11 small backward passes per evaluation, 1.5x a plain one).

The rules are `layers.add_weight_grad` (the layers `ghost` has rules for, weight and bias). A batch-shared layer
output (learned positions, see `ghost`) has a batch dimension here too; its input is broadcast to the segment's
rows. The first batch's gradients are compared with autograd's of the same examples; a model whose rules
disagree goes back to a backward per cell, for good.
"""

from __future__ import annotations

import warnings

import torch

from replay.engine.ghost import CHECK_RTOL, ExampleProducts
from replay.engine.layers import add_weight_grad
from replay.engine.user_code import checked_losses
from replay.task import Examples


def covered(products: ExampleProducts) -> bool:
    """Whether every recorded tensor has a rule here (string padding of a convolution has none)."""
    if products.fallback:
        return False
    return not any(kind == "conv" and isinstance(m.padding, str) for m, kind, _, _ in products.uses)


class SegmentGrads:
    """One batch at a time: its forward and backward (`batch`), then any segment's gradients added into per-tensor
    buffers (`add`)."""

    def __init__(self, products: ExampleProducts, params: list[torch.Tensor]):
        self.products, self.params = products, params
        self.checked = False
        self._records: list = []
        self._grads: list = []

    def batch(self, examples: Examples, where: str) -> torch.Tensor:
        """Per-example losses [B] of the batch; keeps each layer use's input and output gradient for `add`."""
        losses, self._records, self._grads = self.products.outputs_and_grads(examples, where)
        return losses

    def add(self, lo: int, hi: int, views: list[torch.Tensor], alpha: float = 1.0) -> None:
        """Add alpha × the gradient of Σ ℓ_i over the batch's rows lo..hi into views[t] (each shaped as tensor t)."""
        products = self.products
        with torch.no_grad():
            for (u, a, _y, _version), b in zip(self._records, self._grads, strict=True):
                if b is not None:
                    m, kind, pname, ti = products.uses[u]
                    add_weight_grad(views[ti], kind, m, pname, products.input_rows(u, a, lo, hi), b[lo:hi], alpha)

    def check(self, examples: Examples, lo: int, hi: int, where: str) -> bool:
        """The rules' gradients of rows lo..hi of the last batch against autograd's of those examples alone (the
        first batch only): True where they agree; otherwise a warning, and False for good."""
        self.checked = True
        got = [torch.zeros_like(p) for p in self.params]
        self.add(lo, hi, got)
        part = examples.slice(lo, hi)
        with torch.enable_grad():
            losses = checked_losses(part, self.products.model, self.products.loss_fn, where)
            ref = torch.autograd.grad(losses.sum(), self.params, allow_unused=True)
        bad = []
        for i, (g, r) in enumerate(zip(got, ref, strict=True)):
            r = torch.zeros_like(g) if r is None else r
            scale = max(float(r.abs().max()), float(g.abs().max()), 1e-30) if r.numel() else 1.0
            if r.numel() and float((g - r).abs().max()) > CHECK_RTOL * scale + 1e-10:
                bad.append(self.products.names[i])
        if bad:
            warnings.warn(f"per-parameter group losses: the one-backward gradients of {', '.join(bad[:3])} disagree "
                          f"with autograd's; each group is evaluated by a backward of its own", stacklevel=3)
        return not bad
