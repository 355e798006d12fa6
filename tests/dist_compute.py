"""Launched by test_scale.py under torchrun: replay.compute inside a process group the caller created.

    torchrun --nproc-per-node 2 tests/dist_compute.py JOBS_JSON

JOBS_JSON: a list of {"run", "out", "task", "per_class"} computed with data_parallel=True.
"""

import json
import sys

import torch.distributed as dist

import replay


def main(jobs_file: str) -> None:
    dist.init_process_group("gloo")
    for job in json.loads(open(jobs_file).read()):
        replay.compute(job["run"], per_class=job["per_class"], task=job["task"], out=job["out"],
                       data_parallel=True)
        assert dist.is_initialized(), "compute must leave a process group it did not create"
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
