"""Recording overhead inside each training stack: the same training with and without replay, side by side.

For each stack (a plain loop, transformers.Trainer on a tiny GPT-2, lightning.Trainer, an
accelerate loop, a torch.compile'd model), rounds alternate "without" and "with" recording and
the median ratio of wall times is printed (1 torch thread unless --threads says otherwise).

    python tools/bench_stacks.py [--rounds 5] [--threads 1] [--stacks plain,hf,lightning,accelerate,compile]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import replay
from replay.digits import digits_mlp, load_digits_tensors

X, Y = load_digits_tensors()["train"]
EPOCHS = 12  # long enough (a few seconds) that per-step costs, not start and close, are measured


def plain(out: Path | None) -> None:
    model = digits_mlp(hidden=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = replay.Recorder(model, out, optimizer=opt) if out else None
    for _ in range(EPOCHS):
        for i in range(0, len(Y), 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i:i + 32]), Y[i:i + 32]).backward()
            opt.step()
    if rec:
        rec.close()


def compiled(out: Path | None) -> None:
    model = digits_mlp(hidden=256)
    fast = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = replay.Recorder(fast, out, optimizer=opt) if out else None
    for _ in range(EPOCHS):
        for i in range(0, len(Y) - 31, 32):  # one batch shape: no recompilation
            opt.zero_grad()
            nn.functional.cross_entropy(fast(X[i:i + 32]), Y[i:i + 32]).backward()
            opt.step()
    if rec:
        rec.close()


def hf(out: Path | None) -> None:
    import transformers

    from replay.huggingface import ReplayCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=512,
                                                                 n_positions=64))
    ids = torch.randint(0, 512, (512, 64), generator=torch.Generator().manual_seed(0))
    train = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(str(out or Path(tempfile.mkdtemp())) + "-hf", per_device_train_batch_size=8,
                                          gradient_accumulation_steps=2, num_train_epochs=2, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True, dataloader_num_workers=0)
    cbs = [ReplayCallback(out)] if out else []
    transformers.Trainer(model=model, args=args, train_dataset=train, callbacks=cbs).train()


def lightning_fit(out: Path | None) -> None:
    import lightning

    from replay.lightning import ReplayCallback

    class Net(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = digits_mlp(hidden=256)

        def training_step(self, batch, i):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=32)
    trainer = lightning.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[ReplayCallback(out)] if out else [])
    trainer.fit(Net(), loader)


def accelerate_loop(out: Path | None) -> None:
    import accelerate

    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = digits_mlp(hidden=256)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    rec = replay.Recorder(model, out, optimizer=opt) if out else None
    for _ in range(EPOCHS):
        for i in range(0, len(Y), 32):
            with acc.accumulate(model):
                acc.backward(nn.functional.cross_entropy(model(X[i:i + 32]), Y[i:i + 32]))
                opt.step()
                opt.zero_grad()
    if rec:
        rec.close()


STACKS = {"plain": plain, "hf": hf, "lightning": lightning_fit, "accelerate": accelerate_loop, "compile": compiled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stacks", default=",".join(STACKS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="bench_stacks_"))
    try:
        for name in a.stacks.split(","):
            fn = STACKS[name]
            fn(None)  # warm-up (imports, compilation)
            ratios, secs = [], []
            for r in range(a.rounds):
                t = {}
                for mode in ("without", "with") if r % 2 == 0 else ("with", "without"):
                    t0 = time.perf_counter()
                    fn(tmp / f"{name}-{r}" if mode == "with" else None)
                    t[mode] = time.perf_counter() - t0
                ratios.append(t["with"] / t["without"])
                secs.append(t["without"])
            run = replay.open_run(tmp / f"{name}-0")
            print(f"{name:11s} slowdown with recording {statistics.median(ratios):.3f}x (median of {a.rounds}, "
                  f"range {min(ratios):.3f}-{max(ratios):.3f}); training {statistics.median(secs):.2f}s, "
                  f"{len(run.steps) - 1} steps, {sum(s.numel for s in run.manifest.params):,} params")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
