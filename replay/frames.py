"""Output frames: schema, incremental parquet parts, and `load()`.

An lca dir holds `steps/`, `tensors/` (one parquet part per flush, so memory does not grow
with the number of steps) and `params/` (totals over all steps, written at the end), plus
`meta.json`. Column names and meanings are the contract of DESIGN.md; extra columns are
additions. Negative LCA = the parameter helped (the loss went down).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from replay.errors import RunError
from replay.lcadir import (
    META,
    PROGRESS_RE,
    LcaDirDamaged,
    Part,
    check_parts,
    frame_files,
    parts_of,
    read_sealed,
    write_json,
    write_part,
)

STEPS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "loss_before": pl.Float64, "loss_after": pl.Float64,
    "delta_loss": pl.Float64, "lca": pl.Float64, "residual": pl.Float64, "splits": pl.Int32,
    "frac_helped": pl.Float64,
    # additions: the state the step ends at (t + every), whether |residual| met the tolerance, and
    # whether no parameter changed (then no evaluation, LCA exactly 0, frac_helped null)
    "step_to": pl.Int64, "grounded": pl.Boolean, "unchanged": pl.Boolean,
}
TENSORS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "tensor": pl.String, "lca": pl.Float64,
    "n_params": pl.Int64, "n_helped": pl.Int64,
}
EXAMPLES_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "tensor": pl.String, "lca": pl.Float64,
}
# per example and step (an addition): its own loss change, Σ over tensors, and whether they agree within tol
EXAMPLE_STEPS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "loss_before": pl.Float64, "loss_after": pl.Float64,
    "delta_loss": pl.Float64, "lca": pl.Float64, "residual": pl.Float64, "splits": pl.Int32, "grounded": pl.Boolean,
}
PARAMS_SCHEMA = {
    "loss": pl.String, "tensor": pl.String, "index": pl.Int64, "lca": pl.Float64,
    "n_helped": pl.Int64, "n_steps": pl.Int64,
}


@dataclass
class Frames:
    """The frames of an lca dir, as polars LazyFrames, and its meta.json."""

    path: Path
    steps: pl.LazyFrame
    tensors: pl.LazyFrame
    params: pl.LazyFrame
    meta: dict
    examples: pl.LazyFrame | None = None  # with per_example: step, loss, example, tensor, lca
    example_steps: pl.LazyFrame | None = None  # with per_example: per example and step, its loss change and residual

    def __repr__(self) -> str:
        return f"Frames({str(self.path)!r}, losses={self.meta.get('losses')}, steps={self.meta.get('n_steps')})"


def load(path: str | Path, *, verify: bool = True) -> Frames:
    """Open an lca dir written by `compute` (lazily: no value is read until collected).

    Every part is first checked against meta.json's record of it (size and xxHash3, streamed),
    and a file no record names is refused: a damaged, dropped or foreign part is one line, never a
    silently wrong frame. `verify=False` skips the checksums (the records and the file list are
    still checked).
    """
    path = Path(path)
    meta_path = path / META
    if not meta_path.exists():
        if path.is_dir() and any(PROGRESS_RE.fullmatch(p.name) for p in path.iterdir()):
            raise RunError(f"{path}: the computation did not finish; run the same `replay compute` again to resume it")
        raise RunError(f"{path}: not an lca dir (no meta.json); write one with `replay compute RUN --out {path}`")
    meta = read_sealed(meta_path)
    if meta.get("complete") is not True:
        raise RunError(f"{path}: the computation did not finish; run `replay compute` again to resume it")
    parts = parts_of(meta, meta_path)
    problems = check_parts(path, parts) if verify else [
        f"{p}: no record of this compute names it" for p in frame_files(path)
        if str(p.relative_to(path)) not in {q.path for q in parts}]
    if problems:
        more = f" (and {len(problems) - 1} more: `replay verify {path}` lists them)" if len(problems) > 1 else ""
        raise LcaDirDamaged(f"{path}/{problems[0]}{more} — the frames cannot be trusted; compute again into a new "
                            f"--out (or --restart)")
    by_dir: dict[str, list[Path]] = {}
    for part in parts:
        by_dir.setdefault(Path(part.path).parts[0], []).append(path / part.path)

    def scan(name: str, schema: dict) -> pl.LazyFrame:
        files = sorted(f for f in by_dir.get(name, []) if f.suffix == ".parquet")
        return pl.scan_parquet(files) if files else pl.LazyFrame(schema=schema)

    return Frames(path, scan("steps", STEPS_SCHEMA), scan("tensors", TENSORS_SCHEMA),
                  scan("params", PARAMS_SCHEMA), meta, scan("examples", EXAMPLES_SCHEMA),
                  scan("example_steps", EXAMPLE_STEPS_SCHEMA))


class FrameWriter:
    """Buffers per-step rows and writes them as numbered parquet parts."""

    def __init__(self, out: Path, loss_names: list[str], tensor_names: list[str], tensor_sizes: list[int],
                 prefix: str = "part"):
        self.out, self.prefix = out, prefix
        self.loss_names, self.tensor_names = loss_names, tensor_names
        self.tensor_sizes = np.asarray(tensor_sizes, dtype=np.int64)
        for d in ("steps", "tensors", "params"):
            (out / d).mkdir(parents=True, exist_ok=True)
        self._steps: list[dict] = []
        self._tensors: list[tuple[int, np.ndarray, np.ndarray]] = []
        self._examples: list[pl.DataFrame] = []
        self._example_steps: list[pl.DataFrame] = []

    def add_examples(self, step: int, loss: str, lca: np.ndarray, before: np.ndarray, after: np.ndarray,
                     splits: np.ndarray, grounded: np.ndarray) -> None:
        """One step of per-example LCA of one data set: lca [n, T] float64, per-example arrays [n]."""
        n, T = lca.shape
        (self.out / "examples").mkdir(exist_ok=True)
        (self.out / "example_steps").mkdir(exist_ok=True)
        self._examples.append(pl.DataFrame({
            "step": np.full(n * T, step, dtype=np.int64), "loss": [loss] * (n * T),
            "example": np.repeat(np.arange(n, dtype=np.int64), T),
            "tensor": np.tile(np.array(self.tensor_names, dtype=object), n), "lca": lca.reshape(-1),
        }, schema=EXAMPLES_SCHEMA))
        total = lca.sum(1)
        self._example_steps.append(pl.DataFrame({
            "step": np.full(n, step, dtype=np.int64), "loss": [loss] * n, "example": np.arange(n, dtype=np.int64),
            "loss_before": before, "loss_after": after, "delta_loss": after - before, "lca": total,
            "residual": (after - before) - total, "splits": splits.astype(np.int32), "grounded": grounded,
        }, schema=EXAMPLE_STEPS_SCHEMA))

    def add(self, step: int, step_to: int, before: np.ndarray, after: np.ndarray, lca: np.ndarray,
            splits: np.ndarray, grounded: np.ndarray, tensor_lca: np.ndarray, tensor_helped: np.ndarray) -> None:
        """One step: per-loss arrays [L] and per-loss per-tensor arrays [L, T] (already on the host)."""
        moved = bool(splits.any())
        frac = tensor_helped.sum(1) / self.tensor_sizes.sum() if moved else np.full(len(before), np.nan)
        self._steps.append({"step": step, "step_to": step_to, "before": before, "after": after, "lca": lca,
                            "splits": splits, "grounded": grounded, "frac": frac})
        self._tensors.append((step, tensor_lca, tensor_helped))

    def __len__(self) -> int:
        return len(self._steps)

    def flush(self, seq: int) -> list[Part]:
        """Write the buffered rows as part `seq`; returns the records of the files written."""
        if not self._steps:
            return []
        L, T = len(self.loss_names), len(self.tensor_names)
        s = self._steps
        col = lambda k: np.concatenate([r[k] for r in s])  # noqa: E731
        before, after, lca = col("before"), col("after"), col("lca")
        steps = pl.DataFrame({
            "step": np.repeat([r["step"] for r in s], L), "loss": self.loss_names * len(s),
            "loss_before": before, "loss_after": after, "delta_loss": after - before, "lca": lca,
            "residual": (after - before) - lca, "splits": col("splits"),
            "frac_helped": col("frac"), "step_to": np.repeat([r["step_to"] for r in s], L),
            "grounded": col("grounded"), "unchanged": np.repeat([not r["splits"].any() for r in s], L),
        }, schema=STEPS_SCHEMA).with_columns(pl.col("frac_helped").fill_nan(None))
        n = len(self._tensors)
        tensors = pl.DataFrame({
            "step": np.repeat([t for t, _, _ in self._tensors], L * T),
            "loss": pl.Series(self.loss_names, dtype=pl.String).gather(np.tile(np.repeat(np.arange(L), T), n)),
            "tensor": pl.Series(self.tensor_names, dtype=pl.String).gather(np.tile(np.arange(T), L * n)),
            "lca": np.concatenate([a.reshape(-1) for _, a, _ in self._tensors]),
            "n_params": np.tile(self.tensor_sizes, L * n),
            "n_helped": np.concatenate([h.reshape(-1) for _, _, h in self._tensors]).astype(np.int64),
        }, schema=TENSORS_SCHEMA)
        files = []
        frames = [("steps", steps), ("tensors", tensors)]
        if self._examples:
            frames += [("examples", pl.concat(self._examples)), ("example_steps", pl.concat(self._example_steps))]
        first, last = int(self._steps[0]["step"]), int(self._steps[-1]["step"])
        for name, df in frames:
            files.append(_write_parquet(df, self.out, f"{name}/{self.prefix}-{seq:06d}.parquet", first, last))
        self._steps, self._tensors, self._examples, self._example_steps = [], [], [], []
        return files

    def write_params(self, lca: np.ndarray, helped: np.ndarray, n_steps: int, start: int = 0) -> Part:
        """Totals over steps: lca [L, k] float64, helped [L, k] counts, for the flat parameters start..start+k
        (in tensor order; a data-parallel rank writes its own slice)."""
        L, k = lca.shape
        ends = np.cumsum(self.tensor_sizes)
        flat = np.arange(start, start + k)
        tensor_ids = np.searchsorted(ends, flat, side="right")  # [k]
        index = flat - (ends - self.tensor_sizes)[tensor_ids]  # flat index within its tensor
        df = pl.DataFrame({  # strings by gathering from the names: numpy object arrays cost ~10x more
            "loss": pl.Series(self.loss_names, dtype=pl.String).gather(np.repeat(np.arange(L), k)),
            "tensor": pl.Series(self.tensor_names, dtype=pl.String).gather(np.tile(tensor_ids, L)),
            "index": np.tile(index, L), "lca": lca.reshape(-1),
            "n_helped": helped.reshape(-1).astype(np.int64), "n_steps": np.full(L * k, n_steps, dtype=np.int64),
        }, schema=PARAMS_SCHEMA)
        return _write_parquet(df, self.out, f"params/{self.prefix}.parquet")


def _write_parquet(df: pl.DataFrame, out: Path, rel: str, first: int | None = None, last: int | None = None) -> Part:
    """Whole file or nothing, durable before the resume state names it: encoded in memory (a part is one
    flush of rows), then written and recorded (`lcadir.write_part`)."""
    buf = io.BytesIO()
    df.write_parquet(buf)
    return write_part(out, rel, buf.getbuffer(), df.height, first, last)


def write_meta(out: Path, meta: dict) -> None:
    write_json(out / META, meta)
