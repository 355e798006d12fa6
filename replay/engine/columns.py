"""Per-tensor float64 sums of [rows × columns] buffers: the one reduction every allocation ends in.

The columns are a range lo..hi of the flat parameter vector (all of it, or a data-parallel
rank's slice), cut at tensor edges. The sums are in float64 whatever the buffer's dtype. On the
CPU each tensor's columns go through a float64 scratch block of ~1 MiB (rows × block columns):
copied (a cast inside the reduction is 2x slower there), then summed, or multiplied with a
direction by one float64 matrix-vector product (`dot_sums`: the products exact, and 1.4-1.9x
faster than a float32 product, a copy and a sum; blocks that stay in cache: 102 rows of 65,536
columns 7.6 ms whole, 4.2 ms in blocks). On CUDA they sum with the cast in the reduction.
"""

from __future__ import annotations

import torch

from replay.engine import parallel

BLOCK_BYTES = 1 << 20  # the float64 scratch block: rows × columns × 8 bytes, about an L2 cache
MIN_BLOCK = 2048  # columns of a block, whatever the rows (a block of fewer costs more in calls than in cache)
CPU_BLOCKS = True  # False: the CPU sums as CUDA does (the cast inside the reduction; a test compares the two)


class Columns:
    """Columns lo..hi of a flat vector of tensors of `sizes`; `sums` gives [rows, T] per-tensor totals."""

    def __init__(self, sizes: list[int], lo: int, hi: int, device: torch.device, rows: int):
        self.sizes, self.lo, self.hi, self.T = sizes, lo, hi, len(sizes)
        self.cut_sizes, self.cut_ids = parallel.slice_cuts(sizes, lo, hi, device)
        self._cpu = device.type == "cpu" and CPU_BLOCKS
        self._scratch: torch.Tensor | None = None  # [≥ rows × block] float64, made at first use

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
        scratch, block = self._block(rows)
        v64 = None if v is None else v.to(torch.float64)
        sums = torch.zeros(rows, len(self.cut_sizes), dtype=torch.float64)
        a = 0
        for t, n in enumerate(self.cut_sizes):
            for b in range(a, a + n, block):
                w = min(block, a + n - b)
                part = scratch[:rows * w].view(rows, w).copy_(x[:, b:b + w])
                sums[:, t] += part.sum(1) if v64 is None else torch.mv(part, v64[b:b + w])
            a += n
        return self.place(sums)

    def place(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums of the cut pieces → [rows, T] by tensor (0 for tensors outside the range)."""
        if self.cut_ids is None:  # the columns are exactly all the tensors, in order
            return sums
        out = torch.zeros(sums.shape[0], self.T + 1, dtype=sums.dtype, device=sums.device)  # T: the padding
        return out.index_copy_(1, self.cut_ids, sums)[:, :self.T].contiguous()  # collectives need contiguous
