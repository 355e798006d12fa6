"""The lca dir is data too: damaged, dropped, foreign or edited files are one line, never a wrong number."""

import json
import random
import shutil
import threading

import pytest
from typer.testing import CliRunner

import replay
from replay.cli import app
from replay.errors import ReplayError, ReplayWarning

TASK = "tasks:digits_dies"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from replay.digits import digits_mlp, train_digits

    path = tmp_path_factory.mktemp("digits") / "run"
    train_digits(digits_mlp(), str(path), epochs=2, batch=64)  # 44 steps
    return path


@pytest.fixture(scope="module")
def computed(digits_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lca") / "lca"
    replay.compute(digits_run, ["train"], per_class=["train"], out=out, progress=False, flush_every=3)
    return out


def _one_line(res, *words):
    assert res.exit_code == 1, res.output
    assert res.output.count("\n") == 1 and res.output.startswith(("error: ", "damaged: ")), res.output
    for w in words:
        assert w in res.output, res.output


def _outcome(out) -> str:
    try:
        fr = replay.load(out)
        fr.steps.collect(), fr.tensors.collect(), fr.params.collect()
    except ReplayError:
        return "detected"
    except BaseException as e:  # noqa: BLE001 - a Rust panic is a BaseException: the sweep classifies all
        return f"crash: {type(e).__name__}"
    return "loaded"


@pytest.mark.slow
def test_bit_flips_of_every_lca_dir_file_are_detected(computed, tmp_path):
    out = tmp_path / "lca"
    shutil.copytree(computed, out)
    rng = random.Random(0)
    files = [f for f in out.rglob("*") if f.is_file() and not f.name.startswith(".")]
    assert {f.parent.name for f in files} >= {"steps", "tensors", "params", "lca"}
    outcomes = {}
    for f in files:
        original = f.read_bytes()
        for _ in range(40 if f.suffix == ".parquet" else 15):
            i = rng.randrange(len(original) * 8)
            data = bytearray(original)
            data[i // 8] ^= 1 << (i % 8)
            f.write_bytes(bytes(data))
            got = _outcome(out)
            outcomes[got] = outcomes.get(got, 0) + 1
        f.write_bytes(original)
    assert outcomes == {"detected": sum(outcomes.values())}, outcomes
    assert _outcome(out) == "loaded"


def test_a_dropped_truncated_or_foreign_part_is_named(computed, tmp_path):
    out = tmp_path / "lca"
    shutil.copytree(computed, out)
    part = sorted((out / "steps").glob("*.parquet"))[1]
    part.rename(tmp_path / "away.parquet")
    with pytest.raises(ReplayError, match=rf"{part.name}: missing"):
        replay.load(out)
    _one_line(CliRunner().invoke(app, ["summary", str(out)]), part.name, "missing")
    res = CliRunner().invoke(app, ["verify", str(out)])
    assert res.exit_code == 1 and part.name in res.output
    (tmp_path / "away.parquet").rename(part)
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    part.write_bytes(part.read_bytes()[:-9])
    _one_line(CliRunner().invoke(app, ["summary", str(out)]), part.name, "truncated or replaced")
    shutil.copy(sorted((computed / "steps").glob("*.parquet"))[1], part)
    shutil.copy(part, out / "tensors" / "part-999999.parquet")  # a part no record names
    with pytest.raises(ReplayError, match="part-999999.parquet: no record of this compute names it"):
        replay.load(out)


@pytest.mark.parametrize("content, words", [("{not json", "not JSON"), ("[1, 2]", "expected a JSON object"),
                                            ('{"complete": true}', "no checksum field")],
                         ids=["not-json", "a-list", "unsealed"])
def test_a_damaged_meta_json_is_one_line(computed, tmp_path, content, words):
    out = tmp_path / "lca"
    shutil.copytree(computed, out)
    (out / "meta.json").write_text(content)
    for cmd in (["summary"], ["plot"], ["verify"]):
        _one_line(CliRunner().invoke(app, [*cmd, str(out)]), "meta.json", words)


def _interrupted(digits_run, out, monkeypatch, die_after=40):
    """A compute killed by its task (an exception) after some flushes; returns its settings."""
    monkeypatch.setenv("REPLAY_TEST_DIE_AFTER", str(die_after))
    with pytest.raises(ReplayError, match="the compute dies here"):
        replay.compute(digits_run, ["train"], task=TASK, out=out, progress=False, flush_every=3)
    monkeypatch.delenv("REPLAY_TEST_DIE_AFTER")
    prog = json.loads((out / "progress.json").read_text())
    assert prog["next_step"] and len(prog["parts"]) >= 4
    return prog


def _edit_progress(out, edit):
    from replay.store.sealed import encode_json

    d = json.loads((out / "progress.json").read_text())
    d.pop("xxh3")
    (out / "progress.json").write_bytes(encode_json(edit(d)))  # re-sealed: the records must still agree


@pytest.mark.parametrize("edit", [
    lambda d: {**d, "next_step": d["next_step"] + 20},
    lambda d: {**d, "parts": d["parts"][:-2]},
    lambda d: {**d, "seq": 0},
    lambda d: {**d, "steps_done": d["steps_done"] - 1},
], ids=["next-step-plus-20", "parts-list-shortened", "seq-0", "steps-done"])
def test_edited_resume_state_is_refused_even_resealed(digits_run, tmp_path, monkeypatch, edit):
    out = tmp_path / "lca"
    _interrupted(digits_run, out, monkeypatch)
    _edit_progress(out, edit)
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--task", TASK, "--loss", "train", "--out", str(out),
                                   "--no-progress"])
    _one_line(res, "progress.json", "cannot resume", "--restart")
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--task", TASK, "--loss", "train", "--out", str(out),
                                   "--no-progress", "--restart"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("damage", ["flip-progress", "flip-totals", "truncate-totals", "delete-totals"])
def test_damaged_resume_files_name_themselves_and_restart_is_the_way_out(digits_run, tmp_path, monkeypatch,
                                                                         damage):
    out = tmp_path / "lca"
    prog = _interrupted(digits_run, out, monkeypatch)
    totals = out / prog["totals"]["path"]
    victim = out / "progress.json" if damage == "flip-progress" else totals
    if damage.startswith("flip"):
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 4
        victim.write_bytes(bytes(data))
    elif damage == "truncate-totals":
        victim.write_bytes(victim.read_bytes()[:-5])
    else:
        victim.unlink()
    args = ["compute", str(digits_run), "--task", TASK, "--loss", "train", "--out", str(out), "--no-progress"]
    res = CliRunner().invoke(app, args)
    _one_line(res, victim.name, "--restart")
    assert "run the same command again" not in res.output, "a rerun would fail the same way"
    res = CliRunner().invoke(app, args + ["--restart"])
    assert res.exit_code == 0, res.output


def test_resume_gives_the_uninterrupted_frames_and_evaluation_count(digits_run, tmp_path, monkeypatch):
    ref = replay.compute(digits_run, ["train"], task=TASK, out=tmp_path / "ref", progress=False, flush_every=3)
    out = tmp_path / "lca"
    for die_after in (30, 40):  # two interruptions, two resumes
        monkeypatch.setenv("REPLAY_TEST_DIE_AFTER", str(die_after))
        with pytest.raises(ReplayError):
            replay.compute(digits_run, ["train"], task=TASK, out=out, progress=False, flush_every=3)
    monkeypatch.delenv("REPLAY_TEST_DIE_AFTER")
    got = replay.compute(digits_run, ["train"], task=TASK, out=out, progress=False, flush_every=3)
    assert got.steps.collect().equals(ref.steps.collect())
    assert got.params.collect().equals(ref.params.collect())
    assert got.meta["grad_evals"] == ref.meta["grad_evals"], "a resume re-evaluates its first state, uncounted"


def test_a_renamed_run_is_still_the_same_run(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    replay.compute(run, ["train"], out=tmp_path / "lca", progress=False)
    moved = tmp_path / "moved"
    run.rename(moved)
    fr = replay.compute(moved, ["train"], out=tmp_path / "lca", progress=False)  # complete: loaded, not refused
    assert fr.meta["config"]["run_id"] == replay.open_run(moved).manifest.run_id


def test_two_computes_into_one_out_dir(digits_run, tmp_path, monkeypatch):
    from replay.lcadir import claim_lca_dir

    held = claim_lca_dir(tmp_path / "lca")  # another compute holds it
    try:
        res = CliRunner().invoke(app, ["compute", str(digits_run), "--loss", "train", "--out", str(tmp_path / "lca"),
                                       "--no-progress"])
        _one_line(res, "another `replay compute` is writing into it right now")
    finally:
        held.release()
    # two computes that overlap for certain: the first holds its lca dir, stopped at its first committed step,
    # while the second starts; then the first goes on and finishes
    import replay.engine.ledger

    inside, second_done, errors, first = threading.Event(), threading.Event(), [], []
    real = replay.engine.ledger.Ledger.record

    def record(self, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread() and not inside.is_set():
            inside.set()
            assert second_done.wait(120), "the second compute never ended"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(replay.engine.ledger.Ledger, "record", record)

    def one() -> None:
        try:
            first.append(replay.compute(digits_run, ["train"], out=tmp_path / "lca", progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=one)
    t.start()
    try:
        assert inside.wait(120), f"the first compute never reached a step: {errors}"
        with pytest.raises(ReplayError, match="another `replay compute` is writing into it right now"):
            replay.compute(digits_run, ["train"], out=tmp_path / "lca", progress=False)
    finally:
        second_done.set()
        t.join()
    assert not errors and len(first) == 1, errors
    assert first[0].steps.collect().height > 0
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "lca")]).exit_code == 0


def test_a_failed_first_compute_does_not_block_the_corrected_one(digits_run, tmp_path, monkeypatch):
    """An lca dir with nothing committed belongs to nobody (a wrong task that failed at its first batch)."""
    monkeypatch.setenv("REPLAY_TEST_DIE_AFTER", "1")
    with pytest.raises(ReplayError):
        replay.compute(digits_run, ["train"], task=TASK, out=tmp_path / "lca", progress=False)
    monkeypatch.delenv("REPLAY_TEST_DIE_AFTER")
    fr = replay.compute(digits_run, ["train", "val"], out=tmp_path / "lca", progress=False)  # other settings
    assert fr.meta["losses"] == ["train", "val"]


def test_ctrl_c_keeps_every_finished_step_and_the_resume_equals_one_compute(digits_run, tmp_path, monkeypatch):
    """A KeyboardInterrupt mid-step (raised from the loss, as Ctrl-C would) flushes the steps finished before it,
    never a part of the interrupted one; the resume is the uninterrupted compute, and the CLI says so in one line."""
    out = tmp_path / "lca"
    monkeypatch.setenv("REPLAY_TEST_DIE_AFTER", "25")  # loss calls: about one per evaluation
    monkeypatch.setenv("REPLAY_TEST_DIE_WITH", "interrupt")
    with pytest.raises(KeyboardInterrupt):
        replay.compute(digits_run, ["train"], per_class=["train"], task=TASK, out=out, progress=False)
    prog = json.loads((out / "progress.json").read_text())
    assert prog["steps_done"] > 0 and prog["next_step"] == prog["steps_done"], "flushed at once, not every 100"
    monkeypatch.delenv("REPLAY_TEST_DIE_AFTER")
    a = replay.compute(digits_run, ["train"], per_class=["train"], task=TASK, out=out, progress=False)
    b = replay.compute(digits_run, ["train"], per_class=["train"], task=TASK, out=tmp_path / "one", progress=False)
    for name, keys, cols in (("steps", ["step", "loss"], ["lca", "residual", "splits"]),
                             ("tensors", ["step", "loss", "tensor"], ["lca", "n_helped"])):
        x, y = (getattr(f, name).sort(keys).collect() for f in (a, b))
        assert x.select(keys + cols).equals(y.select(keys + cols)), name
    assert a.meta["grad_evals"] == b.meta["grad_evals"], "the interrupted step's evaluations are not counted"
    monkeypatch.setenv("REPLAY_TEST_DIE_AFTER", "60")
    res = CliRunner().invoke(app, ["compute", str(digits_run), "--task", TASK, "--out", str(tmp_path / "cli"),
                                   "--no-progress"])
    assert res.exit_code == 130
    assert "interrupted:" in res.output and "step(s) kept in" in res.output and "run the same command" in res.output


def test_a_live_run_says_so_and_the_same_command_later_extends_it_to_one_compute(tmp_path):
    """Compute while training records: a warning names how far the run is; after it grew, the same command
    extends the lca dir, and the frames (per-parameter totals and evaluations included) are those of one compute
    of the finished run, bit for bit. The recorder is flushed and idle while the run is read."""
    import polars as pl
    import torch
    from polars.testing import assert_frame_equal

    from replay.digits import digits, digits_mlp, load_digits_tensors

    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = load_digits_tensors()["train"]
    rec = replay.Recorder(model, tmp_path / "run", optimizer=opt, chunk_bytes=1 << 16)  # a chunk every ~4 states

    def train(updates: int) -> None:
        for i in range(0, 32 * updates, 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()

    train(12)
    rec.flush()  # states 0..11 on disk (state 12 is final at the next step)
    assert replay.open_run(tmp_path / "run").steps == list(range(12))
    kw = dict(per_class=["train"], progress=False)
    with pytest.warns(ReplayWarning, match=r"being recorded right now.*up to state 11.*run the same command again"):
        part = replay.compute(tmp_path / "run", ["train", "val"], task=digits(), out=tmp_path / "lca", **kw)
    assert part.steps.select("step").collect()["step"].max() == 10
    train(8)
    rec.close()
    assert replay.open_run(tmp_path / "run").steps == list(range(21))
    grown = replay.compute(tmp_path / "run", ["train", "val"], task=digits(), out=tmp_path / "lca", **kw)
    one = replay.compute(tmp_path / "run", ["train", "val"], task=digits(), out=tmp_path / "one", **kw)
    for name, keys in (("steps", ["step", "loss"]), ("tensors", ["step", "loss", "tensor"]),
                       ("params", ["loss", "tensor", "index"])):
        a, b = (getattr(f, name).collect().sort(keys) for f in (grown, one))
        assert_frame_equal(a, b, check_exact=True)
    assert grown.steps.select(pl.col("step").max()).collect().item() == 19
    for k in ("grad_evals", "n_steps", "n_unchanged", "losses"):
        assert grown.meta[k] == one.meta[k], k
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "lca")]).exit_code == 0
    again = replay.compute(tmp_path / "run", ["train", "val"], task=digits(), out=tmp_path / "lca", **kw)
    assert again.meta["grad_evals"] == one.meta["grad_evals"], "complete now: loaded, not extended again"
