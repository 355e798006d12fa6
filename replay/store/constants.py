"""Checksums of what a run does not record but its losses depend on: frozen parameters and buffers.

A LoRA run records only the adapters. Replayed with a frozen base from another seed it is
"100% grounded" with the learning gone, because every allocation adds up on the wrong
model. So the recorder stores, in the manifest, an xxHash3 of each frozen parameter and
buffer at state 0 (`constants_of`), and compute compares the task model's values with them
(`mismatched`) before it replays anything. Buffers that training itself changes (batch-norm
running statistics, counters) are compared only where replay would use them.
"""

from __future__ import annotations

import torch
import xxhash
from torch import nn

from replay.store.layout import TORCH_TO_ST

SLICE = 64 << 20  # bytes hashed per device-to-host copy: memory does not grow with a tensor


def tensor_digest(t: torch.Tensor) -> str:
    """xxHash3-64 (hex) of a tensor's bytes in C order, whatever its device (copied to the host in slices)."""
    flat = t.detach().reshape(-1)
    h = xxhash.xxh3_64()
    h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode())
    step = max(1, SLICE // max(1, t.element_size()))
    for a in range(0, flat.numel(), step):
        part = flat[a:a + step].cpu().contiguous()
        h.update(part.view(torch.uint8).numpy().data if part.numel() else b"")
    return h.hexdigest()


def constants_of(model: nn.Module, recorded: set[str]) -> dict[str, dict]:
    """{name: {kind, xxh3}} of every frozen parameter and every buffer not in `recorded`."""
    out: dict[str, dict] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad or name in recorded or id(p) in seen or p.is_meta:
            continue
        seen.add(id(p))
        out[name] = {"kind": "frozen", "xxh3": tensor_digest(p)}
    for name, b in model.named_buffers():
        if name in recorded or b.is_meta or b.dtype not in TORCH_TO_ST:
            continue
        out[name] = {"kind": "buffer", "xxh3": tensor_digest(b)}
    return out


def mismatched(recorded: dict[str, dict], model: nn.Module, skip: set[str] = frozenset()) -> list[str]:
    """Names whose value in `model` differs from the recorded checksum (absent names are not compared here)."""
    have = dict(model.named_parameters(remove_duplicate=False))
    have.update(dict(model.named_buffers()))
    bad = []
    for name, c in recorded.items():
        t = have.get(name)
        if name in skip or t is None or t.is_meta:
            continue
        if tensor_digest(t) != c.get("xxh3"):
            bad.append(name)
    return bad
