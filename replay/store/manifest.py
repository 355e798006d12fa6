"""The run manifest: a small JSON file written once, before any chunk.

It names every recorded tensor (in `named_parameters()` order, then buffers) so that
chunks can be decoded without the model, plus what replay needs later (task string,
recording stride) and provenance (torch version, user metadata).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from replay.errors import RunError
from replay.store.layout import TensorSpec

FORMAT = "replay-run/1"
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    tensors: list[TensorSpec]
    every: int = 1
    task: str | None = None
    torch_version: str = ""
    metadata: dict = field(default_factory=dict)
    chunk_bytes: int = 0
    format: str = FORMAT

    @property
    def params(self) -> list[TensorSpec]:
        return [s for s in self.tensors if s.kind == "param"]

    @property
    def buffers(self) -> list[TensorSpec]:
        return [s for s in self.tensors if s.kind == "buffer"]

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "every": self.every,
            "task": self.task,
            "torch_version": self.torch_version,
            "chunk_bytes": self.chunk_bytes,
            "metadata": self.metadata,
            "tensors": [s.to_json() for s in self.tensors],
        }

    def write(self, run_dir: Path) -> None:
        write_atomic(run_dir / MANIFEST, json.dumps(self.to_json(), indent=1).encode())

    @staticmethod
    def read(run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise RunError(f"{run_dir}: not a replay run (no {MANIFEST}); pass the directory given to Recorder")
        try:
            d = json.loads(path.read_text())
            if d.get("format") != FORMAT:
                raise RunError(f"{path}: format {d.get('format')!r} is not {FORMAT!r}; upgrade replay to read it")
            return Manifest(
                tensors=[TensorSpec.from_json(t) for t in d["tensors"]],
                every=int(d["every"]),
                task=d.get("task"),
                torch_version=d.get("torch_version", ""),
                metadata=d.get("metadata", {}),
                chunk_bytes=int(d.get("chunk_bytes", 0)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise RunError(f"{path}: unreadable manifest ({e}); the run directory is damaged") from None


def write_atomic(path: Path, data: bytes | memoryview, *parts: bytes | memoryview) -> None:
    """Write to a hidden temp name, fsync, rename: readers see the whole file or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            for p in parts:
                f.write(p)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
