"""replay: record a PyTorch training run, then allocate every loss change to every parameter."""

from replay import losses
from replay.engine import compute
from replay.errors import ReplayError
from replay.frames import Frames, load
from replay.record import Recorder
from replay.store import Run, open_run
from replay.task import Task, register_task

__all__ = ["Frames", "Recorder", "ReplayError", "Run", "Task", "compute", "load", "losses", "open_run", "register_task"]
__version__ = "0.1.0"
