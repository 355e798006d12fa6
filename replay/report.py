"""`replay summary`: the analyses as terminal tables, headline numbers first."""

from __future__ import annotations

import sys

import polars as pl
from rich.console import Console
from rich.table import Table

from replay import analysis
from replay.errors import ReplayError
from replay.frames import Frames


def _table(df: pl.DataFrame, title: str, fmt: dict | None = None) -> Table:
    fmt = {**_percent_columns(df), **(fmt or {})}
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in df.columns:
        t.add_column(c, justify="left" if df[c].dtype == pl.String else "right")
    for row in df.iter_rows():
        t.add_row(*[fmt.get(c, _fmt)(v) for c, v in zip(df.columns, row, strict=True)])
    return t


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _pct(v: object) -> str:
    return f"{v:.1%}" if isinstance(v, float) else _fmt(v)


def _percent_columns(df: pl.DataFrame) -> dict:
    """Shares print as percentages (0.0333 reads as 3.3%, a share as a share)."""
    return {c: _pct for c in df.columns if c.startswith(("frac", "share", "mean_step_frac", "min_step_frac",
                                                         "max_step_frac")) or c == "grounded"}


def advice(g: pl.DataFrame, fr: Frames) -> list[str]:
    """What to do about losses whose steps are not grounded, with this compute's numbers."""
    cfg = fr.meta.get("config", {})
    tol, ms = cfg.get("tol"), cfg.get("max_splits")
    capped = fr.steps.filter(~pl.col("grounded") & ~pl.col("unchanged")).group_by("loss").agg(
        pl.len().alias("missed"), (pl.col("splits") >= (ms or 0)).sum().alias("at_cap")).collect()
    out = []
    # most missed first; ties in the losses' names' order (a data set before its groups), whatever order the join
    # gave (it is not fixed: the list below is cut at 5)
    for row in g.join(capped, on="loss").sort(["missed", "loss"], descending=[True, False]).iter_rows(named=True):
        line = (f"{row['loss']}: {row['missed']} of {row['steps']} steps not grounded (max |residual| "
                f"{row['max_abs_residual']:.1e} against tol {tol:g})")
        if ms and row["at_cap"]:
            line += (f"; {row['at_cap']} used all {ms} sub-intervals: raise --max-splits ({2 * ms}, {4 * ms}); "
                     f"`tensors.lca_error` says which tensors' allocations are uncertain")
        if cfg.get("batchnorm") == "batch":
            line += "; batch-norm batch statistics make the loss rough: more evaluation examples per batch " \
                    "smooth it, batchnorm='running' removes the coupling"
        out.append(line)
    if len(out) > 5:
        out = out[:5] + [f"... and {len(out) - 5} more losses"]
    return out


def headline(g: pl.DataFrame, h: pl.DataFrame) -> list[str]:
    """One line per data-set loss, from `analysis.groundedness` and `analysis.helped_fraction`."""
    lines = []
    for row in g.join(h.select("loss", "frac_param_steps_helped"), on="loss").iter_rows(named=True):
        if "/" in row["loss"]:
            continue  # classes and groups go in the tables
        lines.append(
            f"{row['loss']}: loss {row['loss_first']:.4f} → {row['loss_last']:.4f} over {row['steps']} steps; "
            f"Σ LCA {row['lca']:+.4f} vs ΔL {row['delta_loss']:+.4f}; grounded {row['frac_grounded']:.0%} "
            f"(max |residual| {row['max_abs_residual']:.1e}"
            + (f", {row['n_not_finite']} not finite" if row["n_not_finite"] else "") + "); "
            f"{row['frac_param_steps_helped']:.1%} of parameter-steps helped")
    return lines


def notes(meta: dict) -> list[str]:
    """How to read these frames: chords between sparse states, skipped steps, BN statistics, missing states."""
    out = [meta[k] for k in ("every_note",) if meta.get(k)]
    if meta.get("n_unchanged"):
        out.append(f"{meta['n_unchanged']} step(s) changed no parameter (LCA exactly 0, column `unchanged`); "
                   f"they are left out of helped fractions")
    if meta.get("batchnorm_stats"):
        out.append(f"batch-norm running statistics: {meta['batchnorm_stats']}")
    if meta.get("missing_states"):
        a, b = meta["missing_states"]
        out.append(f"states {a}..{b} of the run are missing (a lost chunk): the frames stop before them")
    if meta.get("aliases"):
        out.append("tied parameters: " + ", ".join(f"{a} = {t}" for a, t in meta["aliases"].items()))
    return out


def print_summary(fr: Frames, console: Console | None = None) -> None:
    con = console or Console(width=None if sys.stdout.isatty() else 120)  # files and pipes get 120 columns
    losses = fr.meta["losses"]
    main = "train" if "train" in losses else losses[0]
    con.print(f"[bold]replay summary[/bold] {fr.path}  ({fr.meta['n_steps']} steps, {len(losses)} losses, "
              f"{fr.meta.get('grad_evals', '?')} gradient evaluations)")
    grounded, helped = analysis.groundedness(fr), analysis.helped_fraction(fr)
    for line in headline(grounded, helped):
        con.print("  " + line)
    for line in notes(fr.meta):
        con.print("  [yellow]note[/yellow] " + line)
    g = grounded.drop("loss_first", "loss_last", "mean_abs_residual").rename(
        {"delta_loss": "ΔL", "lca": "ΣLCA", "frac_grounded": "grounded", "max_abs_residual": "max|resid|",
         "mean_splits": "splits(mean)", "max_splits": "splits(max)", "n_not_finite": "not finite"})
    con.print(_table(g, "Groundedness per loss: Σ LCA must equal the loss change"))
    for line in advice(grounded, fr):
        con.print("  [yellow]not grounded[/yellow] " + line)
    counted = fr.meta.get("per_param") or list(helped["loss"])
    rest = helped.filter(~pl.col("loss").is_in(counted)).height
    helped = helped.filter(pl.col("loss").is_in(counted))
    title = "Share of parameter-steps with negative LCA (steps that moved the parameters)"
    if rest:
        title += f"; {rest} losses without per-parameter counts (--per-param NAME or all adds them)"
    con.print(_table(helped, title))
    stats = analysis.lca_stats(fr, main).drop("loss").transpose(include_header=True, header_name="statistic",
                                                                 column_names=["value"])
    pct = {"frac_params_helped_in_total", "share_top1pct", "share_top10pct"}
    stats = stats.with_columns(pl.struct("statistic", "value").map_elements(
        lambda r: _pct(r["value"]) if r["statistic"] in pct else _fmt(r["value"]), return_dtype=pl.String
    ).alias("value"))
    con.print(_table(stats, f"Per-parameter total LCA, distribution ({main})"))
    con.print(_table(analysis.param_help_histogram(fr, main, bins=10),
                     f"Fraction of steps each parameter helped ({main}): no hero parameters"))
    lt = analysis.layer_totals(fr).filter(pl.col("loss") == main).drop("loss")
    con.print(_table(lt, f"Per-layer LCA ({main}; negative = helped)"))
    hurt = analysis.hurting_layers(fr, main)
    if len(hurt):
        con.print(_table(hurt.drop("loss"), f"Layers that hurt {main} overall"))
    con.print(_table(analysis.peak_moments(fr).filter(pl.col("loss") == main).drop("loss"),
                     f"Peak moment of learning per layer ({main})"))
    if len(fr.tensors.select("tensor").unique().collect()) > 1 and fr.meta["n_steps"] > 5:
        con.print(_table(analysis.synchronization(fr, main, permutations=200),
                         f"Are layers' learning peaks synchronized? ({main}, circular-shift permutation test)"))
    if "val" in losses and "train" in losses:
        con.print(_table(analysis.train_vs_val(fr),
                         "Train vs validation LCA per layer (overfit = helped train, hurt val)"))
    con.print(_table(analysis.prune_candidates(fr, main), f"Prune/freeze candidates ({main})"))
    print_examples(fr, con, main)


def print_examples(fr: Frames, con: Console, main: str) -> None:
    """With per-example LCA: the examples each layer helped and hurt most, forgetting, the batches behind jumps."""
    per = fr.meta.get("config", {}).get("per_example") or []
    if not per or fr.examples is None:
        return
    loss = per[0]
    es = fr.example_steps.filter(pl.col("loss") == loss)
    g = es.select(pl.col("grounded").mean(), pl.col("residual").abs().max(), pl.col("splits").max()).collect().row(0)
    con.print(f"per-example LCA of {loss!r}: {g[0]:.0%} of example-steps grounded, max |residual| {g[1]:.1e}, "
              f"up to {g[2]} sub-intervals")
    con.print(_table(analysis.example_extremes(fr, loss, top=3),
                     f"Examples of {loss!r} each tensor helped and hurt most (Σ LCA over steps)"))
    if main != loss:
        f = analysis.forgetting_events(fr, loss, train=main)
        con.print(f"{len(f)} forgetting events: a step lowered {main!r} but raised an example of {loss!r}"
                  + (f"; largest: step {f['step'][0]}, example {f['example'][0]}, +{f['delta_loss'][0]:.3g}"
                     if len(f) else ""))
    try:
        from replay.store import open_run

        batches = open_run(fr.meta["run"]).batches
    except ReplayError:
        return
    if len(batches):
        con.print(_table(analysis.batches_behind(fr, batches, loss, top=3).with_columns(
            pl.col("examples").list.len().alias("batch size"), pl.col("examples").list.head(6)),
            f"The training batches behind the largest changes of {loss!r}"))
