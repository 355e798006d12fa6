"""The small things of a researcher's week: the whole --help text at any width, a progress display that
writes plain lines into a log, and an export that says when the file will not load strict."""

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import replay
from replay.cli import app


def words(text: str) -> str:
    """Whitespace as one space, and a word the help wrapped at its hyphen joined again."""
    return re.sub(r"-\s+", "-", re.sub(r"\s+", " ", text)).strip()


@pytest.mark.parametrize("width", [60, 100, 200])
def test_every_option_of_compute_is_described_whole_at_any_width(width):
    import typer.main

    res = CliRunner().invoke(app, ["compute", "--help"], terminal_width=width, env={"COLUMNS": str(width)})
    assert res.exit_code == 0 and "…" not in res.output, res.output
    command = typer.main.get_command(app).commands["compute"]
    for p in command.params:
        if getattr(p, "help", None):
            assert words(p.help) in words(res.output), f"--{p.name}: its help is cut at width {width}"
        if p.param_type_name == "option":
            assert f"--{p.name.replace('_', '-')}" in res.output, p.name


def test_progress_in_a_log_is_plain_lines(tmp_path):
    """Not a terminal (a log file, CI): one line per tenth of the steps, no carriage returns."""
    from replay.digits import digits_mlp, train_digits

    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1, batch=64)  # 22 steps
    res = CliRunner().invoke(app, ["compute", str(tmp_path / "run"), "--loss", "train", "--out",
                                   str(tmp_path / "lca"), "--steps", "0:20"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("replay compute:")]
    assert "\r" not in res.output
    assert [ln.split()[2] for ln in lines] == [f"{k}/20" for k in range(2, 21, 2)], lines
    assert all(re.fullmatch(r"replay compute: \d+/20 steps, [\d.]+ steps/s, ETA [\d,]+ s", ln) for ln in lines)


def test_export_without_the_frozen_base_says_it_will_not_load_strict(tmp_path):
    class Adapter(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.base = nn.Linear(4, 4).requires_grad_(False)
            self.lora = nn.Linear(4, 4, bias=False)

    model = Adapter()
    with replay.Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model.lora.weight.add_(1.0)
        rec.capture()
    with pytest.warns(replay.errors.ReplayWarning, match=r"2 frozen parameter\(s\) were not recorded \('base.weight'"
                                                          r", \.\.\.\).*strict=False.*--base"):
        replay.open_run(tmp_path / "run").export(1, tmp_path / "a.safetensors")
    assert set(load_file(tmp_path / "a.safetensors")) == {"lora.weight"}
    cmd = [sys.executable, "-m", "replay", "export", str(tmp_path / "run"), str(tmp_path / "b.safetensors"),
           "--step", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    said = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 0 and len(said) == 1 and "--base" in said[0] and "strict=False" in said[0], p.stderr
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        replay.open_run(tmp_path / "run").export(1, tmp_path / "c.safetensors", base=Adapter())  # no warning
    Adapter().load_state_dict(load_file(tmp_path / "c.safetensors"), strict=True)
