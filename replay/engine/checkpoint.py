"""Checkpoint: what an interrupted `compute` needs to resume from its last flush.

In the lca dir, per process (tag '' alone, '-r001' under torchrun): progress{tag}.json (the
settings, the next step, the parquet parts written so far, evaluations done) and
totals{tag}-{next}.safetensors (the per-parameter totals so far). A resume must use the
same process layout: its blocks of steps, or slices of parameters, belong to it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from replay.engine.parallel import Layout
from replay.errors import ReplayError
from replay.store.manifest import write_atomic


class Checkpoint:
    """Reads the resume state of this process at start (or finds the compute complete), and saves it."""

    def __init__(self, out: Path, config: dict, layout: Layout):
        self.out, self.config, self.layout, self.tag = out, config, layout, layout.tag
        self.parts: list[str] = []
        self.next_step: int | None = None
        self.seq = self.evals = 0
        self.complete = False
        self.totals: dict[str, torch.Tensor] | None = None
        meta, prog = out / "meta.json", out / f"progress{self.tag}.json"
        found = sorted(out.glob("progress*.json")) if out.is_dir() else []
        if meta.is_file():
            m = json.loads(meta.read_text())
            if m.get("config") != config:
                raise ReplayError(f"{out}: holds LCA computed with other settings; choose another --out or delete it")
            self.complete = bool(m.get("complete"))
        elif out.exists() and any(out.iterdir()) and not found:
            raise ReplayError(f"{out}: exists and is not an lca dir; choose another --out")
        if self.complete:
            return
        self._check_layout(found)
        if prog.is_file():
            p = json.loads(prog.read_text())
            if p["config"] != config:
                raise ReplayError(f"{out}: holds an unfinished compute with other settings; "
                                  f"choose another --out or delete it")
            self.parts, self.next_step, self.seq, self.evals = p["parts"], p["next_step"], p["seq"], p["evals"]
            self.totals = load_file(out / p["totals"])
            if layout.writes_steps:
                keep = set(self.parts)
                for f in (self.own_files("steps/part", ".parquet") + self.own_files("tensors/part", ".parquet")
                          + self.own_files("dense/part", ".safetensors")):
                    if str(f.relative_to(out)) not in keep:
                        f.unlink()  # written after the last checkpoint: will be recomputed

    def _check_layout(self, found: list[Path]) -> None:
        """Unfinished files of another layout: its blocks of steps or parameter slices are not ours."""
        key = [self.layout.mode, self.layout.world]
        expected = {f"progress{t}.json" for t in self.layout.tags()}
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
        save_file({k: v.cpu().contiguous() for k, v in totals.items()}, self.out / name)
        prog = {"config": self.config, "parts": self.parts, "next_step": next_step, "seq": self.seq, "totals": name,
                "evals": evals, "layout": [self.layout.mode, self.layout.world]}
        write_atomic(self.out / f"progress{self.tag}.json", json.dumps(prog).encode())
        for old in self.own_files("totals", ".safetensors"):
            if old.name != name:
                old.unlink()

    def remove(self) -> None:
        """The compute is complete (meta.json written): the resume state goes."""
        for f in self.own_files("totals", ".safetensors"):
            f.unlink()
        (self.out / f"progress{self.tag}.json").unlink(missing_ok=True)
