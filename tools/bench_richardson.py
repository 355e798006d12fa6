"""Would Richardson extrapolation of Simpson's nested levels (Boole's rule from the same 5 points) ground steps
with fewer points? Measured on recorded runs, per step, against the one independent check there is: the
residual |ΔL − Σ allocation| of each rule.

Per step of a run (bench_replay's workloads: the LM's AdamW steps, ResNet-20's SGD steps), the data set's
loss and its directional derivative d(s) = Δθ · ∇L(θ0 + sΔθ) at s = 0, ¼, ½, ¾, 1 give
  S1 = Simpson on [0, 1] (3 points: what replay starts with),
  S2 = composite Simpson on two panels (5 points: replay's first refinement),
  B  = (16·S2 − S1) / 15 (Boole's rule, the Richardson extrapolation of S1 and S2),
and the table compares |ΔL − S1|, |ΔL − S2|, |ΔL − B|: Boole is worth using only if it is below S2 on every
workload (then a step refined once could be reported from the same points with a smaller residual).

    python tools/bench_richardson.py --model lm --layers 4 --heads 4 --width 160 --context 64 --examples 16 \\
        --batch 16 --steps 20
    python tools/bench_richardson.py --model resnet20 --examples 200 --batch 100 --steps 20 --bn running
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_replay as br  # noqa: E402

import replay  # noqa: E402
from replay.engine.evaluate import LossEvaluator  # noqa: E402


def main() -> None:
    a = br.parse_args()
    torch.set_num_threads(a.threads)
    br.ARGS = a
    with tempfile.TemporaryDirectory(prefix="richardson_") as tmp:
        run_dir = Path(tmp) / "run"
        br.record(a, run_dir)
        run = replay.open_run(run_dir)
        task = br.make_task(a)
        names = run.param_names
        ev = LossEvaluator(task, names, ["train"], [], torch.device(a.device), per_param=[])
        flat = {t: torch.cat([v.reshape(-1).double() for v in (run.state(t)[n] for n in names)])
                for t in run.steps}
        rows = []
        for t0, t1 in zip(run.steps, run.steps[1:], strict=False):
            th0, d = flat[t0], flat[t1] - flat[t0]
            pts = {}
            for s in (0.0, 0.25, 0.5, 0.75, 1.0):
                v, p, _ = ev(th0 + s * d, d[None])
                pts[s] = (float(v[0]), float(p[0, 0].sum()))
            dl = pts[1.0][0] - pts[0.0][0]
            f = {s: g for s, (_, g) in pts.items()}
            s1 = (f[0.0] + 4 * f[0.5] + f[1.0]) / 6
            s2 = (f[0.0] + 4 * f[0.25] + 2 * f[0.5] + 4 * f[0.75] + f[1.0]) / 12
            boole = (16 * s2 - s1) / 15
            rows.append((abs(dl - s1), abs(dl - s2), abs(dl - boole)))
    med = statistics.median
    r1, r2, rb = zip(*rows, strict=True)
    better = sum(b < c for _, c, b in rows)
    print(f"{br.describe(a)}, {len(rows)} steps, loss train, device {a.device}")
    print("| rule | points | median \\|residual\\| | max \\|residual\\| |")
    print("|---|---|---|---|")
    for name, n, r in (("Simpson, 1 panel", 3, r1), ("Simpson, 2 panels", 5, r2),
                       ("Boole (Richardson of both)", 5, rb)):
        print(f"| {name} | {n} | {med(r):.2e} | {max(r):.2e} |")
    print(f"Boole's residual below the 2-panel Simpson's on {better} of {len(rows)} steps")


if __name__ == "__main__":
    main()
