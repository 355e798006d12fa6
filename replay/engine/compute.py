"""compute(): replay a run and allocate each step's loss change to every parameter.

The pieces, one job each: `evaluate` (values, per-tensor projections and the per-parameter
losses' gradients at one θ, one pass per data set), `simpson` (the method: panels refined where
the error is, as pure functions), `steps` (the step loop), `rows` and `ghost` (examples and
tokens as rows of their own), `ledger` (frames, totals, resume state), `checkpoint`,
`model_check` (the task against the run), `parallel` (torchrun). This module validates the
settings, builds those, and leaves the caller's Task as it found it (parameter values aside).
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from replay import trust
from replay.engine import parallel
from replay.engine.evaluate import LossEvaluator
from replay.engine.fingerprint import task_fingerprint
from replay.engine.ghost import ExampleProducts
from replay.engine.ledger import Ledger
from replay.engine.model_check import check_constants, check_model, running_stats_note
from replay.engine.rows import ExampleIntegrand, RowLoop, TokenIntegrand
from replay.engine.settings import Request, Settings
from replay.engine.steps import StepLoop
from replay.errors import ReplayError, ReplayWarning, RunError, SettingError, TaskError, os_reason
from replay.frames import Frames, load
from replay.lcadir.resume import Checkpoint
from replay.store import Run, open_run
from replay.task import Examples, Task, load_task
from replay.wrappers import unwrap_model


def compute(
    run: str | Path | Run,
    losses: list[str] | None = None,
    per_class: list[str] | None = None,
    *,
    task: str | Task | None = None,
    device: str = "cpu",
    tol: float = 1e-4,
    rtol: float = 0.0,
    max_splits: int = 32,
    first_order: bool = False,
    steps: tuple[int | None, int | None] | None = None,
    out: str | Path | None = None,
    dense: bool = False,
    flush_every: int = 100,
    progress: bool = False,
    data_parallel: bool = False,
    per_example: list[str] | None = None,
    per_param: list[str] | str | None = None,
    per_token: list[str] | None = None,
    token_tensors: dict[str, list[tuple[int, int]]] | None = None,
    precision: str = "float32",
    restart: bool = False,
    constants: str = "check",
    allow_missing: bool = False,
) -> Frames:
    """Compute LCA of `losses` (data set names; default: all of the task's) over the run.

    A step is grounded when |ΔL − ΣLCA| ≤ tol + rtol·|ΔL|; a loss whose step is not is refined
    where its error is (Simpson panels split, up to `max_splits` sub-intervals), and flagged if it
    is still not grounded. Per-parameter totals and helped counts (`params`, `tensors.n_helped`)
    are kept for the losses in `per_param` (default: the data-set losses; "all"; or names), the
    others get per-tensor LCA only, so memory does not grow with the number of group losses.
    16-bit models are evaluated in float32 (`precision="model"`: in their own dtype).
    `token_tensors` ({data set: [(example, position), ...]}, causal LMs) adds the LCA per tensor of
    those tokens (frame `token_tensors`), each refined as its own row.
    Writes frames to `out` (default RUN/lca) and returns them (see `replay.load`). An interrupted
    compute resumes when run again with the same settings; `restart` replaces what `out` holds.
    The task's frozen parameters and buffers must be training's (`constants='warn'`: a warning).
    A run with a lost chunk is refused (a RunError naming the missing states) unless `steps` ends
    before the gap or `allow_missing=True` computes the readable prefix (its meta says so).

    Under torchrun (or in an initialized process group) each process computes blocks of
    consecutive steps; with `data_parallel`, every process computes every step on its shard
    of the data and its slice of the parameters instead. Either way the frames equal a
    single process's, up to the order of float summation (see `engine.parallel`).
    """
    run = run if isinstance(run, Run) else open_run(run)
    settings = Settings(tol, rtol, max_splits, first_order, dense, precision, flush_every, progress)
    parallel.parse_device(device)
    if len(run.steps) < 2:
        raise RunError(f"{run.path}: nothing to compute: {len(run.steps)} state(s) recorded (a step needs two); "
                       f"run `replay verify {run.path}`")
    spec = task if task is not None else run.task
    if spec is None:
        raise TaskError(f"{run.path}: the run names no task; pass task='module:function' (--task)")
    signed = task is None and trust.verifies(run.manifest.run_id, run.task, run.manifest.task_signature)
    t = load_task(spec, run.path, named=task is not None or signed,
                  unsigned=None if signed or not run.manifest.task_signature else "does not verify with your key")
    t = copy.copy(t)  # (its data may be replaced below; its model is borrowed and given back)
    token_tensors = _token_selection(t, token_tensors)
    losses, per_class, per_example, per_token = _names(t, losses, per_class, per_example, per_token)
    if (per_example or per_token or token_tensors) and data_parallel:
        raise ReplayError("--per-example and --per-token with --data-parallel are not supported: use steps mode "
                          "(the default)")
    datasets = losses + [d for d in per_class if d not in losses]
    a, b = steps or (None, None)
    todo = [s for s in run.steps[:-1] if (a is None or s >= a) and (b is None or s < b)]
    if not todo:
        raise RunError(f"{run.path}: no step to compute in {a}:{b} (recorded states {run.steps[0]}..{run.steps[-1]})")
    _refuse_a_gap(run, a, b, allow_missing)
    if run.live:
        last = run.steps[-1]
        warnings.warn(f"{run.path}: the run is being recorded right now: computing the {len(todo)} step(s) recorded so "
                      f"far (up to state {last}); run the same command again later to extend the lca dir to the "
                      f"steps recorded by then", ReplayWarning, stacklevel=2)
    with _borrowed(t.model):
        check_model(t, run)
        constants_note = check_constants(t, run, constants)
        notes = _notes(run, t, todo, settings)
        if constants_note:
            notes["constants_note"] = constants_note
            warnings.warn(f"{run.path}: {constants_note}", ReplayWarning, stacklevel=2)
        if t.batchnorm == "running" and run.manifest.buffers:  # the last recorded statistics, for every step
            t.model.load_state_dict(run.state(run.steps[-1], buffers=True), strict=False)
        req = Request(datasets, per_class, per_example, per_token, token_tensors, _per_param(per_param), todo,
                      Path(out) if out is not None else run.path / "lca", restart, notes)
        place, dev = parallel.join(device, data_parallel)
        try:
            return _run(run, t, spec, req, settings, place, dev)
        finally:
            parallel.leave(place)


def _run(run: Run, t: Task, spec: object, req: Request, st: Settings, place: parallel.Placement,
         dev: torch.device) -> Frames:
    ev = LossEvaluator(t, run.param_names, req.datasets, req.per_class, dev, place, req.per_param, req.per_example)
    unknown = [n for n in (req.per_param if isinstance(req.per_param, list) else []) if n not in ev.loss_names]
    if unknown:
        raise TaskError(f"--per-param {unknown[0]!r}: not a loss of this compute (its losses: "
                        f"{', '.join(ev.loss_names[:8])}{', ...' if len(ev.loss_names) > 8 else ''})")
    state = None
    try:
        state = Checkpoint(req.out, _config(run, t, spec, req, st, ev), place, req.restart)
        place.barrier()  # every rank has read the dir before any writes to it
        if state.complete:
            return load(req.out)
        ledger = Ledger(req.out, ev, run.manifest.params, state, place, st.dense)
        rows = _rows(t, ev, run, req, ledger, st) if place.writes_steps else []
        return StepLoop(run, ev, parallel.segments(req.todo, place), ledger, place, st, rows).execute(req.notes)
    except OSError as e:
        raise _write_failed(req.out, e) from None
    finally:
        if state is not None:
            state.release()


def _config(run: Run, t: Task, spec: object, req: Request, st: Settings, ev: LossEvaluator) -> dict:
    """What an lca dir was computed with: a resume must have the same, or it is another compute."""
    return {"run_id": run.manifest.run_id, "task": spec if isinstance(spec, str) else "<Task object>",
            "task_fingerprint": task_fingerprint(t, req.datasets, run.param_names),
            "losses": ev.loss_names, "per_param": [ev.loss_names[i] for i in ev.per_param], "tol": st.tol,
            "rtol": st.rtol, "max_splits": st.max_splits, "first_order": st.first_order,
            "steps": [req.todo[0], req.todo[-1]], "batchnorm": t.batchnorm, "batch_size": t.batch_size,
            "dense": st.dense, "per_example": req.per_example, "per_token": req.per_token,
            "precision": st.precision} | (
                {"token_tensors": {k: [list(x) for x in v] for k, v in req.token_tensors.items()}}
                if req.token_tensors else {})


def _refuse_a_gap(run: Run, a: int | None, b: int | None, allow_missing: bool) -> None:
    """A lost chunk is an error, not a warning that a filter can hide: the steps asked for must all be readable,
    or the user says that the readable prefix will do."""
    if run.missing is None or allow_missing or (b is not None and b <= run.steps[-1]):
        return
    first, last = run.missing
    raise RunError(f"{run.path}: states {first}..{last} are missing (a chunk is lost; see `replay verify "
                   f"{run.path}`): only steps up to {run.steps[-1] - run.manifest.every} can be computed; restore the "
                   f"chunk, or compute those with --steps {a or 0}:{run.steps[-1]} (or --allow-missing)")


def _per_param(per_param: object) -> object:
    if per_param is None:
        return "datasets"
    if per_param == "all" or per_param == ["all"]:
        return "all"
    if isinstance(per_param, str):
        return [per_param]
    return list(per_param)


def _names(t: Task, losses: list[str] | None, per_class: list[str] | None, per_example: list[str] | None,
           per_token: list[str] | None) -> tuple[list[str], list[str], list[str], list[str]]:
    losses = list(losses) if losses else list(t.data)
    per_class, per_example, per_token = list(per_class or []), list(per_example or []), list(per_token or [])
    for what, names in (("loss", losses), ("--per-class", per_class), ("--per-example", per_example),
                        ("--per-token", per_token)):
        for name in names:
            if name not in t.data:
                raise TaskError(f"{'unknown loss' if what == 'loss' else what} {name!r}: the task's data sets are "
                                f"{sorted(t.data)}")
    return losses, per_class, per_example, per_token


def _token_selection(t: Task, sel: object) -> dict[str, list[tuple[int, int]]]:
    if not sel:
        return {}
    if not isinstance(sel, dict):
        raise SettingError(f"token_tensors: expected {{data set: [(example, position), ...]}}, got "
                           f"{type(sel).__name__}")
    out = {}
    for name, pairs in sel.items():
        if name not in t.data:
            raise TaskError(f"--token-tensors {name!r}: the task's data sets are {sorted(t.data)}")
        try:
            out[name] = sorted({(int(e), int(p)) for e, p in pairs})
        except (TypeError, ValueError):
            raise SettingError(f"token_tensors[{name!r}]: expected (example, position) pairs of integers") from None
    return out


def _rows(t: Task, ev: LossEvaluator, run: Run, req: Request, ledger: Ledger, st: Settings) -> list[RowLoop]:
    """Examples and tokens as rows of their own (they share the evaluator's model and its loading of θ)."""
    if not (req.per_example or req.per_token or req.token_tensors):
        return []
    if ev.batch_stats:
        raise TaskError("per-example and per-token LCA need one loss per example, and batch-norm with batch "
                        "statistics makes every example's loss depend on its batch; use Task(batchnorm='running')")
    names, numels = run.param_names, ev.numels
    shapes = [p.shape for p in ev.params]
    dtypes = [p.dtype for p in ev.params]

    def split(d: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(d[:sum(numels)], numels)
        return {n: v.view(s).to(dt) for n, v, s, dt in zip(names, parts, shapes, dtypes, strict=True)}

    def data(name: str) -> Examples:
        return Examples(t.data[name]).to(ev.device)

    def batch(examples: Examples) -> int:
        return t.batch_size or len(examples)

    out = []
    products = (ev.products or ExampleProducts(ev.model, names, t.loss_fn, ev.device)) if req.per_example else None
    for name in req.per_example:
        x = data(name)
        out.append(RowLoop(name, ExampleIntegrand(products, x, batch(x)), ev.load, split, ledger.writer, st,
                           shared=lambda theta, dirs, name=name: ev.shared_rows(name, theta, dirs)))
    for name in req.per_token:
        x = data(name)
        out.append(RowLoop(name, TokenIntegrand(ev.model, _token_loss(t, name), x, batch(x)), ev.load, split,
                        ledger.writer, st))
    for name, pairs in req.token_tensors.items():
        x = data(name)
        f = TokenIntegrand(ev.model, _token_loss(t, name), x, batch(x), select=pairs, names=names)
        out.append(RowLoop(name, f, ev.load, split, ledger.writer, st))
    return out


def _token_loss(t: Task, name: str) -> object:
    from replay import losses

    if t.token_loss_fn is not None:
        return t.token_loss_fn
    if t.loss_fn is losses.causal_lm:
        return losses.causal_lm_tokens
    raise TaskError(f"--per-token {name!r}: the task's loss is not replay.losses.causal_lm; give the task a "
                    f"token_loss_fn(outputs, batch) returning (per-token losses [batch, seq], which count [bool])")


@contextmanager
def _borrowed(model: nn.Module):
    """Compute changes the task's model to replay it (trainable flags, eval/train modes, batch-norm's
    statistics mode, dtype and device); give it back as it was (its parameter values aside)."""
    inner = unwrap_model(model)
    flags = [(p, p.requires_grad, p.dtype, p.device) for p in inner.parameters()]
    modes = [(m, m.training, getattr(m, "track_running_stats", None)) for m in inner.modules()]
    try:
        yield
    finally:
        for m, training, track in modes:
            m.train(training)
            if track is not None:
                m.track_running_stats = track
        with torch.no_grad():
            for p, requires_grad, dtype, device in flags:
                if p.dtype != dtype or p.device != device:
                    p.data = p.data.to(device=device, dtype=dtype)
                p.grad = None
                p.requires_grad_(requires_grad)


def _notes(run: Run, t: Task, todo: list[int], st: Settings) -> dict:
    """What the frames' meta must say about how to read them (and the user hears once, as a warning)."""
    notes: dict = {"every": run.manifest.every, "aliases": run.aliases}
    if run.manifest.every > 1:
        notes["every_note"] = (f"states were recorded every {run.manifest.every} updates: each step's LCA is that of "
                               f"the straight chord between recorded states, not the sum of the updates' LCAs")
    half = sorted({s.dtype for s in run.manifest.params if s.dtype in ("F16", "BF16")})
    if half:
        if st.precision == "float32":
            t.model.float()  # bf16 and fp16 values are exact in float32: the states are unchanged
            t.data = {k: _float32_inputs(v) for k, v in t.data.items()}
            notes["precision_note"] = (f"the run's {'/'.join(half)} parameters were evaluated in float32 (their "
                                       f"values are exact there; the losses' rounding is not the 16-bit model's)")
        else:
            notes["precision_note"] = f"evaluated in the model's own dtype ({'/'.join(half)})"
    has_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                    for m in t.model.modules())
    if t.batchnorm == "running" and has_stats:  # (a model without batch-norm has no statistics to choose)
        if run.manifest.buffers:
            last = run.steps[-1]
            notes["batchnorm_stats"] = f"recorded buffers of state {last} (the last), for every step"
        else:
            notes["batchnorm_stats"], untrained = running_stats_note(t, run)
            if untrained:
                warnings.warn(f"{run.path}: batchnorm='running' but the run recorded no buffers, so the replay "
                              f"uses {notes['batchnorm_stats']}", ReplayWarning, stacklevel=3)
    if run.missing is not None:
        first, last = run.missing
        notes["missing_states"] = [first, last]
        warnings.warn(f"{run.path}: states {first}..{last} are missing (a chunk is lost; see `replay verify`): "
                      f"computing steps {todo[0]}..{todo[-1]} only", ReplayWarning, stacklevel=3)
    return notes


def _float32_inputs(d: object) -> object:
    """16-bit floating inputs as float32 (exact), for a 16-bit model evaluated in float32."""
    half = (torch.float16, torch.bfloat16)
    if isinstance(d, dict):
        return {k: v.float() if v.dtype in half else v for k, v in d.items()}
    x, y = d
    return (x.float() if x.dtype in half else x, y.float() if y.dtype in half else y)


def _write_failed(out: Path, e: OSError) -> ReplayError:
    where = e.filename or out
    return ReplayError(f"{where}: writing the LCA frames failed ({os_reason(e)}); fix that and run the same command "
                       f"again to resume from the last flush")
