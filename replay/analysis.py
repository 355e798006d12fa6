"""The LCA paper's analyses as small pure functions on frames, each returning a polars frame.

Conventions: negative LCA = helped (the loss went down). `fr` is a `replay.Frames`
(or anything with `steps`, `tensors`, `params` LazyFrames). Nothing here reads the run
except `oscillation`, which needs the weights themselves.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from replay.frames import Frames


def not_finite(col: str = "residual") -> pl.Expr:
    """Rows whose value is NaN or infinite (a diverged step, a NaN example): counted, never skipped."""
    return (~pl.col(col).is_finite()).sum()


def residual_summary(steps: pl.LazyFrame) -> dict:
    """Over all rows of a steps (or example_steps) frame: rows, steps, share grounded, the largest |residual|
    (NaN when any residual is: polars' max would skip it), and how many residuals are not finite."""
    return steps.select(pl.len().alias("rows"), pl.col("step").n_unique().alias("steps"),
                        pl.col("grounded").mean().alias("grounded"),
                        pl.col("residual").abs().nan_max().alias("max_residual"),
                        not_finite().alias("not_finite")).collect().row(0, named=True)


def groundedness(fr: Frames) -> pl.DataFrame:
    """Per loss: how well allocations add up to the real loss change (residuals, splits used). A residual
    that is not finite shows as NaN in the maxima and is counted in `n_not_finite`."""
    return (fr.steps.group_by("loss").agg(
        pl.len().alias("steps"),
        pl.col("loss_before").first().alias("loss_first"),
        pl.col("loss_after").last().alias("loss_last"),
        pl.col("delta_loss").sum().alias("delta_loss"),
        pl.col("lca").sum().alias("lca"),
        pl.col("grounded").mean().alias("frac_grounded"),
        pl.col("residual").abs().nan_max().alias("max_abs_residual"),
        pl.col("residual").abs().mean().alias("mean_abs_residual"),
        not_finite().alias("n_not_finite"),
        pl.col("splits").mean().alias("mean_splits"),
        pl.col("splits").max().alias("max_splits"),
    ).sort("loss").collect())


def moving_steps(fr: Frames) -> pl.LazyFrame:
    """The steps frame without unchanged steps (no parameter moved: LCA 0, nothing could help)."""
    if "unchanged" in fr.steps.collect_schema().names():
        return fr.steps.filter(~pl.col("unchanged"))
    return fr.steps


def helped_fraction(fr: Frames) -> pl.DataFrame:
    """Per loss: the share of (parameter, step) pairs with negative LCA over the steps that moved
    the parameters (`frac_param_steps_helped`), and its per-step range."""
    steps = moving_steps(fr)
    per_step = steps.group_by("loss").agg(
        pl.col("frac_helped").mean().alias("mean_step_frac"),
        pl.col("frac_helped").min().alias("min_step_frac"),
        pl.col("frac_helped").max().alias("max_step_frac"))
    overall = (fr.tensors.join(steps.select("step").unique(), on="step", how="semi").group_by("loss")
               .agg((pl.col("n_helped").sum() / pl.col("n_params").sum()).alias("frac_param_steps_helped")))
    return overall.join(per_step, on="loss").sort("loss").collect()


def param_help_histogram(fr: Frames, loss: str, bins: int = 10) -> pl.DataFrame:
    """Histogram over parameters of the fraction of steps each helped ("no hero parameters":
    the paper finds it centred just above one half, not bimodal)."""
    f = fr.params.filter(pl.col("loss") == loss).select(
        (pl.col("n_helped") / pl.col("n_steps")).alias("f")).collect()["f"].to_numpy()
    counts, edges = np.histogram(f, bins=bins, range=(0.0, 1.0))
    return pl.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n_params": counts, "frac_params": counts / max(1, len(f))})


def lca_stats(fr: Frames, loss: str) -> pl.DataFrame:
    """Distribution of per-parameter total LCA: mean, spread, quantiles, the share of parameters
    whose total over the run is negative (`frac_params_helped_in_total`, not the share of
    parameter-steps of `helped_fraction`), and heavy tails (share of the total carried by the
    top 1% / 10% most helpful parameters)."""
    x = fr.params.filter(pl.col("loss") == loss).select("lca").collect()["lca"].to_numpy()
    srt = np.sort(x)  # most negative (most helpful) first
    total = srt.sum()
    top = lambda q: float(srt[: max(1, int(len(srt) * q))].sum() / total) if total else float("nan")  # noqa: E731
    q = np.quantile(x, [0.01, 0.25, 0.5, 0.75, 0.99])
    return pl.DataFrame({
        "loss": [loss], "n_params": [len(x)], "total": [float(total)], "mean": [float(x.mean())],
        "std": [float(x.std())], "q01": [q[0]], "q25": [q[1]], "median": [q[2]], "q75": [q[3]], "q99": [q[4]],
        "frac_params_helped_in_total": [float((x < 0).mean())], "share_top1pct": [top(0.01)],
        "share_top10pct": [top(0.10)],
    })


def layer_totals(fr: Frames) -> pl.DataFrame:
    """Per loss and tensor: total LCA, per-parameter LCA, and share of the loss's total."""
    t = fr.tensors.group_by("loss", "tensor").agg(pl.col("lca").sum(), pl.col("n_params").first())
    return (t.with_columns((pl.col("lca") / pl.col("n_params")).alias("lca_per_param"),
                           (pl.col("lca") / pl.col("lca").sum().over("loss")).alias("share"))
            .sort("loss", "lca").collect())


def hurting_layers(fr: Frames, loss: str) -> pl.DataFrame:
    """Tensors whose total LCA is positive: over the run they made `loss` worse."""
    return layer_totals(fr).filter((pl.col("loss") == loss) & (pl.col("lca") > 0)).sort("lca", descending=True)


def peak_moments(fr: Frames, top: int = 1) -> pl.DataFrame:
    """Per loss and tensor, the `top` steps of most learning (most negative LCA)."""
    return (fr.tensors.sort("lca").group_by("loss", "tensor", maintain_order=True).head(top)
            .select("loss", "tensor", "step", "lca").sort("loss", "tensor", "lca").collect())


def synchronization(fr: Frames, loss: str, top: int = 5, permutations: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Do layers learn at the same moments? Statistic: mean pairwise overlap of the layers'
    top-`top` learning steps. Null: each layer's LCA series circularly shifted by an
    independent random offset (keeps each layer's own autocorrelation). p-value =
    (1 + #null ≥ observed) / (1 + permutations)."""
    wide = (fr.tensors.filter(pl.col("loss") == loss).collect()
            .pivot(on="tensor", index="step", values="lca").sort("step"))
    m = wide.drop("step").to_numpy()  # [steps, layers]
    n_steps, n_layers = m.shape
    top = min(top, n_steps)

    def stat(x: np.ndarray) -> float:
        sets = [set(np.argsort(x[:, j])[:top]) for j in range(n_layers)]
        pairs = [(i, j) for i in range(n_layers) for j in range(i + 1, n_layers)]
        return float(np.mean([len(sets[i] & sets[j]) / top for i, j in pairs])) if pairs else float("nan")

    observed = stat(m)
    rng = np.random.default_rng(seed)
    null = np.array([stat(np.stack([np.roll(m[:, j], rng.integers(n_steps)) for j in range(n_layers)], 1))
                     for _ in range(permutations)])
    p = (1 + (null >= observed).sum()) / (1 + permutations)
    return pl.DataFrame({"loss": [loss], "layers": [n_layers], "top": [top], "overlap": [observed],
                         "null_mean": [float(null.mean())], "p_value": [float(p)]})


def train_vs_val(fr: Frames, train: str = "train", val: str = "val") -> pl.DataFrame:
    """Per tensor: LCA on train and on validation. `overfit` = helped train but hurt val —
    the parameters that drove overfitting."""
    t = layer_totals(fr)
    a = t.filter(pl.col("loss") == train).select("tensor", pl.col("lca").alias("lca_train"), "n_params")
    b = t.filter(pl.col("loss") == val).select("tensor", pl.col("lca").alias("lca_val"))
    return (a.join(b, on="tensor").with_columns(((pl.col("lca_train") < 0) & (pl.col("lca_val") > 0)).alias("overfit"))
            .sort("lca_val", descending=True))


def overfit_params(fr: Frames, train: str = "train", val: str = "val") -> pl.DataFrame:
    """Per parameter: those that helped train and hurt validation in total, worst first."""
    p = fr.params.filter(pl.col("loss").is_in([train, val])).collect()
    w = p.pivot(on="loss", index=["tensor", "index"], values="lca")
    return (w.filter((pl.col(train) < 0) & (pl.col(val) > 0)).rename({train: "lca_train", val: "lca_val"})
            .sort("lca_val", descending=True))


def prune_candidates(fr: Frames, loss: str) -> pl.DataFrame:
    """Per tensor: parameters that never helped `loss` in any step (n_helped == 0) or hurt
    in total; candidates to prune or freeze."""
    return (fr.params.filter(pl.col("loss") == loss).group_by("tensor").agg(
        pl.len().alias("n_params"),
        (pl.col("n_helped") == 0).sum().alias("never_helped"),
        (pl.col("lca") >= 0).sum().alias("hurt_or_idle_total"),
        pl.col("lca").sum().alias("lca"),
    ).with_columns((pl.col("never_helped") / pl.col("n_params")).alias("frac_never_helped"))
        .sort("frac_never_helped", descending=True).collect())


def oscillation(run: object, start: int = 0, stop: int | None = None) -> pl.DataFrame:
    """Per tensor, from the run's weights: how often each weight reverses direction
    (sign of Δθ flips between consecutive moving steps), as the fraction of possible flips."""
    prev_sign: dict = {}
    flips: dict = {}
    moves: dict = {}
    last = None
    for _, st in run.states(start, stop):
        if last is not None:
            for n, v in st.items():
                s = np.sign((v.double() - last[n].double()).numpy()).ravel()
                p = prev_sign.get(n)
                if p is not None:
                    both = (s != 0) & (p != 0)
                    flips[n] = flips.get(n, 0) + int((both & (s != p)).sum())
                    moves[n] = moves.get(n, 0) + int(both.sum())
                prev_sign[n] = np.where(s != 0, s, p if p is not None else 0)
        last = st
    return pl.DataFrame({"tensor": list(flips), "flips": list(flips.values()),
                         "frac_reversals": [flips[n] / max(1, moves[n]) for n in flips]}).sort("tensor")


# ---- which data moved the loss (per-example LCA and the batches of the run) --------------------------

def example_extremes(fr: Frames, loss: str, top: int = 5) -> pl.DataFrame:
    """Per tensor, the `top` examples of `loss` it helped most (most negative LCA summed over the
    steps) and hurt most: `tensor, kind ('helped'/'hurt'), rank, example, lca`."""
    totals = fr.examples.filter(pl.col("loss") == loss).group_by("tensor", "example").agg(pl.col("lca").sum())
    helped = totals.sort("lca").group_by("tensor", maintain_order=True).head(top).with_columns(kind=pl.lit("helped"))
    hurt = (totals.sort("lca", descending=True).group_by("tensor", maintain_order=True).head(top)
            .filter(pl.col("lca") > 0).with_columns(kind=pl.lit("hurt")))
    both = pl.concat([helped.filter(pl.col("lca") < 0), hurt])
    return (both.with_columns(rank=pl.col("lca").abs().rank("ordinal", descending=True).over("tensor", "kind"))
            .select("tensor", "kind", "rank", "example", "lca").sort("tensor", "kind", "rank").collect())


def forgetting_events(fr: Frames, loss: str, train: str = "train") -> pl.DataFrame:
    """Steps that lowered the `train` loss but raised the loss of an example of `loss`:
    `step, example, delta_loss` (the example's), `train_delta_loss`, largest rise first."""
    lowered = (fr.steps.filter((pl.col("loss") == train) & (pl.col("delta_loss") < 0))
               .select("step", pl.col("delta_loss").alias("train_delta_loss")))
    rose = fr.example_steps.filter((pl.col("loss") == loss) & (pl.col("delta_loss") > 0))
    return (rose.join(lowered, on="step").select("step", "example", "delta_loss", "train_delta_loss")
            .sort("delta_loss", descending=True).collect())


def batches_behind(fr: Frames, batches: pl.DataFrame, loss: str = "val", steps: tuple[int, int] | None = None,
                   top: int = 5) -> pl.DataFrame:
    """The `top` steps (in `steps` = (a, b), a ≤ step < b) with the largest change of `loss`, each with the
    training batch that caused it (`run.batches`): `step, delta_loss, examples` (a list of example ids)."""
    s = fr.steps.filter(pl.col("loss") == loss)
    if steps is not None:
        s = s.filter(pl.col("step").is_between(steps[0], steps[1], closed="left"))
    biggest = s.select("step", "delta_loss").sort(pl.col("delta_loss").abs(), descending=True).head(top).collect()
    ids = batches.group_by("step", maintain_order=True).agg(pl.col("example").alias("examples"))
    return biggest.join(ids, on="step", how="left").sort(pl.col("delta_loss").abs(), descending=True)
