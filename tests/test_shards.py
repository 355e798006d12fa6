"""Sharded recording under a real 2-process torchrun (DDP, gloo): each rank records half the bytes of every
state, and the run reads back bit-exact, as the one-rank recording of the same training; a missing shard,
a foreign shard and a shard's chunk moved into the other shard are each one line, never data."""

import json
import shutil

import pytest
import torch
from conftest import assert_bit_equal
from test_scale import TESTS, torchrun

import replay
from replay.errors import ReplayError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 40 DDP steps recorded twice: sharded (the default) and by rank 0 alone."""
    d = tmp_path_factory.mktemp("shards")
    (d / "one").mkdir()
    torchrun(str(TESTS / "ddp_train.py"), str(d / "run"), str(d), "40", "shard")
    torchrun(str(TESTS / "ddp_train.py"), str(d / "one" / "run"), str(d / "one"), "40", "rank0")
    return d


def chunk_bytes(path):
    return sum(p.stat().st_size for p in path.glob("chunk-*"))


def test_every_rank_records_half_and_the_run_reads_bit_exact(runs):
    run, one = replay.open_run(runs / "run"), replay.open_run(runs / "one" / "run")
    assert run.steps == one.steps == list(range(41))
    assert run.param_names == one.param_names
    for r in (0, 1):
        own = torch.load(runs / f"own-r{r}.pt")
        for t in (0, 17, 40):
            assert_bit_equal(run.state(t), own[t], f"rank {r}, state {t}")
    for (t, a), (_, b) in zip(run.states(), one.states(), strict=True):  # the same training, recorded by one rank
        assert_bit_equal(a, b, f"state {t}")
    shards = sorted(p.name for p in (runs / "run").iterdir() if p.is_dir())
    assert shards == ["shard-0-of-2", "shard-1-of-2"]
    whole = chunk_bytes(runs / "one" / "run")
    for s in shards:
        share = chunk_bytes(runs / "run" / s) / whole
        assert 0.45 < share < 0.55, f"{s} wrote {share:.1%} of the bytes one rank writes alone"
    infos = [json.loads((runs / f"info-r{r}.json").read_text()) for r in (0, 1)]
    assert all(i["recording"] and i["hooks"] == 2 for i in infos), "both ranks record, fenced by the pre-hook"
    assert not run.verify() and run.info().steps == 41 and run.live is False


def test_batches_of_every_rank(runs):
    b = replay.open_run(runs / "run").batches
    assert (b.group_by("step").len()["len"] == 64).all(), "both ranks' halves of each batch of 64"
    assert b["step"].n_unique() == 40


def test_compute_on_a_sharded_run_equals_the_one_rank_run(runs, tmp_path):
    a = replay.compute(runs / "run", ["train"], out=tmp_path / "a")
    b = replay.compute(runs / "one" / "run", ["train"], out=tmp_path / "b")
    assert a.steps.sort("step").collect()["lca"].equals(b.steps.sort("step").collect()["lca"])


def copy_run(runs, tmp_path):
    shutil.copytree(runs / "run", tmp_path / "run")
    return tmp_path / "run"


def test_a_missing_shard_is_one_line(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    shutil.rmtree(run / "shard-1-of-2")
    with pytest.raises(ReplayError, match=r"shard 1 of 2 is missing .*copy every rank's shard directory"):
        replay.open_run(run)


def test_a_foreign_shard_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    shutil.rmtree(run / "shard-1-of-2")
    shutil.copytree(runs / "run-b" / "shard-1-of-2", run / "shard-1-of-2")
    with pytest.raises(ReplayError, match="not shard 1 of this run"):
        replay.open_run(run)


def test_a_chunk_of_the_other_shard_is_refused(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    victim = sorted((run / "shard-1-of-2").glob("chunk-*"))[0]
    victim.unlink()
    shutil.copy(run / "shard-0-of-2" / victim.name, victim)
    with pytest.raises(ReplayError, match="chunk"):
        replay.open_run(run).state(0)
    assert any("shard-1-of-2" in p for p in replay.open_run(run).verify())


def test_a_shard_opened_alone_says_what_it_is(runs):
    with pytest.raises(ReplayError, match="is shard 0 of a sharded run"):
        replay.open_run(runs / "run" / "shard-0-of-2")


def test_a_rank_that_stopped_early_shortens_the_run_and_says_so(runs, tmp_path):
    run = copy_run(runs, tmp_path)
    last = sorted((run / "shard-1-of-2").glob("chunk-*"))[-1]
    if len(list((run / "shard-1-of-2").glob("chunk-*"))) < 2:
        pytest.skip("one chunk per shard")
    last.unlink()
    r = replay.open_run(run)
    assert r.steps[-1] < 40
    assert any("past the last one every shard has" in p for p in r.verify())


# ---- FSDP2 (fully_shard, DTensor parameters): each rank records its local shards ------------------------------

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fsdp")
    torchrun(str(TESTS / "fsdp_train.py"), str(d / "run"), str(d), "12")
    return d


def test_fsdp2_ranks_record_their_local_shards_and_the_run_reads_bit_exact(fsdp_run):
    run = replay.open_run(fsdp_run / "run")
    assert run.steps == list(range(13)) and not run.verify()
    assert run.param_names == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    for r in (0, 1):  # every rank's own gathered copy (full_tensor) of the parameters
        own = torch.load(fsdp_run / f"fsdp-own-r{r}.pt")
        for t in (0, 5, 12):
            assert_bit_equal(run.state(t), own[t], f"rank {r}, state {t}")
    sizes = [sum(p.spec.nbytes for p in ps) for ps in run.source.pieces]
    assert min(sizes) > 0.4 * sum(sizes), f"the local shards split the state: {sizes}"
    names = {p.spec.name for p in run.source.pieces[1]}
    assert "2.bias[3:5]" in names, "rank 1 holds rows 3..4 of the 5-row bias (dim-0 shards of unequal length)"


def test_a_fsdp2_run_replays_on_a_plain_model(fsdp_run, tmp_path):
    from replay.digits import load_digits_tensors

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 33), torch.nn.ReLU(), torch.nn.Linear(33, 5), torch.nn.ReLU(),
                                torch.nn.Linear(5, 10))
    fr = replay.compute(fsdp_run / "run", ["train"], task=replay.Task(model, load_digits_tensors()),
                        out=tmp_path / "lca")
    st = fr.steps.collect()
    assert len(st) == 12 and st["grounded"].all()


def test_a_missing_fsdp2_shard_is_one_line(fsdp_run, tmp_path):
    shutil.copytree(fsdp_run / "run", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "shard-0-of-2")
    with pytest.raises(ReplayError, match="shard 0 of 2 is missing"):
        replay.open_run(tmp_path / "run")


def test_fsdp2_pieces_that_do_not_tile_a_tensor_are_damage(fsdp_run, tmp_path):
    from replay.store.manifest import Manifest

    shutil.copytree(fsdp_run / "run", tmp_path / "run")
    m = Manifest.read(tmp_path / "run")
    m.shards["pieces"][1] = m.shards["pieces"][1][1:]  # resealed: a rank's first piece is nobody's now
    m.write(tmp_path / "run")
    with pytest.raises(ReplayError, match="damaged manifest .*held by no shard"):
        replay.open_run(tmp_path / "run")


def test_shard_outside_a_process_group_is_one_line(tmp_path):
    from replay.digits import digits_mlp

    with pytest.raises(ValueError, match="shard=True needs an initialized torch.distributed process group"):
        replay.Recorder(digits_mlp(), tmp_path / "run", shard=True)
    with pytest.raises(ValueError, match="not both"):
        replay.Recorder(digits_mlp(), tmp_path / "run", shard=True, rank=0)
    assert not (tmp_path / "run").exists()
