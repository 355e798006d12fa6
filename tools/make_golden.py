"""Write the golden runs and lca dir that tests/test_golden.py reads bit for bit (run once per format change).

    python tools/make_golden.py tests/golden --v2 CHECKOUT   # CHECKOUT: a replay of the format-2 release
                                                             # (git worktree add /tmp/v2 823de5a^)

Each run is a tiny deterministic training; `expected.json` holds every state's bytes (hex) as training
had them, and the data-section bytes of every chunk, so that a changed reader or writer shows as a failing
test and a changed format as a diff of these files.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

RECORD = """
import json, sys, torch
from torch import nn
import replay
kind, out = sys.argv[1], sys.argv[2]
given = json.loads(open(sys.argv[3]).read()) if len(sys.argv) > 3 else None  # states to move through, not to train
torch.manual_seed(0)
if kind == "flat":  # thousands of scalars: the header of per-tensor keys would outweigh the data
    class Scalars(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ParameterList([nn.Parameter(torch.full((), float(i))) for i in range(2000)])
    model = Scalars()
else:
    model = nn.Linear(3, 2)
class Given(torch.optim.Optimizer):
    \"\"\"Each step sets the parameters to the next given state: the bytes recorded do not depend on this machine's
    arithmetic (a matmul's last bits differ between CPUs), and the recorder sees an ordinary optimizer.\"\"\"

    def __init__(self, params):
        super().__init__(params, {})
        self.t = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.t += 1
        for n, p in model.named_parameters():
            raw = torch.frombuffer(bytearray(bytes.fromhex(given[str(self.t)][n])), dtype=torch.uint8)
            p.copy_(raw.view(p.dtype).view(p.shape))
opt = Given(model.parameters()) if given else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(1)
states = {}
def take(t):
    states[t] = {n: p.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes().hex()
                 for n, p in model.named_parameters()}
kw = {"compress": True} if kind == "zstd" else {}
distributed = "RANK" in __import__("os").environ
if distributed:
    import torch.distributed as dist
    dist.init_process_group("gloo")
with replay.Recorder(model, out, optimizer=opt, task="tasks:golden", chunk_bytes=100 if kind != "flat" else 1 << 20,
                     **kw):
    take(0)
    for t in range(1, 7):
        opt.zero_grad()
        if given:
            pass
        elif kind == "flat":
            sum((p - 1) ** 2 for p in model.p[::97]).backward()
        else:
            x = torch.randn(4, 3, generator=g)
            model(x).square().mean().backward()
        opt.step()
        take(t)
if not distributed or dist.get_rank() == 0:
    with open(out + ".states.json", "w") as f:
        json.dump(states, f)
"""


def record(kind: str, out: Path, pythonpath: str, nproc: int = 1) -> None:
    script = out.parent / "_record.py"
    script.write_text(textwrap.dedent(RECORD))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), kind, str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               str(script), kind, str(out)]
    subprocess.run(cmd, check=True, env=env)
    script.unlink()


def main(dest: str, v2: str) -> None:
    dest_p = Path(dest)
    if dest_p.exists():
        shutil.rmtree(dest_p)
    dest_p.mkdir(parents=True)
    here = str(Path(__file__).resolve().parent.parent)
    tests = str(Path(here) / "tests")
    record("xor", dest_p / "v2", os.pathsep.join([v2, tests]))
    for kind in ("xor", "flat", "zstd"):
        record(kind, dest_p / f"v3-{kind}", os.pathsep.join([here, tests]))
    record("xor", dest_p / "v3-sharded", os.pathsep.join([here, tests]), nproc=2)
    expected = {}
    for run in sorted(p for p in dest_p.iterdir() if p.is_dir()):
        states = json.loads((dest_p / f"{run.name}.states.json").read_text())
        (dest_p / f"{run.name}.states.json").unlink()
        expected[run.name] = {"states": states}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, tests])}
    subprocess.run([sys.executable, "-m", "replay", "compute", str(dest_p / "v3-xor"), "--task", "tasks:golden",
                    "--out", str(dest_p / "lca"), "--no-progress", "--per-example", "train"], check=True, env=env)
    (dest_p / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[sys.argv.index("--v2") + 1])
