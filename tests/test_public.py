"""The public surface is the contract of DESIGN.md: these names, these positional arguments, nothing accidental."""

import inspect

import pytest

import replay

PUBLIC = ["Frames", "Recorder", "ReplayError", "Run", "Task", "compute", "load", "losses", "open_run", "register_task"]


def test_public_names():
    assert sorted(replay.__all__) == PUBLIC
    exported = {n for n in dir(replay) if not n.startswith("_")}
    modules = {n for n in exported if inspect.ismodule(getattr(replay, n))}  # subpackages Python binds on import
    assert exported - modules - {"losses"} == set(PUBLIC) - {"losses"}, "a name leaked into the public namespace"


@pytest.mark.parametrize("fn, positional", [
    (replay.Recorder, ["model", "path"]),
    (replay.compute, ["run", "losses", "per_class"]),
    (replay.load, ["path"]),
    (replay.open_run, ["path"]),
    (replay.Run.export, ["self", "t", "path"]),
    (replay.Run.state, ["self", "t"]),
], ids=["Recorder", "compute", "load", "open_run", "export", "state"])
def test_options_are_keyword_only(fn, positional):
    """Later options are keyword-only (safetensors' rule): they can be added and reordered without breaking calls."""
    params = inspect.signature(fn).parameters.values()
    got = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert got == positional, f"{fn.__qualname__}: positional {got}"


def test_cli_verbs():
    from replay.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names >= {"demo", "compute", "summary", "info", "verify", "export", "plot"}
