"""The examples of the README and of docs/ run as written (each `# example: NAME` block, in a fresh directory)."""

import re
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = {name: code for page in PAGES
            for name, code in re.findall(r"```python\n# example: (\w+)\n(.*?)```", page.read_text(), re.S)}


def test_the_docs_have_their_examples():
    assert set(EXAMPLES) >= {"huggingface", "lightning", "compile", "accelerate", "peft", "nanogpt"}


def test_every_link_of_the_readme_and_the_docs_leads_to_a_file():
    """A newcomer finds any topic from the README in one click: every relative link resolves."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, "the README stays short: topics go to docs/"
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme or page.name == "README.md", f"docs/{page.name} is not linked"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name, tmp_path, monkeypatch):
    pytest.importorskip({"huggingface": "transformers", "lightning": "lightning",
                         "accelerate": "accelerate", "peft": "peft"}.get(name, "torch"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": f"readme_{name}"}
    exec(compile(EXAMPLES[name], f"docs:{name}", "exec"), scope)  # noqa: S102 - our own docs
    frames = scope["frames"]
    steps = frames.steps.collect()
    assert len(steps) > 0 and steps["grounded"].all(), steps
    if name == "peft":  # only the adapters recorded; the export with its base loads strictly
        from safetensors.torch import load_file

        assert len(scope["run"].param_names) == 4 and all("lora_" in n for n in scope["run"].param_names)
        assert frames.example_steps.select(pl.col("grounded").mean()).collect().item() >= 0.99
        model = scope["lora_gpt2"]()
        model.load_state_dict(load_file("lora-4.safetensors"), strict=True)
        for n, v in scope["run"].state(4).items():
            assert torch.equal(dict(model.named_parameters())[n], v), n
    sys.modules.pop(f"readme_{name}", None)


QUERIES = [(page.name, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
           if 'replay.load("runs/x/lca")' in code]


def test_the_docs_have_their_queries():
    assert {name for name, _ in QUERIES} >= {"README.md", "frames.md"}


@pytest.fixture(scope="module")
def runs_x(tmp_path_factory):
    """runs/x/lca as the docs' queries name it: the digits run, train and val, per class."""
    import replay
    from replay.digits import digits, digits_mlp, train_digits

    d = tmp_path_factory.mktemp("docs")
    train_digits(digits_mlp(), str(d / "runs" / "x"), epochs=1, batch=256)
    replay.compute(d / "runs" / "x", ["train", "val"], per_class=["train"], task=digits())
    return d


@pytest.mark.parametrize("page,code", QUERIES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(QUERIES)])
def test_every_query_of_the_docs_runs(runs_x, page, code, monkeypatch):
    monkeypatch.chdir(runs_x)
    scope: dict = {"__name__": "docs_query"}
    exec(compile(code, f"{page}:query", "exec"), scope)  # noqa: S102 - our own docs
    assert isinstance(scope["f"], __import__("replay").Frames)
