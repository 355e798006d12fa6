"""Record a `transformers.Trainer` run: `Trainer(..., callbacks=[ReplayCallback("runs/x", task=...)])`.

A thin adapter from the Trainer's events to a `Recorder`: state 0 at train begin, one state
per real optimizer step (never per accumulation micro-batch; a step the AMP scaler skipped
becomes a zero-change state, so states keep the Trainer's `global_step` numbering), closed at
the last epoch's end, before the Trainer may load a "best" checkpoint into the model. Under
distributed training only the main process records.

Batches: give each example an id column (default `example_ids`) and set
`TrainingArguments(remove_unused_columns=False)` so that it reaches the model; the callback takes
it out of the model's inputs before forward and logs it (`Recorder.log_batch`, `run.batches`).
"""

from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("replay.huggingface needs transformers: pip install 'replay-lca[hf]'") from None

from replay.record import Recorder
from replay.recording.watch import catch_up
from replay.wrappers import torch_optimizer


class ReplayCallback(TrainerCallback):
    """Records the Trainer's model into `path` (keyword arguments go to `replay.Recorder`)."""

    def __init__(self, path: str | os.PathLike, *, task: str | None = None, ids: str | None = "example_ids",
                 **recorder_kwargs: object):
        if "shard" in recorder_kwargs:
            raise ValueError("shard: the callback records on the main process only; for sharded recording create "
                             "replay.Recorder on every rank")
        self.path, self.task, self.ids, self.kwargs = path, task, ids, recorder_kwargs
        self.recorder: Recorder | None = None
        self._steps = 0
        self._hook = None

    def on_train_begin(self, args: object, state: object, control: object, model: object = None,
                       optimizer: object = None, **kwargs: object) -> None:
        if not state.is_world_process_zero or self.recorder is not None:
            return
        meta = {"trainer": "transformers", "first_global_step": state.global_step,
                "gradient_accumulation_steps": args.gradient_accumulation_steps, **self.kwargs.pop("metadata", {})}
        # the torch optimizer inside accelerate's wrapper: its hooks fire on real updates only;
        # a skipped (AMP overflow) step is added in on_optimizer_step
        # created on the main process only, so it records whole states there (not sharded: the other
        # ranks create no Recorder to record their slices)
        self.recorder = Recorder(model, self.path, optimizer=torch_optimizer(optimizer), task=self.task,
                                 metadata=meta, **{"rank": 0, **self.kwargs})
        self._steps = 0
        if self.ids:
            self._hook = model.register_forward_pre_hook(self._take_ids, with_kwargs=True)

    def _take_ids(self, module: object, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The batch's example ids: out of the model's inputs, into the run (training forwards only)."""
        if self.ids in kwargs:
            kwargs = dict(kwargs)
            ids = kwargs.pop(self.ids)
            if module.training and self.recorder is not None:
                self.recorder.log_batch(ids)
        return args, kwargs

    def on_optimizer_step(self, args: object, state: object, control: object, **kwargs: object) -> None:
        if self.recorder is None:
            return
        self._steps += 1
        catch_up(self.recorder, self._steps)  # an update the wrapper skipped (AMP): a zero-change state

    def on_epoch_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
        if control.should_training_stop or state.global_step >= state.max_steps:
            self._close()  # before _finalize_training may load the best checkpoint into the model

    def on_train_end(self, args: object, state: object, control: object, **kwargs: object) -> None:
        self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
