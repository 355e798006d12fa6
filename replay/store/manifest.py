"""The run manifest: a small JSON file written once, before any chunk.

It names every recorded tensor (in `named_parameters()` order, then buffers) so that
chunks can be decoded without the model, plus what replay needs later (task string,
recording stride, tied-parameter aliases) and provenance (torch version, user metadata).
`run_id` is the run's identity: every chunk carries it, so a chunk copied in from another
run is refused. The file is sealed by a checksum (xxHash3) of all its other bytes, and every field is
validated before it is believed: a manifest is data from wherever the run came from.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from replay.errors import RunError
from replay.store.atomic import check_seal, write_atomic
from replay.store.files import open_regular, read_exactly, size_of, why_unreadable
from replay.store.layout import ST_DTYPES, TensorSpec
from replay.store.sealed import JSON_SEAL, encode_json, why_not_json

FORMAT = "replay-run/2"
SHARDED_FORMAT = "replay-run/3"  # a sharded run's top manifest, and each shard's (store.shards)
LEGACY_FORMAT = "replay-run/1"  # 0.1.0: no checksum, no run id (still readable)
MANIFEST = "manifest.json"
# ~120 bytes per tensor: a manifest of this size already names ~4 million tensors; more is no model's
MAX_MANIFEST = 512 << 20


@dataclass
class Manifest:
    tensors: list[TensorSpec]
    every: int = 1
    task: str | None = None
    task_signature: str | None = None  # HMAC of (run_id, task) with the recording user's key (replay.trust)
    torch_version: str = ""
    metadata: dict = field(default_factory=dict)
    chunk_bytes: int = 0
    aliases: dict[str, str] = field(default_factory=dict)  # tied parameter's other name -> recorded name
    frozen: list[str] = field(default_factory=list)  # parameters with requires_grad=False: not recorded
    # xxh3 of each frozen parameter and unrecorded buffer at state 0 (store.constants), compared at compute
    constants: dict[str, dict] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    format: str = FORMAT
    # a sharded run's top manifest (store.shards): {"world": N, "bounds": [N + 1 byte offsets]} under DDP, or
    # {"world": N, "pieces": [per rank: [[name, lo, hi], ...]]} under FSDP2 (each rank's dim-0 ranges)
    shards: dict | None = None
    # one shard of a sharded run: {"rank": r, "world": N, "run": the run's id} and its bytes, "start"/"stop"
    # (DDP) or its "pieces" (FSDP2)
    shard: dict | None = None

    def __post_init__(self):
        if self.shards is not None or self.shard is not None:
            self.format = SHARDED_FORMAT

    @property
    def params(self) -> list[TensorSpec]:
        return [s for s in self.tensors if s.kind == "param"]

    @property
    def buffers(self) -> list[TensorSpec]:
        return [s for s in self.tensors if s.kind == "buffer"]

    @property
    def version(self) -> int:
        return 1 if self.format == LEGACY_FORMAT else 2

    def to_json(self) -> dict:
        return {
            "format": self.format,
            "run_id": self.run_id,
            "every": self.every,
            "task": self.task,
            "torch_version": self.torch_version,
            "chunk_bytes": self.chunk_bytes,
            "metadata": self.metadata,
            "aliases": self.aliases,
            "frozen": self.frozen,
            "constants": self.constants,
            "tensors": [s.to_json() for s in self.tensors],
        } | ({"task_signature": self.task_signature} if self.task_signature else {}) | (
            {"shards": self.shards} if self.shards is not None else {}) | (
            {"shard": self.shard} if self.shard is not None else {})

    def encode(self) -> bytes:
        return encode_json(self.to_json())

    def write(self, run_dir: Path) -> None:
        write_atomic(run_dir / MANIFEST, self.encode())

    @staticmethod
    def read(run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        if not path.exists() and not path.is_symlink():
            raise RunError(f"{run_dir}: not a replay run (no {MANIFEST}); pass the directory given to Recorder")
        try:
            with open_regular(path) as f:
                size = size_of(f)
                if size > MAX_MANIFEST:
                    raise _damaged(path, f"{size:,} bytes, more than any run's manifest ({MAX_MANIFEST:,})")
                raw = read_exactly(f, size)
        except OSError as e:
            raise RunError(f"{path}: cannot read the manifest ({why_unreadable(e)})") from None
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise _damaged(path, why_not_json(e)) from None
        if not isinstance(d, dict):
            raise _damaged(path, f"expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if fmt not in (FORMAT, SHARDED_FORMAT, LEGACY_FORMAT):
            if isinstance(fmt, str) and fmt.startswith("replay-run/"):
                raise RunError(f"{path}: format {fmt!r} is newer than this replay reads ({FORMAT!r}); upgrade replay")
            raise _damaged(path, f"format {fmt!r} is not a replay run format")
        if fmt != LEGACY_FORMAT and (why := check_seal(raw, JSON_SEAL)):
            raise _damaged(path, why)
        return _validated(d, path)


def _damaged(path: Path, why: str) -> RunError:
    return RunError(f"{path}: damaged manifest ({why}); the run cannot be read without it — "
                    f"restore it from a copy of the run")


def _pieces_ok(x: object) -> bool:
    """[[name, lo, hi], ...] with 0 <= lo < hi (the tensor's size is checked by the reader)."""
    return isinstance(x, list) and all(
        isinstance(p, list) and len(p) == 3 and isinstance(p[0], str) and type(p[1]) is int and type(p[2]) is int
        and 0 <= p[1] < p[2] for p in x)


def _check_sharding(shards: object, shard: object, need: Callable[[bool, str], None]) -> None:
    """The sharded-run fields (store.shards): DDP byte bounds or FSDP2 pieces, and a shard's own."""
    if shards is not None:
        world = shards.get("world") if isinstance(shards, dict) else None
        b, listed = (shards or {}).get("bounds"), (shards or {}).get("pieces")
        need(type(world) is int and 1 <= world <= 1 << 20, f"bad 'shards' {str(shards)[:200]}")
        if listed is None:  # DDP: byte ranges
            need(isinstance(b, list) and len(b) == world + 1 and all(type(x) is int for x in b) and b[0] == 0
                 and all(b[i] <= b[i + 1] for i in range(world)) and all(x % 8 == 0 for x in b),
                 f"bad 'shards' {str(shards)[:200]}")
        else:  # FSDP2: each rank's pieces
            need(b is None and isinstance(listed, list) and len(listed) == world
                 and all(_pieces_ok(x) for x in listed), f"bad 'shards' pieces {str(listed)[:200]}")
    if shard is not None:
        ok = isinstance(shard, dict) and all(type(shard.get(k)) is int for k in ("rank", "world"))
        ranged = ok and type(shard.get("start")) is int and type(shard.get("stop")) is int \
            and 0 <= shard["start"] < shard["stop"]
        need(ok and 0 <= shard["rank"] < shard["world"] and (ranged or _pieces_ok(shard.get("pieces")))
             and isinstance(shard.get("run"), str) and re.fullmatch(r"[0-9a-f]{32}", shard["run"]),
             f"bad 'shard' {str(shard)[:200]}")


def _validated(d: dict, path: Path) -> Manifest:
    """Every field checked for type and range: a hostile or damaged manifest is one clear line."""

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise _damaged(path, what)

    every, tensors = d.get("every"), d.get("tensors")
    need(type(every) is int and every >= 1, f"'every' must be an integer >= 1, got {every!r}")
    need(isinstance(tensors, list) and len(tensors) > 0, "'tensors' must be a non-empty list")
    specs, seen = [], set()
    for i, t in enumerate(tensors):  # messages are formatted only on failure: a manifest may name millions
        if not isinstance(t, dict):
            need(False, f"tensors[{i}] is not an object")
        name, shape, dtype, kind = t.get("name"), t.get("shape"), t.get("dtype"), t.get("kind", "param")
        if not (isinstance(name, str) and name != "" and name not in seen):
            need(False, f"tensors[{i}]: bad or repeated name {name!r}")
        if not (isinstance(shape, list) and all(type(s) is int and 0 <= s < 2**40 for s in shape)):
            need(False, f"tensor {name!r}: bad shape {shape!r}")
        if dtype not in ST_DTYPES:
            need(False, f"tensor {name!r}: unknown dtype {dtype!r} (known: {sorted(ST_DTYPES)})")
        if kind not in ("param", "buffer"):
            need(False, f"tensor {name!r}: kind {kind!r} is not 'param' or 'buffer'")
        seen.add(name)
        specs.append(TensorSpec(name, tuple(shape), dtype, kind))
    shards, shard = d.get("shards"), d.get("shard")
    if shard is None:  # a shard may hold only buffers
        need(any(s.kind == "param" for s in specs), "no parameter is recorded")
    task, run_id, signature = d.get("task"), d.get("run_id", ""), d.get("task_signature")
    need(task is None or (isinstance(task, str) and ":" in task), f"'task' must be 'module:function', got {task!r}")
    need(signature is None or (isinstance(signature, str) and re.fullmatch(r"[0-9a-f]{64}", signature)),
         "bad task_signature")
    need(isinstance(run_id, str) and (d["format"] == LEGACY_FORMAT or re.fullmatch(r"[0-9a-f]{32}", run_id)),
         f"bad run_id {run_id!r}")
    metadata, aliases = d.get("metadata", {}), d.get("aliases", {})
    need(isinstance(metadata, dict), "'metadata' must be an object")
    params = {s.name for s in specs if s.kind == "param"}
    need(isinstance(aliases, dict) and all(isinstance(k, str) and v in params and k not in seen
                                           for k, v in aliases.items()),
         "'aliases' must map other names to recorded parameters")
    frozen = d.get("frozen", [])
    need(isinstance(frozen, list) and all(isinstance(n, str) for n in frozen), "'frozen' must be a list of names")
    constants = d.get("constants", {})
    need(isinstance(constants, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and v.get("kind") in ("frozen", "buffer")
        and isinstance(v.get("xxh3"), str) and re.fullmatch(r"[0-9a-f]{16}", v["xxh3"]) for k, v in constants.items()),
        "'constants' must map names to {kind, xxh3}")
    chunk_bytes, torch_version = d.get("chunk_bytes", 0), d.get("torch_version", "")
    need(type(chunk_bytes) is int and chunk_bytes >= 0, f"bad chunk_bytes {chunk_bytes!r}")
    need(isinstance(torch_version, str), "bad torch_version")
    sharded = d["format"] == SHARDED_FORMAT
    need(sharded == (shards is not None or shard is not None) and (shards is None or shard is None),
         "a sharded run's manifest has 'shards' (the run) or 'shard' (one shard), and only it does")
    _check_sharding(shards, shard, need)
    return Manifest(tensors=specs, every=every, task=task, task_signature=signature, torch_version=torch_version,
                    metadata=metadata, chunk_bytes=chunk_bytes, aliases=dict(aliases), frozen=frozen,
                    constants=dict(constants),
                    run_id=run_id, format=d["format"], shards=shards, shard=shard)
