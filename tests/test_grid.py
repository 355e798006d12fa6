"""The recording grid: dtype × device × every × compress × shards, one parametrized test. Every cell's run
reads back bit-exact against the parameters training had, verifies clean, and says what it is (info)."""

import pytest
import torch
from conftest import assert_bit_equal
from grid_train import DTYPES, STEPS, cell_name, cells
from test_scale import TESTS, torchrun

import replay

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                   reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """{(device, shards): directory of every cell's run and refs.pt}; each recorded once, on first use."""
    base, made = tmp_path_factory.mktemp("grid"), {}

    def get(device: str, shards: int):
        if (device, shards) not in made:
            out = base / f"{device}-{shards}"
            out.mkdir()
            if shards == 1:
                import grid_train

                grid_train.main(str(out), device)
            else:
                torchrun(str(TESTS / "grid_train.py"), str(out), device, nproc=shards)
            made[device, shards] = out
        return made[device, shards]

    return get


@pytest.mark.parametrize("shards", [1, 2], ids=["whole", "2-shards"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,every,compress", cells(), ids=[cell_name(*c) for c in cells()])
def test_every_cell_of_the_grid_reads_back_bit_exact(recorded, device, shards, dtype, every, compress):
    if compress:
        pytest.importorskip("zstandard")
    if shards > 1 and device == "cuda":
        pytest.skip("sharded recording under torchrun is tested on the CPU (gloo)")
    out = recorded(device, shards)
    ref = torch.load(out / "refs.pt")[cell_name(dtype, every, compress)]
    run = replay.open_run(out / cell_name(dtype, every, compress))
    assert run.steps == list(range(0, STEPS + 1, every))
    assert run.verify() == []
    for t, st in run.states():
        assert_bit_equal(st, ref[t], f"state {t}")
        assert all(v.dtype == DTYPES[dtype] for v in st.values())
    info = run.info()
    assert info.steps == len(run.steps) and (info.compressed > 0) == compress
    assert (out / cell_name(dtype, every, compress) / "shard-1-of-2").is_dir() == (shards == 2)
