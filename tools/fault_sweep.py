"""Single-bit flip sweep of a chunk header and the manifest of a tiny real run: prints outcome counts.

    python tools/fault_sweep.py            # the installed replay
    PYTHONPATH=/path/to/other/checkout python tools/fault_sweep.py   # another version, for a before/after

Outcomes: detected (an error or verify names the damage), harmless (every state bit-exact),
wrong (a state differs in silence), crash: Type (an exception that is not a replay error).
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faults import header_length, sweep  # noqa: E402

import replay  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d) / "run"
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ref = {0: {n: p.detach().clone() for n, p in model.named_parameters()}}
        with replay.Recorder(model, run_dir, optimizer=opt):
            for i in range(3):
                opt.zero_grad()
                model(torch.randn(4, 3)).square().mean().backward()
                opt.step()
                ref[i + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
        chunk = next(run_dir.glob("chunk-*"))
        n = header_length(chunk)
        print(f"replay from {Path(replay.__file__).parent}")
        for what, counts in (("chunk header", sweep(run_dir, chunk, ref, 0, n)),
                             ("chunk data", sweep(run_dir, chunk, ref, n)),
                             ("manifest", sweep(run_dir, run_dir / "manifest.json", ref))):
            total = sum(counts.values())
            print(f"{what:13s} {total:6d} flips: " + ", ".join(f"{k} {v} ({v / total:.1%})"
                                                             for k, v in counts.most_common()))


if __name__ == "__main__":
    main()
