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
    not_an_lca_dir,
    parts_of,
    read_sealed,
    write_json,
    write_part,
)

STEPS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "loss_before": pl.Float64, "loss_after": pl.Float64,
    "delta_loss": pl.Float64, "lca": pl.Float64, "residual": pl.Float64, "splits": pl.Int32,
    "frac_helped": pl.Float64,
    # additions: the state the step ends at (t + every), whether |residual| met the tolerance, whether no
    # parameter changed (then no evaluation, LCA exactly 0, frac_helped null), and the points along the step
    # (s in [0, 1]) whose gradients this loss's allocation used (0, 0.5, 1: plain Simpson; refined: more,
    # where the error was). frac_helped is null for losses without per-parameter counts (`per_param`).
    "step_to": pl.Int64, "grounded": pl.Boolean, "unchanged": pl.Boolean, "points": pl.List(pl.Float64),
}
TENSORS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "tensor": pl.String, "lca": pl.Float64,
    "n_params": pl.Int64, "n_helped": pl.Int64,
    # addition: an estimate of this LCA's quadrature error (engine.simpson: the change of the last
    # refinement; never refined: Simpson against the trapezoid, conservative). n_helped: null for losses
    # without per-parameter counts.
    "lca_error": pl.Float64,
}
EXAMPLES_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "tensor": pl.String, "lca": pl.Float64,
}
# per example and step (an addition): its own loss change, Σ over tensors, and whether they agree within tol
EXAMPLE_STEPS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "loss_before": pl.Float64, "loss_after": pl.Float64,
    "delta_loss": pl.Float64, "lca": pl.Float64, "residual": pl.Float64, "splits": pl.Int32, "grounded": pl.Boolean,
}
# per token of a causal LM (`per_token`): `position` is the target token's index in its sequence (the token
# predicted from the ones before it); lca is Σ over tensors; the other columns as in example_steps
TOKENS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "position": pl.Int64, "lca": pl.Float64,
    "loss_before": pl.Float64, "loss_after": pl.Float64, "delta_loss": pl.Float64, "residual": pl.Float64,
    "splits": pl.Int32, "grounded": pl.Boolean,
}
# per tensor, for the tokens a user selects (`token_tensors`)
TOKEN_TENSORS_SCHEMA = {
    "step": pl.Int64, "loss": pl.String, "example": pl.Int64, "position": pl.Int64, "tensor": pl.String,
    "lca": pl.Float64,
}
PARAMS_SCHEMA = {
    "loss": pl.String, "tensor": pl.String, "index": pl.Int64, "lca": pl.Float64,
    "n_helped": pl.Int64, "n_steps": pl.Int64,
}
SCHEMAS = {"steps": STEPS_SCHEMA, "tensors": TENSORS_SCHEMA, "params": PARAMS_SCHEMA, "examples": EXAMPLES_SCHEMA,
           "example_steps": EXAMPLE_STEPS_SCHEMA, "tokens": TOKENS_SCHEMA, "token_tensors": TOKEN_TENSORS_SCHEMA}


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
    tokens: pl.LazyFrame | None = None  # with per_token: step, loss, example, position, lca (Σ over tensors), ...
    token_tensors: pl.LazyFrame | None = None  # with token_tensors: the selected tokens' LCA per tensor

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
        raise not_an_lca_dir(path, f"no meta.json; write one with `replay compute RUN --out {path}`")
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

    frames = {name: scan(name, schema) for name, schema in SCHEMAS.items()}
    return Frames(path, meta=meta, **frames)


@dataclass
class StepRows:
    """One step of every loss, on the host: per-loss arrays [L] and per-loss per-tensor arrays [L, T]."""

    step: int
    step_to: int
    before: np.ndarray  # loss at the step's start [L]
    after: np.ndarray  # loss at its end [L]
    lca: np.ndarray  # Σ over tensors [L]
    splits: np.ndarray  # sub-intervals used [L]
    grounded: np.ndarray  # [L] bool
    tensor_lca: np.ndarray  # [L, T]
    tensor_helped: np.ndarray  # [L, T] (rows of the per-parameter losses only are read)
    error: np.ndarray  # estimated quadrature error [L, T]
    points: list[list[float]]  # per loss, where along the step it was evaluated


@dataclass
class RowValues:
    """One step of an integrand's rows (examples or tokens), on the host: lca [n, columns], the rest [n]."""

    lca: np.ndarray
    before: np.ndarray
    after: np.ndarray
    splits: np.ndarray
    grounded: np.ndarray


class FrameWriter:
    """Buffers per-step rows and writes them as numbered parquet parts; `per_param`: the losses with per-parameter
    counts (the others get null n_helped and frac_helped, and no params rows)."""

    def __init__(self, out: Path, loss_names: list[str], tensor_names: list[str], tensor_sizes: list[int],
                 per_param: list[int], prefix: str = "part"):
        self.out, self.prefix = out, prefix
        self.loss_names, self.tensor_names, self.per_param = loss_names, tensor_names, per_param
        self.tensor_sizes = np.asarray(tensor_sizes, dtype=np.int64)
        self._has_counts = np.zeros(len(loss_names), dtype=bool)
        self._has_counts[per_param] = True
        for d in ("steps", "tensors", "params"):
            (out / d).mkdir(parents=True, exist_ok=True)
        self._steps: list[dict] = []
        self._tensors: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._extra: dict[str, list[tuple]] = {}  # frame -> each step's arrays (see _buffer)

    def _buffer(self, name: str, *arrays: object) -> None:
        """One step of rows of frame `name`, kept as arrays: the frame is built once per flush (a polars frame per
        step cost ~1 ms of a per-example step's few)."""
        (self.out / name).mkdir(exist_ok=True)
        self._extra.setdefault(name, []).append(arrays)

    def add_examples(self, step: int, loss: str, r: RowValues) -> None:
        """One step of per-example LCA of one data set: lca [n, T] float64, per-example arrays [n]."""
        n = r.lca.shape[0]
        self._buffer("examples", step, loss, np.arange(n, dtype=np.int64), None, r.lca)
        self._buffer("example_steps", step, loss, r)

    def add_tokens(self, step: int, loss: str, example: np.ndarray, position: np.ndarray, r: RowValues) -> None:
        """One step of per-token LCA (Σ over tensors) of one data set: arrays [tokens]."""
        self._buffer("tokens", step, loss, example.astype(np.int64), position.astype(np.int64), r)

    def add_token_tensors(self, step: int, loss: str, example: np.ndarray, position: np.ndarray,
                          lca: np.ndarray) -> None:
        """The selected tokens' LCA per tensor: lca [tokens, T]."""
        self._buffer("token_tensors", step, loss, example.astype(np.int64), position.astype(np.int64), lca)

    def _per_tensor_frame(self, name: str, parts: list[tuple]) -> pl.DataFrame:
        """examples / token_tensors: a row per (row, tensor) of each step's lca [n, T]."""
        T = len(self.tensor_names)
        sizes = [len(ex) * T for _, _, ex, _, _ in parts]
        cols = {
            "step": np.repeat([s for s, *_ in parts], sizes).astype(np.int64),
            "loss": _repeat_strings([loss for _, loss, *_ in parts], sizes),
            "example": np.repeat(np.concatenate([ex for _, _, ex, _, _ in parts]), T),
        }
        if name == "token_tensors":
            cols["position"] = np.repeat(np.concatenate([pos for _, _, _, pos, _ in parts]), T)
        n = sum(sizes) // max(T, 1)
        cols["tensor"] = pl.Series(self.tensor_names, dtype=pl.String).gather(np.tile(np.arange(T), n))
        cols["lca"] = np.concatenate([lca.reshape(-1) for *_, lca in parts])
        return pl.DataFrame(cols, schema=SCHEMAS[name])

    def _row_frame(self, name: str, parts: list[tuple]) -> pl.DataFrame:
        """example_steps / tokens: a row per example (token) of each step, its loss change and residual."""
        sizes = [len(r.before) for _, _, *_, r in parts]
        col = lambda f: np.concatenate([f(r) for *_, r in parts])  # noqa: E731
        before, after = col(lambda r: r.before), col(lambda r: r.after)
        lca = col(lambda r: r.lca.sum(1) if name == "example_steps" else r.lca[:, 0])
        cols = {"step": np.repeat([s for s, *_ in parts], sizes).astype(np.int64),
                "loss": _repeat_strings([loss for _, loss, *_ in parts], sizes)}
        if name == "example_steps":
            cols["example"] = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes])
        else:
            cols["example"] = np.concatenate([ex for _, _, ex, _, _ in parts])
            cols["position"] = np.concatenate([pos for _, _, _, pos, _ in parts])
        cols |= {"loss_before": before, "loss_after": after, "delta_loss": after - before, "lca": lca,
                 "residual": (after - before) - lca, "splits": col(lambda r: r.splits).astype(np.int32),
                 "grounded": col(lambda r: r.grounded)}
        return pl.DataFrame(cols, schema=SCHEMAS[name])

    def add(self, r: StepRows) -> None:
        """One step of every loss (`StepRows`)."""
        moved = bool(r.splits.any())
        frac = r.tensor_helped.sum(1) / self.tensor_sizes.sum() if moved else np.full(len(r.before), np.nan)
        frac = np.where(self._has_counts, frac, np.nan)
        self._steps.append({"step": r.step, "step_to": r.step_to, "before": r.before, "after": r.after,
                            "lca": r.lca, "splits": r.splits, "grounded": r.grounded, "frac": frac,
                            "points": r.points})
        self._tensors.append((r.step, r.tensor_lca, r.tensor_helped, r.error))

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
            "points": [p for r in s for p in r["points"]],
        }, schema=STEPS_SCHEMA).with_columns(pl.col("frac_helped").fill_nan(None))
        n = len(self._tensors)
        counted = np.tile(np.repeat(self._has_counts, T), n)
        helped = np.concatenate([h.reshape(-1) for _, _, h, _ in self._tensors]).astype(np.int64)
        tensors = pl.DataFrame({
            "step": np.repeat([t for t, _, _, _ in self._tensors], L * T),
            "loss": pl.Series(self.loss_names, dtype=pl.String).gather(np.tile(np.repeat(np.arange(L), T), n)),
            "tensor": pl.Series(self.tensor_names, dtype=pl.String).gather(np.tile(np.arange(T), L * n)),
            "lca": np.concatenate([a.reshape(-1) for _, a, _, _ in self._tensors]),
            "n_params": np.tile(self.tensor_sizes, L * n),
            "n_helped": pl.Series(helped).set(pl.Series(~counted), None),
            "lca_error": np.concatenate([e.reshape(-1) for _, _, _, e in self._tensors]),
        }, schema=TENSORS_SCHEMA)
        files = []
        build = {"examples": self._per_tensor_frame, "token_tensors": self._per_tensor_frame,
                 "example_steps": self._row_frame, "tokens": self._row_frame}
        frames = [("steps", steps), ("tensors", tensors)] + [(k, build[k](k, v)) for k, v in self._extra.items()]
        first, last = int(self._steps[0]["step"]), int(self._steps[-1]["step"])
        for name, df in frames:
            files.append(_write_parquet(df, self.out, f"{name}/{self.prefix}-{seq:06d}.parquet", first, last))
        self._steps, self._tensors, self._extra = [], [], {}
        return files

    def write_params(self, lca: np.ndarray, helped: np.ndarray, n_steps: int, start: int = 0) -> Part:
        """Totals over steps of the losses `per_param`: lca [K, k] float64, helped [K, k] counts, for the flat
        parameters start..start+k (in tensor order; a data-parallel rank writes its own slice)."""
        K, k = lca.shape
        ends = np.cumsum(self.tensor_sizes)
        flat = np.arange(start, start + k)
        tensor_ids = np.searchsorted(ends, flat, side="right")  # [k]
        # the columns every loss shares, made once (the strings by gathering from the names: numpy object arrays
        # cost ~10x more), and the loss as a repeated constant: a frame per loss, written as one
        tensor = pl.Series("tensor", self.tensor_names, dtype=pl.String).gather(tensor_ids)
        index = pl.Series("index", (flat - (ends - self.tensor_sizes)[tensor_ids]).astype(np.int64))
        steps = pl.Series("n_steps", np.full(k, n_steps, dtype=np.int64))
        df = pl.concat([pl.DataFrame([pl.repeat(self.loss_names[li], k, dtype=pl.String, eager=True).alias("loss"),
                                      tensor, index, pl.Series("lca", lca[r]),
                                      pl.Series("n_helped", helped[r].astype(np.int64)), steps], schema=PARAMS_SCHEMA)
                        for r, li in enumerate(self.per_param)], rechunk=False)
        return _write_parquet(df, self.out, f"params/{self.prefix}.parquet")


def _repeat_strings(values: list[str], counts: list[int]) -> pl.Series:
    """values[i] repeated counts[i] times, as a string column (gathered: numpy object arrays cost ~10x more)."""
    names = sorted(set(values))
    ids = np.repeat(np.array([names.index(v) for v in values], dtype=np.int64), counts)
    return pl.Series(names, dtype=pl.String).gather(ids)


def _write_parquet(df: pl.DataFrame, out: Path, rel: str, first: int | None = None, last: int | None = None) -> Part:
    """Whole file or nothing, durable before the resume state names it: encoded in memory (a part is one
    flush of rows), then written and recorded (`lcadir.write_part`)."""
    buf = io.BytesIO()
    df.write_parquet(buf)
    return write_part(out, rel, buf.getbuffer(), df.height, first, last)


def write_meta(out: Path, meta: dict) -> None:
    write_json(out / META, meta)
