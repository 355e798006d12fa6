"""Checkpoint: what an interrupted `compute` needs to resume from its last flush.

In the lca dir, per process (tag '' alone, '-r001' under torchrun): progress{tag}.json (the
settings, the next step, the parquet parts written so far, evaluations done) and
totals{tag}-{next}.safetensors (the per-parameter totals so far). A resume must use the
same placement of processes: its blocks of steps, or slices of parameters, belong to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from replay.engine.parallel import Placement
from replay.errors import ReplayError
from replay.store.atomic import is_tmp, write_atomic


class Checkpoint:
    """Reads the resume state of this process at start (or finds the compute complete), and saves it."""

    def __init__(self, out: Path, config: dict, place: Placement):
        self.out, self.config, self.place, self.tag = out, config, place, place.tag
        self.parts: list[str] = []
        self.next_step: int | None = None
        self.seq = self.evals = 0
        self.complete = False
        self.totals: dict[str, torch.Tensor] | None = None
        prog = out / f"progress{self.tag}.json"
        found = sorted(out.glob("progress*.json")) if out.is_dir() else []
        self.complete = _finished(out, config, found)
        if self.complete:
            return
        self._check_layout(found)
        if prog.is_file():
            p = _read_json(prog)
            if p.get("config") != config:
                raise ReplayError(f"{out}: holds an unfinished compute with other "
                                  f"{_differences(p.get('config'), config)}; choose another --out or delete it")
            if p.get("next_step") is not None:  # else it was killed before its first flush: start over
                self.parts, self.next_step, self.seq, self.evals = p["parts"], p["next_step"], p["seq"], p["evals"]
                self.totals = load_file(out / p["totals"])
        out.mkdir(parents=True, exist_ok=True)
        if place.writes_steps:
            keep = set(self.parts)
            for f in (self.own_files("steps/part", ".parquet") + self.own_files("tensors/part", ".parquet")
                      + self.own_files("examples/part", ".parquet") + self.own_files("example_steps/part", ".parquet")
                      + self.own_files("dense/part", ".safetensors")):
                if str(f.relative_to(out)) not in keep:
                    f.unlink()  # written after the last checkpoint: will be recomputed
        if self.next_step is None:  # from here on, a rerun with the same settings resumes or starts over
            self._write_progress(None, None, 0)

    def _check_layout(self, found: list[Path]) -> None:
        """Unfinished files of another placement: its blocks of steps or parameter slices are not ours."""
        key = [self.place.mode, self.place.world]
        expected = {f"progress{t}.json" for t in self.place.tags()}
        theirs = [json.loads(f.read_text()).get("layout") for f in found]
        if all(f.name in expected for f in found) and all(k == key for k in theirs):
            return
        mode, world = next((k for k in theirs if k != key), None) or ["?", len(found)]
        was = "one process" if world == 1 else f"{world} processes in {mode} mode"
        raise ReplayError(f"{self.out}: holds an unfinished compute started by {was} "
                          f"({', '.join(f.name for f in found)}); resume it with the same processes and mode, "
                          f"or delete {self.out}")

    def own_files(self, stem: str, suffix: str) -> list[Path]:
        """This rank's files `{stem}{tag}-NNN{suffix}` (the '' tag must not match '-r001' files)."""
        d, name = (self.out / stem).parent, Path(stem).name
        pat = re.compile(rf"{re.escape(name + self.tag)}-\d+{re.escape(suffix)}")
        return [f for f in d.glob(f"{name}*{suffix}") if pat.fullmatch(f.name)] if d.is_dir() else []

    def save(self, next_step: int, totals: dict[str, torch.Tensor], evals: int) -> None:
        name = f"totals{self.tag}-{next_step:010d}.safetensors"
        write_atomic(self.out / name, save({k: v.cpu().contiguous() for k, v in totals.items()}))
        self._write_progress(next_step, name, evals)
        for old in self.own_files("totals", ".safetensors"):
            if old.name != name:
                old.unlink()

    def _write_progress(self, next_step: int | None, totals: str | None, evals: int) -> None:
        prog = {"config": self.config, "parts": self.parts, "next_step": next_step, "seq": self.seq, "totals": totals,
                "evals": evals, "layout": [self.place.mode, self.place.world]}
        write_atomic(self.out / f"progress{self.tag}.json", json.dumps(prog).encode())

    def remove(self) -> None:
        """The compute is complete (meta.json written): the resume state goes."""
        for f in self.own_files("totals", ".safetensors"):
            f.unlink()
        (self.out / f"progress{self.tag}.json").unlink(missing_ok=True)


def _finished(out: Path, config: dict, progress: list[Path]) -> bool:
    """Whether `out` holds this very compute, finished; refuses a dir that holds anything else."""
    if out.exists() and not out.is_dir():
        raise ReplayError(f"--out {out}: is a file; pass a directory for the LCA frames")
    meta = out / "meta.json"
    if meta.is_file():
        m = _read_json(meta)
        if m.get("config") != config:
            raise ReplayError(f"{out}: holds LCA computed with other {_differences(m.get('config'), config)}; "
                              f"choose another --out or delete it")
        return bool(m.get("complete"))
    if out.exists() and not progress and not _only_leftovers(out):
        raise ReplayError(f"{out}: exists and is not an lca dir; choose another --out")
    return False


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReplayError(f"{path}: unreadable ({e}); delete {path.parent} and compute again") from None
    if not isinstance(d, dict):
        raise ReplayError(f"{path}: not an lca dir file; delete {path.parent} and compute again")
    return d


def _differences(old: object, new: dict) -> str:
    """Which settings differ, in words ('task content (same name, other data or model)', 'tol', ...)."""
    if not isinstance(old, dict):
        return "settings"
    keys = [k for k in new if old.get(k) != new[k]] + [k for k in old if k not in new]
    words = {"task_fingerprint": "task content (same task name, other data, model or loss_fn)",
             "run_id": "run (another recording)"}
    return "settings: " + ", ".join(words.get(k, k) for k in keys) if keys else "settings"


def _only_leftovers(out: Path) -> bool:
    """An lca dir whose compute was killed before it wrote its progress: empty frame folders and temp files.

    Under torchrun another rank may be writing its own progress file meanwhile: that is ours too.
    """
    for p in out.iterdir():
        if is_tmp(p.name) or re.fullmatch(r"progress(-r\d{3})?\.json|totals(-r\d{3})?-\d+\.safetensors", p.name):
            continue
        if p.is_dir() and p.name in ("steps", "tensors", "params", "dense", "examples", "example_steps") and all(
                is_tmp(f.name) or f.suffix in (".parquet", ".safetensors") for f in p.iterdir()):
            continue
        return False
    return True
