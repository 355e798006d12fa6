"""The `replay` command: parsing and printing only; the work is done by the library."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from replay.errors import ReplayError, ReplayWarning

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Record a training run, replay it, and see which parameters learned, when, for which loss.")

RunArg = Annotated[Path, typer.Argument(help="run directory written by replay.Recorder")]


@app.callback()
def _setup() -> None:
    """Warnings the user must read (every=k chords, missing states, BN statistics) print as one line."""
    warnings.formatwarning = _one_line_warning


def _fail(err: ReplayError) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)


@app.command()
def info(run: RunArg) -> None:
    """Steps, tensors, bytes on disk and bytes per parameter per step of a run."""
    from replay.store import open_run

    try:
        r = open_run(run)
    except ReplayError as e:
        raise _fail(e) from None
    i = r.info()
    m = r.manifest
    typer.echo(f"run        {r.path}")
    typer.echo(f"steps      {i.steps} recorded (states {i.first}..{i.last}, every {m.every})")
    typer.echo(f"tensors    {len(m.params)} parameters ({i.params:,} values)"
               + (f" + {len(m.buffers)} buffers" if m.buffers else ""))
    zstd = f" ({i.compressed} zstd-compressed)" if i.compressed else ""
    typer.echo(f"chunks     {i.chunks}, {i.bytes_on_disk / 2**20:.2f} MiB on disk{zstd}")
    typer.echo(f"bytes      {i.bytes_per_param_step:.3f} per parameter per step")
    if m.shards is not None:
        how = "its FSDP2 shards" if "pieces" in m.shards else "a byte range"
        sizes = [sum(p.spec.nbytes for p in ps) for ps in getattr(r, "pieces", [])] or [0]
        typer.echo(f"shards     {m.shards['world']} ranks, each recorded {how} of every state "
                   f"({min(sizes) / 2**20:.2f}-{max(sizes) / 2**20:.2f} MiB per rank per state)")
    if m.aliases:
        typer.echo("tied       " + ", ".join(f"{a} = {t}" for a, t in m.aliases.items()) + " (recorded once)")
    if m.frozen:
        typer.echo(f"frozen     {len(m.frozen)} parameter(s) not recorded (requires_grad=False): "
                   + ", ".join(m.frozen[:5]) + (", ..." if len(m.frozen) > 5 else ""))
    try:
        b = r.batches
        typer.echo("batches    " + (f"{b['step'].n_unique()} steps logged ({len(b):,} example ids)" if len(b)
                                    else "none (Recorder.log_batch)"))
    except ReplayError as e:
        typer.echo(f"batches    damaged: {e}")
    typer.echo(f"task       {m.task or '(none: pass --task to compute)'}")
    typer.echo(f"torch      {m.torch_version}")
    typer.echo(f"run id     {m.run_id or '(format 1: none)'}")
    if not i.steps:
        typer.echo(f"warning    nothing was recorded (no chunk); run `replay verify {run}`")
    if i.orphans:
        typer.echo(f"warning    {len(i.orphans)} chunk(s) after a gap are ignored; run `replay verify {run}`")
    if i.leftovers:
        typer.echo(f"note       {len(i.leftovers)} temp file(s) of an interrupted write are ignored: "
                   + ", ".join(i.leftovers[:3]))


@app.command()
def verify(path: Annotated[Path, typer.Argument(help="a run directory, or an lca dir written by replay compute")]
           ) -> None:
    """Check every chunk of a run (or every part of an lca dir) against its checksum; exit 1 on damage."""
    from replay.lcadir import META, PROGRESS_RE
    from replay.lcadir import verify as verify_lca
    from replay.store import open_run

    if path.is_dir() and not (path / "manifest.json").exists() and (
            (path / META).exists() or any(PROGRESS_RE.fullmatch(p.name) for p in path.iterdir())):
        problems = verify_lca(path)
        for p in problems:
            typer.echo(f"damaged: {p}", err=True)
        if problems:
            raise typer.Exit(1)
        typer.echo(f"ok: {path} (an lca dir): every part matches its record")
        return
    try:
        r = open_run(path)
        problems = r.verify()
    except ReplayError as e:
        raise _fail(e) from None
    for p in problems:
        typer.echo(f"damaged: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(r.chunks)} chunks, {len(r.steps)} states, all checksums match")
    if r.live:
        typer.echo("note: a Recorder is writing this run now: its newest states are not in a chunk yet"
                   + (f" ({', '.join(r.leftovers[:3])} is being written)" if r.leftovers else ""))
    elif r.leftovers:
        typer.echo(f"note: {len(r.leftovers)} temp file(s) of an interrupted write are ignored "
                   f"(safe to delete): {', '.join(r.leftovers[:3])}")


@app.command()
def export(run: RunArg, out: Annotated[Path, typer.Argument(help="the .safetensors file to write")],
           step: Annotated[int, typer.Option(help="the recorded state to export")],
           force: Annotated[bool, typer.Option("--force", help="replace OUT if it exists")] = False,
           base: Annotated[str | None, typer.Option(
               help="module:function of a task whose model holds the frozen weights (checked against the run): "
                    "adds them, so the file loads with strict=True")] = None) -> None:
    """One recorded state as a plain safetensors file, keyed by the model's parameter names (bit-exact)."""
    from replay.store import open_run
    from replay.task import load_task

    try:
        model = load_task(base).model if base else None
        n = open_run(run).export(step, out, overwrite=force, base=model)
    except ReplayError as e:
        raise _fail(e) from None
    typer.echo(f"wrote {out}: state {step}, {n} tensors")


def _kept(out: Path) -> str:
    """What an interrupted compute left in `out`, and how to go on: one line."""
    from replay.lcadir import read_sealed

    try:
        p = read_sealed(out / "progress.json")
        done, nxt = int(p.get("steps_done") or 0), p.get("next_step")
    except (ReplayError, OSError, ValueError, TypeError):
        return (f"nothing readable was kept in {out} for this process (under torchrun each rank keeps its own "
                f"progress); run the same command again to resume")
    if not done or nxt is None:
        return f"no step was flushed to {out} yet; run the same command again to start over"
    return (f"{done} step(s) kept in {out} (computed up to state {nxt}); run the same command again to resume "
            f"from there, or add --restart to start over")


def _parse_tokens(specs: list[str] | None) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for spec in specs or []:
        name, _, rest = spec.rpartition(":")
        set_name, _, example = name.rpartition(":")
        if not (set_name and example.isdigit() and rest.isdigit()):
            raise typer.BadParameter(f"{spec!r}: expected SET:EXAMPLE:POSITION, e.g. val:3:17",
                                     param_hint="--token-tensors")
        out.setdefault(set_name, []).append((int(example), int(rest)))
    return out


def _parse_steps(spec: str | None) -> tuple[int | None, int | None] | None:
    if spec is None:
        return None
    a, sep, b = spec.partition(":")
    try:
        if not sep:
            raise ValueError
        return (int(a) if a else None, int(b) if b else None)
    except ValueError:
        raise ReplayError(f"--steps {spec!r}: expected A:B (either may be empty), e.g. 0:1000") from None


@app.command()
def compute(
    run: RunArg,
    task: Annotated[str | None, typer.Option(help="module:function returning replay.Task (default: the run's)")] = None,
    loss: Annotated[list[str] | None, typer.Option(help="data set to allocate (repeat; default: all)")] = None,
    per_class: Annotated[list[str] | None, typer.Option(help="also each class of this data set (repeat)")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    tol: Annotated[float, typer.Option(help="grounded when |residual| <= tol + rtol*|delta_loss|")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="relative part of the tolerance")] = 0.0,
    max_splits: Annotated[int, typer.Option(help="most Simpson sub-intervals per step (power of 2)")] = 32,
    first_order: Annotated[bool, typer.Option("--first-order", help="plain g(θ_t)·Δθ, no Simpson")] = False,
    steps: Annotated[str | None, typer.Option(help="steps A:B to compute (A <= step < B)")] = None,
    out: Annotated[Path | None, typer.Option(help="lca dir to write (default: RUN/lca)")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="also write per-parameter per-step LCA")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
    per_example: Annotated[list[str] | None, typer.Option(
        help="also each example's own LCA, per step and tensor, for this data set (repeat)")] = None,
    per_token: Annotated[list[str] | None, typer.Option(
        help="causal LMs: also each token's own LCA (Σ over tensors) per step, for this data set (repeat)")] = None,
    token_tensors: Annotated[list[str] | None, typer.Option(
        help="causal LMs: also the LCA per tensor of one token, as SET:EXAMPLE:POSITION (repeat)")] = None,
    per_param: Annotated[list[str] | None, typer.Option(
        help="losses that get per-parameter totals and helped counts (repeat; 'all'; default: the data-set "
             "losses, not classes or groups)")] = None,
    precision: Annotated[str, typer.Option(help="float32: evaluate 16-bit models in float32 (exact for their "
                                                "values); model: in their own dtype")] = "float32",
    data_parallel: Annotated[bool, typer.Option(
        "--data-parallel", help="under torchrun: every process takes a shard of the data of every step "
                                "(default: a block of steps each)")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="replace what the lca dir holds (another or an "
                                                              "unfinished compute) instead of resuming")] = False,
    constants: Annotated[str, typer.Option(help="check: refuse a task whose frozen weights or buffers differ "
                                                "from training's; warn: say so and replay anyway")] = "check",
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="a run with a lost chunk: compute the "
                                                "steps before the gap (default: refuse)")] = False,
    follow: Annotated[bool, typer.Option("--follow", help="keep up with a run being recorded: compute its steps "
                                         "as they arrive, until its Recorder closes it (Ctrl-C: resumable)")] = False,
) -> None:
    """Replay RUN and allocate each step's loss change to every parameter (writes polars frames).

    Under `torchrun --nproc-per-node N -m replay compute RUN ...` the N processes share the work.
    """
    from replay.engine import compute as run_compute

    if follow:
        from replay.engine.follow import follow as run_compute  # noqa: F811 - the same options, as the run grows
    try:
        fr = run_compute(run, loss, per_class, task=task, device=device, tol=tol, rtol=rtol, max_splits=max_splits,
                         first_order=first_order, steps=_parse_steps(steps), out=out, dense=dense, progress=progress,
                         data_parallel=data_parallel, per_example=per_example, restart=restart,
                         constants=constants, per_token=per_token, per_param=per_param, precision=precision,
                         token_tensors=_parse_tokens(token_tensors), allow_missing=allow_missing)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {_kept(out or Path(run) / 'lca')}", err=True)
        raise typer.Exit(130) from None
    except ReplayError as e:
        raise _fail(e) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports for all
        return
    from replay.analysis import residual_summary

    s = residual_summary(fr.steps)
    typer.echo(f"computed {s['steps']} steps x {len(fr.meta['losses'])} losses "
               f"({fr.meta['grad_evals']} gradient evaluations) -> {fr.path}")
    bad = f"; {s['not_finite']} of {s['rows']} residuals are not finite (a loss was NaN or inf)" \
        if s["not_finite"] else ""
    typer.echo(f"grounded {s['grounded']:.1%} of step-losses, max |residual| {s['max_residual']:.2e}{bad}")
    if fr.meta.get("missing_states"):
        first, last = fr.meta["missing_states"]
        typer.echo(f"incomplete: states {first}..{last} of the run are missing (a chunk is lost): these frames stop "
                   f"before the gap; run `replay verify {run}`")
    typer.echo(f"next: replay summary {fr.path}   or in Python: replay.load({str(fr.path)!r})")


LcaArg = Annotated[Path, typer.Argument(help="lca dir written by replay compute")]


@app.command()
def summary(lca: LcaArg) -> None:
    """The LCA paper's analyses of an lca dir, as tables (headline numbers first)."""
    from replay.frames import load
    from replay.report import print_summary

    try:
        print_summary(load(lca))
    except ReplayError as e:
        raise _fail(e) from None


@app.command()
def plot(lca: LcaArg,
         out: Annotated[Path | None, typer.Option(help="folder for the PNG files (default: LCA_DIR/plots)")] = None,
         loss: Annotated[str | None, typer.Option(help="loss to plot (default: train)")] = None) -> None:
    """PNG figures: LCA histogram, % helped over time, per-layer totals and trajectories, ..."""
    from replay.frames import load
    from replay.plot import plot_all

    try:
        files = plot_all(load(lca), out or lca / "plots", loss)
    except ReplayError as e:
        raise _fail(e) from None
    for f in files:
        typer.echo(f"wrote {f}")


@app.command()
def report(lca: LcaArg,
           output: Annotated[Path, typer.Option("-o", "--output", help="the .html file to write")
                             ] = Path("report.html"),
           loss: Annotated[str | None, typer.Option(help="the loss of the figures (default: train)")] = None) -> None:
    """One self-contained HTML file to share: figures inline, the summary's tables, the run's facts."""
    from replay.frames import load
    from replay.html_report import write_report

    try:
        path = write_report(load(lca), output, loss)
    except ReplayError as e:
        raise _fail(e) from None
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, self-contained)")


@app.command()
def demo(out: Annotated[Path, typer.Option(help="where to write the run and its lca dir")] = Path("replay-demo"),
         epochs: Annotated[int, typer.Option(help="training epochs over digits (44 steps each)")] = 2) -> None:
    """Train a small net on scikit-learn's digits with recording, compute LCA, summarize."""
    from replay.demo import run_demo
    from replay.report import print_summary

    if out.exists() and not out.is_dir():
        raise _fail(ReplayError(f"--out {out}: is a file; pass a directory for the demo's run and frames"))
    try:
        fr = run_demo(out, epochs=epochs)
    except ReplayError as e:
        raise _fail(e) from None
    print_summary(fr)
    typer.echo(f"""
explore further:
  replay info {out}/run
  replay summary {out}/lca
  replay plot {out}/lca
  python -c "import replay, polars as pl; f = replay.load('{out}/lca'); \\
             print(f.tensors.group_by('loss', 'tensor').agg(pl.col('lca').sum()).collect())"
  replay compute {out}/run --loss val --per-class val --out {out}/lca-val""")


_default_format = warnings.formatwarning


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    if not issubclass(category, ReplayWarning):
        return _default_format(message, category, *args, **kwargs)
    return f"warning: {message}\n"


def main() -> None:
    """Console entry point: user errors print one line and exit 1, never a traceback."""
    warnings.formatwarning = _one_line_warning
    try:
        app()
    except ReplayError as e:  # raised inside a command that did not catch it itself
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
