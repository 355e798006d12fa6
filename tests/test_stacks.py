"""Recording inside real training stacks (transformers.Trainer, lightning.Trainer, accelerate, torch.compile),
each state checked bit for bit against a reference taken in the same training."""

import polars as pl
import pytest
import torch
from conftest import assert_bit_equal, params_of
from torch import nn

import replay
from replay.digits import digits_mlp, load_digits_tensors

transformers = pytest.importorskip("transformers")
lightning = pytest.importorskip("lightning")


# ---- transformers.Trainer on a tiny GPT-2 (from a config: no download) ----------------------------

def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def lm_data(n=48, seq=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % 64  # something learnable: every odd token follows from the one before
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, d):
        self.d = d

    def __len__(self):
        return len(self.d["input_ids"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.d.items()}


class Reference(transformers.TrainerCallback):
    """The parameters at train begin and after every optimizer step, as the Trainer holds them."""

    def __init__(self):
        self.states = []

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.states.append(params_of(model))

    def on_step_end(self, args, state, control, model=None, **kw):
        self.states.append(params_of(model))


def test_hf_trainer_records_every_optimizer_step_bit_exact(tmp_path):
    from replay.huggingface import ReplayCallback

    model, ref = tiny_gpt2(), Reference()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=2,
        max_steps=5, learning_rate=3e-3, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ListDataset(lm_data()),
                                   callbacks=[ReplayCallback(tmp_path / "run", task="x:y"), ref])
    trainer.train()
    run = replay.open_run(tmp_path / "run")
    assert trainer.state.global_step == 5 and run.steps == list(range(6)), "one state per optimizer step"
    assert run.aliases == {"lm_head.weight": "transformer.wte.weight"}
    for t, st in run.states():
        assert_bit_equal(st, {n: ref.states[t][n] for n in st}, f"state {t}")
    assert run.manifest.metadata["gradient_accumulation_steps"] == 2

    # replay with HF-style dict data and the causal-LM loss: grounded, and the loss is the model's own
    data = lm_data()
    task = replay.Task(tiny_gpt2(), {"train": data}, loss_fn=replay.losses.causal_lm, batch_size=16)
    fr = replay.compute(run, task=task, out=tmp_path / "lca", tol=1e-5)
    s = fr.steps.sort("step").collect()
    assert s["grounded"].all() and s["residual"].abs().max() <= 1e-5
    m = tiny_gpt2()
    m.load_state_dict({**run.state(0), "lm_head.weight": run.state(0)["transformer.wte.weight"]})
    m.eval()
    with torch.no_grad():
        own = m(**data).loss.item()  # equal-length sequences: the token mean is the sequence mean
    assert s["loss_before"][0] == pytest.approx(own, rel=1e-5)


def test_causal_lm_loss_honours_ignored_labels_and_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 1, 2, 0, 0]])
    labels = ids.clone()
    labels[0, 2] = -100
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    got = replay.losses.causal_lm(type("Out", (), {"logits": logits})(), {"input_ids": ids, "labels": labels,
                                                                          "attention_mask": mask})
    lp = torch.log_softmax(logits, -1)
    row0 = -(lp[0, 0, 2] + lp[0, 2, 4] + lp[0, 3, 5]) / 3  # token 2's label is ignored
    row1 = -(lp[1, 0, 1] + lp[1, 1, 2]) / 2  # positions 3, 4 are padding
    torch.testing.assert_close(got, torch.stack([row0, row1]))


# ---- lightning.Trainer -------------------------------------------------------------------------

class DigitsModule(lightning.LightningModule):
    def __init__(self, manual=False):
        super().__init__()
        self.net = digits_mlp()
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        self.manual_backward(loss / 2)
        if i % 2 == 1:  # accumulating by hand: one update per two batches
            opt.step()
            opt.zero_grad()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class LightningReference(lightning.pytorch.callbacks.Callback):
    def __init__(self):
        self.states, self.last = {}, None

    def on_train_start(self, trainer, pl_module):
        self.states[0] = params_of(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.states[trainer.global_step] = params_of(pl_module)


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lightning_records_every_optimizer_step_under_accumulation(tmp_path, manual):
    from replay.lightning import ReplayCallback

    x, y = load_digits_tensors()["train"]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:640], y[:640]), batch_size=32)
    ref = LightningReference()
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                accumulate_grad_batches=1 if manual else 2,
                                callbacks=[ReplayCallback(tmp_path / "run", task="replay.digits:digits"), ref])
    module = DigitsModule(manual)
    trainer.fit(module, loader)
    run = replay.open_run(tmp_path / "run")
    assert trainer.global_step == 10 and run.steps == list(range(11)), "one state per optimizer step"
    assert run.param_names == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight",
                               "net.4.bias"]
    for t, st in run.states():
        assert_bit_equal(st, ref.states[t], f"state {t}")


# ---- accelerate and torch.compile ----------------------------------------------------------------

def test_accelerate_wrapped_optimizer_is_hooked_through(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = digits_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    assert type(opt).__name__ == "AcceleratedOptimizer"
    x, y = load_digits_tensors()["train"]
    ref = {0: params_of(model)}
    with replay.Recorder(model, tmp_path / "run", optimizer=opt) as rec:
        for i in range(8):
            with acc.accumulate(model):
                acc.backward(nn.functional.cross_entropy(model(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16]))
                opt.step()
                opt.zero_grad()
            if i % 2 == 1:
                ref[rec.step] = params_of(model)
    run = replay.open_run(tmp_path / "run")
    assert run.steps == [0, 1, 2, 3, 4], "one state per real update, not per micro-batch"
    for t, st in run.states():
        assert_bit_equal(st, ref[t], f"state {t}")


def test_compiled_model_records_the_plain_names_and_replays_with_the_plain_model(tmp_path):
    model = digits_mlp()
    compiled = torch.compile(model, backend="eager")  # dynamo tracing, no C++ build: the wrapper is what matters
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = load_digits_tensors()["train"]
    with replay.Recorder(compiled, tmp_path / "run", optimizer=opt, task="replay.digits:digits"):
        for i in range(0, 320, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(compiled(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    run = replay.open_run(tmp_path / "run")
    assert run.param_names == [n for n, _ in digits_mlp().named_parameters()]
    assert_bit_equal(run.state(10), params_of(model))
    fr = replay.compute(run, ["train"], out=tmp_path / "lca")  # the run's task: the plain model
    assert fr.steps.collect()["grounded"].all()


def test_hf_trainer_loading_the_best_checkpoint_does_not_change_the_last_state(tmp_path):
    """load_best_model_at_end loads an earlier checkpoint into the model after training: the run's last
    state is still the last trained parameters (the recorder closed at the last epoch's end)."""
    from replay.huggingface import ReplayCallback

    data = lm_data()
    ref = Reference()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6, learning_rate=0.5,
        report_to=[], eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # the worst is "best"
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    model = tiny_gpt2()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ListDataset(data),
                                   eval_dataset=ListDataset(data), callbacks=[ReplayCallback(tmp_path / "run"), ref])
    trainer.train()
    run = replay.open_run(tmp_path / "run")
    assert run.steps == list(range(7))
    last = run.state(6)
    assert_bit_equal(last, {n: ref.states[6][n] for n in last})
    loaded = params_of(model)
    assert any(not torch.equal(loaded[n], last[n]) for n in last), "the test needs a best checkpoint != the last"


def test_hf_trainer_logs_the_batch_of_every_step(tmp_path):
    from replay.huggingface import ReplayCallback

    data = lm_data()
    data["example_ids"] = torch.arange(len(data["input_ids"]))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, remove_unused_columns=False)
    trainer = transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=ListDataset(data),
                                   callbacks=[ReplayCallback(tmp_path / "run")])
    trainer.train()
    b = replay.open_run(tmp_path / "run").batches
    assert b["step"].unique().sort().to_list() == [0, 1, 2]
    assert (b.group_by("step").len()["len"] == 16).all(), "two micro-batches of 8 per optimizer step"
    assert sorted(b["example"].to_list()) == list(range(48)), "each example once (one epoch of 48)"


def test_per_example_lca_of_a_causal_lm(tmp_path):
    """Per-sequence LCA of a GPT-2 run (dict data, causal_lm), eager or SDPA attention alike."""
    from replay.huggingface import ReplayCallback

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=ListDataset(lm_data()),
                         callbacks=[ReplayCallback(tmp_path / "run")]).train()
    eager = tiny_gpt2()
    eager.config._attn_implementation = "eager"
    data = lm_data()
    fr = replay.compute(tmp_path / "run", task=replay.Task(eager, {"train": data}, loss_fn=replay.losses.causal_lm),
                        per_example=["train"], out=tmp_path / "lca", tol=1e-5)
    es = fr.example_steps.collect()
    assert len(es) == 3 * 48 and es["grounded"].all()
    mean = es.group_by("step").agg(pl.col("lca").mean()).sort("step")["lca"].to_numpy()
    assert abs(mean - fr.steps.sort("step").collect()["lca"].to_numpy()).max() <= 2e-5
    sdpa = replay.Task(tiny_gpt2(), {"train": data}, loss_fn=replay.losses.causal_lm)
    other = replay.compute(tmp_path / "run", task=sdpa, per_example=["train"], out=tmp_path / "sdpa", tol=1e-5)
    a = es.sort("step", "example")["lca"].to_numpy()
    b = other.example_steps.collect().sort("step", "example")["lca"].to_numpy()
    assert abs(a - b).max() <= 1e-6 * max(1.0, abs(a).max()), "SDPA attention gives the eager answer"
