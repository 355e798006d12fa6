"""Scale: real 2-process torchrun (gloo, CPU) for sharded replay, data-parallel replay and DDP recording."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import tasks
import torch
from conftest import assert_bit_equal
from polars.testing import assert_frame_equal

import replay
from replay.digits import train_digits
from replay.engine.parallel import BLOCKS_PER_RANK, MIN_BLOCK_STEPS, Placement, segments, shard_batches
from replay.errors import ReplayError
from replay.lcadir.resume import Checkpoint

TESTS = Path(__file__).parent
KEYS = {"steps": ["step", "loss"], "tensors": ["step", "loss", "tensor"], "params": ["loss", "tensor", "index"]}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                        str(nproc), *args], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def single_thread_compute(*args, **kwargs) -> replay.Frames:
    """The single-process reference at torchrun's thread count, so per-step numbers may be compared bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return replay.compute(*args, **kwargs)
    finally:
        torch.set_num_threads(n)


def frames(fr: replay.Frames) -> dict[str, pl.DataFrame]:
    return {k: getattr(fr, k).sort(keys).collect() for k, keys in KEYS.items()}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A digits MLP (float32) trained for 40 steps by 2 DDP processes, each calling Recorder on the same path."""
    d = tmp_path_factory.mktemp("ddp")
    torchrun(str(TESTS / "ddp_train.py"), str(d / "run"), str(d), "40")
    return d


def test_ddp_records_once_on_rank_0(ddp_run):
    run = replay.open_run(ddp_run / "run")
    assert run.steps == list(range(41))
    assert run.param_names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"], \
        "the DDP wrapper's 'module.' prefix must not reach the run"
    for rank in (0, 1):  # DDP keeps the ranks identical, and the recorded state is theirs bit for bit
        assert_bit_equal(run.state(40), torch.load(ddp_run / f"final-r{rank}.pt"), f"rank {rank}")
    info = [json.loads((ddp_run / f"info-r{r}.json").read_text()) for r in (0, 1)]
    assert info[0]["recording"] and info[0]["hooks"] == 2  # optimizer pre/post
    assert any(t.startswith("replay-clock") for t in info[0]["threads"])  # (small states: no encoder thread)
    # rank 1: nothing that could make it wait — no fence (pre-hook), no threads — but it still counts steps
    assert not info[1]["recording"] and info[1]["hooks"] == 1 and info[1]["step"] == 40
    assert not any(t.startswith("replay-") for t in info[1]["threads"])
    assert sorted(p.name for p in (ddp_run / "run").iterdir() if not p.name.startswith(("chunk-", "batches-"))) \
        == ["manifest.json"]


def test_torchrun_steps_mode_equals_one_process(ddp_run, tmp_path):
    ref = single_thread_compute(ddp_run / "run", per_class=["train"], out=tmp_path / "one")
    p = torchrun("-m", "replay", "compute", str(ddp_run / "run"), "--per-class", "train", "--out",
                 str(tmp_path / "two"), "--no-progress")
    assert p.stdout.count("computed 40 steps x 12 losses") == 1, "rank 0 reports, once"
    got = replay.load(tmp_path / "two")
    assert sorted(f.name for f in (tmp_path / "two" / "steps").iterdir()) == \
        ["part-r000-000000.parquet", "part-r001-000000.parquet"]
    assert not list((tmp_path / "two").glob("progress*")) and not list((tmp_path / "two").glob("totals*"))
    assert got.meta["processes"] == 2 and got.meta["parallel"] == "steps"
    # each block after the first evaluates its first state itself, instead of reusing the previous step's end
    blocks = sum(len(segments(list(range(40)), Placement(r, 2))) for r in (0, 1))
    assert got.meta["grad_evals"] == ref.meta["grad_evals"] + blocks - 1
    a, b = frames(ref), frames(got)
    assert_frame_equal(a["steps"], b["steps"], check_exact=True)  # every step: the same computation
    assert_frame_equal(a["tensors"], b["tensors"], check_exact=True)
    # the totals: per-block float64 sums, then summed across blocks
    assert_frame_equal(a["params"], b["params"], check_exact=False, rel_tol=1e-12, abs_tol=1e-15)


def test_torchrun_data_parallel_equals_one_process(ddp_run, tmp_path):
    """Replayed in float64 (float32 runs, float64 tasks), so that only summation order can differ."""
    bn_run = tmp_path / "bn"
    train_digits(tasks.BNDropNet(), str(bn_run), epochs=1, batch=128, task="tasks:bn_drop64")
    jobs = [{"run": str(ddp_run / "run"), "out": str(tmp_path / "mlp"), "task": "tasks:digits64",
             "per_class": ["train"], "data_parallel": True},
            {"run": str(bn_run), "out": str(tmp_path / "bnout"), "task": "tasks:bn_drop64", "per_class": [],
             "data_parallel": True}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    torchrun(str(TESTS / "dist_compute.py"), str(tmp_path / "jobs.json"))
    noise = []
    for job in jobs:
        ref = replay.compute(job["run"], per_class=job["per_class"], task=job["task"],
                             out=Path(job["out"] + "-one"))
        got = replay.load(job["out"])
        assert got.meta["processes"] == 2 and got.meta["parallel"] == "data"
        assert got.meta["grad_evals"] == ref.meta["grad_evals"]
        assert sorted(f.name for f in (Path(job["out"]) / "steps").iterdir()) == ["part-r000-000000.parquet"]
        # each rank wrote the params rows of its own slice of the parameters
        assert sorted(f.name for f in (Path(job["out"]) / "params").iterdir()) == \
            ["part-r000.parquet", "part-r001.parquet"]
        noise += assert_close_up_to_summation_order(frames(ref), frames(got), job["task"])
    assert noise == ["net.0.bias"], "the noise exemption must not hide a real difference"


def assert_close_up_to_summation_order(a: dict, b: dict, where: str) -> list[str]:
    """float64 frames to 1e-9; counts exact, except those of tensors whose allocation is pure rounding noise.

    A tensor whose true gradient is zero (a bias before batch-norm) has |LCA| ~1e-25 of either sign,
    so its helped counts are noise in one process as in two. Returns those tensors' names.
    """
    per_tensor = a["tensors"].group_by("tensor").agg(pl.col("lca").abs().max(), pl.col("n_params").first())
    noise = per_tensor.filter(pl.col("lca") < 1e-20)["tensor"].sort().to_list()
    noise_share = per_tensor.filter(pl.col("lca") < 1e-20)["n_params"].sum() / per_tensor["n_params"].sum()
    for k in KEYS:
        counts = [c for c in ("n_helped", "frac_helped") if c in a[k].columns]
        exact = [c for c, t in a[k].schema.items() if t != pl.Float64 and c not in counts]
        assert_frame_equal(a[k].select(exact), b[k].select(exact), check_exact=True)
        for c in set(a[k].columns) - set(exact) - set(counts):
            x, y = a[k][c].to_numpy(), b[k][c].to_numpy()
            assert np.allclose(x, y, rtol=1e-9, atol=1e-13), f"{where} {k}.{c}: {np.abs(x - y).max():.2e}"
        if "n_helped" in counts:
            keep = ~pl.col("tensor").is_in(noise)
            assert a[k].filter(keep)["n_helped"].equals(b[k].filter(keep)["n_helped"]), f"{where} {k}.n_helped"
    fa, fb = a["steps"]["frac_helped"], b["steps"]["frac_helped"]
    assert fa.is_null().equals(fb.is_null()), f"{where}: frac_helped is null elsewhere"
    frac = np.abs(fa.drop_nulls().to_numpy() - fb.drop_nulls().to_numpy())
    assert frac.max(initial=0.0) <= noise_share + 1e-12, f"{where}: frac_helped differs by {frac.max():.2e}"
    return noise


def test_blocks_and_shards_cover_everything_once():
    for n in [0, 1, 7, 15, 16, 17, 30, 88, 129, 1000]:
        todo = list(range(100, 100 + 3 * n, 3))
        for world in range(1, 6):
            mine = [segments(todo, Placement(r, world)) for r in range(world)]
            assert sorted(t for segs in mine for seg in segs for t in seg) == todo
            for segs in mine:
                assert len(segs) <= BLOCKS_PER_RANK
                for seg in segs:  # a block is a run of consecutive steps
                    i = todo.index(seg[0])
                    assert todo[i:i + len(seg)] == seg
                    assert len(seg) >= min(MIN_BLOCK_STEPS, n // world)
            sizes = [sum(map(len, segs)) for segs in mine]
            assert max(sizes) - min(sizes) <= BLOCKS_PER_RANK, "blocks differ by at most one step"
            assert segments(todo, Placement(0, world, data_parallel=True)) == ([todo] if todo else [])
    rank_1 = segments(list(range(88)), Placement(1, 2))
    assert [seg[0] for seg in rank_1] == [9, 27, 45, 63, 80], "10 blocks of 8-9 steps, dealt in turn"
    batches = [(0, 256, 0), (256, 300, 0), (300, 556, 1), (556, 700, 2)]
    for world in (2, 3, 7):
        cut = [shard_batches(batches, Placement(r, world, data_parallel=True), False) for r in range(world)]
        covered = sorted((a, b) for part in cut for a, b, _ in part)
        assert sum(b - a for a, b in covered) == 700 and all(a < b for a, b in covered)
        assert all(x[1] <= y[0] for x, y in zip(covered, covered[1:], strict=False)), "shards overlap"
        assert max(sum(b - a for a, b, _ in p) for p in cut) - min(sum(b - a for a, b, _ in p) for p in cut) <= 1
        whole = [shard_batches(batches, Placement(r, world, data_parallel=True), True) for r in range(world)]
        assert sorted(sum(whole, [])) == batches, "batch-norm batches must stay whole"


def test_resume_with_another_process_layout_is_refused(tmp_path):
    out, config = tmp_path / "lca", {"x": 1}
    out.mkdir()
    totals = {"n_steps": torch.zeros(1, dtype=torch.int64)}

    def opened(out, place):
        ck = Checkpoint(out, config, place)
        ck.release()
        return ck

    for r in (0, 1):
        opened(out, Placement(r, 2)).save(7, totals, 3, 0)
    assert opened(out, Placement(1, 2)).next_step == 7, "the same place resumes"
    with pytest.raises(ReplayError, match=r"unfinished compute started by 2 processes in steps mode .* same proc"):
        opened(out, Placement())  # one process
    with pytest.raises(ReplayError, match="started by 2 processes in steps mode"):
        opened(out, Placement(0, 3))  # blocks of 3 are other steps than blocks of 2
    with pytest.raises(ReplayError, match="started by 2 processes in steps mode"):
        opened(out, Placement(0, 2, data_parallel=True))  # slices of parameters, not blocks of steps
    one = tmp_path / "one"
    one.mkdir()
    opened(one, Placement()).save(5, totals, 2, 0)
    assert opened(one, Placement()).next_step == 5
    with pytest.raises(ReplayError, match="started by one process"):
        opened(one, Placement(0, 2))


def test_torchrun_resumes_after_a_rank_dies(ddp_run, tmp_path):
    """Rank 1 raises mid-block (as a lost node would); the same command then resumes from each rank's last flush."""
    ref = single_thread_compute(ddp_run / "run", per_class=["train"], out=tmp_path / "one")
    out = tmp_path / "two"
    job = [{"run": str(ddp_run / "run"), "out": str(out), "task": "tasks:digits_dies_on_rank_1",
            "per_class": ["train"], "flush_every": 4}]
    (tmp_path / "jobs.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "REPLAY_TEST_DIE_AFTER": "60"}  # ~30 evaluations of train and val
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(TESTS / "dist_compute.py"), str(tmp_path / "jobs.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "rank 1 dies here" in p.stderr
    left = json.loads((out / "progress-r001.json").read_text())
    # rank 1's blocks are steps 10..19 and 30..39 (4 blocks of 10, dealt in turn)
    assert [seg[0] for seg in segments(list(range(40)), Placement(1, 2))] == [10, 30]
    assert 30 < left["next_step"] < 40, "rank 1 did its first block and flushed part of its second before dying"
    assert not (out / "meta.json").exists()
    torchrun(str(TESTS / "dist_compute.py"), str(tmp_path / "jobs.json"))
    got = replay.load(out)
    a, b = frames(ref), frames(got)
    assert_frame_equal(a["steps"], b["steps"], check_exact=True)
    assert_frame_equal(a["tensors"], b["tensors"], check_exact=True)
    assert_frame_equal(a["params"], b["params"], check_exact=False, rel_tol=1e-12, abs_tol=1e-15)


def test_parameter_slices_cover_every_column_once():
    from replay.engine.parallel import param_pieces, slice_cuts

    sizes = [6, 1, 10, 3]  # P = 20
    for world in (1, 2, 3, 7, 25):
        S = -(-20 // world)
        flat = []
        for i, pieces in enumerate(param_pieces(sizes, S)):
            for r, a, b, sa, sb in pieces:
                assert 0 <= a < b <= S and b - a == sb - sa
                flat += [(r * S + a + k, sum(sizes[:i]) + sa + k) for k in range(b - a)]
        assert all(dst == src for dst, src in flat) and sorted(d for d, _ in flat) == list(range(20))
        for r in range(world):  # a slice's columns, cut at tensor edges (id 4 = the padding after P)
            cuts, ids = slice_cuts(sizes, r * S, (r + 1) * S, torch.device("cpu"))
            assert sum(cuts) == S
            if world == 1:
                assert ids is None
    cuts, ids = slice_cuts(sizes, 7, 14, torch.device("cpu"))
    assert cuts == [7] and ids.tolist() == [2]
    cuts, ids = slice_cuts(sizes, 14, 21, torch.device("cpu"))
    assert cuts == [3, 3, 1] and ids.tolist() == [2, 3, 4]


def test_sharded_parameters_are_refused(tmp_path):
    """DTensor parameters laid out other than FSDP2's way (here: one parameter sharded, the others plain) are
    refused in one line; FSDP2 models are recorded shard by shard (test_shards.py)."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from replay.digits import digits_mlp
    from replay.errors import RecordError

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = digits_mlp()
        mesh = init_device_mesh("cpu", (1,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        with pytest.raises(RecordError, match="DTensors sharded other than FSDP2's way"):
            replay.Recorder(model, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    finally:
        dist.destroy_process_group()


def test_a_rank_that_lists_the_out_dir_before_another_writes_its_progress(tmp_path):
    """torchrun ranks start the same compute at once: rank 1 may list the lca dir before rank 0's progress
    file exists and look again after it does; that file is the same compute's, not a foreign dir."""
    from replay.lcadir.resume import Checkpoint

    out, config = tmp_path / "lca", {"losses": ["train"]}
    assert not out.exists()
    Checkpoint(out, config, Placement(0, 2)).release()  # rank 0: writes progress-r000.json before its first flush
    ck = Checkpoint(out, config, Placement(1, 2))  # then rank 1 opens it: the same compute's
    assert ck.next_step is None and not ck.complete
    ck.release()
