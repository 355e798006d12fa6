"""A task's identity by content, so that an lca dir is never reused for another task.

Two tasks under the same `module:function` name (edited data, another model) define other
losses; an lca dir written for one must not be returned for the other. The fingerprint
hashes what the losses depend on besides the recorded parameters: the data (inputs,
targets, group keys) of the data sets computed, the architecture (names, shapes, dtypes),
the values of everything replay does not overwrite (buffers, frozen parameters), and the
loss function's code. Hashing runs at ~1 GB/s, small next to the replay itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from replay.task import Task
from replay.wrappers import unwrap_model


def _update(h: hashlib.blake2b, t: object) -> None:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(t, dict):
        for k in sorted(t, key=str):
            h.update(repr(k).encode())
            _update(h, t[k])
    elif isinstance(t, list | tuple):
        for v in t:
            _update(h, v)
    else:
        h.update(repr(t).encode())


def _code_of(fn: object) -> object:
    """A function's name, bytecode and constants (nested code objects by content: their repr holds an address)."""
    call = vars(type(fn)).get("__call__")  # a callable object: its class's __call__
    code = getattr(fn, "__code__", None) or getattr(call, "__code__", None)
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}"

    def content(c: object) -> object:
        if hasattr(c, "co_code"):
            return [c.co_code, [content(k) for k in c.co_consts], list(c.co_names)]
        return repr(c)

    return [name, content(code)] if code is not None else name


def task_fingerprint(task: Task, datasets: Iterable[str], recorded: Iterable[str]) -> str:
    """Hex digest of the task's content for these data sets; `recorded` parameters are left out (replay sets them)."""
    h = hashlib.blake2b(digest_size=16)
    for name in datasets:
        _update(h, [name, task.data[name], task.groups.get(name, {})])
    model = unwrap_model(task.model)
    h.update(type(model).__qualname__.encode())
    skip = set(recorded)
    for n, p in model.named_parameters(remove_duplicate=False):
        _update(h, [n, str(p.dtype), tuple(p.shape)])
        if n not in skip:
            _update(h, p)
    for n, b in model.named_buffers():
        _update(h, [n, b])
    _update(h, _code_of(task.loss_fn))
    return h.hexdigest()
