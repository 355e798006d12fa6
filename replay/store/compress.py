"""Optional zstd compression of a chunk's data: the XOR deltas grouped by byte plane.

An update changes the low bytes of a float (mantissa noise) far more than its high bytes
(sign, exponent): grouping every element's byte k together puts the mostly-zero planes in
long runs. Measured on digits MLP runs (tools/bench_compress.py, zstd level 1, one core, the
grouping included): float32 1.55-1.76x smaller at 440-490 MB/s of states, bfloat16 3.6-4.5x at
470-500 MB/s; ungrouped bytes compress 10-25% less. So it is not the default: a core per
~470 MB/s of states is more than recording may cost training, unless the disk is slower still.
A compressed chunk is still a safetensors file (one U8 tensor `z`), but only replay decodes
it; an uncompressed run stays readable by any safetensors tool. zstandard is an optional
dependency (`pip install 'replay-lca[zstd]'`).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from replay.errors import ReplayError
from replay.store.layout import StateLayout

LEVEL = 1  # level 3 measured ~1% smaller and 1.5-2x slower to encode


def zstd() -> ModuleType:
    """The zstandard module, or one line saying how to get it."""
    try:
        import zstandard
    except ImportError:
        raise ReplayError("zstd-compressed chunks need the zstandard package: pip install zstandard "
                          "(or pip install 'replay-lca[zstd]')") from None
    return zstandard


def _regroup(data: np.ndarray, layout: StateLayout, planes: bool) -> np.ndarray:
    """Each tensor's bytes of flat states [n × nbytes] grouped by byte plane (planes), or back (not planes)."""
    out = np.empty_like(data)
    for base in range(0, data.nbytes, layout.nbytes):
        for o, nb, k in layout.segments:
            src = data[base + o:base + o + nb]
            out[base + o:base + o + nb] = (src if k == 1 else src.reshape((-1, k) if planes else (k, -1)).T.reshape(-1))
    return out


def to_planes(data: np.ndarray, layout: StateLayout) -> np.ndarray:
    """Flat states [n × nbytes] uint8 → the same bytes, each tensor's grouped by byte plane."""
    return _regroup(data, layout, True)


def from_planes(data: np.ndarray, layout: StateLayout) -> np.ndarray:
    """The inverse of `to_planes`."""
    return _regroup(data, layout, False)


def compress(data: np.ndarray, layout: StateLayout) -> bytes:
    return zstd().ZstdCompressor(level=LEVEL).compress(to_planes(data, layout).data)


def decompress(z: bytes | memoryview, layout: StateLayout, n_states: int) -> np.ndarray | None:
    """The flat states, or None if `z` does not decompress to exactly n_states states."""
    zs = zstd()
    expected = n_states * layout.nbytes
    try:
        raw = zs.ZstdDecompressor().decompress(z, max_output_size=expected)
    except zs.ZstdError:
        return None
    if len(raw) != expected:
        return None
    return from_planes(np.frombuffer(raw, dtype=np.uint8), layout)
