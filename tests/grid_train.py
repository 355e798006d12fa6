"""Records every cell of test_grid.py's grid (or, under torchrun, each rank its shard of it).

    python tests/grid_train.py OUT_DIR DEVICE            # whole states, one process
    torchrun --nproc-per-node 2 tests/grid_train.py OUT_DIR cpu   # sharded (the default under a process group)

Every rank trains the same model on the same data (no collective: the parameters are equal on every rank, as
DDP keeps them), so the sharded run must read back as the one-process recording's states, bit for bit.
"""

import itertools
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import replay

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
EVERY = (1, 3)
COMPRESS = (False, True)
STEPS = 10


def cells():
    return list(itertools.product(DTYPES, EVERY, COMPRESS))


def cell_name(dtype: str, every: int, compress: bool) -> str:
    return f"{dtype}-every{every}-{'zstd' if compress else 'raw'}"


def record(out: str, device: str, dtype: str, every: int, compress: bool) -> dict:
    """Train 10 updates (SGD with momentum; batch-norm's buffers, an int counter among them, beside), recording;
    returns the reference parameters of every state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(device,
                                                                                              DTYPES[dtype])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    ref = {0: {n: p.detach().cpu().clone() for n, p in model.named_parameters()}}
    with replay.Recorder(model, f"{out}/{cell_name(dtype, every, compress)}", optimizer=opt, every=every,
                         compress=compress, chunk_bytes=2000):
        for i in range(1, STEPS + 1):
            x = torch.randn(16, 8, generator=g).to(device, DTYPES[dtype])
            y = torch.randint(0, 3, (16,), generator=g).to(device)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
            ref[i] = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return ref


def main(out: str, device: str) -> None:
    sharded = "RANK" in os.environ
    if sharded:
        dist.init_process_group("gloo")
    refs = {cell_name(*c): record(out, device, *c) for c in cells()}
    if not sharded or dist.get_rank() == 0:
        torch.save(refs, f"{out}/refs.pt")
    if sharded:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
