"""RowLoop of their own along the data set's steps: each example's (or each token's) loss change, allocated.

The same Simpson as the data-set losses (`engine.simpson`), on a mesh of their own per step: an
example's loss is far less smooth than a mean (a ReLU kink of its own), so it gets points where
its residual is, shared with the other examples of the data set (one evaluation serves all).

- examples: d [D, n, T] = Δθ_T · ∇_T ℓ_i, from `ghost.ExampleProducts` (one forward and one
  backward per batch, the forward-mode product for the tensors no fast rule covers);
- tokens (causal LMs): d [D, tokens, 1] = dℓ_{i,p}/ds, one forward-mode product of every token's
  loss along the whole Δθ per direction (a token's loss depends on the tokens before it, so no
  per-layer decomposition gives it from one backward); `lca` is then Σ over tensors;
- selected tokens per tensor (`token_tensors`): d [D, tokens, T], one forward-mode product per
  tensor and direction, over the selected tokens' sequences only (T× the cost of their Σ).

Memory: one batch of activations, and [points × rows × columns] scalars; never rows × parameters.
The start of a step is the end of the previous one (projected onto the next step's direction
when it is evaluated), as for the data-set losses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import functional_call, jvp

from replay.engine.ghost import ExampleProducts, forward_mode_attention
from replay.engine.settings import Settings
from replay.engine.simpson import Mesh, is_grounded, refine
from replay.engine.user_code import user_code
from replay.errors import TaskError
from replay.frames import FrameWriter, RowValues
from replay.task import Examples, user_error
from replay.wrappers import unwrap_model


class ExampleIntegrand:
    """The examples of one data set as rows: values [n], projections [D, n, T], batch by batch."""

    columns_per_tensor = True

    def __init__(self, products: ExampleProducts, data: Examples, batch: int):
        self.products, self.data, self.batch = products, data, batch

    def __len__(self) -> int:
        return len(self.data)

    def __call__(self, dirs: list[dict[str, torch.Tensor]], rows: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values [n], projections [D, n, T], the rows evaluated): all examples, or only `rows` [n] bool (the
        others 0), in batches of the task's size."""
        data = self.data if rows is None else self.data.take(torch.nonzero(rows).flatten())
        values, proj = [], []
        for a in range(0, len(data), self.batch):
            v, d = self.products(data.slice(a, a + self.batch), dirs)
            values.append(v)
            proj.append(d)
        v, d = torch.cat(values), torch.cat(proj, 1)
        if rows is None:
            return v, d, None
        rows = rows.to(v.device)
        full_v = v.new_zeros(len(self.data)).masked_scatter_(rows, v)
        full_d = d.new_zeros(d.shape[0], len(self.data), d.shape[2])
        full_d[:, rows] = d
        return full_v, full_d, rows

    def values(self) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for a in range(0, len(self.data), self.batch):
                out.append(self.products.losses(self.data.slice(a, a + self.batch)).double())
        return torch.cat(out)

    def round(self, direction: dict[str, torch.Tensor], points: list[tuple[float, torch.Tensor]]
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """A refinement round at once, the model at the step's start θ: every (point, example that needs it) pair
        at θ + sΔθ in batches of pairs (`ExampleProducts.at_points`), not one evaluation per point; per point
        (values [n], projections [1, n, T], its rows). None when the model does not allow it."""
        need = torch.stack([rows for _, rows in points]).cpu()  # [points, n]
        at, ex = torch.nonzero(need, as_tuple=True)  # the pairs, point by point, each point's examples in order
        s = torch.tensor([sv for sv, _ in points], dtype=torch.float64)[at]
        values, proj = [], []
        for a in range(0, len(s), self.batch):
            got = self.products.at_points(self.data.take(ex[a:a + self.batch]), s[a:a + self.batch], direction)
            if got is None:
                return None
            values.append(got[0])
            proj.append(got[1])
        v, pr = torch.cat(values), torch.cat(proj)
        at, ex = at.to(v.device), ex.to(v.device)
        full_v = v.new_zeros(len(points), len(self.data)).index_put_((at, ex), v)
        full_p = pr.new_zeros(len(points), len(self.data), pr.shape[1]).index_put_((at, ex), pr)
        need = need.to(v.device)
        out = [(full_v[j], full_p[j:j + 1], need[j]) for j in range(len(points))]
        return out


class TokenIntegrand:
    """The tokens of one data set (a causal LM) as rows: values [tokens], projections [D, tokens, 1]."""

    def __init__(self, model: torch.nn.Module, token_loss: Callable, data: Examples, batch: int,
                 select: list[tuple[int, int]] | None = None, names: list[str] | None = None):
        """`select` (example, position) pairs: only those tokens, each per tensor of `names`."""
        self.model, self.token_loss, self.batch = model, token_loss, batch
        self.names = names if select is not None else None
        self.columns_per_tensor = select is not None
        inner = unwrap_model(model)
        self.prefix = "" if inner is model else "_orig_mod."
        ids = torch.arange(len(data))
        if select is not None:  # only the sequences that hold a selected token
            ids = torch.tensor(sorted({e for e, _ in select}), dtype=torch.long)
            data = data.take(ids)
        self.data = data
        wanted = None if select is None else set(select)
        self.index: list[tuple[torch.Tensor, torch.Tensor]] = []  # per batch: (rows in data, positions) of tokens
        found: set[tuple[int, int]] = set()
        with torch.no_grad():
            for a in range(0, len(data), batch):
                _, keep = self._losses(data.slice(a, a + batch), None)
                ex, pos = torch.nonzero(keep, as_tuple=True)
                ex, pos = ex.cpu() + a, pos.cpu() + 1  # position: the target token's index in its sequence
                if wanted is not None:
                    pick = torch.tensor([(int(ids[e]), int(p)) in wanted for e, p in zip(ex, pos, strict=True)],
                                        dtype=torch.bool)
                    ex, pos = ex[pick], pos[pick]
                    found |= {(int(ids[e]), int(p)) for e, p in zip(ex, pos, strict=True)}
                self.index.append((ex.to(keep.device), pos.to(keep.device)))
        if wanted is not None and (missing := sorted(wanted - found)):
            more = f" ({len(missing)} in all)" if len(missing) > 1 else ""
            raise TaskError(f"--token-tensors: token {missing[0]} (example, position) is not a target token of the "
                            f"data set (positions 1..length-1 whose label counts){more}")
        self.examples = ids[torch.cat([e for e, _ in self.index]).cpu()]
        self.positions = torch.cat([p for _, p in self.index]).cpu()

    def __len__(self) -> int:
        return len(self.examples)

    def _losses(self, batch: Examples, params: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        t = batch.tensors
        with user_code("per-token LCA", "model or token loss"):
            if params is None:
                out = self.model(**t) if isinstance(t, dict) else self.model(t[0])
            else:
                out = functional_call(self.model, params, (), t) if isinstance(t, dict) else \
                    functional_call(self.model, params, (t[0],))
            return self.token_loss(out, t if isinstance(t, dict) else t[1])

    def __call__(self, dirs: list[dict[str, torch.Tensor]], need: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values [tokens], projections [D, tokens, 1 or T], the rows evaluated): every batch of sequences, or
        (`need` [tokens] bool) only those holding a needed token (the other tokens 0)."""
        params = {self.prefix + n: p.detach() for n, p in unwrap_model(self.model).named_parameters()}
        values, proj = [], []
        done = None if need is None else torch.zeros_like(need)
        hi = 0  # the token rows of a batch: lo..hi
        for bi, a in enumerate(range(0, len(self.data), self.batch)):
            batch = self.data.slice(a, a + self.batch)
            ex, pos = self.index[bi]
            rows = (ex - a, pos - 1)
            lo, hi = hi, hi + len(ex)
            if len(ex) == 0:
                continue
            if need is not None:
                if not bool(need[lo:hi].any()):
                    values.append(torch.zeros(len(ex), dtype=torch.float64, device=ex.device))
                    proj.append(torch.zeros(len(dirs), len(ex), len(self.names or [0]), dtype=torch.float64,
                                            device=ex.device))
                    continue
                done[lo:hi] = True
            cols = []
            for dd in dirs:
                parts = [dd] if self.names is None else [{n: dd[n]} for n in self.names]
                per = []
                for part in parts:
                    tangent = {k: part.get(k.removeprefix(self.prefix), torch.zeros_like(v))
                               for k, v in params.items()}
                    tok, dtok = self._jvp(batch, params, tangent)
                    per.append(dtok[rows].double())
                cols.append(torch.stack(per, -1))  # [tokens, 1 or T]
            values.append(tok.detach()[rows].double())
            proj.append(torch.stack(cols))
        return torch.cat(values), torch.cat(proj, 1), done

    def _jvp(self, batch: Examples, params: dict, tangent: dict) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            with forward_mode_attention():
                return jvp(lambda p: self._losses(batch, p)[0], (params,), (tangent,))
        except (NotImplementedError, RuntimeError) as e:
            raise TaskError(f"per-token LCA differentiates forward (torch.func.jvp), which an op of the "
                            f"task's model does not support ({user_error(e)}); use the math attention path "
                            f"(HF: attn_implementation='eager')") from None

    def values(self) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for bi, a in enumerate(range(0, len(self.data), self.batch)):
                tok, _ = self._losses(self.data.slice(a, a + self.batch), None)
                ex, pos = self.index[bi]
                out.append(tok[ex - a, pos - 1].double())
        return torch.cat(out)


class RowLoop:
    """One integrand's rows over the steps, written into the frames: examples, or tokens."""

    def __init__(self, name: str, integrand: ExampleIntegrand | TokenIntegrand, load: Callable[[torch.Tensor], None],
                 split: Callable[[torch.Tensor], dict[str, torch.Tensor]], writer: FrameWriter, st: Settings,
                 on_eval: Callable[[], None] | None = None,
                 shared: Callable[[object, list[torch.Tensor]], tuple | None] | None = None):
        """`shared(θ, dirs)`: the rows' (values, projections) at θ where the data set's own evaluation of that
        point already computed them (`LossEvaluator.shared_rows`), else None."""
        self.name, self.f, self.load, self.split, self.writer = name, integrand, load, split, writer
        self.shared = shared or (lambda theta, dirs: None)
        self.tol, self.rtol, self.max_splits = st.tol, st.rtol, st.max_splits
        self.on_eval = on_eval or (lambda: None)
        self._carry: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (state, values, proj onto this Δθ)

    def _at(self, theta: torch.Tensor | tuple[torch.Tensor, float, torch.Tensor], dirs: list[torch.Tensor],
            rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(values, projections, the rows evaluated: None for all) at θ (or θ0 + sΔθ, given as (θ0, s, Δθ)), of all
        rows or at least `rows`."""
        got = self.shared(theta, dirs)
        if got is not None:  # the data set's own pass at this point gave every row's
            return got[0], got[1], None
        if isinstance(theta, tuple):
            theta = theta[0] + theta[1] * theta[2]
        self.load(theta)
        self.on_eval()
        return self.f([self.split(d) for d in dirs], rows)

    def step(self, t0: int, t1: int, th0: torch.Tensor, th1: torch.Tensor, d: torch.Tensor,
             d_next: torch.Tensor | None) -> Callable[[], None]:
        """Evaluate and allocate step t0 -> t1 (d = θ1 − θ0, the step loop's tensor: its evaluations are found by
        it); returns what writes it (nothing is written before)."""
        if self._carry is not None and self._carry[0] == t0:
            v0, p0 = self._carry[1], self._carry[2]
        else:
            v0, p, _ = self._at(th0, [d])
            p0 = p[0]
        v1, p1, _ = self._at(th1, [d] + ([d_next] if d_next is not None else []))
        vm, pm, _ = self._at((th0, 0.5, d), [d])
        mesh = Mesh(((v0, p0), (v1, p1[0])), (vm, pm[0]), self.max_splits)

        def point(s: float, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            v, p, done = self._at((th0, s, d), [d], rows)  # only the rows whose panels need the point
            return v, p[0], rows if done is None else done

        many = None
        if isinstance(self.f, ExampleIntegrand):
            direction = self.split(d)

            def many(points: list) -> list | None:
                kept = {}  # the points the data set's own pass evaluated: every row's, from there
                for i, (sv, _) in enumerate(points):
                    if (shared := self.shared((th0, sv, d), [d])) is not None:
                        kept[i] = (shared[0], shared[1][0], None)
                rest = [pt for i, pt in enumerate(points) if i not in kept]
                got = []
                if rest:
                    self.load(th0)
                    self.on_eval()
                    got = self.f.round(direction, rest)
                    if got is None:
                        return None
                it = iter((v, p[0], r) for v, p, r in got)
                return [kept[i] if i in kept else next(it) for i in range(len(points))]

        refine(mesh, point, self.tol, self.rtol, many=many)
        lca = mesh.allocation()
        res = mesh.residual()
        grounded = is_grounded(res, v1 - v0, self.tol, self.rtol)

        def commit() -> None:  # written with the step's other rows (an interrupt before: nothing of it)
            self._write(t0, lca, v0, v1, mesh.splits(), grounded)
            self._carry = (t1, v1, p1[1] if d_next is not None else p1[0])

        return commit

    def unchanged(self, t0: int, t1: int, theta: torch.Tensor) -> None:
        """No parameter moved: LCA exactly 0, the losses by a forward (or the carried start's)."""
        if self._carry is not None and self._carry[0] == t0:
            v = self._carry[1]
            self._carry = (t1, *self._carry[1:])  # θ_t1 = θ_t0: still the next moving step's start
        else:
            self.load(theta)
            v = self.f.values()
        cols = len(self.writer.tensor_names) if self.f.columns_per_tensor else 1
        zeros = torch.zeros(len(v), cols, dtype=torch.float64)
        self._write(t0, zeros, v, v, torch.zeros(len(v), dtype=torch.int64), torch.ones(len(v), dtype=torch.bool))

    def _write(self, t0: int, lca: torch.Tensor, v0: torch.Tensor, v1: torch.Tensor, splits: torch.Tensor,
               grounded: torch.Tensor) -> None:
        values = RowValues(*(x.cpu().numpy() for x in (lca, v0, v1, splits, grounded)))
        if isinstance(self.f, TokenIntegrand) and self.f.columns_per_tensor:
            self.writer.add_token_tensors(t0, self.name, self.f.examples.numpy(), self.f.positions.numpy(),
                                          values.lca)
        elif isinstance(self.f, TokenIntegrand):
            self.writer.add_tokens(t0, self.name, self.f.examples.numpy(), self.f.positions.numpy(), values)
        else:
            self.writer.add_examples(t0, self.name, values)
