"""Ctrl-C caught and training continued (a notebook): the run stays consistent, state for state.

A thread sends SIGINT to the main thread every 0.5-5 ms into a training loop that catches
KeyboardInterrupt and goes on, hundreds of interrupts per trial, so that many land inside the
Recorder's hooks. Every recorded state must be a parameter value that training's forwards
really saw (taken by the test's own hook, under its own signal handler), in order, none
twice, and at most one update per interrupt merged into the next state.
"""

import random
import signal
import threading
import time

import pytest
import torch
from conftest import bits, mlp
from torch import nn

import replay


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(bits(a[n]), bits(b[n])) for n in a)


class _Seen:
    """Every distinct parameter value a forward of `model` saw, taken with SIGINT held by the test itself."""

    def __init__(self, model: nn.Module):
        self.model, self.values = model, []
        model.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        pending = []
        old = signal.signal(signal.SIGINT, lambda *a: pending.append(a))
        try:
            now = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            if not self.values or not _same(self.values[-1], now):
                self.values.append(now)
        finally:
            signal.signal(signal.SIGINT, old)
        if pending:
            raise KeyboardInterrupt


def _interrupted_training(path, seed: int, updates: int, chunk_bytes: int):
    torch.manual_seed(seed)
    model = mlp(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen = _Seen(model)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(32)]
    rec = replay.Recorder(model, path, optimizer=opt, chunk_bytes=chunk_bytes)
    stop, main, rng = threading.Event(), threading.main_thread().ident, random.Random(seed)

    def sender() -> None:
        while not stop.wait(rng.uniform(0.0005, 0.005)):
            signal.pthread_kill(main, signal.SIGINT)

    done = interrupts = 0

    def train() -> None:
        nonlocal done, interrupts
        while done < updates:
            try:
                x, y = data[done % len(data)]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                done += 1
            except KeyboardInterrupt:
                interrupts += 1

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    try:
        while done < updates:  # an interrupt on the loop's own back-edge, outside its try, is caught here
            try:
                train()
            except KeyboardInterrupt:
                interrupts += 1
    finally:
        stop.set()
        while True:  # the last interrupts may still be on their way
            try:
                t.join()
                rec.close()
                time.sleep(0.05)  # a signal sent before the sender stopped is handled here, inside the try
                break
            except KeyboardInterrupt:
                interrupts += 1
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    return seen.values + [final], done, interrupts


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*recording slows training")
@pytest.mark.parametrize("seed", range(6))
def test_interrupts_in_hooks_leave_every_state_whole_and_in_order(tmp_path, recorder_mode, seed):
    # chunks of ~40 states: interrupts also land while chunks are closed and written
    truth, done, interrupts = _interrupted_training(tmp_path / "run", seed, updates=800, chunk_bytes=40 * 1000)
    assert interrupts > 50, f"the sender must interrupt often ({interrupts})"
    run = replay.open_run(tmp_path / "run")
    assert run.verify() == []
    states = list(run.states())
    assert [t for t, _ in states] == list(range(len(states))), "consecutive states, no gap"
    j = 0
    for t, st in states:  # each recorded state is one training really had, later than the previous one
        while j < len(truth) and not _same(st, truth[j]):
            j += 1
        assert j < len(truth), f"state {t} of {len(states)} is no parameter value training had ({interrupts} " \
                               f"interrupts): a wrong delta chain"
        j += 1
    assert _same(states[-1][1], truth[-1]), "the last state is training's final parameters"
    assert len(states) - 1 >= done - interrupts, f"{done} updates, {interrupts} interrupts, {len(states)} states"
