"""The CUDA paths (states gathered and XORed on the GPU at the fence, copied into pinned chunk slots on a side
stream; GPU replay; GPU per-example LCA), each against
a CPU reference. Skipped without a GPU: CI has none, so run these on a GPU machine by hand
(`python -m pytest tests/test_cuda.py`); docs/benchmarks.md gives the last figures."""

import numpy as np
import polars as pl
import pytest
import tasks
import torch
from conftest import assert_bit_equal
from torch import nn

import replay
from replay.digits import digits_mlp, load_digits_tensors, train_digits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cpu_params(model: nn.Module) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("every", [1, 3])
def test_cuda_recording_is_bit_exact_with_in_place_edits(tmp_path, dtype, every):
    """States gathered at the fence (the next step's pre-hook), so that parameters changed in place after the
    step are in them, XORed on the GPU and copied into pinned memory: exactly what the next forward sees."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    model = model.to("cuda", dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (v.cuda() for v in load_digits_tensors()["train"])
    ref = {0: cpu_params(model)}
    with replay.Recorder(model, tmp_path / "run", optimizer=opt, every=every):
        for i in range(40):
            idx = slice(32 * i, 32 * i + 32)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx].to(dtype)).float(), y[idx]).backward()
            opt.step()
            if i % 4 == 1:
                with torch.no_grad():
                    model[0].weight.clamp_(-0.05, 0.05)  # weight clipping after the step
            ref[i + 1] = cpu_params(model)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(0, 41, every))
    for t, st in run.states():
        assert_bit_equal(st, ref[t], f"state {t}")


def test_cuda_replay_agrees_with_cpu_replay(tmp_path):
    """The same run replayed on the GPU and on the CPU, in float64: the frames agree to rounding, and
    both are grounded."""
    path, task = tmp_path / "run", tasks.digits64()
    (x, y), model = task.data["train"], task.model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with replay.Recorder(model, path, optimizer=opt, task="tasks:digits64"):
        for i in range(0, 1400, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
    kw = dict(per_class=["train"], tol=1e-5)
    cpu = replay.compute(path, ["train", "val"], task=tasks.digits64(), device="cpu", out=tmp_path / "cpu", **kw)
    gpu = replay.compute(path, ["train", "val"], task=tasks.digits64(), device="cuda", out=tmp_path / "gpu", **kw)
    a, b = (f.steps.sort("step", "loss").collect() for f in (cpu, gpu))
    assert a["grounded"].all() and b["grounded"].all()
    assert a["splits"].to_list() == b["splits"].to_list()
    for c in ("loss_before", "loss_after", "lca"):
        np.testing.assert_allclose(b[c].to_numpy(), a[c].to_numpy(), rtol=1e-9, atol=1e-12, err_msg=c)
    ta, tb = (f.tensors.sort("step", "loss", "tensor").collect() for f in (cpu, gpu))
    np.testing.assert_allclose(tb["lca"].to_numpy(), ta["lca"].to_numpy(), rtol=1e-7, atol=1e-12)
    pa, pb = (f.params.sort("loss", "tensor", "index").collect() for f in (cpu, gpu))
    np.testing.assert_allclose(pb["lca"].to_numpy(), pa["lca"].to_numpy(), rtol=1e-6, atol=1e-10)


def test_cuda_per_example_agrees_with_cpu(tmp_path):
    path = tmp_path / "run"
    train_digits(digits_mlp(), str(path), epochs=1, batch=128)
    cpu = replay.compute(path, ["val"], per_example=["val"], device="cpu", out=tmp_path / "cpu", tol=1e-4)
    gpu = replay.compute(path, ["val"], per_example=["val"], device="cuda", out=tmp_path / "gpu", tol=1e-4)
    a, b = (f.example_steps.sort("step", "example").collect() for f in (cpu, gpu))
    assert b["grounded"].all() and len(a) == len(b)
    np.testing.assert_allclose(b["loss_before"].to_numpy(), a["loss_before"].to_numpy(), rtol=1e-4, atol=1e-6)
    # float32 on two devices: per-example allocations agree to the tolerance they were computed to
    assert (b["lca"] - a["lca"]).abs().max() <= 2e-4
    tot = [f.examples.group_by("example").agg(pl.col("lca").sum()).sort("example").collect()["lca"].to_numpy()
           for f in (cpu, gpu)]
    assert np.abs(tot[0] - tot[1]).max() <= 1e-3


def test_cuda_gradscaler_skips_are_zero_change_states(tmp_path):
    """AMP float16 with a GradScaler that skips overflowing steps: `capture()` after `scaler.update()` gives one
    state per iteration, a skipped one unchanged, and the last state is the model's."""
    torch.manual_seed(0)
    model = digits_mlp(hidden=128).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 40)  # overflows at first: the first steps are skipped
    x, y = (v.cuda() for v in load_digits_tensors()["train"])
    ref = {0: cpu_params(model)}
    with replay.Recorder(model, tmp_path / "run") as rec:
        for i in range(30):
            idx = slice(32 * i, 32 * i + 32)
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            rec.capture()
            ref[i + 1] = cpu_params(model)
    run = replay.open_run(tmp_path / "run")
    skipped = [t for t in range(1, 31) if all(torch.equal(ref[t][n], ref[t - 1][n]) for n in ref[t])]
    assert skipped, "the huge initial scale should make the scaler skip steps"
    for t, st in run.states():
        assert_bit_equal(st, ref[t], f"state {t}")
    fr = replay.compute(run, ["train"], task=replay.Task(digits_mlp(hidden=128), load_digits_tensors()),
                        device="cuda", out=tmp_path / "lca")
    s = fr.steps.sort("step").collect()
    assert s.filter(pl.col("step").is_in([t - 1 for t in skipped]))["unchanged"].all()
    assert s["grounded"].all()


def test_hf_trainer_fp16_on_cuda_records_one_state_per_global_step(tmp_path):
    """The Trainer's own AMP: a step its scaler skipped is still a state (unchanged), so state t is global_step t."""
    transformers = pytest.importorskip("transformers")
    from test_stacks import ListDataset, Reference, lm_data, tiny_gpt2

    from replay.huggingface import ReplayCallback

    ref = Reference()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=6,
        learning_rate=3e-3, report_to=[], save_strategy="no", logging_strategy="no", fp16=True, seed=0,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=ListDataset(lm_data()),
                                   callbacks=[ReplayCallback(tmp_path / "run", task="x:y"), ref])
    trainer.train()
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(trainer.state.global_step + 1))
    final = cpu_params(trainer.model)
    assert_bit_equal(run.state(run.steps[-1]), {n: final[n] for n in run.state(0)}, "last state")


def test_lightning_16_mixed_on_cuda_records_every_optimizer_step(tmp_path):
    lightning = pytest.importorskip("lightning")
    from test_stacks import DigitsModule

    from replay.lightning import ReplayCallback

    x, y = load_digits_tensors()["train"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:640], y[:640]), batch_size=32)
    model = DigitsModule()
    trainer = lightning.Trainer(max_steps=8, accelerator="gpu", devices=1, precision="16-mixed", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ReplayCallback(tmp_path / "run")])
    trainer.fit(model, loader)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(trainer.global_step + 1))
    final = cpu_params(model)
    assert_bit_equal(run.state(run.steps[-1]), {n: final[n] for n in run.state(0)}, "last state")


def test_cuda_update_interrupted_after_its_pre_hook_is_the_last_state(tmp_path):
    """The CUDA snapshot's close: a step interrupted once the state was fenced leaves the model with parameters
    no post-hook saw; the run still ends with them (as tests/test_interrupts.py checks on the CPU paths)."""
    from test_interrupts import train_interrupting_the_last_step

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = replay.Recorder(model, tmp_path / "run", optimizer=opt)
    batch = (torch.randn(16, 8, device="cuda"), torch.randint(0, 3, (16,), device="cuda"))
    train_interrupting_the_last_step(model, opt, [batch] * 4, changed=True)
    rec.close()
    states = list(replay.open_run(tmp_path / "run").states())
    assert len(states) == 5
    assert_bit_equal(states[-1][1], cpu_params(model))
