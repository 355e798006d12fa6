"""Your own runs replay without --task; a copied or edited one still needs it, in one line that says why."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import replay
from replay.store.manifest import Manifest

TESTS = Path(__file__).parent


def record(path: Path) -> None:
    task = __import__("trust_tasks").linear()
    model, (x, y) = task.model, task.data["train"]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with replay.Recorder(model, path, optimizer=opt, task="trust_tasks:linear"):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def compute(run: Path, out: Path, key_dir: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    if key_dir is not None:
        env["REPLAY_TRUST_DIR"] = key_dir
    return subprocess.run([sys.executable, "-m", "replay", "compute", str(run), "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=out.parent)


def test_own_run_replays_without_task(tmp_path):
    record(tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    assert m.task == "trust_tasks:linear" and len(m.task_signature) == 64
    key = Path(os.environ["REPLAY_TRUST_DIR"]) / "trust.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, "the key is the user's alone"
    p = compute(tmp_path / "run", tmp_path / "lca")
    assert p.returncode == 0, p.stderr
    assert replay.load(tmp_path / "lca").steps.collect().height == 3


def test_a_run_from_another_users_key_needs_task(tmp_path):
    record(tmp_path / "run")
    other = tmp_path / "other-user"
    p = compute(tmp_path / "run", tmp_path / "lca", key_dir=str(other))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr
    assert "task signature does not verify with your key (recorded by another user or machine" in lines[0]
    assert "pass --task trust_tasks:linear" in lines[0]
    assert not (other / "trust.key").exists(), "verifying makes no key"


def test_an_edited_task_string_resealed_needs_task(tmp_path):
    record(tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    m.task = "trust_tasks:other"  # the signature is of the recorded task; the manifest's seal is remade
    m.write(tmp_path / "run")
    p = compute(tmp_path / "run", tmp_path / "lca")
    assert p.returncode == 1 and "does not verify with your key" in p.stderr, p.stderr
    assert "AssertionError" not in p.stderr, "the edited task was called"


def test_a_signature_copied_into_another_run_does_not_verify(tmp_path):
    record(tmp_path / "a")
    record(tmp_path / "b")
    sig = Manifest.read(tmp_path / "a").task_signature
    m = Manifest.read(tmp_path / "b")
    assert m.task_signature != sig, "the signature binds the run's id"
    m.task_signature = sig
    m.write(tmp_path / "b")
    p = compute(tmp_path / "b", tmp_path / "lca")
    assert p.returncode == 1 and "does not verify" in p.stderr, p.stderr
