"""Launched by test_shards.py under torchrun: FSDP2 (`fully_shard`, gloo, CPU) training of a small MLP,
the same Recorder call on every rank; saves each rank's copy of the full parameters at states 0, 5 and STEPS.

    torchrun --nproc-per-node 2 tests/fsdp_train.py RUN_DIR OUT_DIR STEPS
"""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import replay
from replay.digits import load_digits_tensors


def main(run_dir: str, out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    # odd sizes: dim-0 shards of unequal length, and a bias of 5 rows (rank 1 holds 2)
    model = nn.Sequential(nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 5), nn.ReLU(), nn.Linear(5, 10))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = load_digits_tensors()["train"]
    g = torch.Generator().manual_seed(0)

    def full() -> dict:
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    own = {}
    with replay.Recorder(model, run_dir, optimizer=opt, chunk_bytes=4 << 10):
        for t in range(steps):
            if t in (0, 5):
                own[t] = full()
            idx = torch.randperm(len(y), generator=g)[:64][rank::world]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    own[steps] = full()
    torch.save(own, f"{out_dir}/fsdp-own-r{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
