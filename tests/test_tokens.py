"""Per-token LCA of a causal LM: each token's own loss change along every step, Σ over tensors; checked against
the token losses evaluated directly and against the per-example (per-sequence) LCA they average to."""

import polars as pl
import pytest
import torch

import replay
from replay.losses import causal_lm, causal_lm_tokens

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=40, n_positions=16,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


def data(n, seed):
    ids = torch.randint(0, 40, (n, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # a padded sequence: its last tokens count for nothing
    labels = ids.clone()
    labels[1, :4] = -100  # ignored labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "run"
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = data(32, 1)
    with replay.Recorder(model, path, optimizer=opt):
        for i in range(0, 32, 8):
            opt.zero_grad()
            batch = {k: v[i:i + 8] for k, v in train.items()}
            causal_lm(model(**batch), batch).mean().backward()
            opt.step()
    return path


def token_losses(state, val):
    model = gpt2()
    model.load_state_dict(state, strict=False)
    model.eval()
    with torch.no_grad():
        tok, keep = causal_lm_tokens(model(**val), val)
    return tok.double(), keep


def test_per_token_totals_are_each_tokens_own_loss_change(lm_run, tmp_path):
    val = data(6, 2)
    task = replay.Task(gpt2(), {"val": val}, loss_fn=causal_lm, batchnorm="running")
    fr = replay.compute(lm_run, ["val"], task=task, per_token=["val"], per_example=["val"], out=tmp_path / "lca",
                        tol=1e-6)
    tok = fr.tokens.collect()
    assert tok.columns[:5] == ["step", "loss", "example", "position", "lca"]
    run = replay.open_run(lm_run)
    losses = {t: token_losses(st, val) for t, st in run.states()}  # each token's loss, evaluated directly
    keep = losses[run.steps[0]][1]
    assert len(tok.filter(pl.col("step") == 0)) == int(keep.sum()), "one row per token that counts"
    ex, pos = torch.nonzero(keep, as_tuple=True)
    want = pl.concat([pl.DataFrame({"step": a, "example": ex.numpy(), "position": (pos + 1).numpy(),
                                    "change": (losses[b][0] - losses[a][0])[keep].numpy()})
                      for a, b in zip(run.steps, run.steps[1:], strict=False)])
    j = tok.join(want, on=["step", "example", "position"])
    assert len(j) == len(tok) == len(want)
    # per step and token: the loss change the compute reports (lca + residual) is the one evaluated here (up to
    # float32 evaluation), and the LCA itself is that change within its grounding tolerance
    err = (j["lca"] + j["residual"] - j["change"]).abs().max()
    assert err < 1e-5, f"the reported loss change of a token is not its own (max_diff {err:.2e})"
    off = j.filter(pl.col("grounded")).select((pl.col("lca") - pl.col("change")).abs().max()).item()
    assert off < 1e-5, f"a grounded token's LCA is not its loss change (max_diff {off:.2e})"
    assert tok["grounded"].mean() > 0.99
    # the tokens of a sequence average to its per-example LCA (causal_lm is the mean over its tokens)
    per_seq = (tok.group_by("step", "example").agg(pl.col("lca").mean()).sort("step", "example"))
    es = fr.example_steps.sort("step", "example").collect()
    assert (per_seq["lca"] - es["lca"]).abs().max() < 1e-5


def test_selected_tokens_per_tensor_against_autograd(lm_run, tmp_path):
    """token_tensors: each selected token's LCA per tensor, against a 64-panel Simpson of its own backward
    gradient (autograd, not forward mode), and Σ over tensors against its loss change."""
    val = data(6, 2)
    pick = [(0, 3), (2, 11), (5, 1)]
    task = replay.Task(gpt2(), {"val": val}, loss_fn=causal_lm, batchnorm="running")
    fr = replay.compute(lm_run, ["val"], task=task, token_tensors={"val": pick}, out=tmp_path / "lca", tol=1e-7)
    tt = fr.token_tensors.collect()
    run = replay.open_run(lm_run)
    names = run.param_names
    assert sorted(set(zip(tt["example"], tt["position"], strict=True))) == pick
    assert tt["tensor"].n_unique() == len(names)
    t0, t1 = run.steps[0], run.steps[1]
    a, b = run.state(t0), run.state(t1)
    model = gpt2()
    model.eval()
    params = dict(model.named_parameters())

    def grads(s, ex, pos):
        with torch.no_grad():
            for n in names:
                params[n].copy_(a[n] + s * (b[n] - a[n]))
        model.zero_grad()
        tok, _ = causal_lm_tokens(model(**{k: v[ex:ex + 1] for k, v in val.items()}),
                                  {k: v[ex:ex + 1] for k, v in val.items()})
        tok[0, pos - 1].backward()
        return {n: (params[n].grad.double() * (b[n] - a[n]).double()).sum().item() for n in names}

    n = 64
    for ex, pos in pick:
        g = [grads(i / n, ex, pos) for i in range(n + 1)]
        w = [1 if i in (0, n) else (4 if i % 2 else 2) for i in range(n + 1)]
        want = {k: sum(wi * gi[k] for wi, gi in zip(w, g, strict=True)) / (3 * n) for k in names}
        got = tt.filter((pl.col("step") == t0) & (pl.col("example") == ex) & (pl.col("position") == pos))
        got = dict(zip(got["tensor"], got["lca"], strict=True))
        for k in names:
            assert abs(got[k] - want[k]) <= 1e-6 + 1e-4 * abs(want[k]), (ex, pos, k, got[k], want[k])
        first, last = token_losses(a, val)[0][ex, pos - 1], token_losses(b, val)[0][ex, pos - 1]
        assert abs(sum(got.values()) - (last - first).item()) < 1e-6


def test_a_token_that_is_not_a_target_is_one_line(lm_run, tmp_path):
    from replay.errors import TaskError

    val = data(6, 2)
    task = replay.Task(gpt2(), {"val": val}, loss_fn=causal_lm, batchnorm="running")
    with pytest.raises(TaskError, match=r"token \(0, 0\) .*is not a target token"):
        replay.compute(lm_run, ["val"], task=task, token_tensors={"val": [(0, 0)]}, out=tmp_path / "lca")
