"""Launched by test_scale.py under torchrun: DDP training on digits, the same Recorder call on every rank.

    torchrun --nproc-per-node 2 tests/ddp_train.py RUN_DIR OUT_DIR STEPS
"""

import json
import sys
import threading

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import replay
from replay.digits import digits_mlp, load_digits_tensors


def main(run_dir: str, out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(digits_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = load_digits_tensors()["train"]
    g = torch.Generator().manual_seed(0)
    rec = replay.Recorder(model, run_dir, optimizer=opt, task="replay.digits:digits")
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=g)[:64][rank::world]  # this rank's half of a batch of 64
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    threads = sorted(t.name for t in threading.enumerate())
    rec.close()
    torch.save({n: p.detach().clone() for n, p in model.module.named_parameters()}, f"{out_dir}/final-r{rank}.pt")
    info = {"recording": rec.recording, "step": rec.step, "threads": threads, "hooks": len(rec._hooks)}
    with open(f"{out_dir}/info-r{rank}.json", "w") as f:
        json.dump(info, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
