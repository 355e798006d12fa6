"""Byte layout of one recorded state: every tensor packed into one flat buffer.

One flat buffer per state lets the recorder copy, XOR, checksum and write a whole state
with a handful of vectorized operations whatever the number of tensors. Tensors are
ordered by element size (largest first, stable) so that every tensor starts at an offset
divisible by its element size, and the state is padded to 8 bytes so consecutive states
in a chunk stay aligned. In a per-tensor chunk that padding is an explicit tensor (key
`"{t}/"`) because safetensors forbids holes between tensors.

`segments` describe the same bytes without names: (offset, bytes, element size) runs, the
unit of byte-plane compression and of the slices a rank records (`Slice`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from replay.errors import RecordError

# safetensors dtype codes <-> torch dtypes (the ones a parameter or buffer can have)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# XOR deltas are stored as signed integers of the same width (bit patterns, not values)
INT_OF_SIZE = {8: "I64", 4: "I32", 2: "I16", 1: "I8"}
ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one recorded tensor; `kind` is 'param' or 'buffer'."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code, e.g. "F32"
    kind: str = "param"

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def delta_dtype(self) -> str:
        return INT_OF_SIZE[self.itemsize]

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}


def spec_of(name: str, t: torch.Tensor, kind: str = "param") -> TensorSpec:
    if t.dtype not in TORCH_TO_ST:
        known = ", ".join(str(d).removeprefix("torch.") for d in ST_DTYPES.values())
        what = "parameter" if kind == "param" else kind
        raise RecordError(f"{what} {name!r}: dtype {str(t.dtype).removeprefix('torch.')} cannot be recorded (replay "
                          f"records {known}); keep it out of the recorded set (requires_grad_(False)) or convert it")
    return TensorSpec(name, tuple(t.shape), TORCH_TO_ST[t.dtype], kind)


class StateLayout:
    """Offsets of each tensor inside the flat state buffer of `nbytes` (a multiple of 8)."""

    def __init__(self, specs: list[TensorSpec]):
        self.specs = list(specs)  # recording order (named_parameters order, then buffers)
        self.packed = sorted(self.specs, key=lambda s: -s.itemsize)  # stable: alignment order
        self.offsets: dict[str, int] = {}
        off = 0
        for s in self.packed:
            self.offsets[s.name] = off
            off += s.nbytes
        self.data_bytes = off
        self.pad = (-off) % ALIGN
        self.nbytes = off + self.pad

    @property
    def segments(self) -> list[tuple[int, int, int]]:
        """(offset, bytes, element size) of each tensor in the flat state, in byte order; the padding as size 1."""
        out = [(self.offsets[s.name], s.nbytes, s.itemsize) for s in self.packed if s.nbytes]
        if self.pad:
            out.append((self.data_bytes, self.pad, 1))
        return out

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed, shaped views into a flat uint8 tensor holding one state (no copy)."""
        out = {}
        for s in self.specs:
            o = self.offsets[s.name]
            out[s.name] = flat[o : o + s.nbytes].view(s.torch_dtype).view(s.shape)
        return out
