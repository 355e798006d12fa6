"""Reproduce the LCA paper's setups: MNIST FC / LeNet and CIFAR-10 ResNet-20, recorded.

Data come from a local torchvision folder (nothing is downloaded):

    python tools/paper.py train mnist-fc --data-dir ~/data --out runs/mnist-fc --epochs 1
    REPLAY_DATA_DIR=~/data replay compute runs/mnist-fc --loss train --loss val --per-class train
    python tools/paper.py train cifar-resnet20 --data-dir ~/data --out runs/resnet20 --device cuda

The paper evaluates LCA on a fixed subset of examples; `--eval-examples` (default 10,000
train, all test) sets its size. The task functions below (`paper:mnist_fc`, ...) read the
data folder from REPLAY_DATA_DIR. `--fake` swaps in torchvision's FakeData for a smoke test.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import replay

# ---- models (the paper's architectures) ---------------------------------------------


def mnist_fc_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(),
                         nn.Linear(50, 10))


def lenet_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


def resnet20_model() -> nn.Module:
    """He et al.'s CIFAR ResNet-20: 3 stages × 3 blocks, 16/32/64 channels (~0.27M params)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


SETUPS = {"mnist-fc": (mnist_fc_model, "mnist"), "mnist-lenet": (lenet_model, "mnist"),
          "cifar-resnet20": (resnet20_model, "cifar10")}

# ---- data -----------------------------------------------------------------------------


def tensors(dataset: str, data_dir: str | None, train: bool, limit: int | None, fake: bool = False):
    from torchvision import datasets, transforms

    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    if fake:
        ds = datasets.FakeData(size=limit or 512, image_size=shape, num_classes=10,
                               transform=transforms.ToTensor(), random_offset=0 if train else 10_000)
    else:
        cls = datasets.MNIST if dataset == "mnist" else datasets.CIFAR10
        try:
            ds = cls(data_dir, train=train, download=False, transform=transforms.ToTensor())
        except RuntimeError as e:
            raise SystemExit(f"error: {dataset} not found under {data_dir!r} ({e}); put torchvision's "
                             f"{cls.__name__} files there (this tool never downloads)") from None
    n = min(len(ds), limit) if limit else len(ds)
    xs = torch.stack([ds[i][0] for i in range(n)])
    ys = torch.tensor([int(ds[i][1]) for i in range(n)])
    return xs, ys


def make_task(setup: str) -> replay.Task:
    model_fn, dataset = SETUPS[setup]
    data_dir = os.environ.get("REPLAY_DATA_DIR")
    fake = os.environ.get("REPLAY_FAKE_DATA") == "1"
    limit = int(os.environ.get("REPLAY_EVAL_EXAMPLES", "10000"))
    data = {"train": tensors(dataset, data_dir, True, limit, fake),
            "val": tensors(dataset, data_dir, False, None if not fake else 256, fake)}
    return replay.Task(model_fn(), data, batch_size=1000, batchnorm="batch")


@replay.register_task
def mnist_fc() -> replay.Task:
    return make_task("mnist-fc")


@replay.register_task
def mnist_lenet() -> replay.Task:
    return make_task("mnist-lenet")


@replay.register_task
def cifar_resnet20() -> replay.Task:
    return make_task("cifar-resnet20")


# ---- training ---------------------------------------------------------------------------


def train(a: argparse.Namespace) -> None:
    model_fn, dataset = SETUPS[a.setup]
    x, y = tensors(dataset, a.data_dir, True, a.train_examples, a.fake)
    model = model_fn().to(a.device)
    opt = (torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9) if a.optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=a.lr))
    task = f"paper:{a.setup.replace('-', '_')}"
    g = torch.Generator().manual_seed(0)
    with replay.Recorder(model, a.out, optimizer=opt, task=task, metadata={"setup": a.setup}):
        for epoch in range(a.epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), a.batch):
                idx = perm[i:i + a.batch]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx].to(a.device)), y[idx].to(a.device)).backward()
                opt.step()
            print(f"epoch {epoch + 1}/{a.epochs} done")
    print(f"recorded {a.out}; now: REPLAY_DATA_DIR={a.data_dir} PYTHONPATH=tools replay compute {a.out} "
          f"--loss train --loss val --per-class train" + (" --device cuda" if a.device == "cuda" else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("setup", choices=sorted(SETUPS))
    t.add_argument("--data-dir", default=None)
    t.add_argument("--out", required=True)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch", type=int, default=128)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    t.add_argument("--train-examples", type=int, default=None)
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--fake", action="store_true", help="torchvision FakeData instead of --data-dir (smoke test)")
    a = ap.parse_args()
    if not a.fake and not a.data_dir:
        ap.error("--data-dir is required (or --fake)")
    train(a)


if __name__ == "__main__":
    main()
