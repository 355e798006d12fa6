"""Per-tensor float64 sums of [rows × columns] buffers: the one reduction every allocation ends in.

The columns are a range lo..hi of the flat parameter vector (all of it, or a data-parallel
rank's slice), cut at tensor edges. The sums are in float64 whatever the buffer's dtype: on the
CPU through a float64 scratch copy of each tensor's columns (2x faster there than a cast inside
the reduction), for tensors whose copy fits in 64 MiB; bigger ones (an LM's embedding) and
CUDA sum with the cast in the reduction (tested to agree).
"""

from __future__ import annotations

import torch

from replay.engine import parallel

COPY_BYTES = 64 << 20  # the largest float64 copy of one tensor's columns that `sums` makes


class Columns:
    """Columns lo..hi of a flat vector of tensors of `sizes`; `sums` gives [rows, T] per-tensor totals."""

    def __init__(self, sizes: list[int], lo: int, hi: int, device: torch.device, rows: int):
        self.sizes, self.lo, self.hi, self.T = sizes, lo, hi, len(sizes)
        self.cut_sizes, self.cut_ids = parallel.slice_cuts(sizes, lo, hi, device)
        fit = COPY_BYTES // (8 * max(1, rows)) if device.type == "cpu" else 0
        self._copy_cols = fit
        self._scratch = torch.empty(max(1, rows) * min(fit, max(self.cut_sizes, default=0)), dtype=torch.float64,
                                    device=device)
        self._prod_scratch: torch.Tensor | None = None  # dot_sums' products, as many elements, in x's dtype

    def sums(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, T] float64 sums of x [rows, hi − lo] over each tensor's columns (0 outside the range)."""
        rows, out, a = x.shape[0], [], 0
        for n in self.cut_sizes:
            if n <= self._copy_cols and rows * n <= self._scratch.numel():
                out.append(self._scratch[:rows * n].view(rows, n).copy_(x[:, a:a + n]).sum(1))
            else:
                out.append(x[:, a:a + n].sum(1, dtype=torch.float64))
            a += n
        sums = torch.stack(out, 1) if out else x.new_zeros(rows, 0, dtype=torch.float64)
        return self.place(sums)

    def dot_sums(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[rows, T] float64 sums of x [rows, hi − lo] ⊙ v [hi − lo] over each tensor's columns: the product in x's
        dtype, tensor by tensor through scratch buffers (on the CPU), so no [rows × columns] product is made (a
        fresh one per call costs more in page faults than the arithmetic)."""
        rows = x.shape[0]
        if self._copy_cols == 0 or self._scratch.numel() < rows:
            return self.sums(x * v)
        if self._prod_scratch is None or self._prod_scratch.dtype != x.dtype:
            self._prod_scratch = torch.empty(self._scratch.numel(), dtype=x.dtype, device=x.device)
        out, a = [], 0
        for n in self.cut_sizes:
            if n <= self._copy_cols and rows * n <= self._scratch.numel():
                prod = torch.mul(x[:, a:a + n], v[a:a + n], out=self._prod_scratch[:rows * n].view(rows, n))
                out.append(self._scratch[:rows * n].view(rows, n).copy_(prod).sum(1))
            else:
                out.append((x[:, a:a + n] * v[a:a + n]).sum(1, dtype=torch.float64))
            a += n
        sums = torch.stack(out, 1) if out else x.new_zeros(rows, 0, dtype=torch.float64)
        return self.place(sums)

    def place(self, sums: torch.Tensor) -> torch.Tensor:
        """Sums of the cut pieces → [rows, T] by tensor (0 for tensors outside the range)."""
        if self.cut_ids is None:  # the columns are exactly all the tensors, in order
            return sums
        out = torch.zeros(sums.shape[0], self.T + 1, dtype=sums.dtype, device=sums.device)  # T: the padding
        return out.index_copy_(1, self.cut_ids, sums)[:, :self.T].contiguous()  # collectives need contiguous
