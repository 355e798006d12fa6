"""Launched by test_scale.py under torchrun: replay.compute inside a process group the caller created.

    torchrun --nproc-per-node 2 tests/dist_compute.py JOBS_JSON

JOBS_JSON: a list of {"run": ..., **keyword arguments of replay.compute}.
"""

import json
import sys

import torch.distributed as dist

import replay


def main(jobs_file: str) -> None:
    dist.init_process_group("gloo")
    for job in json.loads(open(jobs_file).read()):
        replay.compute(job.pop("run"), **job)
        assert dist.is_initialized(), "compute must leave a process group it did not create"
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
