"""The training batch of every step (Recorder.log_batch): round trips, crashes, damage."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import mlp
from torch import nn
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.errors import ChunkDamaged

TESTS = Path(__file__).parent


def train_logging(path, steps=30, micro=2, every=1, **kw):
    """SGD with `micro` micro-batches per update, each logged; returns {update: ids}."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    logged = {}
    with replay.Recorder(model, path, optimizer=opt, every=every, **kw) as rec:
        for step in range(steps):
            opt.zero_grad()
            for _ in range(micro):
                ids = torch.randint(0, 10_000, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
                rec.log_batch(ids)
                logged.setdefault(step, []).extend(ids.tolist())
                out = model(torch.randn(len(ids), 8, generator=g))
                nn.functional.mse_loss(out, torch.zeros(len(ids), 3)).backward()
            opt.step()
    return logged


@pytest.mark.parametrize("every", [1, 3])
def test_log_batch_round_trips_exactly(tmp_path, every, recorder_mode):
    logged = train_logging(tmp_path / "run", every=every, chunk_bytes=3000)
    run = replay.open_run(tmp_path / "run")
    assert len(list((tmp_path / "run").glob("batches-*"))) > 1, "batches are flushed with the chunks"
    b = run.batches
    assert b.columns == ["step", "example"] and b["step"].to_list() == sorted(b["step"].to_list())
    got = {t: g["example"].to_list() for (t,), g in b.group_by("step", maintain_order=True)}
    assert got == logged, "every micro-batch's ids, in order, under the update they preceded"
    assert run.verify() == []
    res = CliRunner().invoke(app, ["info", str(tmp_path / "run")])
    assert "30 steps logged" in res.output


def test_log_batch_refuses_what_is_not_ids(tmp_path):
    with replay.Recorder(mlp(), tmp_path / "run") as rec:
        with pytest.raises(TypeError, match="integer example ids"):
            rec.log_batch(torch.randn(3))
        with pytest.raises(TypeError, match="integer example ids"):
            rec.log_batch([[1, 2]])


KILLED = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from conftest import mlp
import replay
model = mlp()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
rec = replay.Recorder(model, {run!r}, optimizer=opt, chunk_bytes=4000)
for i in range(40):
    rec.log_batch([10 * i, 10 * i + 1])
    opt.zero_grad()
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    if i == 33:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_crash_keeps_the_batches_of_every_flushed_step(tmp_path):
    code = KILLED.format(tests=str(TESTS), run=str(tmp_path / "run"))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9, p.stderr
    run = replay.open_run(tmp_path / "run")
    last = run.steps[-1]
    assert 8 <= last < 34
    b = run.batches
    flushed = b.filter(b["step"] < last)
    assert flushed["step"].unique().sort().to_list() == list(range(last)), "every update up to the last state"
    for t in range(last):
        assert flushed.filter(flushed["step"] == t)["example"].to_list() == [10 * t, 10 * t + 1]


def test_a_damaged_batches_file_is_named(tmp_path):
    train_logging(tmp_path / "run", chunk_bytes=3000)
    victim = sorted((tmp_path / "run").glob("batches-*"))[1]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 1
    victim.write_bytes(bytes(data))
    run = replay.open_run(tmp_path / "run")
    with pytest.raises(ChunkDamaged, match=victim.name):
        _ = run.batches
    assert any(victim.name in p for p in run.verify())
    assert len(run.state(5)) == 4, "the states are unaffected"


def test_lightning_logs_the_ids_of_dict_batches(tmp_path):
    lightning = pytest.importorskip("lightning")
    from replay.digits import digits_mlp, load_digits_tensors
    from replay.lightning import ReplayCallback

    x, y = load_digits_tensors()["train"]

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 256

        def __getitem__(self, i):
            return {"x": x[i], "y": y[i], "example_ids": i}

    class Net(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = digits_mlp()

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(Dicts(), batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = lightning.Trainer(max_epochs=1, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ReplayCallback(tmp_path / "run")])
    trainer.fit(Net(), loader)
    b = replay.open_run(tmp_path / "run").batches
    assert b["step"].unique().sort().to_list() == list(range(4))
    assert sorted(b["example"].to_list()) == list(range(256)), "each example once, in the step it was learned"
    assert (b.group_by("step").len()["len"] == 64).all(), "two micro-batches of 32 per optimizer step"
