"""Launched by test_scale.py under torchrun: DDP training on digits, the same Recorder call on every rank.

    torchrun --nproc-per-node 2 tests/ddp_train.py RUN_DIR OUT_DIR STEPS [rank0|shard]

rank0: Recorder(rank=0), one rank records whole states; shard (the default under DDP): each rank
its slice. Saves each rank's own copy of the parameters at states 0, 17 and STEPS, and in shard
mode records a second, shorter run (RUN_DIR-b, another seed) to take a foreign shard from.
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


def train(run_dir: str, out_dir: str | None, steps: int, mode: str, seed: int = 0) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    model = DistributedDataParallel(digits_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = load_digits_tensors()["train"]
    g = torch.Generator().manual_seed(seed)
    # chunks of 4 states in both modes (a rank's slice is half a state), so that their bytes compare
    rec = replay.Recorder(model, run_dir, optimizer=opt, task="replay.digits:digits",
                          chunk_bytes=(64 << 10) // (1 if mode == "rank0" else world),
                          **({"rank": 0} if mode == "rank0" else {}))
    own = {}
    for t in range(steps):
        if t in (0, 17):
            own[t] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
        idx = torch.randperm(len(y), generator=g)[:64][rank::world]  # this rank's half of a batch of 64
        rec.log_batch(idx)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    threads = sorted(t.name for t in threading.enumerate())
    rec.close()
    if out_dir is None:
        return
    own[steps] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    torch.save(own[steps], f"{out_dir}/final-r{rank}.pt")
    torch.save(own, f"{out_dir}/own-r{rank}.pt")
    info = {"recording": rec.recording, "step": rec.step, "threads": threads, "hooks": len(rec._hooks)}
    with open(f"{out_dir}/info-r{rank}.json", "w") as f:
        json.dump(info, f)


def main(run_dir: str, out_dir: str, steps: int, mode: str) -> None:
    dist.init_process_group("gloo")
    train(run_dir, out_dir, steps, mode)
    if mode == "shard":
        train(run_dir + "-b", None, 5, mode, seed=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "rank0")
