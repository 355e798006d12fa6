"""Recorder + reader: bit-exact round trips under the training loops people write."""


import pytest
import torch
from conftest import assert_bit_equal, mlp, params_of, train_recording
from safetensors import safe_open
from torch import nn

import replay
from replay.errors import RecordError, ReplayWarning

# small chunks so every test crosses chunk boundaries (a 8-16-3 MLP state is ~0.8 KiB)
SMALL = {"chunk_bytes": 3000}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_states_bit_exact_across_chunks(tmp_path, dtype, recorder_mode):
    model = mlp(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # Adam's eps underflows in fp16
    ref = train_recording(model, opt, SMALL, tmp_path / "run", steps=25)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(26))
    assert len(run.chunks) > 3, "test must cross chunk boundaries"
    seen = 0
    for t, state in run.states():
        assert_bit_equal(state, ref[t], f"state {t}")
        seen += 1
    assert seen == 26
    for t in [0, 7, 13, 25]:  # random access from the nearest keyframe
        assert_bit_equal(run.state(t), ref[t], f"state({t})")
    assert [t for t, _ in run.states(5, 9)] == [5, 6, 7, 8]


def test_every_k(tmp_path, recorder_mode):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = train_recording(model, opt, {"every": 3, **SMALL}, tmp_path / "run", steps=20)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(0, 21, 3))
    for t, state in run.states():
        assert_bit_equal(state, ref[t], f"state {t}")
    assert [t for t, _ in run.states(4, 13)] == [6, 9, 12]
    with pytest.raises(replay.ReplayError, match="state 4 was not recorded"):
        run.state(4)


def test_manual_capture_without_optimizer(tmp_path):
    model = mlp()
    ref = {0: params_of(model)}
    rec = replay.Recorder(model, tmp_path / "run", **SMALL)
    for i in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.01 * i)
        rec.capture()
        ref[i] = params_of(model)
    rec.close()
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(8))
    for t, state in run.states():
        assert_bit_equal(state, ref[t], f"state {t}")


def test_tied_and_frozen_parameters(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight  # tied: one parameter, two names
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.out(self.frozen(self.emb(x)))

    model = Tied()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.arange(10)), torch.arange(10)).backward()
            opt.step()
    run = replay.open_run(tmp_path / "run")
    assert run.param_names == ["emb.weight"]
    assert_bit_equal(run.state(3), params_of(model))


def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path, recorder_mode):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = {0: params_of(model)}
    with replay.Recorder(model, tmp_path / "run", optimizer=opt):
        for step in range(4):
            opt.zero_grad()
            for _micro in range(3):
                nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 3)).backward()
            opt.step()
            ref[step + 1] = params_of(model)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3, 4]
    for t, state in run.states():
        assert_bit_equal(state, ref[t], f"state {t}")


def test_unchanged_step_is_a_cheap_zero_delta(tmp_path, recorder_mode):
    """A step that changed nothing (GradScaler skip, lr=0) is a state that stores no bytes."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with replay.Recorder(model, tmp_path / "run", optimizer=opt) as rec:
        for step in range(6):
            opt.param_groups[0]["lr"] = 0.0 if step in (1, 2, 4) else 0.1
            opt.zero_grad()
            nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 3)).backward()
            opt.step()
        assert rec.step == 6
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(7))
    assert_bit_equal(run.state(2), run.state(1))
    run.chunks[0].verify()
    assert run.chunks[0].steps == list(range(7)) and run.chunks[0].stored == [0, 1, 4, 6]


def test_grad_scaler_loop_with_manual_capture(tmp_path):
    """AMP: scaler.step() skips optimizer.step() on overflow; capture() after update() keeps numbering."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1)  # early steps overflow
    ref = {0: params_of(model)}
    with replay.Recorder(model, tmp_path / "run") as rec:
        for i in range(6):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(torch.randn(4, 8)), 100 * torch.randn(4, 3))).backward()
            scaler.step(opt)
            scaler.update()
            rec.capture()
            ref[i + 1] = params_of(model)
    changed = [t for t in range(1, 7) if any(not torch.equal(ref[t][n], ref[t - 1][n]) for n in ref[t])]
    assert 0 < len(changed) < 6, "the test needs both skipped and applied steps"
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(7))
    run.chunks[0].verify()
    assert run.chunks[0].stored == [0] + changed
    for t, state in run.states():
        assert_bit_equal(state, ref[t], f"state {t}")


def test_buffers_recorded_when_asked(tmp_path, recorder_mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    bufs = {}
    with replay.Recorder(model, tmp_path / "run", optimizer=opt, buffers=True):
        bufs[0] = {n: b.clone() for n, b in model.named_buffers()}
        for i in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
            opt.step()
            bufs[i + 1] = {n: b.clone() for n, b in model.named_buffers()}
    run = replay.open_run(tmp_path / "run")
    assert "1.running_mean" not in run.state(2)
    for t in range(4):
        assert_bit_equal(run.state(t, buffers=True), bufs[t], f"buffers {t}")


def test_chunks_are_plain_safetensors(tmp_path):
    """Another tool can read a chunk: keyframe in its own dtype, deltas as same-width integers."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_recording(model, opt, {}, tmp_path / "run", steps=3)
    run = replay.open_run(tmp_path / "run")
    with safe_open(run.chunks[0].path, framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == "replay-chunk/2" and meta["encoding"] == "xor"
        assert meta["steps"] == "[0, 1, 2, 3]"
        assert f.get_tensor("0/0.weight").dtype == torch.float32
        assert f.get_tensor("1/0.weight").dtype == torch.int32
        delta = f.get_tensor("1/0.weight")
        manual = (f.get_tensor("0/0.weight").view(torch.int32) ^ delta).view(torch.float32)
    assert torch.equal(manual, run.state(1)["0.weight"])


def test_refuses_non_empty_run_dir(tmp_path):
    model = mlp()
    replay.Recorder(model, tmp_path / "run").close()
    with pytest.raises(RecordError, match="already holds a run"):
        replay.Recorder(model, tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RecordError, match="not an empty directory"):
        replay.Recorder(model, tmp_path / "other")


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="every: expected an integer ≥ 1, got 0"):
        replay.Recorder(mlp(), tmp_path / "a", every=0)
    with pytest.raises(ValueError, match="task: expected 'module:function'"):
        replay.Recorder(mlp(), tmp_path / "b", task="nocolon")
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        replay.Recorder("model", tmp_path / "c")


def test_parameter_set_change_is_an_error_and_keeps_data(tmp_path, recorder_mode):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = replay.Recorder(model, tmp_path / "run", optimizer=opt, chunk_bytes=1)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 3)).backward()
        opt.step()
    model[2] = nn.Linear(16, 5)  # the architecture changed mid-run: the registration hook sees it at once
    with pytest.raises(RecordError, match=r"changed after recording began \(2.weight, 2.bias\)"):
        rec.capture()
    with pytest.raises(RecordError):
        rec.close()
    run = replay.open_run(tmp_path / "run")
    assert run.steps[:4] == [0, 1, 2, 3] and run.verify() == []


def test_a_recorder_slower_than_training_says_so_once(tmp_path, monkeypatch):
    """A disk that takes states slower than training makes them: one warning line with the rates and the remedy.

    The recorder's clock is the test's: time passes only while the disk writes (20 ms a chunk) and training
    takes none, so the writer is busy all the time whatever the machine's load."""
    import threading

    import replay.recording.rates
    import replay.recording.writer

    real, clock, lock = replay.recording.writer.write_chunk, [0.0], threading.Lock()

    def slow_disk(*args, **kwargs):
        with lock:
            clock[0] += 0.02
        return real(*args, **kwargs)

    monkeypatch.setattr(replay.recording.writer, "write_chunk", slow_disk)
    monkeypatch.setattr(replay.recording.rates, "clock", lambda: clock[0])
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(ReplayWarning, match=r"recording slows training: states arrive at .* MiB/s and the "
                                                  r"disk takes .* record every=\d+ to stop") as said:
        train_recording(model, opt, {"chunk_bytes": 1000, "queue_size": 1}, tmp_path / "run", steps=120)
    assert sum("slows training" in str(w.message) for w in said) == 1, "once"
    line = next(str(w.message) for w in said if "slows training" in str(w.message))
    assert "the disk is the limit, so Recorder(compress=True) may do" in line, "the writer is busy all the time"
    assert replay.open_run(tmp_path / "run").steps == list(range(121)), "slowed, never dropped"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_recording_is_bit_exact_and_smaller(tmp_path, dtype):
    """compress=True: zstd over byte planes of the XOR deltas; the states come back bit for bit (keyframes,
    deltas, unchanged steps, every=k, int buffers), and bfloat16 deltas take far fewer bytes."""
    pytest.importorskip("zstandard")
    refs, sizes = [], []
    for compress in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.Linear(64, 3)).to(dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        ref = {}
        path = tmp_path / f"run{compress}"
        with replay.Recorder(model, path, optimizer=opt, every=2, buffers=True, compress=compress,
                             chunk_bytes=20_000):
            for i in range(40):
                opt.param_groups[0]["lr"] = 0.0 if i % 7 == 3 else 1e-3  # some unchanged steps
                opt.zero_grad()
                x = torch.randn(16, 8, generator=g).to(dtype)
                nn.functional.cross_entropy(model(x).float(), torch.randint(0, 3, (16,), generator=g)).backward()
                opt.step()
                ref[i + 1] = {**params_of(model), **{n: b.clone() for n, b in model.named_buffers()}}
        run = replay.open_run(path)
        assert run.verify() == [] and len(run.chunks) > 1
        assert run.info().compressed == (len(run.chunks) if compress else 0)
        for t in run.steps[1:]:
            assert_bit_equal({**run.state(t), **run.state(t, buffers=True)}, ref[t], f"state {t}")
        refs.append(dict(run.states()))
        sizes.append(run.info().bytes_on_disk)
    for t in refs[0]:
        assert_bit_equal(refs[1][t], refs[0][t], f"state {t}: compressed = uncompressed")
    assert sizes[1] < sizes[0] / (2.5 if dtype == torch.bfloat16 else 1.2), sizes


def test_compress_without_zstandard_is_one_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "zstandard", None)  # import fails as if not installed
    with pytest.raises(replay.ReplayError, match=r"need the zstandard package: pip install zstandard"):
        replay.Recorder(mlp(), tmp_path / "run", compress=True)
    assert not (tmp_path / "run").exists(), "nothing made"
