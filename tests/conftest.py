import os
import tempfile

import pytest
import torch
from torch import nn

import replay

# One torch thread, here and in every process the tests start: on a 2-core machine with another busy job,
# OpenMP's spin-waits at 2 threads slow torch 10-30x, and the suite must not need an idle machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The Recorder signs runs with the user's key (replay.trust): the tests' own key, never the user's.
os.environ["REPLAY_TRUST_DIR"] = tempfile.mkdtemp(prefix="replay-trust-")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (which installs every extra) a test skipped for a missing package is a failure: a README example
    or an integration that CI silently skips is untested."""
    outcome = yield
    rep = outcome.get_result()
    if os.environ.get("CI") and rep.skipped and "could not import" in str(rep.longrepr):
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI, where every extra is installed: {rep.longrepr}"


@pytest.fixture(params=["inline", "threaded"])
def recorder_mode(request, monkeypatch):
    """Both ways the CPU recorder encodes: on the training thread (small states), or copied and
    encoded by a background thread (states of DEFER_BYTES and more): forced here by a threshold of 0."""
    import replay.recording.snapshot

    if request.param == "threaded":
        monkeypatch.setattr(replay.recording.snapshot, "DEFER_BYTES", 0)
    return request.param


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits: equality of these is bit-exactness."""
    return t.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.itemsize])


def assert_bit_equal(a: dict, b: dict, where: str = "") -> None:
    assert list(a) == list(b), f"{where}: names {list(a)} != {list(b)}"
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, f"{where} {n}"
        diff = (bits(a[n]) != bits(b[n])).sum().item()
        assert diff == 0, f"{where} {n}: {diff} elements differ in their bits"


def params_of(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def mlp(dtype=torch.float32, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def train_recording(model, opt, rec_kwargs, path, steps=20, seed=1):
    """Train on random data with a Recorder; return the reference state of every step."""
    import replay

    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    ref = {0: params_of(model)}
    with replay.Recorder(model, path, optimizer=opt, **rec_kwargs):
        for i in range(steps):
            x = torch.randn(32, 8, generator=g).to(dtype)
            y = torch.randint(0, 3, (32,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x).float(), y).backward()
            opt.step()
            ref[i + 1] = params_of(model)
    return ref


def tiny_run(path, steps=3, seed=0, **rec_kwargs):
    """A 2-tensor model, every state in one chunk: small enough to flip every header bit."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = {0: params_of(model)}
    with replay.Recorder(model, path, optimizer=opt, **rec_kwargs):
        for i in range(steps):
            opt.zero_grad()
            model(torch.randn(4, 3)).square().mean().backward()
            opt.step()
            ref[i + 1] = params_of(model)
    return ref
