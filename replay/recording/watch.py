"""What the Recorder watches besides the parameters' values: that they stay the same set, and steps it missed.

- `ParamWatch`: a run records one fixed parameter set. Replacing a parameter or a submodule
  (`model.fc = nn.Linear(...)`) is seen at once by torch's global registration hooks; what
  no hook sees (`requires_grad` switched) by a full comparison every CHECK_EVERY states.
  The full comparison walks the model (~70 µs for a 3-layer MLP, 224 µs for a 12-layer
  GPT-2), too slow for every state.
- `catch_up`: the one skipped-step policy of every integration. A wrapper that skips the
  torch optimizer's step (AMP's scaler on overflow: accelerate, the HF Trainer, Lightning)
  fires none of its hooks, yet the training stack counts the step; the Recorder makes it a
  zero-change state so that state t stays the stack's global step t.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

CHECK_EVERY = 64


class ParamWatch:
    """Tells when the model's trainable parameters are no longer the recorded ones."""

    def __init__(self, model: nn.Module, params: list[tuple[str, nn.Parameter]]):
        self.model, self.params = model, params
        self.signature = self._signature()
        self.dirty, self.since = False, 0
        ours, me = {id(m) for m in model.modules()}, weakref.ref(self)  # global hooks: hold no watch

        def replaced(module: nn.Module, *_: object) -> None:  # a parameter or submodule (re)assigned anywhere
            if id(module) in ours and (w := me()) is not None:
                w.dirty = True

        self._hooks = [register_module_parameter_registration_hook(replaced),
                       register_module_module_registration_hook(replaced)]

    def _signature(self) -> list:
        return [(n, id(p), tuple(p.shape), p.dtype) for n, p in self.model.named_parameters() if p.requires_grad]

    def changed(self) -> str | None:
        """None while the parameter set is the recorded one; else which names changed (cheap most calls)."""
        self.since += 1
        if not self.dirty and self.since < CHECK_EVERY:
            return None
        self.dirty, self.since = False, 0
        if self._signature() == self.signature:
            return None
        now = {n: (tuple(p.shape), p.dtype) for n, p in self.model.named_parameters() if p.requires_grad}
        was = {n: (tuple(p.shape), p.dtype) for n, p in self.params}
        diff = sorted(set(now) ^ set(was)) or [n for n in now if now[n] != was.get(n)] or ["(a tensor was replaced)"]
        return ", ".join(diff[:3])

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def catch_up(recorder: object, steps_done: int) -> None:
    """The stack says `steps_done` optimizer steps happened since recording began: each one the optimizer's
    hooks did not see (skipped on AMP overflow) becomes a zero-change state."""
    while recorder.step < steps_done:
        recorder.capture()


def wrap_skipping_step(wrapper: object, recorder: object) -> Callable[[], None]:
    """accelerate's optimizer skips the torch step on AMP overflow: count it anyway (a zero-change state).
    Returns the function that undoes the patch."""
    original = wrapper.step

    def step(*args: object, **kwargs: object) -> object:
        before = recorder.step
        out = original(*args, **kwargs)
        if recorder.step == before and getattr(wrapper, "step_was_skipped", False):
            catch_up(recorder, before + 1)
        return out

    wrapper.step = step
    return lambda: wrapper.__dict__.pop("step", None)
