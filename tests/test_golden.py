"""Golden bytes: tiny runs of every format and an lca dir, checked in (tests/golden, written by
tools/make_golden.py), read bit for bit; and the current writer's bytes against them, so that a change of a
format is a visible change of these tests and files, never a silent one.

    v2          a whole-state run written by the format-2 release (before shards)
    v3-xor      the current writer, whole states, per-tensor keys
    v3-flat     2,000 scalar tensors: the xor-flat encoding
    v3-zstd     Recorder(compress=True)
    v3-sharded  a 2-process torchrun, each rank its half of every state (format 3)
    lca         replay compute of v3-xor (tasks:golden, --per-example train)
"""

import json
import os
import runpy
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

import replay
from replay.cli import app

GOLDEN = Path(__file__).parent / "golden"
EXPECTED = json.loads((GOLDEN / "expected.json").read_text())
MAKE = Path(__file__).parent.parent / "tools" / "make_golden.py"


def header(path: Path) -> tuple[dict, bytes]:
    """(safetensors header, data section) of a chunk, with what is particular to one recording masked."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    meta = head["__metadata__"]
    meta["run"] = meta["xxh3"] = "*"
    return head, raw[8 + n:]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_golden_run_reads_back_bit_exact(name):
    run = replay.open_run(GOLDEN / name)
    want = EXPECTED[name]["states"]
    assert run.steps == [int(t) for t in sorted(want, key=int)]
    assert run.verify() == []
    for t, state in run.states():
        got = {n: v.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes().hex() for n, v in state.items()}
        assert got == want[str(t)], f"{name}: state {t} differs from the golden bytes"
    fmt = json.loads((GOLDEN / name / "manifest.json").read_text())["format"]
    assert fmt == ("replay-run/3" if name == "v3-sharded" else "replay-run/2")
    encodings = {header(c.path)[0]["__metadata__"]["encoding"] for c in run.chunks} if name != "v3-sharded" else None
    assert encodings in ({{"v3-flat": "xor-flat", "v3-zstd": "xor-planes-zstd"}.get(name, "xor")}, None)
    assert (run.info().compressed == len(run.chunks)) == (name == "v3-zstd")


@pytest.mark.parametrize("kind", ["xor", "flat", "zstd"])
def test_the_writer_writes_the_golden_bytes(tmp_path, kind):
    """The golden run's states recorded now: the same chunk files, headers (but the run id and checksum) and data.
    (The states are given, not trained again: a training's last bits depend on the CPU's matmul kernels.)"""
    if kind == "zstd":
        pytest.importorskip("zstandard")
    script = tmp_path / "record.py"
    script.write_text(runpy.run_path(str(MAKE))["RECORD"])
    states = tmp_path / "states.json"
    states.write_text(json.dumps(EXPECTED[f"v3-{kind}"]["states"]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), kind, str(tmp_path / "run"), str(states)], check=True, env=env,
                   timeout=120)
    gold = GOLDEN / f"v3-{kind}"
    names = sorted(p.name for p in gold.glob("chunk-*"))
    assert sorted(p.name for p in (tmp_path / "run").glob("chunk-*")) == names
    for n in names:
        (h_new, d_new), (h_old, d_old) = header(tmp_path / "run" / n), header(gold / n)
        assert h_new == h_old, f"{kind}: {n}: the chunk header changed"
        if kind != "zstd":  # (zstd's bytes are the zstandard library's to choose)
            assert d_new == d_old, f"{kind}: {n}: the data section changed"
    m_new = json.loads((tmp_path / "run" / "manifest.json").read_text())
    m_old = json.loads((gold / "manifest.json").read_text())
    for m in (m_new, m_old):
        for k in ("run_id", "task_signature", "created", "xxh3", "host", "torch", "replay", "python"):
            m.pop(k, None)
    assert m_new.keys() == m_old.keys() and m_new["tensors"] == m_old["tensors"]


def test_the_golden_lca_dir_loads_and_a_compute_now_gives_its_frames(tmp_path):
    lca = tmp_path / "lca"
    shutil.copytree(GOLDEN / "lca", lca)
    assert CliRunner().invoke(app, ["verify", str(lca)]).exit_code == 0
    gold = replay.load(lca)
    assert set(gold.meta["losses"]) == {"train"}
    run = tmp_path / "run"
    shutil.copytree(GOLDEN / "v3-xor", run)
    now = replay.compute(run, ["train"], task="tasks:golden", per_example=["train"], out=tmp_path / "now")
    for name, keys in (("steps", ["step", "loss"]), ("tensors", ["step", "loss", "tensor"]),
                       ("params", ["loss", "tensor", "index"]), ("examples", ["step", "loss", "example", "tensor"]),
                       ("example_steps", ["step", "loss", "example"])):
        a, b = (getattr(f, name).collect().sort(keys) for f in (gold, now))
        assert a.columns == b.columns, f"{name}: columns changed"
        floats = [c for c, t in a.schema.items() if t == pl.Float64]
        assert_frame_equal(a.drop(floats), b.drop(floats), check_exact=True)
        # the golden numbers were computed by an earlier release: loss values as float32 batch sums (float64 sums
        # of the examples' losses now) and the per-example points one evaluation each (one pass per round now),
        # so they agree to float32 rounding: loss values to 1e-6 of the loss, allocations to 1e-6 of the largest
        # |lca| (the promise for a change of method); integers, keys and flags exactly
        def top(col, a=a):
            return max(float(a[col].abs().max() or 0.0), 1e-30) if col in a.columns else 1e-30

        for c in floats:
            diff = (a[c] - b[c]).abs().max() or 0.0
            loss_scale = top("loss_before") if "loss_before" in a.columns else top("lca")
            scale = loss_scale if c in ("loss_before", "loss_after", "delta_loss", "residual") else top("lca")
            assert diff <= 1e-6 * scale, f"{name}.{c}: max_diff {diff:.2e} against {scale:.2e}"
