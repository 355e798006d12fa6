"""Per-tensor float64 sums of [rows × columns] buffers: the one reduction every allocation ends in.

The columns are a range lo..hi of the flat parameter vector (all of it, or a data-parallel
rank's slice), cut at tensor edges. The sums are in float64 whatever the buffer's dtype. On the
CPU each tensor's columns go through a float64 scratch block of ~256 KiB (rows × block columns):
copied (a cast inside the reduction is 2x slower there), then summed, or multiplied with a
direction by one float64 matrix-vector product (`dot_sums`: the products exact, and 1.4-1.9x
faster than a float32 product, a copy and a sum; blocks that stay in cache: 102 rows of 65,536
columns 7.6 ms whole, 4.2 ms in blocks). On CUDA they sum with the cast in the reduction.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from replay.engine import parallel

BLOCK_BYTES = 1 << 18  # the float64 scratch block: rows × columns × 8 bytes (a fraction of an L2 cache: measured best)
MIN_BLOCK = 2048  # columns of a block, whatever the rows (a block of fewer costs more in calls than in cache)
CPU_BLOCKS = True  # False: the CPU sums as CUDA does (the cast inside the reduction; a test compares the two)


class Columns:
    """Columns lo..hi of a flat vector of tensors of `sizes`; `sums` gives [rows, T] per-tensor totals."""

    def __init__(self, sizes: list[int], lo: int, hi: int, device: torch.device, rows: int):
        self.sizes, self.lo, self.hi, self.T = sizes, lo, hi, len(sizes)
        self.cut_sizes, self.cut_ids = parallel.slice_cuts(sizes, lo, hi, device)
        self._cpu = device.type == "cpu" and CPU_BLOCKS
        self._scratch: torch.Tensor | None = None  # [≥ rows × block] float64, made at first use
        self._vbuf: torch.Tensor | None = None  # a direction's block in float64 (see vector)

    def _block(self, rows: int) -> tuple[torch.Tensor, int]:
        """The scratch buffer and the columns of a block for `rows` rows."""
        cols = max(MIN_BLOCK, BLOCK_BYTES // (8 * max(1, rows)))
        if self._scratch is None or self._scratch.numel() < rows * cols:
            self._scratch = torch.empty(rows * cols, dtype=torch.float64)
        return self._scratch, cols

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, T] float64 sums of x [rows, hi − lo] over each tensor's columns (0 outside the range)."""
        return self._reduce(x, None)

    def dot_sums(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[rows, T] float64 sums of x [rows, hi − lo] ⊙ v [hi − lo] over each tensor's columns: each product in
        float64 (exact for float32 factors), no [rows × columns] product made."""
        return self._reduce(x, v)

    def _reduce(self, x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        rows = x.shape[0]
        if not self._cpu:
            out, a = [], 0
            for n in self.cut_sizes:
                part = x[:, a:a + n] if v is None else x[:, a:a + n] * v[a:a + n]
                out.append(part.sum(1, dtype=torch.float64))
                a += n
            sums = torch.stack(out, 1) if out else x.new_zeros(rows, 0, dtype=torch.float64)
            return self.place(sums)
        per_tensor: list[list[torch.Tensor]] = [[] for _ in self.cut_sizes]
        vbuf = self.vector(v)
        for t, b, w, part in self.blocks(rows):
            part.copy_(x[:, b:b + w])
            per_tensor[t].append(part.sum(1) if v is None else torch.mv(part, vbuf[:w].copy_(v[b:b + w])))
        return self.place(_stacked(per_tensor, rows))

    def vector(self, v: torch.Tensor | None) -> torch.Tensor | None:
        """A float64 scratch vector of a block's columns, for v's values block by block (widening all of v at once
        cost as much as the products, on an LM's 10M columns)."""
        if v is None:
            return None
        if self._vbuf is None:
            self._vbuf = torch.empty(max(MIN_BLOCK, BLOCK_BYTES // 8), dtype=torch.float64)  # (the widest block)
        return self._vbuf

    @property
    def blocked(self) -> bool:
        """Whether reductions go block by block through the float64 scratch (the CPU)."""
        return self._cpu

    def blocks(self, rows: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(tensor piece t, its first column, width, a float64 scratch view [rows, width]) for every block of
        columns, in order (CPU): work done block by block stays in cache."""
        scratch, block = self._block(rows)
        a = 0
        for t, n in enumerate(self.cut_sizes):
            for b in range(a, a + n, block):
                w = min(block, a + n - b)
                yield t, b, w, scratch[:rows * w].view(rows, w)
            a += n

    def place(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums of the cut pieces → [rows, T] by tensor (0 for tensors outside the range)."""
        if self.cut_ids is None:  # the columns are exactly all the tensors, in order
            return sums
        out = torch.zeros(sums.shape[0], self.T + 1, dtype=sums.dtype, device=sums.device)  # T: the padding
        return out.index_copy_(1, self.cut_ids, sums)[:, :self.T].contiguous()  # collectives need contiguous


def _stacked(per_tensor: list[list[torch.Tensor]], rows: int) -> torch.Tensor:
    """[rows, T] float64: each tensor's block sums [rows] added up, in order."""
    if not per_tensor:
        return torch.zeros(rows, 0, dtype=torch.float64)
    return torch.stack([p[0] if len(p) == 1 else torch.stack(p).sum(0) if p else
                        torch.zeros(rows, dtype=torch.float64) for p in per_tensor], 1)


def simpson_sums(cols: Columns, g0: torch.Tensor, g1: torch.Tensor, gm: torch.Tensor, dw: torch.Tensor,
                 out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain Simpson per parameter, out = Δθ ⊙ (g0 + 4·gm + g1)/6 [rows, columns] (the gradients' dtype), with its
    per-tensor float64 sums and those of the trapezoid Δθ ⊙ (g0 + g1)/2, [rows, T] each (not summed over ranks).
    On the CPU block by block, each block's arithmetic done while it is in cache; the same numbers as the
    whole-array passes (elementwise the same operations; the sums through the same blocks as `sums`/`dot_sums`)."""
    rows = out.shape[0]
    dw6 = dw / 6.0
    if not cols.blocked:
        both = torch.add(g0, g1, out=out)
        trap = cols.dot_sums(both, dw)
        return cols.sums(both.add_(gm, alpha=4.0).mul_(dw6)), trap / 2.0
    vbuf = cols.vector(dw)
    roots: list[list[torch.Tensor]] = [[] for _ in cols.cut_sizes]
    traps: list[list[torch.Tensor]] = [[] for _ in cols.cut_sizes]
    for t, b, w, part in cols.blocks(rows):
        both = torch.add(g0[:, b:b + w], g1[:, b:b + w], out=out[:, b:b + w])
        traps[t].append(torch.mv(part.copy_(both), vbuf[:w].copy_(dw[b:b + w])))
        both.add_(gm[:, b:b + w], alpha=4.0).mul_(dw6[b:b + w])
        roots[t].append(part.copy_(both).sum(1))
    root, trap = _stacked(roots, rows), _stacked(traps, rows)
    if out.shape[1] > cols.hi - cols.lo:  # (a data-parallel slice's padding: Simpson of zeros)
        torch.add(g0[:, cols.hi - cols.lo:], g1[:, cols.hi - cols.lo:], out=out[:, cols.hi - cols.lo:])
        out[:, cols.hi - cols.lo:].add_(gm[:, cols.hi - cols.lo:], alpha=4.0).mul_(dw6[cols.hi - cols.lo:])
    return cols.place(root), cols.place(trap) / 2.0
