"""Resume: what an interrupted `compute` needs to resume from its last flush, checked before it is believed.

In the lca dir, per process (tag '' alone, '-r001' under torchrun): progress{tag}.json (sealed:
the settings, the next step, the records of the parts written so far, the steps done, the
evaluations, the totals file) and totals{tag}-{next}.safetensors (the per-parameter totals so
far). A resume checks the progress file's seal, every part and the totals against their
records, and that the records agree with each other (rows, steps, flush numbers): an edited or
damaged resume state is one line, never silently skipped or deleted steps. A resume must use
the same placement of processes: its blocks of steps, or slices of parameters, belong to it.

The dir is locked for the compute (`claim_lca_dir`); a compute that committed nothing belongs to
nobody and is replaced; `restart` replaces whatever compute an lca dir holds.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, save

from replay.errors import ReplayError
from replay.lcadir import parts as records
from replay.lcadir.parts import LcaDirDamaged, Part
from replay.store.claim import Claim
from replay.store.files import open_regular, read_exactly

if TYPE_CHECKING:  # (the engine's; the lca dir only asks it for its rank, tags and barrier)
    from replay.engine.parallel import Placement


class Checkpoint:
    """Reads the resume state of this process at start (or finds the compute complete), and saves it."""

    def __init__(self, out: Path, config: dict, place: Placement, restart: bool = False):
        self.out, self.config, self.place, self.tag = out, config, place, place.tag
        self.parts: list[Part] = []
        self.next_step: int | None = None
        self.seq = self.evals = self.steps_done = 0
        self.totals: dict[str, torch.Tensor] | None = None
        if out.exists() and not out.is_dir():
            raise ReplayError(f"--out {out}: is a file; pass a directory for the LCA frames")
        if out.exists() and not records.is_lca_dir(out):
            raise records.not_an_lca_dir(out, "exists and holds other files; choose another --out")
        self.claim: Claim | None = records.claim_lca_dir(out, self.tag)
        try:
            self._open(restart)
        except BaseException:
            self.release()
            raise

    def _open(self, restart: bool) -> None:
        out = self.out
        if restart:
            if self.place.rank == 0:
                _wipe(out)
            self.place.barrier()  # every rank sees the dir as rank 0 left it
        self.complete = self._finished()
        if self.complete:
            return
        prog = out / f"progress{self.tag}.json"
        self._check_layout()
        if prog.exists():
            p = records.read_sealed(prog)
            committed = p.get("next_step") is not None
            if p.get("config") != self.config and committed:
                raise ReplayError(f"{out}: holds an unfinished compute with other "
                                  f"{_differences(p.get('config'), self.config)}; pass --restart to replace it, or "
                                  f"choose another --out")
            if committed and p.get("config") == self.config:  # else nothing was kept: start over
                self._resume(p, prog)
        if self.place.writes_steps:
            keep = {part.path for part in self.parts}
            mine = re.compile(rf"part{re.escape(self.tag)}-\d+\.(parquet|safetensors)")
            for d in (*records.FRAME_DIRS, records.DENSE_DIR):
                for f in (out / d).glob("*") if (out / d).is_dir() else []:
                    if mine.fullmatch(f.name) and str(f.relative_to(out)) not in keep:
                        f.unlink()  # written after the last checkpoint: will be recomputed
        if self.next_step is None:  # from here on, a rerun with the same settings resumes or starts over
            self._write_progress(None, None)

    def _resume(self, p: dict, prog: Path) -> None:
        """Believe the resume state only once its parts, totals and counts agree with their records."""
        def damaged(why: str) -> LcaDirDamaged:
            return LcaDirDamaged(f"{prog}: {why}; the compute cannot resume from it: run the same command with "
                                 f"--restart to start over")

        parts = records.parts_of(p, prog)
        for part in parts:
            if why := records.check_part(self.out, part):
                raise damaged(f"a part it names is damaged: {why}")
        totals = p.get("totals")
        try:
            totals = Part.of(totals)
        except Exception:  # noqa: BLE001 - any malformed record is damage
            raise damaged("its totals record is malformed") from None
        if why := records.check_part(self.out, totals):
            raise damaged(f"its totals are damaged: {why}")
        nxt, seq, evals, done = p.get("next_step"), p.get("seq"), p.get("evals"), p.get("steps_done")
        if not all(type(v) is int and v >= 0 for v in (nxt, seq, evals, done)):
            raise damaged("its counters are not counts")
        flushes = {int(m.group(1)) for part in parts if (m := re.search(r"-(\d+)\.(parquet|safetensors)$",
                                                                          part.path))}
        steps_parts = [part for part in parts if part.path.startswith("steps/")]
        n_losses = len(self.config.get("losses", [])) or 1
        if (flushes and seq != max(flushes) + 1) or sum(part.rows for part in steps_parts) != done * n_losses \
                or any(part.last is not None and part.last >= nxt for part in steps_parts):
            raise damaged("its records disagree with each other (next step, flush count, rows)")
        with open_regular(self.out / totals.path) as f:
            self.totals = load(read_exactly(f, totals.bytes))
        self.parts, self.next_step, self.seq, self.evals, self.steps_done = parts, nxt, seq, evals, done
        self._totals_part = totals

    def _check_layout(self) -> None:
        """Unfinished files of another placement: its blocks of steps or parameter slices are not ours."""
        listed = self.out.iterdir() if self.out.is_dir() else []
        found = sorted(f for f in listed if records.PROGRESS_RE.fullmatch(f.name))
        key = [self.place.mode, self.place.world]
        expected = {f"progress{t}.json" for t in self.place.tags()}
        theirs = [records.read_sealed(f).get("layout") for f in found]
        if all(f.name in expected for f in found) and all(k == key for k in theirs):
            return
        mode, world = next((k for k in theirs if k != key), None) or ["?", len(found)]
        was = "one process" if world == 1 else f"{world} processes in {mode} mode"
        raise ReplayError(f"{self.out}: holds an unfinished compute started by {was} "
                          f"({', '.join(f.name for f in found)}); resume it with the same processes and mode, "
                          f"or pass --restart")

    def _finished(self) -> bool:
        """Whether `out` holds this very compute, finished; refuses one that holds another."""
        meta = self.out / records.META
        if not meta.exists():
            return False
        m = records.read_sealed(meta)
        if m.get("config") != self.config:
            if grown := _grown(m.get("config"), self.config):
                if self.place.world == 1 and m.get("complete") is True:
                    self._extend(m)  # the same compute, over a run that has grown: go on from its end
                    return False
                raise ReplayError(f"{self.out}: {grown}")
            what = _differences(m.get("config"), self.config)
            raise ReplayError(f"{self.out}: holds LCA computed with other {what}; pass --restart to replace it, or "
                              f"choose another --out")
        return m.get("complete") is True

    def _extend(self, m: dict) -> None:
        """A finished lca dir of a run that has grown since: it becomes the resume state of the compute of all the
        steps. The per-parameter totals are carried exactly (the float64 sums and integer counts of its params
        part, to which the new steps are added in order, as one compute adds them), the step parts are kept,
        and the compute resumes after its last step. Only the params part and meta.json are rewritten."""
        meta = self.out / records.META
        parts = records.parts_of(m, meta)
        if problems := records.check_parts(self.out, parts):
            raise LcaDirDamaged(f"{self.out}/{problems[0]}; it cannot be extended: pass --restart to compute every "
                                f"step anew")
        params = [q for q in parts if q.path.startswith("params/")]
        K = len(m.get("per_param") or [])
        if K:
            import polars as pl

            df = pl.concat([pl.read_parquet(self.out / q.path) for q in params])
            lca = torch.from_numpy(df["lca"].to_numpy().copy()).view(K, -1)
            helped = torch.from_numpy(df["n_helped"].to_numpy().astype("int32")).view(K, -1)
        else:
            lca, helped = torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.int32)
        unchanged = int(m.get("n_unchanged", 0))
        totals = {"lca": lca, "helped": helped, "n_steps": torch.tensor([int(m["n_steps"]) - unchanged]),
                  "n_unchanged": torch.tensor([unchanged])}
        flushes = [int(x.group(1)) for q in parts if (x := re.search(r"-(\d+)\.(parquet|safetensors)$", q.path))]
        self.parts = [q for q in parts if q not in params]
        self.seq = max(flushes) + 1 if flushes else 0
        last = m["config"]["steps"][1]
        self.save(last + int(m.get("every", 1)), totals, int(m["grad_evals"]), int(m["n_steps"]))
        meta.unlink()  # the progress file now holds the compute; the params part is written anew at its end
        for q in params:
            (self.out / q.path).unlink(missing_ok=True)

    def save(self, next_step: int, totals: dict[str, torch.Tensor], evals: int, steps_done: int) -> None:
        name = f"totals{self.tag}-{next_step:010d}.safetensors"
        part = records.write_part(self.out, name, save({k: v.cpu().contiguous() for k, v in totals.items()}))
        old = getattr(self, "_totals_part", None)
        self._totals_part, self.next_step, self.evals, self.steps_done = part, next_step, evals, steps_done
        self._write_progress(next_step, part)
        if old is not None and old.path != name:
            (self.out / old.path).unlink(missing_ok=True)

    def finish_parts(self, parts: list[Part]) -> None:
        """The params parts of the end: recorded in this rank's progress, for rank 0's meta.json."""
        self.parts += parts
        self._write_progress(self.next_step, getattr(self, "_totals_part", None))

    def all_parts(self) -> list[Part]:
        """(rank 0, after every rank's finish_parts) the parts of every rank."""
        out = []
        for tag in self.place.tags():
            prog = self.out / f"progress{tag}.json"
            out += self.parts if tag == self.tag else records.parts_of(records.read_sealed(prog), prog)
        return out

    def _write_progress(self, next_step: int | None, totals: Part | None) -> None:
        prog = {"config": self.config, "parts": [p.to_json() for p in self.parts], "next_step": next_step,
                "seq": self.seq, "totals": totals.to_json() if totals else None, "evals": self.evals,
                "steps_done": self.steps_done, "layout": [self.place.mode, self.place.world]}
        records.write_json(self.out / f"progress{self.tag}.json", prog)

    def remove(self) -> None:
        """The compute is complete (meta.json written): the resume state goes."""
        old = getattr(self, "_totals_part", None)
        if old is not None:
            (self.out / old.path).unlink(missing_ok=True)
        (self.out / f"progress{self.tag}.json").unlink(missing_ok=True)

    def check_resumed(self, done: int, where: str) -> None:
        """The steps a resumed compute has before `next_step` must be the steps the resume state counts."""
        if self.next_step is not None and done != self.steps_done:
            raise LcaDirDamaged(f"{where}: it says {self.steps_done} steps are done before step {self.next_step}, "
                                f"this compute has {done} there; the compute cannot resume from it: run the same "
                                f"command with --restart to start over")

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


def _wipe(out: Path) -> None:
    """--restart: remove what a compute wrote (only an lca dir's own files; the lock stays held)."""
    if not out.is_dir():
        return
    for p in out.iterdir():
        if p.name.startswith(".replay.lock"):
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def _grown(old: object, new: dict) -> str | None:
    """When only the steps differ and the new ones extend the old: what to do, in words (a compute of one
    process extends the lca dir instead; under torchrun each rank's slice would have to be rebuilt)."""
    if not isinstance(old, dict) or any(old.get(k) != new[k] for k in new if k != "steps"):
        return None
    (a, b), (c, d) = old.get("steps") or (None, None), new["steps"]
    if a != c or not isinstance(b, int) or d <= b:
        return None
    return (f"holds LCA of steps {a}..{b}; the run has grown to step {d} since. Extend it with one process (the same "
            f"command without torchrun), compute the new steps into another lca dir (`--steps {b + 1}: --out DIR`), "
            f"or pass --restart to compute all of them here")


def _differences(old: object, new: dict) -> str:
    """Which settings differ, in words ('task content (same name, other data or model)', 'tol', ...)."""
    if not isinstance(old, dict):
        return "settings"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    words = {"task_fingerprint": "task content (same task name, other data, model or loss_fn)",
             "run_id": "run (another recording)"}
    return "settings: " + ", ".join(words.get(k, k) for k in keys) if keys else "settings"
