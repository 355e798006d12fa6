"""What each layer kind contributes, one rule per kind side by side: a new kind is added here alone.

The layers whose output y is linear in each of their parameters, with examples not mixed inside them (b's rows,
the gradient of Σ ℓ at y, are each example's own ∂ℓ_i/∂y), give three numbers from a layer's input a and b:

- `directional`: every example's directional derivative ⟨b_i, J(a_i) Δθ⟩ (ghost products, `ghost`);
- `tangent`: J(a) Δθ, the output's change along Δθ (y at θ + sΔθ is y + s·Σ of these: `ghost.at_points`);
- `add_weight_grad`: the gradient Σ_i over some rows of b_iᵀ J(a_i) (a group's segment of a batch, `segments`).

The rules: Linear (and HF's Conv1D): J Δθ = a ΔWᵀ (a ΔW), ∇W = Σ bᵀa (Σ aᵀb), the bias: Δb, Σ b;
Conv1d/2d/3d (zero padding): J Δθ = conv(a, ΔW), ∇W torch's convolution weight gradient, the bias per channel;
Embedding: J Δθ = ΔW[indices] (the padding row included: the forward reads it, a tied output layer moves it;
autograd's gradient of it is zero); LayerNorm: x̂ ⊙ Δγ, ∇γ = Σ b ⊙ x̂, the bias Δβ, Σ b; BatchNorm: the same per
channel, x̂ normalized with the statistics its forward used (the batch's own couple the examples: no segments).
"""

from __future__ import annotations

import torch
from torch import nn


def kind_of(m: nn.Module) -> str | None:
    """The rule a layer follows (None: no rule here; its tensors take the forward-mode product)."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.padding_mode == "zeros":
        return "conv"
    if isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        return "layernorm"
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        return "batchnorm"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None:
        return "hf_conv1d"  # transformers' GPT-2 projection: y = x @ W + b, W [in, out]
    return None


def per_example(x: torch.Tensor) -> torch.Tensor:
    """Σ over every dimension but the first (the batch)."""
    return x.reshape(x.shape[0], -1).sum(1)


def directional(kind: str, m: nn.Module, pname: str, a: torch.Tensor, b: torch.Tensor, dp: torch.Tensor,
                ) -> torch.Tensor:
    """[B] ⟨b, J(a) Δθ⟩ of one use of layer m for its parameter `pname` with direction dp (the embedding's padding row
    counts: the forward reads it)."""
    return per_example(b * tangent(kind, m, pname, a, dp))


def tangent(kind: str, m: nn.Module, pname: str, a: torch.Tensor, dp: torch.Tensor) -> torch.Tensor:
    """J(a) Δθ of one use of layer m for its parameter `pname`, shaped as (or broadcasting to) its output: the
    layer's output is linear in each of these parameters, so at θ + sΔθ it is y(θ) + s·Σ of these."""
    if pname == "bias":
        return dp.view(1, -1, *([1] * (a.dim() - 2))) if kind in ("conv", "batchnorm") else dp
    if kind == "linear":
        return nn.functional.linear(a, dp)
    if kind == "hf_conv1d":
        return a @ dp
    if kind == "conv":
        return m._conv_forward(a, dp, None)
    if kind == "embedding":
        return nn.functional.embedding(a, dp)
    if kind == "layernorm":
        return nn.functional.layer_norm(a, m.normalized_shape, None, None, m.eps) * dp
    stats = not m.training and m.running_mean is not None  # batchnorm
    xhat = nn.functional.batch_norm(a, m.running_mean if stats else None, m.running_var if stats else None,
                                    None, None, not stats, 0.0, m.eps)
    return xhat * dp.view(1, -1, *([1] * (a.dim() - 2)))


def add_weight_grad(into: torch.Tensor, kind: str, m: nn.Module, pname: str, a: torch.Tensor, b: torch.Tensor,
                    alpha: float = 1.0) -> None:
    """Add alpha × the gradient of Σ over b's rows of the loss for parameter `pname` of one use of layer m into
    `into` (shaped as the parameter): a [rows, ...] the layer's input, b [rows, ...] the gradient at its output. A
    matrix product goes straight into `into` (one fused multiply-add: no gradient tensor, no second pass)."""
    if pname == "weight" and kind in ("linear", "hf_conv1d"):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
        into.addmm_(*((b.t(), a) if kind == "linear" else (a.t(), b)), alpha=alpha)
        return
    if pname == "bias":
        g = b.sum(dim=[0, *range(2, b.dim())]) if kind in ("conv", "batchnorm") else b.reshape(-1, b.shape[-1]).sum(0)
    elif kind == "conv":
        nd = b.dim() - 2
        g = torch.ops.aten.convolution_backward(b, a, m.weight, None, m.stride, m.padding, m.dilation, False,
                                                [0] * nd, m.groups, [False, True, False])[1]
    elif kind == "embedding":
        g = torch.zeros(m.weight.shape, dtype=b.dtype, device=b.device)
        g.index_add_(0, a.reshape(-1), b.reshape(-1, b.shape[-1]))
        if m.padding_idx is not None:
            g[m.padding_idx] = 0  # (autograd's rule: the padding row is never trained)
    elif kind == "layernorm":
        xhat = nn.functional.layer_norm(a, m.normalized_shape, None, None, m.eps)
        g = (b * xhat).reshape(-1, *m.normalized_shape).sum(0)
    elif kind == "batchnorm":  # running statistics (batch statistics couple the examples: never segmented)
        xhat = nn.functional.batch_norm(a, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
        g = (b * xhat).sum(dim=[0, *range(2, b.dim())])
    else:
        raise AssertionError(kind)
    into.add_(g, alpha=alpha)
