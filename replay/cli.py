"""The `replay` command: parsing and printing only; the work is done by the library."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from replay.errors import ReplayError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Record a training run, replay it, and see which parameters learned, when, for which loss.")

RunArg = Annotated[Path, typer.Argument(help="run directory written by replay.Recorder")]


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
    typer.echo(f"chunks     {i.chunks}, {i.bytes_on_disk / 2**20:.2f} MiB on disk")
    typer.echo(f"bytes      {i.bytes_per_param_step:.3f} per parameter per step")
    typer.echo(f"task       {m.task or '(none: pass --task to compute)'}")
    typer.echo(f"torch      {m.torch_version}")
    if i.orphans:
        typer.echo(f"warning    {len(i.orphans)} chunk(s) after a gap are ignored; run `replay verify {run}`")


@app.command()
def verify(run: RunArg) -> None:
    """Check every chunk (size, header, checksum); exit 1 if any is damaged."""
    from replay.store import open_run

    try:
        r = open_run(run)
        problems = r.verify()
    except ReplayError as e:
        raise _fail(e) from None
    for p in problems:
        typer.echo(f"damaged: {p}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(r.chunks)} chunks, {len(r.steps)} states, all checksums match")


def main() -> None:
    """Console entry point: user errors print one line and exit 1, never a traceback."""
    try:
        app()
    except ReplayError as e:  # raised inside a command that did not catch it itself
        typer.echo(f"error: {e}", err=True)
        sys.exit(1)
