"""tools/paper.py: the paper's setups train, record and replay (on FakeData: no download here)."""

import subprocess
import sys
from pathlib import Path

import pytest

import replay

TOOLS = Path(__file__).parents[1] / "tools"


@pytest.mark.parametrize("setup", ["mnist-fc", "cifar-resnet20"])
def test_paper_setup_records_and_replays(tmp_path, monkeypatch, setup):
    pytest.importorskip("torchvision")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, str(TOOLS / "paper.py"), "train", setup, "--fake", "--out", str(out),
                        "--train-examples", "256", "--batch", "128", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    monkeypatch.syspath_prepend(str(TOOLS))
    monkeypatch.setenv("REPLAY_FAKE_DATA", "1")
    monkeypatch.setenv("REPLAY_EVAL_EXAMPLES", "256")
    fr = replay.compute(out, ["train"], tol=1e-3, task=replay.open_run(out).task)  # ours: trusted
    assert fr.meta["n_steps"] == 2
    assert fr.steps.collect()["residual"].abs().max() < 1e-3
