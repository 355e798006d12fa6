"""Crash safety with real processes and real files: SIGKILL, exit without close, write
failures, damaged and truncated chunks, missing chunks."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_bit_equal, mlp, train_recording
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.errors import ChunkDamaged

TRAIN = """
import os, resource, signal, sys, torch
from torch import nn
import replay
sys.path.insert(0, {tests!r})
from conftest import mlp, params_of
model = mlp()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(1)
rec = replay.Recorder(model, {run!r}, optimizer=opt, chunk_bytes=4000)
torch.save(params_of(model), {ref!r} + "/0.pt")
for i in range(1, 41):
    opt.zero_grad()
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    torch.save(params_of(model), {ref!r} + f"/{{i}}.pt")
    {at_step}
{at_end}
"""


def run_child(tmp_path, at_step="pass", at_end="", prelude=""):
    run, ref = tmp_path / "run", tmp_path / "ref"
    ref.mkdir()
    code = prelude + TRAIN.format(tests=str(__import__("pathlib").Path(__file__).parent), run=str(run),
                                  ref=str(ref), at_step=at_step, at_end=at_end)
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    return p, run, ref


def check_prefix(run_dir, ref_dir):
    run = replay.open_run(run_dir)
    assert run.verify() == []
    for t, state in run.states():
        assert_bit_equal(state, torch.load(ref_dir / f"{t}.pt"), f"state {t}")
    return run


def test_sigkill_leaves_every_completed_chunk_readable(tmp_path):
    p, run_dir, ref = run_child(tmp_path, at_step="if i == 33: os.kill(os.getpid(), signal.SIGKILL)")
    assert p.returncode == -9, p.stderr
    run = check_prefix(run_dir, ref)
    # 4000-byte chunks hold 4 states of this MLP: everything up to the last full chunk survives
    assert 20 <= len(run.steps) <= 33 and run.steps == list(range(len(run.steps)))


def test_interpreter_exit_without_close_flushes(tmp_path):
    p, run_dir, ref = run_child(tmp_path)  # never calls rec.close()
    assert p.returncode == 0, p.stderr
    run = check_prefix(run_dir, ref)
    assert run.steps == list(range(41))


def test_write_failure_is_one_clear_error_and_keeps_written_chunks(tmp_path):
    # at step 20 the states final so far are flushed, then RLIMIT_FSIZE makes the kernel refuse file writes
    # past 4 kB (a full chunk here is ~5.8 kB, a reference file 2.7 kB): a real write error, as a full disk gives
    prelude = "import resource, signal\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    limit = "if i == 20: rec.flush(); resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))"
    p, run_dir, ref = run_child(tmp_path, at_step=limit, at_end="rec.close()", prelude=prelude)
    assert p.returncode == 1, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert "writing the chunk of steps 20..24 failed" in last, last
    assert "already written are intact" in last, last
    run = check_prefix(run_dir, ref)
    assert run.steps == list(range(20)), "every state flushed before the failure, none after it"
    assert not list(run_dir.glob(".*.tmp")), "the failed temp file is removed"


@pytest.fixture
def recorded(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = train_recording(model, opt, {"chunk_bytes": 3000}, tmp_path / "run", steps=15)
    return tmp_path / "run", ref


def test_damaged_chunk_is_named_and_does_not_poison_the_rest(recorded):
    run_dir, ref = recorded
    run = replay.open_run(run_dir)
    victim = run.chunks[1]
    data = bytearray(victim.path.read_bytes())
    data[-5] ^= 0x40  # one flipped bit in the data section
    victim.path.write_bytes(bytes(data))
    run = replay.open_run(run_dir)
    problems = run.verify()
    assert len(problems) == 1 and victim.path.name in problems[0] and "checksum mismatch" in problems[0]
    with pytest.raises(ChunkDamaged, match=victim.path.name):
        run.state(victim.first)
    for c in (run.chunks[0], run.chunks[2]):
        assert_bit_equal(run.state(c.last), ref[c.last])
    res = CliRunner().invoke(app, ["verify", str(run_dir)])
    assert res.exit_code == 1 and victim.path.name in res.output


def test_truncated_chunk_is_detected(recorded):
    run_dir, _ = recorded
    victim = replay.open_run(run_dir).chunks[-1]
    victim.path.write_bytes(victim.path.read_bytes()[:-100])
    run = replay.open_run(run_dir)
    assert any("truncated" in p for p in run.verify())
    with pytest.raises(ChunkDamaged, match="truncated"):
        run.state(victim.last)
    garbage = run.chunks[0].path
    garbage.write_bytes(b"\xff" * 30)
    with pytest.raises(ChunkDamaged, match="length prefix claims a header of .* bytes"):
        replay.open_run(run_dir).state(0)


def test_missing_chunk_gives_contiguous_prefix(recorded):
    run_dir, ref = recorded
    run = replay.open_run(run_dir)
    gone = run.chunks[2]
    gone.path.unlink()
    run = replay.open_run(run_dir)
    assert run.steps == list(range(gone.first))
    assert any("gap" in p for p in run.verify())
    res = CliRunner().invoke(app, ["info", str(run_dir)])
    assert res.exit_code == 0 and "after a gap are ignored" in res.output


def test_cli_info_and_errors(recorded, tmp_path):
    run_dir, _ = recorded
    res = CliRunner().invoke(app, ["info", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "16 recorded (states 0..15, every 1)" in res.output and "per parameter per step" in res.output
    res = CliRunner().invoke(app, ["verify", str(run_dir)])
    assert res.exit_code == 0 and "all checksums match" in res.output
    res = CliRunner().invoke(app, ["info", str(tmp_path / "nope")])
    assert res.exit_code == 1 and res.output.strip() == f"error: {tmp_path / 'nope'}: no such run directory"
    res = CliRunner().invoke(app, ["verify", str(tmp_path)])
    assert res.exit_code == 1 and "not a replay run" in res.output
