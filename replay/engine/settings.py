"""What one compute is asked to do, validated once and passed whole: how (Settings) and what (Request)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from replay.errors import SettingError

PRECISIONS = ("float32", "model")


@dataclass(frozen=True)
class Settings:
    """The options of one compute, validated (each error names the option, the value, what it expects)."""

    tol: float = 1e-4
    rtol: float = 0.0
    max_splits: int = 32
    first_order: bool = False
    dense: bool = False
    precision: str = "float32"
    flush_every: int = 100  # steps between writes of the frames and the resume state
    progress: bool = False  # a progress line on stderr (rank 0)

    def __post_init__(self):
        ms = self.max_splits
        if not isinstance(ms, int) or ms < 2 or ms & (ms - 1):
            raise SettingError(f"max_splits: expected a power of two ≥ 2, got {ms}")
        if not (math.isfinite(self.tol) and math.isfinite(self.rtol) and self.tol >= 0 and self.rtol >= 0):
            raise SettingError(f"tol, rtol: expected finite numbers ≥ 0, got {self.tol}, {self.rtol}")
        if self.precision not in PRECISIONS:
            raise SettingError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class Request:
    """What is computed: the data sets and the rows beside them, the steps, and where the frames go."""

    datasets: list[str]  # the data-set losses (and those of per_class), in order
    per_class: list[str]
    per_example: list[str]
    per_token: list[str]
    token_tensors: dict[str, list[tuple[int, int]]]
    per_param: object  # "datasets", "all" or a list of loss names
    todo: list[int]  # the steps to compute
    out: Path
    restart: bool = False
    notes: dict = field(default_factory=dict)  # what the frames' meta must say about how to read them
