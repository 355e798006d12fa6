"""The public surface is the contract of DESIGN.md: these names, nothing accidental."""

import replay


def test_public_names():
    assert sorted(replay.__all__) == ["Frames", "Recorder", "ReplayError", "Run", "Task", "compute", "load",
                                      "losses", "open_run"]
    for name in replay.__all__:
        assert getattr(replay, name) is not None


def test_cli_verbs():
    from typer.testing import CliRunner

    from replay.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    for verb in ("demo", "compute", "summary", "info", "verify", "export"):
        assert verb in out
