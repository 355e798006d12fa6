"""Group losses from the examples' one-backward products (engine.evaluate's ghost pass), at one θ, against each
group's own mean loss differentiated by autograd on its examples alone (an independent reference: no products,
no index sums), for the layer types a classifier has: linear, convolution, batch-norm with running statistics
followed by ReLU(inplace=True) (its output changed in place), and an embedding."""

import pytest
import torch
from torch import nn

import replay
from replay.engine.evaluate import LossEvaluator


class ConvNet(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(6 * 16, classes)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        return self.fc(nn.functional.avg_pool2d(h, 2).flatten(1))


class BagOfWords(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, classes)

    def forward(self, idx):
        return self.out(self.norm(self.emb(idx).mean(1)))


class TinyLM(nn.Module):
    """Sequences classified by their mean logits: a padding row, learned positions (one output the whole batch
    shares, given a batch dimension by the engine), LayerNorm, the output layer tied to the embedding."""

    def __init__(self, classes: int, vocab: int = 20, width: int = 8, context: int = 5):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width, padding_idx=0), nn.Embedding(context, width)
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.cls = nn.Linear(vocab, classes)

    def forward(self, idx):
        h = self.ln(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        return self.cls(self.head(h).mean(1))


def make(kind: str, n: int = 120, classes: int = 7, groups: bool = True):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (n,), generator=g)
    if kind == "conv":
        model, x = ConvNet(classes), torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
        model.bn.running_mean.uniform_(-0.5, 0.5)  # statistics of their own: the rule must use them
        model.bn.running_var.uniform_(0.5, 2.0)
    elif kind == "lm":
        model, x = TinyLM(classes), torch.randint(0, 20, (n, 5), generator=g)
    else:
        model, x = BagOfWords(classes), torch.randint(0, 30, (n, 5), generator=g)
    model = model.double()
    keys = {"g": torch.randint(0, 25, (n,), generator=g)}  # 25 groups beside the classes
    task = replay.Task(model, {"train": (x, y)}, batch_size=32, groups={"train": keys} if groups else {},
                       batchnorm="running")
    return task, x, y, keys["g"]


def rows_of(name, y, g):
    """The examples of loss `name` (the data set, a class, a group)."""
    if name == "train":
        return torch.ones(len(y), dtype=torch.bool)
    if name.startswith("train/class="):
        return y == int(name.split("=")[1])
    return g == int(name.split("=")[1])


def reference(model, x, y, rows, dirs):
    """[D, T] projections of the mean loss of the examples `rows` onto each direction, per tensor (autograd)."""
    params = list(model.parameters())
    model.eval()
    loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    out = torch.zeros(len(dirs), len(params), dtype=torch.float64)
    for k, d in enumerate(dirs):
        for t, (g, dd) in enumerate(zip(grads, torch.split(d, [p.numel() for p in params]), strict=True)):
            out[k, t] = 0.0 if g is None else (g.reshape(-1) * dd).sum()
    return out, loss.detach()


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_every_group_loss_equals_autograd_on_its_own_examples(kind):
    task, x, y, g = make(kind)
    names = [n for n, _ in task.model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], ["train"], torch.device("cpu"))
    assert ev.plans[0].ghost, "the group losses come from the examples' products"
    assert not ev.products.fallback
    P = sum(ev.numels)
    gen = torch.Generator().manual_seed(3)
    theta = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    dirs = torch.randn(2, P, generator=gen, dtype=torch.float64) * 0.1
    for _ in range(2):  # the second call: the layer changed in place goes on as a copy (the fast rule)
        values, proj, grads = ev(theta, dirs)
        for li, name in enumerate(ev.loss_names):
            ref, loss = reference(task.model, x, y, rows_of(name, y, g), list(dirs))
            torch.testing.assert_close(values[li], loss, rtol=1e-12, atol=1e-12, msg=name)
            torch.testing.assert_close(proj[:, li], ref, rtol=1e-9, atol=1e-12, msg=name)
    assert len(ev.loss_names) > 1 + 7 + 20  # (a group value may draw no example)


def test_a_partial_evaluation_gives_the_wanted_groups_exactly():
    """`need`: only some groups' examples are evaluated; their numbers equal the full evaluation's."""
    task, x, y, g = make("conv")
    names = [n for n, _ in task.model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], ["train"], torch.device("cpu"), per_param=[])
    theta = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    dirs = torch.randn(1, theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    full_v, full_p, _ = ev(theta, dirs)
    need = torch.zeros(len(ev.loss_names), dtype=torch.bool)
    wanted = [ev.loss_names.index(n) for n in ("train/class=2", "train/g=5", "train/g=17")]
    need[wanted] = True
    v, p, grads = ev(theta, dirs, need=need)
    assert grads is None
    torch.testing.assert_close(v[wanted], full_v[wanted], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(p[:, wanted], full_p[:, wanted], rtol=1e-9, atol=1e-13)


def test_a_round_of_points_in_one_pass_equals_each_point_evaluated_alone():
    """LossEvaluator.round: two refinement points wanting different groups, their (point, example) pairs in one
    pass, against loading θ + sΔθ and evaluating each point's wanted groups (a partial evaluation each)."""
    task, x, y, g = make("conv")
    names = [n for n, _ in task.model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], ["train"], torch.device("cpu"), per_param=[])
    theta = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    d = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.05
    ev(theta, d[None])  # the first evaluation (the products' check)
    L = len(ev.loss_names)
    points = []
    for s, wanted in ((0.25, ("train/class=1", "train/g=3")), (0.75, ("train/class=4", "train/g=3", "train/g=9"))):
        rows = torch.zeros(L, dtype=torch.bool)
        rows[[ev.loss_names.index(n) for n in wanted]] = True
        points.append((s, rows))
    got = ev.round(theta, d, points)
    assert got is not None
    for (s, rows), (v, p, r) in zip(points, got, strict=True):
        want_v, want_p, _ = ev(theta + s * d, d[None], need=rows)
        assert torch.equal(r, rows)
        torch.testing.assert_close(v[rows], want_v[rows], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p[rows], want_p[0, rows], rtol=1e-9, atol=1e-13)


def test_the_evaluator_loads_theta_again_whenever_it_or_a_parameter_changed():
    """Loading θ is skipped only when the model holds it already: the same tensor, and neither it nor a parameter
    changed in place since. A parameter changed behind the evaluator's back, or θ changed in place, is loaded."""
    task, x, y, g = make("conv")
    names = [n for n, _ in task.model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], [], torch.device("cpu"), per_param=[])
    theta = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()]).double()
    dirs = torch.randn(1, theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v1, p1, _ = ev(theta, dirs)
    with torch.no_grad():
        ev.params[0].add_(1.0)
    v2, p2, _ = ev(theta, dirs)
    assert torch.equal(v1, v2) and torch.equal(p1, p2), "the changed parameter was loaded again"
    theta[:ev.numels[0]] += 1.0
    v3, _, _ = ev(theta, dirs)
    assert not torch.equal(v1, v3), "θ changed in place: loaded again"
    assert torch.equal(ev.params[0].detach().reshape(-1), theta[:ev.numels[0]].to(ev.params[0].dtype))


@pytest.mark.parametrize("kind", ["conv", "embedding", "lm"])
@pytest.mark.parametrize("groups", [True, False], ids=["classes-and-groups", "classes"])
def test_per_parameter_group_losses_from_one_backward_equal_autograd_on_their_own_examples(kind, groups):
    """per_param='all': every class and group loss's whole gradient comes from the data set's batches, one forward
    and one backward each (each cell's rows a segment of the batch, `engine.segments`), and equals autograd of
    that group's mean loss on its examples alone: convolution, batch-norm with running statistics, ReLU(inplace),
    an embedding with a padding row, LayerNorm, learned positions shared by the batch, tied weights. With classes
    alone each cell is its class's only cell: its gradient goes straight into the class's row, and the data set's
    is the classes' weighted sum (`_own_slots`)."""
    task, x, y, g = make(kind, groups=groups)
    names = [n for n, _ in task.model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], ["train"], torch.device("cpu"), per_param="all")
    assert ev.plans[0].segmented and len(ev.plans[0].batches) < len(ev.plans[0].cell_batches)
    assert (ev._own_slots(ev.plans[0]) is None) == groups
    theta = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    dirs = torch.randn(1, theta.numel(), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    values, proj, grads = ev(theta, dirs)
    assert ev.plans[0].segmented, "the first batch's check kept the one-backward gradients"
    params = list(task.model.parameters())
    for li, name in enumerate(ev.loss_names):
        rows = rows_of(name, y, g)
        loss = nn.functional.cross_entropy(task.model(x[rows]), y[rows])
        ref = torch.cat([r.reshape(-1) for r in torch.autograd.grad(loss, params)])
        torch.testing.assert_close(grads[ev.per_param.index(li)], ref, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(values[li], loss.detach(), rtol=1e-12, atol=1e-12, msg=name)


class Flipped(nn.Module):
    """A layer whose output rows are not its examples' (the batch reversed after it): one-backward gradients by
    segments would be other examples' (the first batch's check must catch it)."""

    def __init__(self, classes: int):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, classes)

    def forward(self, x):
        h = self.a(x).flip(0)
        return self.b(torch.tanh(h)).flip(0)


def test_per_parameter_groups_whose_rules_disagree_go_back_to_a_backward_per_cell():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n, classes = 60, 4
    x, y = torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)
    model = Flipped(classes).double()
    task = replay.Task(model, {"train": (x, y)}, batch_size=25)
    names = [n for n, _ in model.named_parameters()]
    ev = LossEvaluator(task, names, ["train"], ["train"], torch.device("cpu"), per_param="all")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with pytest.warns(UserWarning, match="one-backward gradients of .* disagree with autograd's"):
        values, _, grads = ev(theta, torch.zeros(1, theta.numel(), dtype=torch.float64))
    assert not ev.plans[0].segmented
    for li, name in enumerate(ev.loss_names):
        rows = torch.ones(n, dtype=torch.bool) if name == "train" else y == int(name.split("=")[1])
        # a batch of the cell's examples (as the backward per cell evaluates them): the flip stays inside it
        loss = sum(nn.functional.cross_entropy(model(x[rows][i:i + 25]), y[rows][i:i + 25], reduction="sum")
                   for i in range(0, int(rows.sum()), 25)) / int(rows.sum())
        ref = torch.cat([r.reshape(-1) for r in torch.autograd.grad(loss, list(model.parameters()))])
        torch.testing.assert_close(grads[ev.per_param.index(li)], ref, rtol=1e-10, atol=1e-12, msg=name)
