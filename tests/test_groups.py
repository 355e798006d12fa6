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


def make(kind: str, n: int = 120, classes: int = 7):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, (n,), generator=g)
    if kind == "conv":
        model, x = ConvNet(classes), torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
        model.bn.running_mean.uniform_(-0.5, 0.5)  # statistics of their own: the rule must use them
        model.bn.running_var.uniform_(0.5, 2.0)
    else:
        model, x = BagOfWords(classes), torch.randint(0, 30, (n, 5), generator=g)
    model = model.double()
    groups = {"g": torch.randint(0, 25, (n,), generator=g)}  # 25 groups beside the classes
    task = replay.Task(model, {"train": (x, y)}, batch_size=32, groups={"train": groups}, batchnorm="running")
    return task, x, y, groups["g"]


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
            if name == "train":
                rows = torch.ones(len(y), dtype=torch.bool)
            elif name.startswith("train/class="):
                rows = y == int(name.split("=")[1])
            else:
                rows = g == int(name.split("=")[1])
            ref, loss = reference(task.model, x, y, rows, list(dirs))
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
