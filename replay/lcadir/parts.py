"""The lca dir's records: every part a compute writes is named with its bytes, xxHash3, rows and steps in a
sealed JSON file, and checked against that record before a reader believes a value.

A flipped bit, a truncated or dropped part, or a file in the frame folders that no record names (a foreign
part, or one written after the last flush) is one line that names it and says what to do; nothing is
silently skipped or recomputed. The JSON files carry their own checksum (`store.sealed`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from replay.errors import ReplayError, RunError
from replay.store.atomic import is_tmp, write_atomic
from replay.store.checksum import blocks, digest_without
from replay.store.claim import LOCK as LOCK_NAME
from replay.store.claim import Claim, lock
from replay.store.files import open_regular, size_of, why_unreadable
from replay.store.sealed import Unsealed, encode_json, read_json

FRAME_DIRS = ("steps", "tensors", "params", "examples", "example_steps", "tokens", "token_tensors")
DENSE_DIR = "dense"
META = "meta.json"
MAX_JSON = 256 << 20  # meta.json lists every part: generous, and bounded
PROGRESS_RE = re.compile(r"progress(-r\d{3})?\.json")
TOTALS_RE = re.compile(r"totals(-r\d{3})?-\d+\.safetensors")
LOCK_RE = re.compile(r"\.replay\.lock(-r\d{3})?")


class LcaDirDamaged(ReplayError):
    """A file of an lca dir is damaged, missing, or not one this compute wrote."""


@dataclass
class Part:
    """A file written by a compute, as its record names it."""

    path: str  # relative to the lca dir
    bytes: int
    xxh3: str
    rows: int = 0
    first: int | None = None  # the first and last step it holds (step frames)
    last: int | None = None

    @staticmethod
    def of(d: object) -> Part:
        if not (isinstance(d, dict) and isinstance(d.get("path"), str) and type(d.get("bytes")) is int
                and isinstance(d.get("xxh3"), str) and type(d.get("rows", 0)) is int):
            raise Unsealed(f"a part record is malformed ({str(d)[:80]})")
        p = Part(d["path"], d["bytes"], d["xxh3"], d.get("rows", 0), d.get("first"), d.get("last"))
        if ".." in Path(p.path).parts or Path(p.path).is_absolute():
            raise Unsealed(f"a part record names a path outside the lca dir ({p.path!r})")
        return p

    def to_json(self) -> dict:
        return asdict(self)


def write_part(out: Path, rel: str, data: bytes | memoryview, rows: int = 0, first: int | None = None,
               last: int | None = None) -> Part:
    """Write a part whole (temp name, rename, fsync) and return its record."""
    write_atomic(out / rel, data)
    return Part(rel, memoryview(data).nbytes, xxhash.xxh3_64_hexdigest(data), rows, first, last)


def check_part(out: Path, part: Part) -> str | None:
    """None if the part on disk is the one its record names, else what is wrong."""
    path = out / part.path
    try:
        with open_regular(path) as f:
            size = size_of(f)
            if size != part.bytes:
                return f"{part.path}: {size:,} bytes, its record says {part.bytes:,} (truncated or replaced)"
            if digest_without(blocks(f, size), (0, 0)) != part.xxh3:
                return f"{part.path}: checksum mismatch (its bytes changed since the compute wrote it)"
    except FileNotFoundError:
        return f"{part.path}: missing (the record names it, the folder does not hold it)"
    except OSError as e:
        return f"{part.path}: {why_unreadable(e)}"
    return None


def frame_files(out: Path) -> list[Path]:
    """Every file in the frame folders, temp files of interrupted writes left out."""
    files = []
    for d in (*FRAME_DIRS, DENSE_DIR):
        if (out / d).is_dir():
            files += [f for f in (out / d).iterdir() if not is_tmp(f.name)]
    return sorted(files)


def check_parts(out: Path, parts: list[Part], mine: re.Pattern | None = None) -> list[str]:
    """Problems of the parts against their records, and files no record names (of this rank, with `mine`)."""
    problems = [p for p in (check_part(out, part) for part in parts) if p]
    named = {part.path for part in parts}
    for f in frame_files(out):
        rel = str(f.relative_to(out))
        if rel not in named and (mine is None or mine.fullmatch(f.name)):
            problems.append(f"{rel}: no record of this compute names it (a foreign part, or one copied in)")
    return problems


def write_json(path: Path, doc: dict) -> None:
    write_atomic(path, encode_json(doc))


def read_sealed(path: Path) -> dict:
    """A sealed JSON file of an lca dir, or LcaDirDamaged naming it."""
    try:
        return read_json(path, MAX_JSON)
    except (Unsealed, OSError) as e:
        why = why_unreadable(e) if isinstance(e, OSError) else str(e)
        raise LcaDirDamaged(f"{path}: damaged ({why}); {_remedy(path)}") from None


def parts_of(doc: dict, path: Path) -> list[Part]:
    try:
        parts = doc.get("parts", [])
        if not isinstance(parts, list):
            raise Unsealed("'parts' is not a list")
        return [Part.of(p) for p in parts]
    except Unsealed as e:
        raise LcaDirDamaged(f"{path}: damaged ({e}); {_remedy(path)}") from None


def _remedy(path: Path) -> str:
    if path.name == META:
        return f"compute again into a new --out (or pass --restart to replace {path.parent})"
    return "the compute cannot resume from it: run the same command with --restart to start over"


def not_an_lca_dir(path: Path, why: str) -> RunError:
    """The one line for a directory that is not an lca dir (where a reader or a compute expected one)."""
    return RunError(f"{path}: not an lca dir ({why})")


def claim_lca_dir(out: Path, tag: str = "") -> Claim:
    """Lock an lca dir for one compute process (created if needed): a second compute into it gets one line.

    Under torchrun each rank holds its own lock (`tag`, as its files): a second job's rank collides with ours.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        held = lock(out, LOCK_NAME + tag)
    except OSError as e:
        raise ReplayError(f"{out}: cannot create or lock the lca dir ({e.strerror or e}); pass another --out") from None
    if held is None:
        raise ReplayError(f"{out}: another `replay compute` is writing into it right now; wait for it to finish, "
                          f"or pass another --out")
    return Claim(held)


def is_lca_dir(out: Path) -> bool:
    """Whether `out` holds (only) what a compute writes."""
    if not out.is_dir():
        return False
    for p in out.iterdir():
        if p.name == META or PROGRESS_RE.fullmatch(p.name) or TOTALS_RE.fullmatch(p.name) or \
                LOCK_RE.fullmatch(p.name) or is_tmp(p.name):
            continue
        if p.is_dir() and p.name in (*FRAME_DIRS, DENSE_DIR, "plots"):
            continue
        return False
    return True


def verify(out: Path) -> list[str]:
    """`replay verify LCA_DIR`: meta.json sealed, every part as recorded, no unnamed file; one line per problem."""
    meta = out / META
    if not meta.exists():
        if any(PROGRESS_RE.fullmatch(p.name) for p in out.iterdir()):
            return [f"{out}: the compute did not finish (no {META}); run the same `replay compute` to resume it"]
        return [str(not_an_lca_dir(out, f"no {META}"))]
    try:
        doc = read_sealed(meta)
        parts = parts_of(doc, meta)
    except LcaDirDamaged as e:
        return [str(e)]
    return [f"{out}/{p}" for p in check_parts(out, parts)]
