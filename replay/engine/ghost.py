"""Per-example directional derivatives Δθ_T · ∇_T ℓ_i for every example i and tensor T of a batch, at the cost of
about one forward and one backward ("ghost" products, as in DP ghost clipping and In-Run Data Shapley).

A layer whose output is linear in a parameter gives that parameter's directional derivative of
every example's loss from the layer's input a and its output gradient b = ∂(Σ_i ℓ_i)/∂y (examples
do not mix inside these layers, so b's rows are each example's own ∂ℓ_i/∂y):

    Δθ_T · ∇_T ℓ_i = Σ_{positions} ⟨ b_i, J_T(a_i) Δθ_T ⟩

for the layers `layers.kind_of` names (Linear, Conv1D, convolutions, Embedding, LayerNorm, BatchNorm: the rules
are in `layers`). A layer output the examples share (learned positions, [1, S, D] broadcast later) is given a
batch dimension as a broadcast view (`_expand`), so its products come from the same backward.

A tensor used by several layers (tied weights) sums their contributions; a layer applied
several times sums each application. Every other recorded tensor (and any whose layer's output
was changed in place after it, which makes b another tensor's gradient) goes through the
forward-mode product (`torch.func.jvp`, batched by `vmap`). On the first batch every
fast tensor is checked against it on a few examples; one that disagrees falls back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, jvp, vmap

from replay.engine.layers import directional, kind_of, per_example, tangent
from replay.engine.user_code import checked_losses
from replay.errors import TaskError
from replay.task import Examples, user_error
from replay.wrappers import unwrap_model

CHECK_EXAMPLES = 4  # examples of the first batch compared with the forward-mode product
CHECK_RTOL = 1e-3  # the ghost product agrees to ~1e-6 relative in float32; a wrong rule is far off


@contextmanager
def forward_mode_attention() -> Iterator[None]:
    """Where replay differentiates forward: scaled_dot_product_attention's fused CPU/GPU kernels have no
    forward-mode AD, its math backend computes the same function (to rounding) and has, so it is chosen;
    and torch's forward-AD decompositions script themselves (a FutureWarning about torch.jit.script that
    is torch's own, not the user's), so that warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # pragma: no cover - older torch
            yield
            return
        with sdpa_kernel(SDPBackend.MATH):
            yield


def _batched(out: torch.Tensor, how: str, B: int) -> torch.Tensor:
    """A batch-shared layer output as a [B, ...] broadcast view (see ExampleProducts._expand)."""
    return out.expand(B, *out.shape[1:]) if how == "lead" else out.unsqueeze(0).expand(B, *out.shape)


def _runs(s: torch.Tensor) -> list[tuple[int, int, float]] | None:
    """(start, stop, s) of each run of equal s (a round's pairs, point by point), or None when the runs are too
    short for a matrix per run to pay (fewer than 4 pairs each on average)."""
    values = s.tolist()  # (a few hundred floats: Python's loop costs less than three torch ops here)
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, values[start]))
            start = i
    return None if len(runs) * 4 > len(values) else runs


def _moved(out: torch.Tensor, ts: list[tuple[int, torch.Tensor]], sv: torch.Tensor, a: torch.Tensor | None = None,
           mod: nn.Module | None = None, dw: torch.Tensor | None = None, runs: list | None = None) -> torch.Tensor:
    """A layer's output at each pair's point, y + s_i·Σ its tangents: a Linear (given its input a, its ΔW and the
    runs of pairs at one point) through `_AtPointsLinear`, any other by autograd."""
    if mod is not None:
        return _AtPointsLinear.apply(a, out.detach(), [t.detach() for _, t in ts], sv, mod.weight.detach(), dw, runs)
    y = out
    for _, t in ts:
        y = y + sv * t
    return y


class _AtPointsLinear(torch.autograd.Function):
    """A Linear's output at θ + s_iΔθ, y = y(θ) + s_i·Σ tangents (as `ExampleProducts.at_points` forms it), with
    the gradient to its input through W(s) = W + s·ΔW, one matrix per run of pairs at one point: one matmul
    where autograd takes two (through W, and through the tangent's ΔW)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, y: torch.Tensor,
                tangents: list[torch.Tensor], sv: torch.Tensor, weight: torch.Tensor, dweight: torch.Tensor,
                runs: list[tuple[int, int, float]]) -> torch.Tensor:
        ctx.save_for_backward(weight, dweight)
        ctx.runs, ctx.a_dtype = runs, a.dtype
        for t in tangents:
            y = y + sv * t
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple:
        weight, dweight = ctx.saved_tensors
        grad = g.new_empty(*g.shape[:-1], weight.shape[1])
        for lo, hi, sv in ctx.runs:
            grad[lo:hi] = g[lo:hi] @ torch.add(weight, dweight, alpha=sv)
        return grad.to(ctx.a_dtype), None, None, None, None, None, None


class ExampleProducts:
    """d[D, B, T] for the examples of a batch at the model's current parameters, and their losses [B]."""

    def __init__(self, model: nn.Module, names: list[str], loss_fn: Callable, device: torch.device):
        self.model, self.names, self.loss_fn, self.device = model, list(names), loss_fn, device
        inner = unwrap_model(model)
        self.prefix = "" if inner is model else "_orig_mod."  # functional_call on the module that is called
        self.params = dict(inner.named_parameters(remove_duplicate=False))
        index = {n: i for i, n in enumerate(self.names)}
        by_id = {id(p): n for n, p in inner.named_parameters() if n in index}  # the recorded name of each tensor
        self.uses: list[tuple[nn.Module, str, str, int]] = []  # (module, kind, its parameter name, tensor index)
        for m in inner.modules():
            kind = kind_of(m)
            if kind is None:
                continue
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in by_id and pname in ("weight", "bias"):
                    self.uses.append((m, kind, pname, index[by_id[id(p)]]))
        covered = {i for *_, i in self.uses}
        self.fallback = [i for i in range(len(self.names)) if i not in covered]
        self.checked = False
        self._probed = False
        self._modules_uses: dict | None = None  # see _by_module
        self._vmap_ok = True
        self._copied: set[int] = set()  # uses whose output the model changes in place: forwarded as a copy
        self._points_ok = True  # every layer output batch-first (at_points)
        # uses whose output is shared by the whole batch (nanoGPT's position embedding: [T, C], or HF GPT-2's
        # [1, T, C]), found by the probe: their output is given a batch dimension (a broadcast view, which every
        # elementwise consumer treats alike), so that the gradient there is each example's own
        self._expand: dict[int, str] = {}  # use -> "lead" ([1, ...] expanded) or "new" ([...] -> [B, ...])

    # ---- the fast path -------------------------------------------------------------------------------

    def __call__(self, batch: Examples, dirs: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [B] float64, d [D, B, T] float64) of the batch for each direction ({name: Δθ})."""
        losses, d = self.batch_products(batch, dirs)
        return losses.double(), d

    def batch_products(self, batch: Examples, dirs: list[dict[str, torch.Tensor]], accumulate: bool = False,
                       where: str = "per-example LCA") -> tuple[torch.Tensor, torch.Tensor]:
        """(losses [B] in the model's dtype, d [D, B, T] float64); `where` names the examples in an error.

        `accumulate`: the one backward also adds ∇ Σ_i ℓ_i into the parameters' .grad (as loss.backward()
        would), for a caller that needs the batch's gradient too.
        """
        if not self._probed:  # which layers' outputs the model changes in place, before any number is taken:
            self._probe(batch.slice(0, min(CHECK_EXAMPLES, len(batch))), where)  # every batch computes alike
        losses, records, grads = self._backward(batch, accumulate, where)
        d, stale = self._ghost(records, grads, dirs, losses.shape[0])
        slow = sorted(set(self.fallback) | stale)
        if not self.checked:
            slow = self._check(batch, dirs, d, slow)
        if slow:
            d[:, :, slow] = self._forward_mode(batch, dirs, slow)
        return losses, d

    def _backward(self, batch: Examples, accumulate: bool, where: str, probe: bool = False,
                  expand: dict[int, str] | None = None) -> tuple[torch.Tensor, list, list]:
        """One forward and one backward of the batch: its losses, each fast layer use's (input, output, version)
        and the gradient b of Σ ℓ at that output (None where the output does not reach the loss)."""
        expand = self._expand if expand is None else expand
        B = len(batch)
        records: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # (use, input, output, its version)
        grads: dict[int, torch.Tensor] = {}
        hooks = []
        for u, (m, *_rest) in enumerate(self.uses):
            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, u: int = u) -> torch.Tensor | None:
                if isinstance(out, torch.Tensor) and (out.requires_grad or probe) and args:
                    given = None
                    if u in expand and (expand[u] == "new" or out.shape[0] != B):  # one output for the batch:
                        out = given = _batched(out, expand[u], B)  # each example's view of it
                    r = len(records)
                    records.append((u, args[0], out, out._version))
                    if accumulate:  # b arrives during loss.backward(): kept by a hook on the output
                        out.register_hook(lambda g, r=r: grads.__setitem__(r, g))
                    if u in self._copied:  # the model changes this output in place (ReLU(inplace=True)): the
                        return out.clone()  # copy is what it changes, the recorded output keeps its gradient
                    return given
                return None
            hooks.append(m.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                losses = checked_losses(batch, self.model, self.loss_fn, where)
                ys = [r[2] for r in records]
                if probe:
                    bs = []
                elif accumulate:
                    losses.sum().backward()
                    bs = [grads.get(r) for r in range(len(records))]
                else:
                    bs = list(torch.autograd.grad(losses.sum(), ys, allow_unused=True)) if ys else []
        finally:
            for h in hooks:
                h.remove()
        return losses.detach(), records, bs

    def outputs_and_grads(self, batch: Examples, where: str) -> tuple[torch.Tensor, list, list]:
        """(losses [B], records, output gradients) of one forward and one backward (activations only) of the batch:
        each fast layer use's (use, input, output, version) and the gradient of Σ ℓ at its output (`segments`)."""
        if not self._probed:
            self._probe(batch.slice(0, min(CHECK_EXAMPLES, len(batch))), where)
        losses, records, grads = self._backward(batch, False, where)
        changed = {u for u, _, y, version in records if y._version != version}
        if changed:  # changed in place after the layer: b would be another tensor's gradient; as a copy, again
            self._copied |= changed
            losses, records, grads = self._backward(batch, False, where)
        return losses, records, grads

    def input_rows(self, u: int, a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Rows lo..hi of use u's input: its rows, or (a batch-shared output, see _expand) the input broadcast."""
        how = self._expand.get(u)
        if how is None:
            return a[lo:hi]
        return a.expand(hi - lo, *(a.shape if how == "new" else a.shape[1:]))

    def _probe(self, batch: Examples, where: str) -> None:
        """Forwards of a few examples: the layer uses whose output the model then changes in place go on as a
        copy from the first batch (so that the first batch's numbers are computed as every later one's), and
        those whose output the whole batch shares (its first dimension the same for k and k − 1 examples: no
        coincidence of sizes can pass for batch-first) are given a batch dimension from then on, where the
        losses stay what they were (checked here: else they keep the slow product)."""
        self._probed = True
        with torch.no_grad():
            losses, records, _ = self._backward(batch, False, where, probe=True, expand={})
        self._copied |= {u for u, _, y, version in records if y._version != version}
        if len(batch) < 2:
            return
        try:
            with torch.no_grad():
                _, fewer, _ = self._backward(batch.slice(0, len(batch) - 1), False, where, probe=True, expand={})
        except (RuntimeError, TaskError):  # a model for one batch size only: nothing is taken for shared
            return
        if [r[0] for r in fewer] != [r[0] for r in records]:
            return
        calls: dict[int, list[tuple[bool, bool]]] = {}  # use -> per call (shared, of first dimension 1)
        for (u, _, y, _), (_, _, z, _) in zip(records, fewer, strict=True):
            same = bool(y.dim() and z.dim() and y.shape[0] == z.shape[0])
            calls.setdefault(u, []).append((same, y.shape[:1] == (1,)))
        shared = {u: "lead" if all(one for _, one in c) else "new" for u, c in calls.items()
                  if all(sh for sh, _ in c) and len({one for _, one in c}) == 1}  # every call of the use alike
        if not shared:
            return
        try:
            with torch.no_grad():
                again, _, _ = self._backward(batch, False, where, probe=True, expand=shared)
            if again.shape == losses.shape and torch.allclose(again, losses, rtol=1e-5, atol=1e-7):
                self._expand = shared
        except (RuntimeError, TaskError):  # the model needs that output as it was: the slow product there
            pass

    def _ghost(self, records: list, grads: list, dirs: list[dict[str, torch.Tensor]], B: int
               ) -> tuple[torch.Tensor, set[int]]:
        """d [D, B, T] of the fast rules, and the tensors whose records cannot use them (`stale`)."""
        d = torch.zeros(len(dirs), B, len(self.names), dtype=torch.float64, device=self.device)
        stale = set()
        with torch.no_grad():
            for (u, a, y, version), b in zip(records, grads, strict=True):
                m, kind, pname, ti = self.uses[u]
                if y._version != version:  # changed in place after the layer, so b is another tensor's gradient:
                    stale.add(ti)  # the slow product this once, and from the next batch on the layer's output
                    self._copied.add(u)  # goes on as a copy
                    continue
                if y.shape[0] != B:  # not batch-first (GPT-2's position embedding: one row broadcast to every
                    stale.add(ti)  # example, so b sums the examples): the slow product
                    continue
                if b is None:
                    continue
                for k, dd in enumerate(dirs):  # one product per direction: a direction's numbers never depend
                    d[k, :, ti] += directional(kind, m, pname, a, b, dd[self.names[ti]]).double()  # on the others
                    # (stacked in one matmul they would round differently, and a resumed or followed compute,
                    # whose first point has one direction fewer, would not be bit for bit one compute)
        return d, stale

    # ---- a refinement round: each example at its own point, in one pass --------------------------------

    def at_points(self, batch: Examples, s: torch.Tensor, direction: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(losses [B] float64, d [B, T] float64) of example i of the batch at θ + s_i Δθ, θ the model's current
        parameters, in one forward and one backward: every recorded tensor's layer output is linear in it, so
        each layer returns y(θ) + s_i · J Δθ (its tangent, which is also its ghost product's factor). None
        when some tensor has no such rule or a layer's output is not batch-first (then for good)."""
        if not self._points_ok or self.fallback or not self.checked:
            return None
        B = len(batch)
        records: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # (use, its tangent, the output, its version)
        by_module = self._by_module()
        bad = []
        runs = _runs(s)  # pairs at one point are consecutive: (start, stop, s) of each point's
        svs: dict[tuple, torch.Tensor] = {}  # s on each output's device and dtype, made once

        def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            uses, weight_name = by_module[mod]
            shape = getattr(out, "shape", None)
            if self._expand:
                out = self._shared_view([u for u, *_ in uses], out, B)  # (each example's view of a shared output)
            if not (isinstance(out, torch.Tensor) and args) or out.shape[0] != B:
                bad.append(mod)
                return None
            key = (out.device, out.dtype)
            if key not in svs:
                svs[key] = s.to(device=out.device, dtype=out.dtype)
            sv = svs[key].view(-1, *([1] * (out.dim() - 1)))
            a = args[0]
            ts = [(u, tangent(kind, mod, pname, a, direction[name])) for u, kind, pname, name in uses]
            fused = weight_name is not None and runs is not None and a.requires_grad and shape == out.shape \
                and a.shape[:-1] == out.shape[:-1]
            y = _moved(out, ts, sv, a, mod, direction[weight_name], runs) if fused else _moved(out, ts, sv)
            records.extend((u, t, y, y._version) for u, t in ts)
            return y.clone() if any(u in self._copied for u, *_ in uses) else y

        hooks = [m.register_forward_hook(hook) for m in by_module]
        try:
            with torch.enable_grad():
                losses = checked_losses(batch, self.model, self.loss_fn, "per-example LCA")
                ys = list({id(r[2]): r[2] for r in records}.values())
                grads = torch.autograd.grad(losses.sum(), ys, allow_unused=True) if ys and not bad else []
        finally:
            for h in hooks:
                h.remove()
        if bad:
            self._points_ok = False
            return None
        changed = {u for u, _, y, version in records if y._version != version}
        if changed:  # changed in place after the layer: as a copy from now on, point by point this once
            self._copied |= changed
            return None
        bs = {id(y): b for y, b in zip(ys, grads, strict=True)}
        d = torch.zeros(B, len(self.names), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for u, t, y, _ in records:
                b = bs.get(id(y))
                if b is not None:
                    d[:, self.uses[u][3]] += per_example(b * t).double()
        return losses.detach().double(), d

    def _by_module(self) -> dict[nn.Module, tuple[list[tuple[int, str, str, str]], str | None]]:
        """Per layer: its uses (use, kind, parameter name, recorded name) and the recorded name of its Linear
        weight (None if it is not a Linear)."""
        if self._modules_uses is None:
            out: dict[nn.Module, tuple[list, str | None]] = {}
            for u, (m, kind, pname, ti) in enumerate(self.uses):
                uses, weight = out.get(m, ([], None))
                uses.append((u, kind, pname, self.names[ti]))
                if kind == "linear" and pname == "weight":
                    weight = self.names[ti]
                out[m] = (uses, weight)
            self._modules_uses = out
        return self._modules_uses

    def _shared_view(self, uses: list[int], out: object, B: int) -> object:
        """A batch-shared output of these uses as a [B, ...] view (see _expand), any other output as it is."""
        how = next((self._expand[u] for u in uses if u in self._expand), None)
        if how is not None and isinstance(out, torch.Tensor) and (how == "new" or out.shape[0] != B):
            return _batched(out, how, B)
        return out

    def losses(self, batch: Examples) -> torch.Tensor:
        """Per-example losses [B] of the batch (the user's model and loss_fn, checked)."""
        return checked_losses(batch, self.model, self.loss_fn, "per-example LCA")

    def _check(self, batch: Examples, dirs: list[dict], d: torch.Tensor, slow: list[int]) -> list[int]:
        """Compare the fast tensors on a few examples with each example's own gradient (autograd, one backward per
        example of their batch); those that disagree fall back for good. (Autograd rather than the forward-mode
        product where it can: as independent, and it spares the second that functorch's first call sets up.)"""
        self.checked = True
        fast = [i for i in range(len(self.names)) if i not in slow]
        if not fast:
            return slow
        few = batch.slice(0, min(CHECK_EXAMPLES, len(batch)))
        # autograd zeros an embedding's padding row's gradient although the forward reads that row (a tied output
        # layer moves it): there the forward-mode product is the reference
        padded = {i for m, kind, _, i in self.uses if kind == "embedding" and m.padding_idx is not None}
        by_grad = [i for i in fast if i not in padded]
        ref = torch.empty(len(few), len(fast), dtype=torch.float64, device=self.device)
        if by_grad:
            ref[:, [fast.index(i) for i in by_grad]] = self._by_gradients(few, dirs[0], by_grad)
        if len(by_grad) < len(fast):
            rest = [i for i in fast if i in padded]
            ref[:, [fast.index(i) for i in rest]] = self._forward_mode(few, dirs[:1], rest)[0]
        got = d[0, :ref.shape[0]][:, fast]
        scale = torch.maximum(ref.abs(), got.abs()).amax(0)
        bad = {fast[j] for j in torch.nonzero((got - ref).abs().amax(0) > CHECK_RTOL * scale + 1e-10).flatten()
               .tolist()}
        if bad:
            names = ", ".join(self.names[i] for i in sorted(bad)[:3])
            warnings.warn(f"per-example LCA: the one-backward products of {names} disagree with each example's own "
                          f"gradient (a layer used batch-second?); they use the forward-mode product", stacklevel=3)
            self.fallback = sorted(set(self.fallback) | bad)
        return sorted(set(slow) | bad)

    def _by_gradients(self, batch: Examples, direction: dict, which: list[int]) -> torch.Tensor:
        """[b, len(which)] Δθ_T · ∇_T ℓ_i of each example i of the batch, from its own backward through the batch."""
        params = [self.params[self.names[i]] for i in which]
        rows = []
        with torch.enable_grad():
            losses = self.losses(batch)
            for e in range(len(batch)):
                gs = torch.autograd.grad(losses[e], params, allow_unused=True, retain_graph=e + 1 < len(batch))
                rows.append(torch.stack([torch.zeros((), dtype=torch.float64) if g is None else
                                         (g.double() * direction[self.names[i]].double()).sum()
                                         for i, g in zip(which, gs, strict=True)]))
        return torch.stack(rows).to(self.device)

    # ---- the fallback: forward-mode products, one per tensor (batched by vmap) -------------------------

    def _forward_mode(self, batch: Examples, dirs: list[dict], which: list[int]) -> torch.Tensor:
        """d [D, B, len(which)] from torch.func.jvp with the tangent restricted to each tensor in turn."""
        params = {self.prefix + n: p.detach() for n, p in unwrap_model(self.model).named_parameters()}
        keys = [self.prefix + self.names[i] for i in which]
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        t = batch.tensors

        def losses(p: dict[str, torch.Tensor]) -> torch.Tensor:
            out = functional_call(self.model, p, (), t) if isinstance(t, dict) else functional_call(self.model, p,
                                                                                                      (t[0],))
            return self.loss_fn(out, t if isinstance(t, dict) else t[1])

        out = []
        with forward_mode_attention():
            for dd in dirs:
                delta = {self.prefix + n: v for n, v in dd.items()}
                out.append(self._products(losses, params, zeros, delta, keys))
        return torch.stack(out).double()

    def _products(self, losses: Callable, params: dict, zeros: dict, delta: dict, keys: list[str]) -> torch.Tensor:
        """d [B, len(keys)]: the forward-mode products, batched in one vmap when the model allows it (a k-fold
        tangent costs k × the parameters' memory: up to 256 MiB), else one after another."""
        size = sum(v.numel() * v.element_size() for v in params.values())
        if self._vmap_ok and len(keys) * size <= 256 << 20:
            tangents = {k: torch.stack([delta[k] if key == k else zeros[k] for key in keys]) if k in keys else
                        zeros[k].expand(len(keys), *zeros[k].shape) for k in params}
            try:
                _, d = vmap(lambda tg: jvp(losses, (params,), (tg,)), randomness="same")(tangents)
                return d.T
            except (RuntimeError, NotImplementedError, ValueError):  # an op without a batching rule
                self._vmap_ok = False
        cols = []
        for key in keys:  # one forward-mode product per tensor: Δθ restricted to it
            try:
                _, d = jvp(losses, (params,), ({**zeros, key: delta[key]},))
            except (NotImplementedError, RuntimeError) as e:
                if "forward AD" not in str(e) and "forward-mode" not in str(e):
                    raise
                raise TaskError(f"per-example LCA of {key.removeprefix(self.prefix)!r} differentiates forward "
                                f"(torch.func.jvp), which an op of the task's model does not support "
                                f"({user_error(e)}); use an implementation that does (HF: "
                                f"attn_implementation='eager'; scaled_dot_product_attention: the math backend, "
                                f"torch.nn.attention.sdpa_kernel(SDPBackend.MATH))") from None
            cols.append(d)
        return torch.stack(cols, 1)
