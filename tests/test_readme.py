"""The README's Python examples run as written."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import compressed_grad, tiny_llama, word_tokenizer

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


# ---- the Trainer recipes: each README block runs as written, on a tiny model ------------------


def _example(*markers: str) -> str:
    """The README's one python block that contains every marker."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if all(m in b for m in markers)]
    return block


def _run(example: str, tmp_path, monkeypatch, **names) -> dict:
    """Run a README block in a module of its own (the Trainer pickles the arguments class a
    block defines) inside ``tmp_path``, with ``names`` (the model, the data) predefined."""
    module = types.ModuleType("readme_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.chdir(tmp_path)
    module.__dict__.update(names)
    exec(compile(example, "README.md", "exec"), module.__dict__)
    return module.__dict__


def test_readme_mixin_arguments_parse_trainer_flags(tmp_path, monkeypatch):
    from transformers import Seq2SeqTrainingArguments

    argv = ["train.py", "--output_dir", str(tmp_path), "--optim", "grass", "--grass_rank", "64"]
    monkeypatch.setattr(sys, "argv", argv)
    scope = _run(_example("GrassTrainerMixin, Seq2SeqTrainer"), tmp_path, monkeypatch)
    args = scope["args"]
    assert isinstance(args, Seq2SeqTrainingArguments)
    assert (args.output_dir, args.optim, args.grass_rank) == (str(tmp_path), "grass", 64)


def test_readme_peft_recipe_trains_and_saves_the_grass_mlp(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from test_boundaries import TINY, lm_data

    from hf_grass import GrassLinear
    from hf_grass.report import unwrap_optimizer

    scope = _run(
        _example("modules_to_save=mlp"), tmp_path, monkeypatch,
        model=tiny_llama("lm", **TINY), train=lm_data(),
    )  # fmt: skip
    model, state = scope["model"], unwrap_optimizer(scope["trainer"].optimizer).state
    copies = {n: m for n, m in model.named_modules() if n.endswith("modules_to_save.default")}
    assert len(copies) == 6 and all(type(m) is GrassLinear for m in copies.values())
    assert all(state[m.weight]["rows"].numel() == 64 for m in copies.values())
    saved = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    for name, module in copies.items():
        key = name.replace(".modules_to_save.default", ".weight")
        assert torch.equal(saved[key], module.weight), key
    assert sum("lora_B" in k for k in saved) == 4


def test_readme_trl_sft_recipe_trains_with_grass(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset

    from hf_grass import GrassLinear
    from hf_grass.report import unwrap_optimizer

    words = "<pad> <unk> <s> </s> the cat sat on a mat dog ran".split()
    text = ["the cat sat on a mat", "a dog ran", "the dog sat", "a cat ran on the mat"] * 4
    model = tiny_llama("lm", vocab_size=len(words), pad_token_id=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scope = _run(
        _example("GrassSFTTrainer("), tmp_path, monkeypatch, model=model,
        dataset=Dataset.from_dict({"text": text}), tokenizer=word_tokenizer(words),
    )  # fmt: skip
    trainer = scope["trainer"]
    assert trainer.state.global_step == 2  # 16 rows, batches of 8, one epoch
    state = unwrap_optimizer(trainer.optimizer).state
    projected = [m for m in model.modules() if type(m) is GrassLinear]
    assert len(projected) == 14 and all(state[m.weight]["rows"].numel() == 64 for m in projected)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_readme_glue_offline_recipe_runs_without_the_hub(tmp_path, monkeypatch, capsys):
    import numpy as np
    from transformers import EvalPrediction

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = _example("GLUE_OFFLINE_PATH", "def compute_metrics(")
    scope = _run(example, tmp_path, monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    shown = [line[2:] for line in example.splitlines() if line.startswith("# {")]
    assert printed == shown  # the README shows what it prints
    metric, same = scope["metric"], scope["same"]
    assert "glue_offline" in type(metric).__module__  # the local module, not the Hub's
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 5.0], [4.0, 0.0]])  # predicts 0, 1, 1, 0
    labels = np.array([0, 1, 0, 1])
    result = scope["compute_metrics"](EvalPrediction(predictions=logits, label_ids=labels))
    assert result == {"accuracy": 0.5, "f1": 0.5}
    assert same.compute(predictions=[0, 1, 1, 0], references=labels) == result
