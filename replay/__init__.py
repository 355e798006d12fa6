"""replay: record a PyTorch training run, then allocate every loss change to every parameter."""

from replay.errors import ReplayError
from replay.record import Recorder
from replay.store import Run, open_run

__all__ = ["Recorder", "ReplayError", "Run", "open_run"]
__version__ = "0.1.0"
