"""Fault injection on real run directories: every single-bit flip of a file, judged by what a reader does.

Used by tests/test_integrity.py and tools/fault_sweep.py. Only the public API is used
(`open_run`, `Run.verify`, `Run.states`), so the same sweep measures any version of replay.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

import replay


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.itemsize])


def outcome(run_dir: Path, reference: dict[int, dict[str, torch.Tensor]]) -> str:
    """'detected' (a ReplayError, or verify reports it), 'harmless' (every state bit-exact),
    'wrong' (a state differs in silence) or 'crash: Type' (any other exception)."""
    try:
        run = replay.open_run(run_dir)
        problems = run.verify()
        got = dict(run.states())
    except replay.ReplayError:
        return "detected"
    except Exception as e:  # noqa: BLE001 - the sweep classifies every failure
        return f"crash: {type(e).__name__}"
    if problems:
        return "detected"
    for t, ref in reference.items():
        st = got.get(t)
        if st is None or list(st) != list(ref) or any(
                st[n].dtype != ref[n].dtype or st[n].shape != ref[n].shape or not torch.equal(bits(st[n]), bits(ref[n]))
                for n in ref):
            return "wrong"
    return "harmless"


def sweep(run_dir: Path, victim: Path, reference: dict, start: int = 0, stop: int | None = None) -> Counter:
    """Flip every bit of victim[start:stop] in turn (restoring it after each), counting outcomes."""
    original = victim.read_bytes()
    stop = len(original) if stop is None else stop
    counts: Counter = Counter()
    try:
        for i in range(start, stop):
            for b in range(8):
                data = bytearray(original)
                data[i] ^= 1 << b
                victim.write_bytes(bytes(data))
                counts[outcome(run_dir, reference)] += 1
    finally:
        victim.write_bytes(original)
    return counts


def header_length(chunk: Path) -> int:
    """8 + the safetensors header length: the bytes of a chunk that are not tensor data."""
    return 8 + int.from_bytes(chunk.read_bytes()[:8], "little")
