"""The README's Python usage example runs as written."""

import re
from pathlib import Path

from conftest import compressed_grad

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_example_runs_and_updates_the_model():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "grassify(" in b and "opt.step()" in b)
    assert len([line for line in example.splitlines() if line.strip()]) <= 10
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    model, opt = scope["model"], scope["opt"]
    projected = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    assert projected and all(opt.state[p]["exp_avg"].shape[0] == 32 for p in projected)
    assert all(p.grad is None and compressed_grad(p) is None for p in model.parameters())


def test_readme_recompute_example_runs_in_the_training_loop():
    import torch

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    loop = next(b for b in blocks if "grassify(" in b and "opt.step()" in b)
    example = next(b for b in blocks if "recompute_norms(model)" in b)
    scope: dict = {}
    exec(compile(loop, "README.md", "exec"), scope)
    norm = scope["model"].model.norm
    before = norm.weight.detach().clone()
    scope["batches"] = torch.randint(0, 1000, (3, 4, 64))
    exec(compile(example, "README.md", "exec"), scope)
    assert "forward" in vars(norm)  # recomputed
    assert not torch.equal(norm.weight, before)  # and trained
