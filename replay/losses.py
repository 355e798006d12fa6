"""Ready per-example losses for `Task(loss_fn=...)`: one loss per example, as replay needs.

A loss of replay is the mean of per-example losses over a fixed data set, so a loss_fn must
not reduce over the batch. These are the ones users would otherwise hand-write.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _logits(outputs: object) -> torch.Tensor:
    """`.logits` of a model output (HF), the first element of a tuple, or the tensor itself."""
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    if logits is None and isinstance(outputs, tuple | list):
        logits = outputs[0]
    if logits is None:
        logits = outputs
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(f"causal_lm: expected logits [batch, seq, vocab] (a tensor, or an output with .logits), "
                        f"got {type(logits).__name__} {tuple(getattr(logits, 'shape', ()))}")
    return logits


def causal_lm(outputs: object, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-sequence next-token cross-entropy [batch]: the mean over each sequence's predicted tokens.

    Token i predicts token i+1 (the shift is done here, as HF models do inside their own loss).
    Targets are `batch["labels"]` (or `input_ids` when there are none); positions labelled -100
    and, with an `attention_mask`, padded positions are left out. A sequence with no target
    token has loss 0. Logits are upcast to float32, as HF's own loss does. When every sequence
    has the same number of target tokens, the mean over sequences equals the model's own
    `labels=` loss (a token-weighted mean).
    """
    tok, keep = _token_losses("causal_lm", outputs, batch)
    return tok.sum(1) / keep.sum(1).clamp(min=1)


def causal_lm_tokens(outputs: object, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token cross-entropy [batch, seq − 1] and which tokens count [batch, seq − 1] (bool):
    the terms `causal_lm` averages (labels −100 and padding left out). Token j predicts token j + 1."""
    return _token_losses("causal_lm_tokens", outputs, batch)


def _token_losses(name: str, outputs: object, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _logits(outputs)
    labels = batch.get("labels", batch.get("input_ids"))
    if labels is None:
        raise KeyError(f"{name}: the batch has neither 'labels' nor 'input_ids'")
    targets = labels[:, 1:]
    keep = targets != -100
    mask = batch.get("attention_mask")
    if mask is not None:
        keep = keep & mask[:, 1:].bool()
    pred = logits[:, :-1].float()  # [b, s-1, vocab]
    tok = nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), targets.masked_fill(~keep, 0).reshape(-1),
                                      reduction="none").view(targets.shape)  # [b, s-1]
    return tok * keep, keep
