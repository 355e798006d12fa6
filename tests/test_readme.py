"""The README's examples run as written (each `# example: NAME` block, in a fresh directory)."""

import re
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

README = (Path(__file__).parent.parent / "README.md").read_text()
EXAMPLES = dict(re.findall(r"```python\n# example: (\w+)\n(.*?)```", README, re.S))


def test_the_readme_has_its_examples():
    assert set(EXAMPLES) >= {"huggingface", "lightning", "compile", "accelerate"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name, tmp_path, monkeypatch):
    pytest.importorskip({"huggingface": "transformers", "lightning": "lightning",
                         "accelerate": "accelerate", "peft": "peft"}.get(name, "torch"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": f"readme_{name}"}
    exec(compile(EXAMPLES[name], f"README.md:{name}", "exec"), scope)  # noqa: S102 - our own README
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
