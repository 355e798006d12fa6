"""The replay engine: Simpson + adaptive refinement over a run's states."""

from replay.engine.compute import compute

__all__ = ["compute"]
