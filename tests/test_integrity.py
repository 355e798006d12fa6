"""A run from anyone: damaged and hostile run directories are caught, never believed, never executed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_bit_equal, mlp, params_of, tiny_run, train_recording
from faults import header_length, outcome, sweep
from torch import nn
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.errors import ChunkDamaged, RecordError
from replay.store.manifest import Manifest

TESTS = Path(__file__).parent


def test_every_single_bit_flip_of_a_chunk_header_is_detected(tmp_path):
    ref = tiny_run(tmp_path / "run")
    chunk = replay.open_run(tmp_path / "run").chunks[0].path
    counts = sweep(tmp_path / "run", chunk, ref, 0, header_length(chunk))
    assert set(counts) <= {"detected", "harmless"}, counts
    assert counts["detected"] == sum(counts.values()), f"every header byte is under the checksum: {counts}"
    data = sweep(tmp_path / "run", chunk, ref, header_length(chunk))  # and the tensor data
    assert set(data) == {"detected"}, data


def test_every_single_bit_flip_of_a_compressed_chunk_is_detected(tmp_path):
    pytest.importorskip("zstandard")
    ref = tiny_run(tmp_path / "run", compress=True)
    chunk = replay.open_run(tmp_path / "run").chunks[0]
    chunk.verify()
    assert chunk.zlen is not None, "compressed"
    counts = sweep(tmp_path / "run", chunk.path, ref)  # header and compressed data alike
    assert set(counts) == {"detected"}, counts


def test_a_compressed_chunk_that_does_not_decompress_is_named(tmp_path):
    """A hostile chunk whose checksum was recomputed over garbage data: detected at decoding, one line."""
    pytest.importorskip("zstandard")
    from replay.store.chunk import write_chunk

    tiny_run(tmp_path / "run", compress=True)
    run = replay.open_run(tmp_path / "run")
    c = run.chunks[0]
    c.verify()
    write_chunk(tmp_path / "run", run.layout, c.steps, c.stored, b"\x28\xb5\x2f\xfd" + bytes(40), run.manifest.run_id,
                compressed=True)
    with pytest.raises(ChunkDamaged, match=r"chunk-.*does not decompress to its states.*replay verify"):
        dict(replay.open_run(tmp_path / "run").states())


def test_every_single_bit_flip_of_the_manifest_is_detected(tmp_path):
    ref = tiny_run(tmp_path / "run")
    counts = sweep(tmp_path / "run", tmp_path / "run" / "manifest.json", ref)
    assert set(counts) == {"detected"}, counts


def test_chunk_of_another_run_is_refused(tmp_path):
    a_ref = _record_twice(tmp_path)
    a = replay.open_run(tmp_path / "a")
    b = replay.open_run(tmp_path / "b")
    victim = a.chunks[1]
    victim.path.write_bytes(b.chunks[1].path.read_bytes())  # same model, same steps, same size
    run = replay.open_run(tmp_path / "a")
    problems = run.verify()
    assert len(problems) == 1 and "belongs to another run" in problems[0] and victim.path.name in problems[0]
    with pytest.raises(ChunkDamaged, match="belongs to another run"):
        run.state(victim.first)
    assert_bit_equal(run.state(0), a_ref[0])  # the other chunks are unaffected


def _record_twice(tmp_path):
    refs = []
    for name, seed in (("a", 1), ("b", 2)):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        refs.append(train_recording(model, opt, {"chunk_bytes": 3000}, tmp_path / name, steps=12, seed=seed))
    return refs[0]


def test_manifest_that_lies_about_a_dtype_is_refused(tmp_path):
    """A hostile manifest with a valid checksum: the chunks' headers are checked against it."""
    tiny_run(tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    m.tensors = [replay.store.layout.TensorSpec(s.name, s.shape, "F64" if s.name == "bias" else s.dtype, s.kind)
                 for s in m.tensors]
    m.write(tmp_path / "run")  # re-sealed: the checksum alone cannot catch this
    run = replay.open_run(tmp_path / "run")
    with pytest.raises(ChunkDamaged, match="does not match the run's manifest"):
        run.state(0)


def test_parameter_named_like_the_padding_records_and_reads(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_parameter("__pad__", nn.Parameter(torch.randn(3)))  # 12 bytes: padding is needed
            self.w = nn.Parameter(torch.randn(2, dtype=torch.float64))

        def forward(self, x):
            return (x * self.__dict__["_parameters"]["__pad__"]).sum() + self.w.sum()

    model = Odd()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = {0: params_of(model)}
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for i in range(3):
            opt.zero_grad()
            model(torch.randn(3)).backward()
            opt.step()
            ref[i + 1] = params_of(model)
    run = replay.open_run(tmp_path / "run")
    assert run.verify() == []
    for t, st in run.states():
        assert_bit_equal(st, ref[t], f"state {t}")


EVIL = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("code next to a run ran")
import replay
from replay.digits import digits
def task():
    return digits()
"""


def test_task_next_to_the_run_is_never_imported_unless_named(tmp_path, monkeypatch):
    from replay.digits import digits_mlp, train_digits

    (tmp_path / "evil_task_mod.py").write_text(EVIL)
    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1, task="evil_task_mod:task")
    monkeypatch.chdir(tmp_path)  # the current directory holds it too
    monkeypatch.setenv("REPLAY_TRUST_DIR", str(tmp_path / "another-user"))  # a run from someone else (replay.trust)
    res = CliRunner().invoke(app, ["compute", str(tmp_path / "run"), "--steps", "0:2"])
    assert res.exit_code == 1
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "pass --task evil_task_mod:task" in line, line
    assert not (tmp_path / "IMPORTED").exists(), "the run's task module was imported"
    # named by the user: imported from the current directory, as `python -m` would
    res = CliRunner().invoke(app, ["compute", str(tmp_path / "run"), "--task", "evil_task_mod:task",
                                   "--steps", "0:2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "IMPORTED").exists()
    sys.modules.pop("evil_task_mod", None)


KILLER = """
import os, signal
from replay.digits import digits
calls = [0]

def task():
    t, limit = digits(), int(os.environ.get("DIE_AFTER", "0"))
    base = t.loss_fn

    def loss(o, y):  # one code whether it dies or not: the task's fingerprint is the same
        calls[0] += 1
        if limit and calls[0] > limit:
            os.kill(os.getpid(), signal.SIGKILL)
        return base(o, y)

    t.loss_fn = loss
    return t
"""


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from replay.digits import digits_mlp, train_digits

    path = tmp_path_factory.mktemp("digits") / "run"
    train_digits(digits_mlp(), str(path), epochs=1, batch=128)
    return path


def test_compute_killed_before_its_first_flush_resumes(digits_run, tmp_path, monkeypatch):
    (tmp_path / "killer_task.py").write_text(KILLER)
    out = tmp_path / "lca"
    cmd = [sys.executable, "-m", "replay", "compute", str(digits_run), "--task", "killer_task:task", "--loss", "train",
           "--out", str(out), "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "DIE_AFTER": "8"})
    assert p.returncode == -9, p.stderr
    assert out.is_dir() and not (out / "meta.json").exists()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)  # the same command
    assert p.returncode == 0, p.stderr
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = replay.compute(digits_run, ["train"], task="killer_task:task", out=tmp_path / "ref", progress=False)
    assert replay.load(out).steps.collect().equals(ref.steps.collect())
    sys.modules.pop("killer_task", None)


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # parquet parts are bigger: the disk is "full"
sys.argv = ["replay", "compute", {run!r}, "--loss", "train", "--out", {out!r}, "--no-progress"]
from replay.cli import main
main()
"""


def test_full_disk_is_one_line_and_the_rerun_works(digits_run, tmp_path):
    out = tmp_path / "lca"
    code = FULL_DISK.format(run=str(digits_run), out=str(out))
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "writing the LCA frames failed" in lines[0], lines
    assert "run the same command again" in lines[0]
    fr = replay.compute(digits_run, ["train"], out=out, progress=False)
    assert fr.steps.collect()["grounded"].all()


def test_missing_middle_chunk_is_an_error_unless_the_prefix_is_asked_for(tmp_path):
    """A lost chunk is never only a warning: with warnings ignored (as notebooks often do), compute refuses in one
    line naming the states and the two ways on; asked for the prefix, it computes it and says what is missing."""
    from replay.digits import digits_mlp, train_digits

    train_digits(digits_mlp(), str(tmp_path / "run"), epochs=1, batch=256, chunk_bytes=30_000)
    run = replay.open_run(tmp_path / "run")
    assert len(run.chunks) >= 3
    gone = run.chunks[1]
    gone.path.unlink()
    last = replay.open_run(tmp_path / "run").steps[-1]
    assert last == gone.first - 1
    with pytest.raises(replay.errors.RunError, match=rf"states {gone.first}\.\.\d+ are missing .* --steps "
                                                     rf"0:{last} \(or --allow-missing\)"):
        replay.compute(tmp_path / "run", ["train"], out=tmp_path / "lca", progress=False)
    assert not (tmp_path / "lca").exists()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "replay", "compute", str(tmp_path / "run"), "--loss", "train", "--no-progress",
           "--out", str(tmp_path / "cli")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [p.stderr.strip()], (p.stdout, p.stderr)
    assert f"states {gone.first}.." in p.stderr and "are missing" in p.stderr, p.stderr
    p = subprocess.run(cmd + ["--allow-missing"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"incomplete: states {gone.first}.." in p.stdout, p.stdout
    p = subprocess.run(cmd[:-1] + [str(tmp_path / "prefix"), "--steps", f"0:{last}"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0 and "incomplete: states" in p.stdout, p.stdout + p.stderr
    with pytest.warns(replay.errors.ReplayWarning, match=rf"states {gone.first}\.\.\d+ are missing"):
        fr = replay.compute(tmp_path / "run", ["train"], out=tmp_path / "lca", progress=False, allow_missing=True)
    assert fr.meta["missing_states"][0] == gone.first
    assert fr.steps.collect()["step"].max() == last - 1
    res = CliRunner().invoke(app, ["summary", str(tmp_path / "lca")])
    assert "missing" in res.output


def test_two_recorders_on_one_directory(tmp_path):
    a = replay.Recorder(mlp(), tmp_path / "run")
    with pytest.raises(RecordError, match="another Recorder is recording into it"):
        replay.Recorder(mlp(), tmp_path / "run")
    a.close()
    with pytest.raises(RecordError, match="already holds a run"):
        replay.Recorder(mlp(), tmp_path / "run")
    assert replay.open_run(tmp_path / "run").steps == [0]


def test_leftover_temp_files_are_ignored_visibly(tmp_path):
    tiny_run(tmp_path / "run")
    (tmp_path / "run" / ".chunk-0000000004-0000000007.safetensors.tmp").write_bytes(b"partial")
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "run")])
    assert res.exit_code == 0 and "temp file(s) of an interrupted write are ignored" in res.output
    res = CliRunner().invoke(app, ["info", str(tmp_path / "run")])
    assert "interrupted write" in res.output


def test_verify_of_an_empty_run_says_nothing_was_recorded(tmp_path):
    tiny_run(tmp_path / "run")
    for c in (tmp_path / "run").glob("chunk-*"):
        c.unlink()
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "run")])
    assert res.exit_code == 1 and "nothing was recorded" in res.output
    res = CliRunner().invoke(app, ["compute", str(tmp_path / "run"), "--task", "replay.digits:digits"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "nothing to compute" in res.output


def _manifest_edit(run_dir, edit):
    path = run_dir / "manifest.json"
    d = json.loads(path.read_text())
    d.pop("xxh3")
    d = edit(d)
    path.write_text(json.dumps(d))  # no checksum field: refused as damaged anyway, but the reason must be one line


@pytest.mark.parametrize("edit, words", [
    (lambda d: {**d, "every": 0}, "no checksum field"),
    (lambda d: [1, 2], "expected a JSON object"),
    (lambda d: {**d, "format": "replay-run/1", "every": 0}, "'every' must be an integer >= 1"),
    (lambda d: {**d, "format": "replay-run/1", "tensors": [{**d["tensors"][0], "dtype": "F7"}]}, "unknown dtype"),
    (lambda d: {**d, "format": "replay-run/1", "tensors": "x"}, "'tensors' must be a non-empty list"),
], ids=["every-0-resealed-not", "not-an-object", "every-0", "unknown-dtype", "tensors-not-list"])
def test_hostile_manifest_is_one_line(tmp_path, edit, words):
    tiny_run(tmp_path / "run")
    _manifest_edit(tmp_path / "run", edit)
    for cmd in (["info"], ["verify"], ["compute"]):
        res = CliRunner().invoke(app, [*cmd, str(tmp_path / "run")])
        assert res.exit_code == 1 and res.output.count("\n") == 1, res.output
        assert words in res.output and "damaged manifest" in res.output, res.output


BAD_TASKS = """
import torch
import replay
from replay.digits import digits, digits_mlp, load_digits_tensors

def labels_minus_one():
    t = digits()
    x, y = t.data["train"]
    y = y.clone(); y[5] = -1
    return replay.Task(digits_mlp(), {"train": (x, y)})

def labels_out_of_range():
    t = digits()
    x, y = t.data["train"]
    y = y.clone(); y[5] = 12
    return replay.Task(digits_mlp(), {"train": (x, y)})

def wrong_input_dim():
    t = digits()
    x, y = t.data["train"]
    return replay.Task(digits_mlp(), {"train": (x[:, :63], y)})

def raises():
    raise ValueError("my data is not there")

def mean_loss():
    t = digits()
    t.loss_fn = lambda o, y: torch.nn.functional.cross_entropy(o, y)
    return t

def matrix_loss():
    t = digits()
    t.loss_fn = lambda o, y: torch.nn.functional.cross_entropy(o, y, reduction="none")[:, None].expand(-1, 3)
    return t
"""


@pytest.fixture
def bad_tasks(tmp_path, monkeypatch):
    (tmp_path / "bad_tasks.py").write_text(BAD_TASKS)
    (tmp_path / "broken_tasks.py").write_text("def task(:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for m in ("bad_tasks", "broken_tasks"):
        sys.modules.pop(m, None)


@pytest.mark.parametrize("args, words", [
    (["--task", "bad_tasks:labels_minus_one", "--per-class", "train"], "labels must be >= 0, found -1"),
    (["--task", "bad_tasks:labels_out_of_range"], "Target 12 is out of bounds"),
    (["--task", "bad_tasks:wrong_input_dim"], "the task's model or loss_fn failed: RuntimeError: mat1 and mat2"),
    (["--task", "bad_tasks:raises"], "raises() raised ValueError: my data is not there (" ),
    (["--task", "broken_tasks:task"], "importing broken_tasks failed: SyntaxError"),
    (["--task", "bad_tasks:mean_loss"], "loss_fn returned () for a batch of"),
    (["--task", "bad_tasks:matrix_loss"], "must return one loss per example"),
    (["--tol", "nan"], "tol, rtol: expected finite numbers"),
    (["--device", "gpu"], "--device 'gpu': not a device"),
    (["--device", "meta"], "replay computes on cpu or cuda"),
    (["--device", "cuda"], "no CUDA device is available here"),
    (["--max-splits", "3"], "max_splits: expected a power of two"),
], ids=["labels-minus-one", "labels-out-of-range", "input-dim", "task-raises", "syntax-error", "mean-loss",
        "matrix-loss", "tol-nan", "device-gpu", "device-meta", "device-cuda", "max-splits"])
def test_user_errors_are_one_line(digits_run, tmp_path, bad_tasks, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--out", str(tmp_path / "o"), "--no-progress",
                                   *args], catch_exceptions=False)
    assert res.exit_code == 1, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("error: "), res.output
    assert words in res.output, res.output


def test_out_that_is_a_file_is_one_line(digits_run, tmp_path):
    (tmp_path / "f").write_text("x")
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--out", str(tmp_path / "f"), "--no-progress"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "is a file" in res.output, res.output
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "f")])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "is a file" in res.output, res.output


def test_export_is_a_plain_bit_exact_safetensors_file(tmp_path):
    from safetensors.torch import load_file

    ref = tiny_run(tmp_path / "run")
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "s2.safetensors"), "--step", "2"])
    assert res.exit_code == 0, res.output
    loaded = load_file(tmp_path / "s2.safetensors")
    assert sorted(loaded) == sorted(ref[2])
    assert_bit_equal({n: loaded[n] for n in ref[2]}, ref[2])
    model = nn.Linear(3, 2)
    model.load_state_dict(load_file(tmp_path / "s2.safetensors"))
    assert_bit_equal(params_of(model), ref[2])
    res = CliRunner().invoke(app, ["export", str(tmp_path / "run"), str(tmp_path / "x.safetensors"), "--step", "9"])
    assert res.exit_code == 1 and "state 9 was not recorded" in res.output


def test_legacy_format_1_runs_still_read(tmp_path):
    """Runs of replay 0.1 (format 1: no run id, data-only checksum, `__pad__`) stay readable."""
    from replay.store.chunk import chunk_header

    ref = tiny_run(tmp_path / "run")
    run = replay.open_run(tmp_path / "run")
    c = run.chunks[0]
    c.verify()
    raw = c.path.read_bytes()
    n = header_length(c.path)
    data = raw[n:]
    import zlib

    head = chunk_header(run.layout, c.steps, c.stored, "", f"{zlib.crc32(data):08x}", version=1)
    c.path.write_bytes(head + data)
    d = json.loads((tmp_path / "run" / "manifest.json").read_text())
    d = {k: v for k, v in d.items() if k not in ("xxh3", "run_id", "aliases", "frozen")}
    d["format"] = "replay-run/1"
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(d, indent=1))
    old = replay.open_run(tmp_path / "run")
    assert old.verify() == []
    for t, st in old.states():
        assert_bit_equal(st, ref[t])
    bad = bytearray(head + data)
    bad[-1] ^= 1
    c.path.write_bytes(bytes(bad))
    assert outcome(tmp_path / "run", ref) == "detected"
