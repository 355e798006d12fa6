"""See through the wrappers training stacks put around models and optimizers, and name what is trained.

The recorder must hook the torch optimizer that really updates the parameters, and name
parameters as the plain model does, so that the same task replays a run whatever wrapped
the model during training (DDP's `module.`, torch.compile's `_orig_mod.`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose `named_parameters()` names are the plain model's (same tensors)."""
    for _ in range(8):
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model
    return model


def torch_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, ...

    Wrappers may subclass `torch.optim.Optimizer` without initializing it (accelerate does),
    so a wrapper is recognized by holding an inner optimizer, not by its class.
    """
    opt = optimizer
    for _ in range(8):
        inner = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if isinstance(opt, torch.optim.Optimizer) and "_optimizer_step_pre_hooks" in vars(opt):
            if not isinstance(inner, torch.optim.Optimizer):
                return opt  # a real torch optimizer (not a wrapper of one)
        if inner is None or inner is opt:
            break
        opt = inner
    raise TypeError(f"optimizer: expected a torch.optim.Optimizer or a wrapper holding one (as .optimizer), "
                    f"got {type(optimizer).__name__}")


def trainable_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], dict[str, str], list[str]]:
    """(recorded (name, parameter) pairs, {alias: recorded name} of tied ones, frozen names).

    A tied tensor (one Parameter under two names) is recorded once, under its first name in
    `named_parameters()` order; its other names are aliases.
    """
    first: dict[int, str] = {}
    params, aliases, frozen = [], {}, []
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            if p.requires_grad:
                aliases[n] = first[id(p)]
            continue
        first[id(p)] = n
        if p.requires_grad:
            params.append((n, p))
        else:
            frozen.append(n)
    return params, aliases, frozen
