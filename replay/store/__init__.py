"""The run format: manifest, chunk files, bit-exact reader, integrity checks."""

from replay.store.run import Run, open_run

__all__ = ["Run", "open_run"]
