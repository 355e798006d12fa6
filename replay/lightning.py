"""Record a `lightning.Trainer` run: `Trainer(callbacks=[ReplayCallback("runs/x", task=...)])`.

A thin adapter from Lightning's events to a `Recorder`: state 0 when training starts, one
state per optimizer step whatever `accumulate_grad_batches` is (the torch optimizer's own
step hooks), with manual optimization too; a step the AMP scaler skipped becomes a
zero-change state, so states keep `trainer.global_step` numbering. Only global rank 0 records.
With `ids`, each batch's example ids are logged (`Recorder.log_batch`, read back as `run.batches`):
a key of dict batches (default "example_ids", used when present) or a function of the batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("replay.lightning needs lightning: pip install 'replay-lca[lightning]'") from None

from replay.errors import RecordError
from replay.record import Recorder
from replay.recording.watch import catch_up
from replay.wrappers import torch_optimizer


class ReplayCallback(Callback):
    """Records the LightningModule's parameters into `path` (keyword arguments go to `replay.Recorder`)."""

    def __init__(self, path: str | os.PathLike, *, task: str | None = None,
                 ids: str | Callable[[object], object] | None = "example_ids", **recorder_kwargs: object):
        if "shard" in recorder_kwargs:
            raise ValueError("shard: the callback records on the main process only; for sharded recording create "
                             "replay.Recorder on every rank")
        self.path, self.task, self.ids, self.kwargs = path, task, ids, recorder_kwargs
        self.recorder: Recorder | None = None

    def on_train_start(self, trainer: object, pl_module: object) -> None:
        if not trainer.is_global_zero or self.recorder is not None:
            return
        if len(trainer.optimizers) != 1:
            raise RecordError(f"replay.lightning.ReplayCallback records a model trained by one optimizer; this "
                              f"one has {len(trainer.optimizers)}: record with replay.Recorder and capture()")
        meta = {"trainer": "lightning", "first_global_step": trainer.global_step,
                "accumulate_grad_batches": trainer.accumulate_grad_batches, **self.kwargs.pop("metadata", {})}
        self.recorder = Recorder(pl_module, self.path, optimizer=torch_optimizer(trainer.optimizers[0]),
                                 task=self.task, metadata=meta, **{"rank": 0, **self.kwargs})
        self._first = trainer.global_step

    def on_train_batch_start(self, trainer: object, pl_module: object, batch: object, batch_idx: int) -> None:
        if self.recorder is None or self.ids is None:
            return
        if callable(self.ids):
            self.recorder.log_batch(self.ids(batch))
        elif isinstance(batch, Mapping) and self.ids in batch:
            self.recorder.log_batch(batch[self.ids])

    def on_train_batch_end(self, trainer: object, pl_module: object, *args: object, **kwargs: object) -> None:
        if self.recorder is not None:
            catch_up(self.recorder, trainer.global_step - self._first)  # steps the AMP scaler skipped

    def on_train_end(self, trainer: object, pl_module: object) -> None:
        self._close()

    def on_exception(self, trainer: object, pl_module: object, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
