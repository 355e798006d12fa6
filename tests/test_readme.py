"""The README's examples run as written (each `# example: NAME` block, in a fresh directory)."""

import re
import sys
from pathlib import Path

import pytest

README = (Path(__file__).parent.parent / "README.md").read_text()
EXAMPLES = dict(re.findall(r"```python\n# example: (\w+)\n(.*?)```", README, re.S))


def test_the_readme_has_its_examples():
    assert set(EXAMPLES) >= {"huggingface", "lightning", "compile", "accelerate"}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_readme_example_runs(name, tmp_path, monkeypatch):
    pytest.importorskip({"huggingface": "transformers", "lightning": "lightning",
                         "accelerate": "accelerate"}.get(name, "torch"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": f"readme_{name}"}
    exec(compile(EXAMPLES[name], f"README.md:{name}", "exec"), scope)  # noqa: S102 - our own README
    frames = scope["frames"]
    steps = frames.steps.collect()
    assert len(steps) > 0 and steps["grounded"].all(), steps
    sys.modules.pop(f"readme_{name}", None)
