"""The ledger of one compute process: what each step adds to the frames and to the per-parameter
totals, flushed with the resume state so that an interrupted compute resumes from its last flush.

It owns every buffer that outlives a step, and only for the losses that report per-parameter
numbers (`per_param`, K of the L losses): the float64 LCA totals and helped counts [K × held columns].
The other losses leave the device as [L × tensors] sums each step (one sync) and hold nothing
per parameter, so memory does not grow with the number of group losses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from replay.engine.columns import Columns
from replay.engine.evaluate import LossEvaluator
from replay.engine.parallel import Placement
from replay.frames import Frames, FrameWriter, StepRows, load, write_meta
from replay.lcadir import DENSE_DIR, write_part
from replay.lcadir.resume import Checkpoint
from replay.store.layout import TensorSpec


@dataclass
class StepLCA:
    """One step's allocation for every loss, as the step loop hands it over.

    `alloc` [K, held columns] the per-parameter allocation of the per-parameter losses (the gradients'
    dtype, or None); `tensor_lca` and `error` [L, T] float64 (over all ranks' columns); `splits`,
    `grounded` [L] and `points` (per loss, the s of its points) on the host; `loss_after` [L] float64.
    """

    alloc: torch.Tensor | None
    tensor_lca: torch.Tensor
    error: torch.Tensor
    splits: torch.Tensor
    grounded: torch.Tensor
    loss_after: torch.Tensor
    points: list[list[float]]


class Ledger:
    """Per-step rows of every loss and per-parameter totals of the losses `per_param`, over the held columns."""

    def __init__(self, out: Path, ev: LossEvaluator, params: list[TensorSpec], ckpt: Checkpoint, place: Placement,
                 dense: bool):
        loss_names, per_param, device = ev.loss_names, ev.per_param, ev.device
        names, sizes = [s.name for s in params], [s.numel for s in params]
        self.out, self.loss_names, self.loss_sizes, self.ckpt, self.place = out, loss_names, ev.loss_sizes, ckpt, place
        self.per_param, self.dense, self.dev = per_param, dense, device
        self.writer = FrameWriter(out, loss_names, names, sizes, per_param, prefix=f"part{place.tag}")
        self.lo, self.hi = ev.columns
        self.P, self.T = sum(sizes), len(sizes)
        K, S = len(per_param), self.hi - self.lo
        self.cols = Columns(sizes, self.lo, min(self.hi, self.P), device, rows=max(1, K))
        self.totals = ckpt.totals or {"lca": torch.zeros(K, S, dtype=torch.float64),
                                      "helped": torch.zeros(K, S, dtype=torch.int32),
                                      "n_steps": torch.zeros(1, dtype=torch.int64),
                                      "n_unchanged": torch.zeros(1, dtype=torch.int64)}
        if self.totals["lca"].shape[1] < S:  # carried from an extended lca dir: [K, P], the padding is zeros
            pad = S - self.totals["lca"].shape[1]
            for k in ("lca", "helped"):
                self.totals[k] = torch.nn.functional.pad(self.totals[k], (0, pad))
        self.totals = {k: v.to(device) for k, v in self.totals.items()}
        self._helped_block = torch.empty(0, dtype=torch.bool)  # (CPU: one block's helped flags, see _accumulate)
        if not self.cols.blocked:
            self._helped = torch.empty(K, S, dtype=torch.bool, device=device)
            # the step's allocation widened to float64 in a buffer of its own: adding the gradients' dtype into the
            # float64 totals directly makes torch widen it into a fresh temporary each step, whose page faults
            # (measured: 1,500 per step of [12 × 85k], 3-12 ms) cost more than the addition
            self._wide = torch.empty(K, S, dtype=torch.float64, device=device)
        # helped counts of the last < 255 steps, in one byte per count: a quarter of the int32 totals'
        # memory traffic per step (measured 0.05 vs 0.5 ms for [12 × 85k]); folded into the totals
        # before they are read (flush, finish) and before a byte could overflow
        self._recent = torch.zeros(K, S, dtype=torch.uint8, device=device)
        self._recent_steps = 0
        self.dense_buf: dict[str, torch.Tensor] = {}
        self.unflushed = 0  # steps recorded since the last flush
        self.steps_done = ckpt.steps_done  # steps in the parts written so far (checked on resume)

    def tensor_sums(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, T] float64 sums of x [rows, held columns] over each tensor's columns (0 outside the held slice)."""
        S = self.hi - self.lo
        return self.cols.sums(x[:, :min(S, self.P - self.lo)])

    def record(self, t0: int, t1: int, loss_before: torch.Tensor, step: StepLCA | None) -> None:
        """Add the step to the totals, and its per-loss and per-tensor sums to the frames.

        `step` None: no parameter moved (LCA exactly 0, no evaluation): it adds nothing to the
        totals and is no step in which a parameter could have helped.
        """
        self.unflushed += 1
        L, K = len(self.loss_names), len(self.per_param)
        helped_t = np.zeros((L, self.T), np.int64)
        if step is None:
            self.totals["n_unchanged"] += 1
            zeros, before = np.zeros((L, self.T)), loss_before.cpu().numpy()
            rows = StepRows(t0, t1, before, before, np.zeros(L), np.zeros(L, np.int64), np.ones(L, bool), zeros,
                            helped_t, zeros, [[] for _ in range(L)])
            alloc = None
        else:
            alloc = step.alloc
            if K:
                th = self._accumulate(alloc)
                self._recent_steps += 1
                if self._recent_steps == 255:
                    self._fold()
                self.place.sum_shards_onto_first(th)  # data mode: each rank counted its slice; rank 0 writes
                if self.place.writes_steps:
                    helped_t[self.per_param] = th.cpu().numpy()
            self.totals["n_steps"] += 1
            tl = step.tensor_lca
            if self.place.writes_steps:  # one sync per step
                before, after, lca, grounded, tensor_lca, error = (
                    x.cpu().numpy() for x in (loss_before, step.loss_after, tl.sum(1), step.grounded, tl, step.error))
                rows = StepRows(t0, t1, before, after, lca, step.splits.numpy(), grounded, tensor_lca, helped_t,
                                error, step.points)
        if self.dense and K:
            if alloc is None:
                alloc = torch.zeros(K, self.hi - self.lo, device=self.dev)
            if (cols := self.place.columns_on_first(alloc)) is not None:
                self.dense_buf[str(t0)] = cols[:, :self.P].to("cpu", torch.float64, copy=True)
        if self.place.writes_steps:
            self.writer.add(rows)

    def _accumulate(self, alloc: torch.Tensor) -> torch.Tensor:
        """The step's per-parameter allocation [K, held columns] into the float64 totals and the helped counts;
        returns [K, T] the parameters of each tensor it helped (negative LCA). On the CPU block by block, each
        block widened once into a float64 scratch and used there while in cache (the whole-array passes cost
        ~2x more: the arithmetic is a few passes over [K × P])."""
        cols, K = self.cols, alloc.shape[0]
        if not cols.blocked:  # (CUDA: whole arrays, the widening in a buffer of its own: see _wide)
            helped = torch.lt(alloc, 0, out=self._helped)
            th = cols.place(torch.stack([c.sum(1, dtype=torch.int32) for c in
                                         helped[:, :self.P - self.lo].split(cols.cut_sizes, 1)], 1))
            self.totals["lca"] += self._wide.copy_(alloc)
            self._recent += helped.view(torch.uint8)
            return th.long()
        counts: list[list[torch.Tensor]] = [[] for _ in cols.cut_sizes]
        lca, recent = self.totals["lca"], self._recent
        for t, b, w, wide in cols.blocks(K):
            wide.copy_(alloc[:, b:b + w])
            lca[:, b:b + w] += wide
            if self._helped_block.numel() < K * w:
                self._helped_block = torch.empty(K * w, dtype=torch.bool)
            helped = torch.lt(wide, 0, out=self._helped_block[:K * w].view(K, w))
            counts[t].append(helped.sum(1))
            recent[:, b:b + w] += helped.view(torch.uint8)
        return cols.place(torch.stack([sum(c) if c else torch.zeros(K, dtype=torch.int64) for c in counts], 1))

    def _fold(self) -> None:
        """Add the recent helped counts to the totals (exact: integers)."""
        if self._recent_steps:
            self.totals["helped"] += self._recent
            self._recent.zero_()
            self._recent_steps = 0

    def flush(self, next_step: int, evals: int) -> None:
        """Write the buffered rows as parquet parts (and dense parts), then the resume state."""
        ck = self.ckpt
        self.steps_done += len(self.writer)
        ck.parts += self.writer.flush(ck.seq)
        if self.dense and self.dense_buf:
            (self.out / DENSE_DIR).mkdir(exist_ok=True)
            rel = f"{DENSE_DIR}/part{self.place.tag}-{ck.seq:06d}.safetensors"
            losses = [self.loss_names[i] for i in self.per_param]
            ck.parts.append(write_part(self.out, rel, save(self.dense_buf, metadata={"losses": json.dumps(losses)})))
            self.dense_buf = {}
        ck.seq += 1
        self._fold()
        ck.save(next_step, self.totals, evals, self.steps_done)
        self.unflushed = 0

    def finish(self, evals: int, run: str, notes: dict) -> Frames:
        """params rows (own slice, or the totals summed onto rank 0 in steps mode), meta.json listing every
        part of every rank, then the resume state goes."""
        place = self.place
        self._fold()
        totals = {**self.totals, "evals": torch.tensor([evals], dtype=torch.int64, device=self.dev)}
        place.sum_blocks_onto_first(*(totals[k] for k in sorted(totals)))
        tot = {k: v.cpu() for k, v in totals.items()}
        n_steps = int(tot["n_steps"].item())
        parts = []
        if self.per_param and (place.rank == 0 or place.shards_data):
            own = max(0, min(self.hi, self.P) - self.lo)  # the last slice may end in padding
            parts.append(self.writer.write_params(tot["lca"][:, :own].numpy(), tot["helped"][:, :own].numpy(),
                                                  n_steps, start=self.lo))
        self.ckpt.finish_parts(parts)
        place.barrier()  # every params part is written and recorded
        if place.rank == 0:
            write_meta(self.out, {"complete": True, "config": self.ckpt.config, "losses": self.loss_names,
                                  "loss_sizes": self.loss_sizes,
                                  "per_param": [self.loss_names[i] for i in self.per_param],
                                  "n_steps": n_steps + int(tot["n_unchanged"]),
                                  "n_unchanged": int(tot["n_unchanged"]),
                                  "tensors": self.writer.tensor_names, "run": run,
                                  "grad_evals": int(tot["evals"].item()), "processes": place.world,
                                  "parallel": place.mode, **notes,
                                  "parts": [p.to_json() for p in self.ckpt.all_parts()]})
        place.barrier()  # meta.json is written: every rank may load, and drop its resume state
        self.ckpt.remove()
        return load(self.out)
