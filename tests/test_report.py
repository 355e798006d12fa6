"""`replay report`: one self-contained HTML file, opened in a real headless Chromium (Debian's `chromium`):
every figure loads, no console error, and the screenshot is a page, not a blank; readable from 6 to 600
tensors."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import replay
from replay.cli import app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_lca(tmp_path_factory):
    from replay.digits import digits, digits_mlp, train_digits

    d = tmp_path_factory.mktemp("report")
    train_digits(digits_mlp(), str(d / "run"), epochs=1, batch=128)
    replay.compute(d / "run", ["train", "val"], per_class=["train"], task=digits(), out=d / "lca", steps=(0, 8))
    return d / "lca"


def browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs chromium (.ci/run): the report must be opened in a real browser there")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_report_is_one_self_contained_file(demo_lca, tmp_path):
    out = tmp_path / "report.html"
    res = CliRunner().invoke(app, ["report", str(demo_lca), "-o", str(out)])
    assert res.exit_code == 0 and "self-contained" in res.output, res.output
    doc = out.read_text()
    srcs = re.findall(r'src="([^"]*)"', doc)
    assert len(srcs) >= 5 and all(s.startswith("data:image/png;base64,") for s in srcs), srcs[:3]
    assert "<script" not in doc and "http://" not in doc and "https://" not in doc and "<link" not in doc
    for fact in ("grounded step-losses", "gradient evaluations", "Groundedness per loss", "train/class=3"):
        assert fact in doc, fact
    res = CliRunner().invoke(app, ["report", str(demo_lca), "-o", str(tmp_path / "no" / "such" / "r.html")])
    assert res.exit_code == 1 and res.output.startswith("error: ") and "cannot write the report" in res.output


def test_the_report_in_a_real_browser(demo_lca, tmp_path):
    out = tmp_path / "report.html"
    assert CliRunner().invoke(app, ["report", str(demo_lca), "-o", str(out)]).exit_code == 0
    n = out.read_text().count("<img ")
    probe = tmp_path / "probe.html"  # the test's own check, appended to a copy: the report has no script
    probe.write_text(out.read_text() + "<script>window.onerror = () => { document.title = 'JS-ERROR'; };"
                     "document.title = Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
                     " ? 'IMAGES-OK ' + document.images.length : 'IMAGES-BAD';</script>")
    p = browser(tmp_path, "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom",
                probe.as_uri())
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"<title>IMAGES-OK {n}</title>" in p.stdout, re.findall(r"<title>.*?</title>", p.stdout)
    console = [ln for ln in p.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    shot = tmp_path / "shot.png"
    p = browser(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", out.as_uri())
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    import matplotlib.image

    px = matplotlib.image.imread(shot)[..., :3]
    assert px.shape[:2] == (2400, 1200)
    assert px.std() > 0.05 and (px < 0.5).mean() > 0.01, "the screenshot is blank"


def test_the_report_of_600_tensors_stays_readable(tmp_path):
    class Many(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.p = nn.ParameterList([nn.Parameter(torch.randn(2)) for _ in range(600)])

        def forward(self, x):
            return torch.stack([x @ p for p in self.p], 1)

    model = Many()
    x, y = torch.randn(16, 2), torch.randint(0, 600, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for _ in range(4):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    fr = replay.compute(tmp_path / "run", ["train"], task=replay.Task(Many(), {"train": (x, y)}), out=tmp_path / "lca")
    from replay.html_report import write_report

    doc = write_report(fr, tmp_path / "r.html").read_text()
    assert doc.count("<img ") >= 5
    assert (tmp_path / "r.html").stat().st_size < 5e6, "figures bounded whatever the tensor count"
