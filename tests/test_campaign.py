"""The wider fault campaign: runs and tasks as users and attackers make them. Each case is one line and an exit
code (or a correct result), never a hang, a traceback, code that runs, or memory that follows a claim."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_bit_equal, params_of, tiny_run
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.errors import RecordError, ReplayError, TaskError
from replay.store.manifest import Manifest


def cli(*args, timeout=60):
    """The real command in its own process (a hang is a timeout, a traceback is visible)."""
    return subprocess.run([sys.executable, "-m", "replay", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def one_line(p, *words, code=1):
    """A user error: exit `code`, no traceback, and one line per problem: a single `error:` line, or (verify) one
    `damaged` line per file named."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    out = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()]
    errors = [line for line in out if line.startswith("error")]
    damaged = [line for line in out if line.lstrip().startswith("damaged")]
    assert (len(errors) == 1 and not damaged) or (damaged and not errors), out
    for w in words:
        assert w in p.stderr + p.stdout, (w, p.stderr, p.stdout)


# ---- many small tensors (2) ------------------------------------------------------------------------------

class Scalars(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.p = nn.ParameterList([nn.Parameter(torch.full((), float(i))) for i in range(n)])


def test_many_small_tensors_record_and_read_back_every_state(tmp_path):
    from replay.store.chunk import HEADER_CAP

    model = Scalars(3000)
    ref = {0: params_of(model)}
    with replay.Recorder(model, tmp_path / "run", chunk_bytes=64 << 20) as rec:
        for t in range(1, 301):
            with torch.no_grad():
                for p in model.p[:: 7]:
                    p.add_(0.5)
            rec.capture()
            if t % 50 == 0:
                ref[t] = params_of(model)
    run = replay.open_run(tmp_path / "run")
    assert run.verify() == [] and run.steps == list(range(301))
    for c in run.chunks:
        assert int.from_bytes(c.path.read_bytes()[:8], "little") <= HEADER_CAP
    states = dict(run.states())
    for t, st in ref.items():
        assert_bit_equal(st, states[t], f"state {t}")


def test_a_chunk_header_never_passes_the_cap_the_reader_accepts():
    from replay.store.chunk import HEADER_CAP, MAX_CHUNK_STATES, chunk_capacity, chunk_header, default_encoding
    from replay.store.layout import StateLayout, TensorSpec

    layout = StateLayout([TensorSpec(f"layer{i}.weight", (512,), "F32") for i in range(800)])  # per-tensor keys
    assert default_encoding(layout) == "xor"
    k = chunk_capacity(layout, 1 << 40)  # a buffer that would fit any number of states
    assert k < MAX_CHUNK_STATES
    steps = list(range(9_999_990_000 - k, 9_999_990_000))  # 10-digit steps: the longest keys
    assert len(chunk_header(layout, steps, steps, "0" * 32, "0" * 16)) <= HEADER_CAP


# ---- export (5) ------------------------------------------------------------------------------------------

def test_export_never_destroys_a_run(tmp_path):
    tiny_run(tmp_path / "run")
    run = replay.open_run(tmp_path / "run")
    chunk, before = run.chunks[0].path, run.chunks[0].path.read_bytes()
    for target in (chunk, tmp_path / "run" / "manifest.json", tmp_path / "run" / "new.safetensors"):
        p = cli("export", tmp_path / "run", target, "--step", "1")
        one_line(p, "inside a run or lca directory")
    assert chunk.read_bytes() == before and replay.open_run(tmp_path / "run").verify() == []
    assert cli("export", tmp_path / "run", tmp_path / "s.safetensors", "--step", "1").returncode == 0
    one_line(cli("export", tmp_path / "run", tmp_path / "s.safetensors", "--step", "2"), "exists", "--force")
    assert cli("export", tmp_path / "run", tmp_path / "s.safetensors", "--step", "2", "--force").returncode == 0


def test_an_exported_tied_state_loads_strictly(tmp_path):
    from safetensors.torch import load_file

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    with replay.Recorder(model, tmp_path / "run") as rec:
        with torch.no_grad():
            model.emb.weight.add_(1.0)
        rec.capture()
    replay.open_run(tmp_path / "run").export(1, tmp_path / "s.safetensors")
    fresh = Tied()
    fresh.load_state_dict(load_file(tmp_path / "s.safetensors"), strict=True)  # the alias is a key of its own
    assert torch.equal(fresh.head.weight, model.head.weight)


# ---- frozen weights that differ (5b) ---------------------------------------------------------------------

class Frozen(nn.Module):
    """A frozen base and a trained head (as a LoRA run records only its adapters)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.base = nn.Linear(64, 32).requires_grad_(False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.base(x)))


def test_a_frozen_base_from_another_seed_is_refused_by_name(tmp_path):
    from replay.digits import load_digits_tensors

    model = Frozen(seed=0)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    x, y = load_digits_tensors()["train"]
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for i in range(0, 320, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    data = load_digits_tensors()
    good = replay.compute(tmp_path / "run", ["train"], task=replay.Task(Frozen(0), data), out=tmp_path / "a")
    assert good.steps.collect()["delta_loss"].sum() < -0.05, "the learning is there with training's base"
    with pytest.raises(TaskError, match=r"2 frozen parameters of the task's model differ .*base.weight, base.bias"):
        replay.compute(tmp_path / "run", ["train"], task=replay.Task(Frozen(1), data), out=tmp_path / "b")
    with pytest.warns(replay.errors.ReplayWarning, match="frozen parameters of the task's model differ"):
        fr = replay.compute(tmp_path / "run", ["train"], task=replay.Task(Frozen(1), data), out=tmp_path / "c",
                            constants="warn")
    assert "differ" in fr.meta["constants_note"]
    # an export with its base loads strictly, and only with training's base
    run = replay.open_run(tmp_path / "run")
    run.export(10, tmp_path / "s10.safetensors", base=Frozen(0))
    fresh = Frozen(5)
    fresh.load_state_dict(load_file(tmp_path / "s10.safetensors"), strict=True)
    assert torch.equal(fresh.base.weight, Frozen(0).base.weight) and torch.equal(fresh.head.weight,
                                                                                run.state(10)["head.weight"])
    with pytest.raises(ReplayError, match="the base model's 'base.weight' differs from the one training froze"):
        run.export(10, tmp_path / "s10b.safetensors", base=Frozen(1))


# ---- code that runs because a file says so (6) ------------------------------------------------------------

@pytest.mark.parametrize("task", ["cProfile:main", "profile:main", "pydoc:cli", "sys:exit", "os:abort",
                                  "replay.cli:main"])
def test_a_run_naming_an_installed_callable_runs_nothing(tmp_path, task):
    tiny_run(tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    m.task = task
    m.write(tmp_path / "run")  # resealed: only the import rule stands between the file and the code
    (tmp_path / "compute").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    (tmp_path / "run" / "__init__.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    (tmp_path / "compute.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('ran')\n")
    p = subprocess.run([sys.executable, "-m", "replay", "compute", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    one_line(p, f"the run names task {task!r}, which is not a registered task", f"pass --task {task}")
    assert not (tmp_path / "RAN").exists(), "a file next to the run was run"


def test_a_registered_task_runs_without_naming_it(tmp_path):
    from replay.digits import digits_mlp, train_digits

    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1, batch=256)  # names replay.digits:digits
    p = cli("compute", tmp_path / "run", "--loss", "train", "--no-progress", timeout=300)
    assert p.returncode == 0, p.stderr


# ---- hangs, memory, tracebacks (7, 8, 9) ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["chunk-0000000004-0000000004.safetensors",
                                  "batches-0000000001-0000000001.safetensors"])
def test_a_fifo_named_like_a_run_file_hangs_nothing(tmp_path, name):
    tiny_run(tmp_path / "run")
    os.mkfifo(tmp_path / "run" / name)
    one_line(cli("verify", tmp_path / "run", timeout=30), "it is a FIFO, not a regular file")
    assert cli("info", tmp_path / "run", timeout=30).returncode == 0
    p = cli("compute", tmp_path / "run", "--task", "replay.digits:digits", timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr  # (refused: not the digits model)


def test_claims_in_names_and_sizes_size_no_work(tmp_path):
    ref = tiny_run(tmp_path / "run")
    run_dir = tmp_path / "run"
    (run_dir / "chunk-0000000045-0999999999.safetensors").write_bytes(b"")  # a billion states, claimed
    p = cli("verify", run_dir, timeout=30)
    one_line(p, "chunk-0000000045-0999999999", "claims states 45..999999999")
    states = dict(replay.open_run(run_dir).states())  # the claim poisons nothing: the real states read back
    assert sorted(states) == sorted(ref)
    for t in ref:
        assert_bit_equal(states[t], ref[t], f"state {t}")
    with open(run_dir / "batches-0000000000-0000000002.safetensors", "wb") as f:
        f.truncate(40 << 30)  # a sparse 40 GB file
    os.symlink("/dev/zero", run_dir / "batches-0000000003-0000000003.safetensors")
    p = cli("verify", run_dir, timeout=30)
    one_line(p, "batches-0000000000-0000000002", "batches-0000000003-0000000003", "character device")
    assert "MemoryError" not in p.stderr
    chunk = replay.open_run(run_dir).chunks[0].path
    os.truncate(chunk, 16 << 30)  # a 16 GB sparse chunk: its size is compared before its checksum reads it
    p = cli("verify", run_dir, timeout=30)
    one_line(p, chunk.name, "but its header describes")


def test_many_tensors_in_a_manifest_bound_the_work(tmp_path):
    """A resealed manifest naming 300k tensors: linear work, one line, no MemoryError."""
    from replay.store.layout import TensorSpec

    tiny_run(tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    m.tensors = [TensorSpec(f"p{i}", (1,), "F32") for i in range(300_000)]
    m.write(tmp_path / "run")
    one_line(cli("verify", tmp_path / "run", timeout=120), "does not match the run's manifest")


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["manifest", "chunk", "batches"])
def test_deep_json_is_one_line(tmp_path, where):
    import struct

    tiny_run(tmp_path / "run")
    run_dir = tmp_path / "run"
    if where == "manifest":
        (run_dir / "manifest.json").write_text(DEEP)
    else:
        name = "chunk-0000000000-0000000003.safetensors" if where == "chunk" else \
            "batches-0000000000-0000000000.safetensors"
        raw = DEEP.encode()
        (run_dir / name).write_bytes(struct.pack("<Q", len(raw)) + raw)
    p = cli("verify", run_dir, timeout=60)
    one_line(p, "manifest.json" if where == "manifest" else where)
    assert "RecursionError" not in p.stderr


@pytest.mark.parametrize("kind", ["dangling-chunk", "dangling-batches", "batches-dir"])
def test_odd_directory_entries_are_one_line(tmp_path, kind):
    tiny_run(tmp_path / "run")
    run_dir = tmp_path / "run"
    if kind == "dangling-chunk":
        os.symlink(tmp_path / "nowhere", run_dir / "chunk-0000000004-0000000004.safetensors")
    elif kind == "dangling-batches":
        os.symlink(tmp_path / "nowhere", run_dir / "batches-0000000001-0000000001.safetensors")
    else:
        (run_dir / "batches-0000000001-0000000001.safetensors").mkdir()
    for cmd in ("verify", "info"):
        p = cli(cmd, run_dir, timeout=30)
        assert "Traceback" not in p.stderr, p.stderr
    one_line(cli("verify", run_dir, timeout=30), "dangling symbolic link" if "dangling" in kind else "a directory")


def test_models_that_cannot_be_recorded_are_one_line(tmp_path):
    class Complex(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, dtype=torch.complex64))

    with pytest.raises(RecordError, match=r"parameter 'w': dtype complex64 cannot be recorded"):
        replay.Recorder(Complex(), tmp_path / "a")
    empty = nn.Module()
    empty.w = nn.Parameter(torch.zeros(0))
    with pytest.raises(RecordError, match="every trainable parameter of the model is empty"):
        replay.Recorder(empty, tmp_path / "b")
    with torch.device("meta"):
        meta = nn.Linear(3, 2)
    with pytest.raises(RecordError, match="is on the meta device"):
        replay.Recorder(meta, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in "abc"), "nothing left behind"


def test_verify_while_recording_says_the_run_is_live(tmp_path):
    model = nn.Linear(3, 2)
    rec = replay.Recorder(model, tmp_path / "run", flush_secs=0.2)
    try:
        for _ in range(3):
            rec.capture()
        rec.flush()  # the open chunk is written (as the flush clock would)
        (tmp_path / "run" / ".chunk-0000000009-0000000009.safetensors.tmp").write_bytes(b"x")
        res = CliRunner().invoke(app, ["verify", str(tmp_path / "run")])
        assert res.exit_code == 0 and "a Recorder is writing this run now" in res.output, res.output
        assert "safe to delete" not in res.output
    finally:
        rec.close()
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "run")])
    assert "safe to delete" in res.output


def test_a_damaged_chunk_under_verify_does_not_say_run_verify(tmp_path):
    tiny_run(tmp_path / "run")
    c = replay.open_run(tmp_path / "run").chunks[0].path
    data = bytearray(c.read_bytes())
    data[-1] ^= 1
    c.write_bytes(bytes(data))
    p = cli("verify", tmp_path / "run")
    one_line(p, "checksum mismatch")
    assert "replay verify" not in p.stderr, "the user is running it"
    with pytest.raises(ReplayError, match="replay verify"):  # elsewhere the hint stays
        replay.open_run(tmp_path / "run").state(1)


def test_the_manifest_says_which_constants_it_checks(tmp_path):
    tiny_run(tmp_path / "run")
    d = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert d["constants"] == {}, "nn.Linear has no frozen parameter or buffer"
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # a frozen base
    with replay.Recorder(model, tmp_path / "frozen") as rec:
        with torch.no_grad():
            model[2].bias.add_(0.1)
        rec.capture()
    c = json.loads((tmp_path / "frozen" / "manifest.json").read_text())["constants"]
    assert {n: v["kind"] for n, v in c.items()} == {
        "0.weight": "frozen", "0.bias": "frozen", "1.running_mean": "buffer", "1.running_var": "buffer",
        "1.num_batches_tracked": "buffer"}
    assert all(len(v["xxh3"]) == 16 for v in c.values())
    model[0].weight.data[0, 0] += 1  # a frozen weight that is not training's: refused, naming it
    with pytest.raises(TaskError, match=r"1 frozen parameters of the task's model differ .*\(0\.weight\)"):
        replay.compute(tmp_path / "frozen", task=replay.Task(model, {"train": (torch.randn(4, 3),
                                                                              torch.tensor([0, 1, 0, 1]))}))
