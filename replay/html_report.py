"""`replay report`: one self-contained HTML file to share (figures inline, the summary's tables, the run's facts).

Everything is in the one file: the figures of `replay plot` as base64 PNGs, the tables of `replay summary`
(rich's own HTML export, styles inline), and the facts a reader needs to trust the numbers (steps,
losses, evaluations, how many step-losses were grounded, the notes of `meta.json`). No script, no
external resource: it opens from a mail attachment or a shared drive.
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from pathlib import Path

import polars as pl

from replay import analysis
from replay.errors import ReplayError
from replay.frames import Frames
from replay.store.atomic import write_atomic

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em}table.facts td{padding:2px 12px 2px 0}
figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}
figcaption{color:#555;font-size:.9em}.bad{color:#b00}pre,.wide{overflow-x:auto}
table{border-collapse:collapse}th,td{padding:1px 8px;text-align:right}th{border-bottom:1px solid #999}"""

CAPTIONS = {
    "layer_trajectories": "Cumulative LCA per layer over training (negative = the layer lowered the loss).",
    "layer_totals": "Total LCA per layer, and per parameter.",
    "peak_moments": "When each layer learned: per-step LCA, each layer on its own scale.",
    "percent_helped": "Share of parameters whose LCA was negative, per step.",
    "lca_histogram": "Distribution of the per-parameter total LCA.",
    "train_vs_val": "Per-parameter LCA on train against val: lower right helped train and hurt val.",
}


def _facts(fr: Frames, s: pl.DataFrame) -> list[tuple[str, str]]:
    m = fr.meta
    grounded = s["grounded"].mean() if len(s) else 1.0
    cfg = m.get("config", {})
    facts = [("lca dir", str(fr.path)), ("run", str(m.get("run", "?"))),
             ("steps", f"{m.get('n_steps', '?')} ({m.get('n_unchanged', 0)} unchanged)"),
             ("losses", ", ".join(m["losses"][:12]) + (f", … ({len(m['losses'])} in all)" if len(m["losses"]) > 12
                                                         else "")),
             ("tensors", str(len(m.get("tensors", [])))), ("gradient evaluations", str(m.get("grad_evals", "?"))),
             ("grounded step-losses", f"{grounded:.1%} (tol {cfg.get('tol', '?')}, max |residual| "
                                      f"{s['residual'].abs().max() if len(s) else 0:.2e})")]
    facts += [(k, str(v)) for k, v in m.items() if k.endswith("_note") or k in ("batchnorm_stats", "missing_states")]
    return facts


def _summary_html(fr: Frames) -> str:
    """The tables of `replay summary`, as rich renders them, exported to HTML with inline styles."""
    from rich.console import Console

    from replay.report import print_summary

    con = Console(record=True, width=140, file=io.StringIO())  # rendered once, kept as HTML only
    print_summary(fr, con)
    return con.export_html(inline_styles=True, code_format='<pre style="font-size:12px">{code}</pre>')


def write_report(fr: Frames, out: Path, loss: str | None = None) -> Path:
    """Write the report of `fr` (figures for `loss`: default train, else the first) to `out`; returns it."""
    from replay.plot import plot_all

    out = Path(out)
    with tempfile.TemporaryDirectory() as d:
        figures = [(p.stem, base64.b64encode(p.read_bytes()).decode()) for p in plot_all(fr, Path(d), loss)]
    steps = fr.steps.collect()
    bad = steps.filter(~pl.col("grounded"))
    facts = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _facts(fr, steps))
    g = analysis.groundedness(fr)
    warn = (f'<p class="bad">{len(bad)} step-losses are not grounded: their LCA does not add up to the loss '
            f"change within the tolerance (see the groundedness table).</p>" if len(bad) else "")
    figs = "".join(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                   f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
                   for name, data in figures)
    doc = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>replay report: "
           f"{html.escape(fr.path.name)}</title><style>{CSS}</style></head><body>"
           f"<h1>Loss Change Allocation: {html.escape(str(fr.path))}</h1>"
           f"<table class=\"facts\">{facts}</table>{warn}"
           f"<h2>Groundedness per loss</h2>{_frame(g)}"
           f"<h2>Figures</h2>{figs}<h2>Summary</h2>{_summary_html(fr)}</body></html>")
    try:
        write_atomic(out, doc.encode())
    except OSError as e:
        raise ReplayError(f"{out}: cannot write the report ({e.strerror or e}); pass a writable -o path") from None
    return out


def _frame(df: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>" for r in df.iter_rows())
    return f'<div class="wide"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'


def _cell(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("—" if v is None else str(v))
