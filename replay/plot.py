"""`replay plot`: the figures a researcher would otherwise draw by hand, as PNG files.

matplotlib is an optional extra (`pip install 'replay-lca[plot]'`); everything here reads
frames through `replay.analysis` and polars, nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from replay import analysis
from replay.errors import ReplayError
from replay.frames import Frames


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReplayError("replay plot needs matplotlib: pip install 'replay-lca[plot]'") from None
    return plt


TOP = 8  # tensors drawn by name in a figure; the others are summed as one "rest" (6 or 600 tensors alike)
BARS = 30  # tensors with a bar of their own in the per-layer totals
ROWS = 60  # tensors with a row of their own in the learning-moments map


def top_tensors(totals: pl.DataFrame, k: int) -> tuple[list[str], list[str]]:
    """The k tensors with the largest |lca| (in that order), and the others."""
    order = totals.sort(pl.col("lca").abs(), descending=True)["tensor"].to_list()
    return order[:k], order[k:]


def _ungrounded_note(fig: object, steps: pl.DataFrame, loss: str) -> None:
    s = steps.filter(pl.col("loss") == loss)
    missed = int((~s["grounded"]).sum()) if "grounded" in s.columns else 0
    if missed:
        fig.suptitle(f"{missed} of {len(s)} steps of {loss} not grounded (|residual| > tol): see `replay summary`",
                     color="tab:red", fontsize="small")


def plot_all(fr: Frames, out: Path, loss: str | None = None) -> list[Path]:
    """Write every figure for `loss` (default: train, else the first loss) into `out`."""
    plt = _pyplot()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    losses = fr.meta["losses"]
    loss = loss or ("train" if "train" in losses else losses[0])
    if loss not in losses:
        raise ReplayError(f"--loss {loss!r}: not in this lca dir (have {losses})")
    files = []

    steps_all = fr.steps.sort("step").collect()

    def save(fig: object, name: str, note: bool = True) -> None:
        if note:
            _ungrounded_note(fig, steps_all, loss)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(path)

    lca = fr.params.filter(pl.col("loss") == loss).select("lca").collect()["lca"].to_numpy()
    if not len(lca):
        lca = np.zeros(1)  # a loss without per-parameter totals (not in per_param)
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    lim = np.abs(lca).max() or 1.0
    ax.hist(lca, bins=np.linspace(-lim, lim, 81), color="tab:blue")
    ax.set_yscale("log")
    ax.set(title=f"Per-parameter total LCA ({loss})", xlabel="LCA (negative = helped)", ylabel="parameters")
    save(fig, "lca_histogram")

    steps = steps_all
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    for name in [n for n in fr.meta.get("per_param", losses) if "/" not in n]:
        s = steps.filter(pl.col("loss") == name)
        ax.plot(s["step"], 100 * s["frac_helped"], label=name)
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set(title="Parameters helping per step", xlabel="step", ylabel="% helped")
    ax.legend()
    save(fig, "percent_helped")

    lt = analysis.layer_totals(fr).filter(pl.col("loss") == loss)
    shown, rest = top_tensors(lt, BARS)
    bars = lt.filter(pl.col("tensor").is_in(shown)).sort(pl.col("lca").abs())
    names, vals, per = bars["tensor"].to_list(), bars["lca"].to_list(), bars["lca_per_param"].to_list()
    if rest:
        r = lt.filter(pl.col("tensor").is_in(rest))
        names.insert(0, f"rest ({len(rest)} tensors)")
        vals.insert(0, r["lca"].sum())
        per.insert(0, r["lca"].sum() / max(1, r["n_params"].sum()) if "n_params" in r.columns else 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, max(3, 0.28 * len(names) + 1)), layout="constrained")
    colors = np.where(np.asarray(vals) < 0, "tab:green", "tab:red")
    axes[0].barh(names, vals, color=colors)
    axes[0].set(title=f"Per-layer total LCA ({loss}" + (f"; the {BARS} largest of {len(lt)}" if rest else "")
                + ")", xlabel="LCA (negative = helped)")
    axes[1].barh(names, per, color="tab:blue")
    axes[1].set(title="per parameter", xlabel="LCA / parameter")
    axes[1].set_yticklabels([])
    for ax in axes:
        ax.tick_params(axis="y", labelsize="small" if len(names) > 15 else "medium")
    save(fig, "layer_totals")

    cum = (fr.tensors.filter(pl.col("loss") == loss).sort("step")
           .with_columns(pl.col("lca").cum_sum().over("tensor").alias("cum")).collect())
    top, others = top_tensors(lt, TOP)
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(top):
        g = cum.filter(pl.col("tensor") == name)
        ax.plot(g["step"], g["cum"], label=name, color=cmap(i % 10))
    if others:
        g = cum.filter(pl.col("tensor").is_in(others)).group_by("step").agg(pl.col("cum").sum()).sort("step")
        ax.plot(g["step"], g["cum"], label=f"rest ({len(others)} tensors, summed)", color="gray", ls="--")
    total = cum.group_by("step").agg(pl.col("cum").sum()).sort("step")
    ax.plot(total["step"], total["cum"], label="all tensors", color="black", lw=1.5)
    ax.set(title=f"Cumulative LCA per layer ({loss}; the {min(TOP, len(lt))} largest by |total|)", xlabel="step",
           ylabel="cumulative LCA")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    save(fig, "layer_trajectories")

    if "train" in losses and "val" in losses:
        p = fr.params.filter(pl.col("loss").is_in(["train", "val"])).collect().pivot(
            on="loss", index=["tensor", "index"], values="lca")
        fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
        ax.scatter(p["train"], p["val"], s=3, alpha=0.4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set(title="Per-parameter LCA: train vs val\n(lower right: helped train, hurt val)",
               xlabel="train LCA", ylabel="val LCA")
        save(fig, "train_vs_val")

    rows, hidden = top_tensors(lt, ROWS)
    order = [n for n in fr.meta.get("tensors", []) if isinstance(n, str)] or lt["tensor"].to_list()
    rows = [n for n in order if n in set(rows)]  # the model's order
    wide = (fr.tensors.filter((pl.col("loss") == loss) & pl.col("tensor").is_in(rows)).collect()
            .pivot(on="tensor", index="step", values="lca").sort("step"))
    m = wide.select(rows).to_numpy()
    fig, ax = plt.subplots(figsize=(9, max(3, 0.22 * m.shape[1] + 1)), layout="constrained")
    norm = m / (np.abs(m).max(0, keepdims=True) + 1e-300)
    ax.imshow(norm.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest",
              extent=(wide["step"][0] - 0.5, wide["step"][-1] + 0.5, m.shape[1] - 0.5, -0.5))
    ax.set_yticks(range(m.shape[1]), rows, fontsize="small" if m.shape[1] > 15 else "medium")
    ax.set(title=f"Learning moments per layer ({loss}; blue = helped, per-layer scale"
           + (f"; the {ROWS} largest of {len(lt)}" if hidden else "") + ")", xlabel="step")
    save(fig, "peak_moments")
    return files
