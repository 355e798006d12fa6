"""Per-example products from one forward and one backward (engine.ghost), per layer type, against the forward-mode
product and against each example's loss evaluated directly (a float64 central difference along Δθ_T)."""

import warnings

import pytest
import torch
from torch import nn

from replay.engine.ghost import ExampleProducts
from replay.task import Examples


class Net(nn.Module):
    """Every layer type with a fast rule, a tied weight used twice, a layer applied twice, and a parameter no
    rule covers (`scale`, used directly)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv1 = nn.Conv1d(6, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 3, 3, padding=1, stride=2)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.scale = nn.Parameter(torch.tensor(1.3))

    def forward(self, idx):
        x = self.emb(idx)  # [B, S, 6]
        h = self.conv1(x.transpose(1, 2)).transpose(1, 2)  # [B, S, 5]
        img = self.conv2(h.unsqueeze(1)).mean((1, 2, 3))  # [B]
        h = self.fc(torch.tanh(self.norm(h)))
        h = self.fc(h) * self.scale  # fc applied twice
        out = self.head(torch.cat([h, img[:, None, None].expand(-1, h.shape[1], 1)], 2))  # [B, S, 11]
        return out


def loss_fn(out, idx):
    return nn.functional.cross_entropy(out.transpose(1, 2), idx, reduction="none").mean(1)


def setup(dtype=torch.float64):
    torch.manual_seed(0)
    model = Net().to(dtype)
    idx = torch.randint(0, 11, (7, 9))
    idx[0, :3] = 0  # padding positions: the embedding's gradient is 0 there
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(p.shape, generator=g, dtype=dtype) * 0.1 for n, p in model.named_parameters()}
    return model, idx, names, delta


def direct(model, idx, name, delta, h=1e-6):
    """dℓ_i/ds of θ + s·Δθ_name at s = 0, by a float64 central difference of every example's own loss."""
    p = dict(model.named_parameters())[name]
    base = p.detach().clone()
    out = []
    with torch.no_grad():
        for sign in (1, -1):
            p.copy_(base + sign * h * delta[name])
            out.append(loss_fn(model(idx), idx))
        p.copy_(base)
    return (out[0] - out[1]) / (2 * h)


@pytest.mark.parametrize("batched", [True, False], ids=["vmap", "one-by-one"])
def test_every_fast_rule_matches_the_forward_mode_product_and_the_loss_itself(batched):
    model, idx, names, delta = setup()
    ex = ExampleProducts(model, names, loss_fn, torch.device("cpu"))
    assert [names[i] for i in ex.fallback] == ["scale"], "only the parameter no layer rule covers"
    ex._vmap_ok = batched
    values, d = ex(Examples((idx, idx)), [delta])
    fast = [i for i in range(len(names)) if i not in ex.fallback]
    ref = ex._forward_mode(Examples((idx, idx)), [delta], list(range(len(names))))[0]  # [B, T]
    for i, n in enumerate(names):
        torch.testing.assert_close(d[0, :, i], ref[:, i], rtol=1e-9, atol=1e-12, msg=f"{n} vs forward mode")
        torch.testing.assert_close(d[0, :, i], direct(model, idx, n, delta), rtol=1e-6, atol=1e-9,
                                   msg=f"{n} vs the loss evaluated directly")
    assert len(fast) == len(names) - 1
    torch.testing.assert_close(values, loss_fn(model(idx), idx).double())


def test_two_directions_at_once_and_a_batch_one_by_one():
    model, idx, names, delta = setup()
    g = torch.Generator().manual_seed(2)
    other = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in delta.items()}
    ex = ExampleProducts(model, names, loss_fn, torch.device("cpu"))
    _, both = ex(Examples((idx, idx)), [delta, other])  # each weight's two products as one stacked product
    torch.testing.assert_close(both[1], ex(Examples((idx, idx)), [other])[1][0], rtol=1e-10, atol=1e-13)
    rows = torch.cat([ex(Examples((idx[i:i + 1], idx[i:i + 1])), [delta])[1][0] for i in range(len(idx))])
    torch.testing.assert_close(rows, both[0], rtol=1e-10, atol=1e-13)


def test_a_layer_changed_in_place_after_it_goes_on_as_a_copy_without_a_wrong_number():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(x).relu_())  # the Linear's output is overwritten in place

    torch.manual_seed(0)
    model = InPlace().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    names = [n for n, _ in model.named_parameters()]
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ex = ExampleProducts(model, names, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                         torch.device("cpu"))
    slow = []
    forward_mode = ex._forward_mode

    def spy(batch, dirs, which):
        slow.append(list(which))
        return forward_mode(batch, dirs, which)

    ex._forward_mode = spy
    _, d = ex(Examples((x, y)), [delta])
    # a probe forward of the first batch finds the layer changed in place: from the first batch on its output goes
    # on as a copy (the copy is overwritten) and its fast rule holds, so no forward-mode product is needed
    assert slow == [] and ex._copied
    ref = forward_mode(Examples((x, y)), [delta], list(range(len(names))))[0]
    torch.testing.assert_close(d[0], ref, rtol=1e-9, atol=1e-12)
    _, d2 = ex(Examples((x, y)), [delta])
    assert torch.equal(d, d2), "every batch computed alike"


def test_a_layer_whose_rows_are_not_examples_is_caught_by_the_check_and_falls_back():
    """fc1's output is transposed after it: its rows are examples but every example's loss reads all of them, so
    b's rows are no example's own (and no shape tells: there are as many features as examples). The first
    batch's check against each example's own gradient flags it (one warning), and every number then equals the
    forward-mode product."""

    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)).T)  # [4, 3]: row i is feature i's, read as example i's

    torch.manual_seed(0)
    model = Transposed().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    names = [n for n, _ in model.named_parameters()]
    delta = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    ex = ExampleProducts(model, names, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"),
                         torch.device("cpu"))
    with pytest.warns(UserWarning, match=r"fc1\.weight, fc1\.bias disagree with each example's own gradient"):
        _, d = ex(Examples((x, y)), [delta])
    assert [names[i] for i in ex.fallback] == ["fc1.weight", "fc1.bias"]
    ref = ex._forward_mode(Examples((x, y)), [delta], list(range(len(names))))[0]
    torch.testing.assert_close(d[0], ref, rtol=1e-9, atol=1e-12)


def assert_each_at_its_point(got: tuple, model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
                             delta: dict, loss) -> None:
    """`at_points`' (losses, products) against loading θ + s_i Δθ and autograd of example i's own loss, dotted with
    Δθ per tensor; the model is left at θ."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(len(s)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + s[i] * delta[n])
        li = loss(model(x[i:i + 1]), y[i:i + 1])[0]
        grads = torch.autograd.grad(li, list(model.parameters()))
        want = torch.stack([(g * delta[n]).sum() for n, g in zip(names, grads, strict=True)])
        torch.testing.assert_close(got[0][i], li.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1][i], want, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])


def test_a_round_of_linear_layers_takes_the_input_gradient_through_the_weights_at_each_point():
    """at_points with runs of pairs at one point (as a round orders them): the Linear layers' input gradients go
    through W + sΔW once per run (`_AtPointsLinear`). Every example's loss and products equal loading its point and
    autograd of its own loss, for layers on [B, in] and on sequences [B, T, in], with and without bias."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(5, 8)
            self.mid = nn.Linear(8, 8, bias=False)
            self.out = nn.Linear(8, 3)

        def forward(self, x):  # x [B, T, 5]
            return self.out(torch.tanh(self.mid(torch.relu(self.inp(x))))).mean(1)

    torch.manual_seed(1)
    model = Net().double().eval()
    x, y = torch.randn(12, 4, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    delta = {n: torch.randn_like(p) * 0.5 for n, p in model.named_parameters()}
    ex = ExampleProducts(model, names, loss, torch.device("cpu"))
    ex(Examples((x, y)), [delta])
    s = torch.tensor([0.25] * 4 + [0.75] * 5 + [0.625] * 3, dtype=torch.float64)
    from replay.engine.ghost import _runs
    assert _runs(s) == [(0, 4, 0.25), (4, 9, 0.75), (9, 12, 0.625)]
    got = ex.at_points(Examples((x, y)), s, delta)
    assert_each_at_its_point(got, model, x, y, s, delta, loss)


def test_each_example_at_its_own_point_in_one_pass():
    """at_points: example i at θ + s_i Δθ (a refinement round's pairs in one batch) equals loading θ + s_i Δθ and
    taking that example's own loss and its gradient dotted with Δθ per tensor (autograd), for convolution,
    batch-norm with running statistics, ReLU(inplace=True) after it, embedding, LayerNorm and tied weights."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.conv = nn.Conv1d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm1d(4)
            self.relu = nn.ReLU(inplace=True)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            h = self.relu(self.bn(self.conv(self.emb(idx).transpose(1, 2)))).transpose(1, 2)
            return self.head(self.norm(h)).mean(1)  # [B, 9]

    torch.manual_seed(0)
    model = Mixed().double().eval()
    model.bn.running_mean.uniform_(-0.3, 0.3)
    idx, y = torch.randint(0, 9, (6, 5)), torch.randint(0, 9, (6,))
    loss = lambda o, t: nn.functional.cross_entropy(o, t, reduction="none")  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    delta = {n: torch.randn_like(p) * 0.3 for n, p in model.named_parameters()}
    ex = ExampleProducts(model, names, loss, torch.device("cpu"))
    assert not ex.fallback
    ex(Examples((idx, y)), [delta])  # the first batch: the check, and the in-place layer found
    s = torch.tensor([0.25, 0.75, 0.125, 0.25, 0.875, 0.5], dtype=torch.float64)
    got = ex.at_points(Examples((idx, y)), s, delta)
    assert got is not None
    assert_each_at_its_point(got, model, idx, y, s, delta, loss)


class Positions(nn.Module):
    """A tiny LM with learned positions the whole batch shares: nanoGPT's wpe(arange(T)) is [T, C], HF GPT-2's
    wpe(position_ids [1, T]) is [1, T, C]; `reads` uses the position output by its shape (a consumer that a
    batch dimension would break)."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.wte, self.wpe = nn.Embedding(7, 4), nn.Embedding(5, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        T = idx.shape[1]
        pos = torch.arange(T) if self.style != "hf" else torch.arange(T)[None]
        p = self.wpe(pos)
        if self.style == "reads":
            p = p.reshape(T, 4)[None]  # [1, T, C] from [T, C] by shape: a [B, T, C] view cannot be read so
        return self.head(torch.tanh(self.mix(self.wte(idx) + p)))


@pytest.mark.parametrize("style", ["nanogpt", "hf", "reads", "square"])
def test_a_batch_shared_output_gets_each_examples_products_from_one_backward(style):
    """The position embedding's output is one for the whole batch, so its gradient there sums the examples. It is
    given a batch dimension (a broadcast view): every tensor, the positions' included, then comes from one
    backward and equals each example's loss differenced directly, and each example at its own point (at_points)
    equals loading that point. Where the model reads the output by its shape, the view would change the loss:
    the probe sees it and the positions keep the forward-mode product (the numbers equal all the same).
    `square`: as many examples as positions, so that no shape tells the shared output from a batch-first one
    (the probe compares two numbers of examples instead)."""
    torch.manual_seed(0)
    model = Positions("nanogpt" if style == "square" else style).double()
    idx = torch.randint(0, 7, (5 if style == "square" else 6, 5))
    loss = lambda o, t: nn.functional.cross_entropy(o.transpose(1, 2), t, reduction="none").mean(1)  # noqa: E731
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    delta = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2 for n, p in model.named_parameters()}
    ex = ExampleProducts(model, names, loss, torch.device("cpu"))
    assert not ex.fallback
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rule disagrees with the examples' own gradients
        _, d = ex(Examples((idx, idx)), [delta])
    wpe = [i for i, (_, _, _, ti) in enumerate(ex.uses) if names[ti] == "wpe.weight"]
    assert bool(set(wpe) & set(ex._expand)) == (style != "reads")
    for i, n in enumerate(names):
        p = dict(model.named_parameters())[n]
        base, h, out = p.detach().clone(), 1e-6, []
        with torch.no_grad():
            for sign in (1, -1):
                p.copy_(base + sign * h * delta[n])
                out.append(loss(model(idx), idx))
            p.copy_(base)
        torch.testing.assert_close(d[0, :, i], (out[0] - out[1]) / (2 * h), rtol=1e-6, atol=1e-9, msg=n)
    s = torch.tensor([0.25, 0.75, 0.125, 0.5, 0.875, 0.375][:len(idx)], dtype=torch.float64)
    got = ex.at_points(Examples((idx, idx)), s, delta)
    if style == "reads":
        return
    assert got is not None, "a round in one pass, the shared output at each example's own point"
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(len(s)):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(base[n] + s[i] * delta[n])
        li = loss(model(idx[i:i + 1]), idx[i:i + 1])[0]
        grads = dict(zip(names, torch.autograd.grad(li, list(model.parameters())), strict=True))
        want = torch.stack([(grads[n] * delta[n]).sum() for n in names])
        torch.testing.assert_close(got[0][i], li.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1][i], want, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(base[n])
