"""Grass with PEFT: the modules PEFT trains whole (``modules_to_save``) are Grass targets, and a
LoRA layer is refused by name (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch
from conftest import grass_sft_trainer, tiny_llama
from peft import LoraConfig, get_peft_model
from test_boundaries import MLP, TINY, lm_data, lora_llama, make_args
from torch import nn

from hf_grass import GrassLinear, grassify, match_target_modules
from hf_grass.errors import UsageError
from hf_grass.report import unwrap_optimizer
from hf_grass.trainer import GrassTrainer

LORA_REFUSAL = (
    r"'base_model\.model\.model\.layers\.0\.self_attn\.q_proj', a LoRA layer "
    r"\(peft\.tuners\.lora\.layer\.Linear\): its base weight is frozen and Grass trains full "
    r"weights: leave it out of target_modules, or train modules fully with PEFT's modules_to_save"
)


def saved_mlp_llama():
    """The tiny LLaMA with LoRA on q_proj/v_proj and its MLP trained whole (``modules_to_save``):
    PEFT wraps each MLP linear layer, freezes the original and trains a copy."""
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=MLP)
    return get_peft_model(tiny_llama("lm", **TINY), config)


def wrappers(model: nn.Module) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if n.split(".")[-1] in MLP]


@pytest.mark.parametrize(
    "targets", [MLP, "all-linear", r".*mlp\.\w+_proj.*"], ids=["names", "all", "re"]
)
def test_targets_see_through_modules_to_save_to_the_trainable_copy(targets):
    model = saved_mlp_llama()
    names = match_target_modules(model, targets)
    copies = [n for n in names if ".modules_to_save.default" in n]
    assert len(copies) == 6 and all(n.endswith(".modules_to_save.default") for n in copies)
    assert not any("original_module" in n for n in names)
    if targets != "all-linear":  # which also has the attention layers
        assert names == copies


def test_grass_trains_the_modules_peft_saves(tmp_path):
    model = saved_mlp_llama()
    copies = [w.modules_to_save["default"] for w in wrappers(model)]
    originals = [w.original_module for w in wrappers(model)]
    before = {m: m.weight.detach().clone() for m in copies + originals}
    lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = make_args(tmp_path, grass_target_modules=MLP, max_steps=3)
    trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    state = unwrap_optimizer(trainer.optimizer).state
    for module in copies:
        assert type(module) is GrassLinear
        assert state[module.weight]["rows"].numel() == 8
        assert not torch.equal(module.weight, before[module])
    for module in originals:  # frozen, left as they were
        assert type(module) is nn.Linear and not module.weight.requires_grad
        assert torch.equal(module.weight, before[module])
    assert all(not torch.equal(p, lora_b[n]) for n, p in model.named_parameters() if n in lora_b)


def test_modules_to_save_with_grass_saves_and_resumes_exactly(tmp_path):
    def run(name: str, model: nn.Module, **train) -> GrassTrainer:
        args = make_args(
            tmp_path / name, grass_target_modules=MLP, grass_selection="multinomial",
            max_steps=4, save_strategy="steps", save_steps=2,
        )  # fmt: skip
        trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
        trainer.train(**train)
        return trainer

    full = run("full", saved_mlp_llama())
    checkpoint = tmp_path / "full" / "out" / "checkpoint-2"
    fresh = saved_mlp_llama()  # the same frozen base; its trained weights must come from disk
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.normal_()
    resumed = run("resumed", fresh, resume_from_checkpoint=str(checkpoint))
    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    states = [unwrap_optimizer(t.optimizer).state for t in (full, resumed)]
    for a, b in zip(wrappers(full.model), wrappers(resumed.model), strict=True):
        weights = a.modules_to_save["default"].weight, b.modules_to_save["default"].weight
        assert torch.equal(states[0][weights[0]]["rows"], states[1][weights[1]]["rows"])


def test_targeting_a_lora_layer_is_refused_naming_lora(tmp_path):
    with pytest.raises(ValueError, match=LORA_REFUSAL):
        grassify(lora_llama(), rank=8, target_modules=["q_proj"])
    args = make_args(tmp_path, grass_target_modules=["q_proj", "gate_proj"])
    with pytest.raises(UsageError, match=LORA_REFUSAL) as err:
        GrassTrainer(model=lora_llama(), args=args, train_dataset=lm_data())
    assert "\n" not in str(err.value)


def test_trl_sft_trainer_with_modules_to_save_trains_them_with_grass(tmp_path):
    pytest.importorskip("trl")
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=MLP)
    trainer = grass_sft_trainer(tmp_path / "out", lora, grass_target_modules=MLP, max_steps=2)
    before = {
        w: w.modules_to_save["default"].weight.detach().clone() for w in wrappers(trainer.model)
    }
    trainer.train()
    state = unwrap_optimizer(trainer.optimizer).state
    assert len(before) == 6
    for wrapper, old in before.items():
        copy = wrapper.modules_to_save["default"]
        assert type(copy) is GrassLinear and state[copy.weight]["rows"].numel() == 4
        assert not torch.equal(copy.weight, old)
