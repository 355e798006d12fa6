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

    def save(fig: object, name: str) -> None:
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)

    lca = fr.params.filter(pl.col("loss") == loss).select("lca").collect()["lca"].to_numpy()
    fig, ax = plt.subplots(figsize=(6, 4))
    lim = np.abs(lca).max() or 1.0
    ax.hist(lca, bins=np.linspace(-lim, lim, 81), color="tab:blue")
    ax.set_yscale("log")
    ax.set(title=f"Per-parameter total LCA ({loss})", xlabel="LCA (negative = helped)", ylabel="parameters")
    save(fig, "lca_histogram")

    steps = fr.steps.sort("step").collect()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in [n for n in losses if "/" not in n]:
        s = steps.filter(pl.col("loss") == name)
        ax.plot(s["step"], 100 * s["frac_helped"], label=name)
    ax.axhline(50, color="gray", lw=0.8, ls="--")
    ax.set(title="Parameters helping per step", xlabel="step", ylabel="% helped")
    ax.legend()
    save(fig, "percent_helped")

    lt = analysis.layer_totals(fr).filter(pl.col("loss") == loss).sort("tensor")
    fig, axes = plt.subplots(1, 2, figsize=(10, max(3, 0.3 * len(lt))))
    axes[0].barh(lt["tensor"], lt["lca"], color=np.where(lt["lca"] < 0, "tab:green", "tab:red"))
    axes[0].set(title=f"Per-layer total LCA ({loss})", xlabel="LCA")
    axes[1].barh(lt["tensor"], lt["lca_per_param"], color="tab:blue")
    axes[1].set(title="per parameter", xlabel="LCA / parameter")
    save(fig, "layer_totals")

    cum = (fr.tensors.filter(pl.col("loss") == loss).sort("step")
           .with_columns(pl.col("lca").cum_sum().over("tensor").alias("cum")).collect())
    fig, ax = plt.subplots(figsize=(7, 4))
    for (name,), g in cum.group_by("tensor", maintain_order=True):
        ax.plot(g["step"], g["cum"], label=name)
    ax.set(title=f"Cumulative LCA per layer ({loss})", xlabel="step", ylabel="cumulative LCA")
    ax.legend(fontsize="small")
    save(fig, "layer_trajectories")

    if "train" in losses and "val" in losses:
        p = fr.params.filter(pl.col("loss").is_in(["train", "val"])).collect().pivot(
            on="loss", index=["tensor", "index"], values="lca")
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.scatter(p["train"], p["val"], s=3, alpha=0.4)
        ax.axhline(0, color="gray", lw=0.8)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set(title="Per-parameter LCA: train vs val\n(lower right: helped train, hurt val)",
               xlabel="train LCA", ylabel="val LCA")
        save(fig, "train_vs_val")

    wide = (fr.tensors.filter(pl.col("loss") == loss).collect().pivot(on="tensor", index="step", values="lca")
            .sort("step"))
    m = wide.drop("step").to_numpy()
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * m.shape[1])))
    norm = m / (np.abs(m).max(0, keepdims=True) + 1e-300)
    ax.imshow(norm.T, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_yticks(range(m.shape[1]), wide.columns[1:])
    ax.set(title=f"Learning moments per layer ({loss}; blue = helped, per-layer scale)", xlabel="step")
    save(fig, "peak_moments")
    return files
