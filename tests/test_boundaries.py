"""Grass is never silently off: a run that projects nothing stops, and a run that projects says
what, where the Trainer's own messages go (CPU, seconds)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import grass_sft_trainer, tiny_llama
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers.utils import logging as hf_logging

from hf_grass import GrassLinear, grassify
from hf_grass.errors import UsageError
from hf_grass.report import REPORT_NAME, ResourceReportCallback
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

SEQ = 12
# vocab 256, so that token ids 1..255 fit; pad 0.
TINY = dict(vocab_size=256, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
MLP = ["gate_proj", "up_proj", "down_proj"]
NOTHING_PROJECTED = "would project nothing and train as plain AdamW: all {} target weights"


def lm_data(n: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (n, SEQ), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
         "labels": ids.tolist()}
    )  # fmt: skip


def make_args(tmp_path, **kw) -> GrassTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"), optim="grass", grass_rank=8, grass_update_proj_gap=2,
        learning_rate=1e-2, per_device_train_batch_size=8, max_steps=2, save_strategy="no",
        report_to="none", disable_tqdm=True, use_cpu=True, seed=7,
    )  # fmt: skip
    defaults.update(kw)
    return GrassTrainingArguments(**defaults)


def lora_llama():
    """The tiny LLaMA with LoRA on q_proj/v_proj: PEFT freezes every base weight."""
    return get_peft_model(
        tiny_llama("lm", **TINY), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )


@pytest.fixture
def trainer_log():
    """The messages of the ``transformers`` logger (where the Trainer's own go), at its default
    verbosity: a record that arrives here is one a default run prints."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = hf_logging.get_logger("transformers")
    handler, verbosity = Keep(), hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # transformers' default; a Trainer's log_level "passive"
    root.addHandler(handler)
    yield records
    root.removeHandler(handler)
    hf_logging.set_verbosity(verbosity)


def grass_lines(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("Grass:")]


# ---- nothing projected: stop with one line ------------------------------------------------------


@pytest.mark.parametrize("targets, count", [(None, 14), (MLP, 6)], ids=["all-linear", "frozen-mlp"])
def test_grass_trainer_on_a_lora_model_with_frozen_targets_stops(tmp_path, targets, count):
    model = lora_llama()
    args = make_args(tmp_path, grass_target_modules=targets)
    with pytest.raises(UsageError, match=NOTHING_PROJECTED.format(count)) as err:
        GrassTrainer(model=model, args=args, train_dataset=lm_data())
    message = str(err.value)
    assert "\n" not in message
    for fix in ("modules_to_save", "grass_target_modules", "drop LoRA", "adamw_torch"):
        assert fix in message
    assert not any(isinstance(m, GrassLinear) for m in model.modules())


def test_trl_sft_trainer_with_peft_config_stops(tmp_path):
    pytest.importorskip("trl")
    with pytest.raises(UsageError, match=NOTHING_PROJECTED.format(14)):
        grass_sft_trainer(tmp_path / "out", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_grassify_refuses_targets_that_are_all_frozen():
    model = tiny_llama("lm", **TINY)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # something trains, but no target does
    with pytest.raises(ValueError, match=r"grassify would project nothing: all 14 target") as e:
        grassify(model, rank=8)
    assert "'model.layers.0.self_attn.q_proj'" in str(e.value)
    assert not any(isinstance(m, GrassLinear) for m in model.modules())
    # Some targets frozen among trainable ones is a choice: it goes through.
    model.model.layers[1].requires_grad_(True)
    groups = grassify(model, rank=8)
    assert sum(len(g["params"]) for g in groups if "rank" in g) == 7


def test_lora_on_attention_and_grass_on_the_unfrozen_mlp_trains_both(tmp_path, trainer_log):
    model = lora_llama()
    mlp = [m for n, m in model.named_modules() if n.split(".")[-1] in MLP]
    for module in mlp:
        module.requires_grad_(True)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    before = [m.weight.detach().clone() for m in mlp]
    args = make_args(tmp_path, grass_target_modules=MLP, max_steps=3)
    trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    for module, old in zip(mlp, before, strict=True):
        assert isinstance(module, GrassLinear)
        assert optimizer.state[module.weight]["rows"].numel() == 8
        assert not torch.equal(module.weight, old)
    for name, p in model.named_parameters():
        if name in lora and name.split(".")[-3] == "lora_B":  # B starts at zero, then moves
            assert not torch.equal(p, lora[name]), name
    # Projected: 6 MLP matrices of 8192 elements. Dense: 8 LoRA matrices, per layer q's A 4x64
    # and B 64x4, v's A 4x64 and B 32x4 (v has 2 KV heads of 16): 1792 elements.
    projected, lora_elements = 6 * 8192, 2 * (256 + 256 + 256 + 128)
    assert projected / (projected + lora_elements) == pytest.approx(0.9648, abs=1e-4)
    # fp32 moments: 8 x 64 per MLP matrix (rank x smaller side) -> 24 KiB, LoRA 14 KiB; AdamW
    # 2 x 4 x 50944 bytes = 398 KiB.
    assert grass_lines(trainer_log) == [
        "Grass: 6 of 14 weight matrices projected at rank 8 (96.5% of trainable parameters); "
        "Adam moments 38.0 KiB vs 398.0 KiB for AdamW (9.5%); dense: 8 LoRA adapter weights."
    ]


# ---- the coverage line and the report ------------------------------------------------------------


def test_coverage_line_reaches_the_trainer_log_with_exact_counts(tmp_path, trainer_log):
    # Hand count of the tiny LLaMA (hidden 64, 2 layers, MLP 128, 2 KV heads of 16, vocab 256):
    # per layer q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128 = 36864
    # elements; embed_tokens and lm_head 256x64 = 16384 each; 5 norms of 64.
    projected = 2 * 36864
    trainable = projected + 2 * 16384 + 5 * 64
    # Adam moments, fp32: rank 8 times the unselected (smaller) side, per projected matrix:
    # 8 * (64 + 32 + 32 + 64 + 64 + 64 + 64) per layer; dense parameters 2 per element.
    grass_moments = 2 * 4 * (2 * 8 * 384 + 2 * 16384 + 5 * 64)
    adamw_moments = 2 * 4 * trainable
    assert (grass_moments, adamw_moments) == (313856, 854528)  # 306.5 and 834.5 KiB
    cb = ResourceReportCallback()
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=make_args(tmp_path), train_dataset=lm_data(),
        callbacks=[cb],
    )  # fmt: skip
    trainer.train()
    expected = (
        "Grass: 14 of 16 weight matrices projected at rank 8 (69.0% of trainable parameters); "
        "Adam moments 306.5 KiB vs 834.5 KiB for AdamW (36.7%); dense: embed_tokens (embedding), "
        "lm_head (head), 5 norms."
    )
    assert grass_lines(trainer_log) == [expected]
    assert f"{100 * projected / trainable:.1f}%" == "69.0%"
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["projected_param_fraction"] == projected / trainable


def test_coverage_line_only_on_the_main_process(tmp_path, trainer_log, monkeypatch):
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=make_args(tmp_path), train_dataset=lm_data()
    )
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: False)
    trainer.create_optimizer()
    assert grass_lines(trainer_log) == []
    monkeypatch.setattr(trainer, "is_world_process_zero", lambda: True)
    trainer.optimizer = None
    trainer.create_optimizer()
    assert len(grass_lines(trainer_log)) == 1


def test_report_projects_nothing_for_adamw(tmp_path):
    cb = ResourceReportCallback()
    args = make_args(tmp_path, optim="adamw_torch", max_steps=1)
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=args, train_dataset=lm_data(), callbacks=[cb]
    )
    trainer.train()
    assert cb.report["projected_param_fraction"] == 0.0


# ---- the logged grad_norm ------------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e6], ids=["unclipped", "clip-hook"])
def test_logged_grad_norm_is_the_norm_of_plain_and_compressed_gradients(tmp_path, max_grad_norm):
    """The Trainer logs sqrt(sum |plain .grad|^2 + sum |rho * G[rows]|^2), the quantity
    --max_grad_norm clips; with top_r rows it is below the full gradient's norm AdamW logs."""
    import math

    from conftest import compressed_grad
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.norms: list[float] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [g for p in model.parameters() for g in (p.grad, compressed_grad(p))]
            squares = sum(g.double().square().sum().item() for g in grads if g is not None)
            self.norms.append(math.sqrt(squares))

    def logged(trainer) -> list[float]:
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]

    probe = Probe()
    args = make_args(tmp_path, max_steps=3, logging_steps=1, max_grad_norm=max_grad_norm)
    trainer = GrassTrainer(
        model=tiny_llama("lm", **TINY), args=args, train_dataset=lm_data(), callbacks=[probe]
    )
    trainer.train()
    assert len(probe.norms) == 3
    assert logged(trainer) == pytest.approx(probe.norms, rel=1e-5)
    adamw_args = make_args(tmp_path / "adamw", optim="adamw_torch", max_steps=1, logging_steps=1)
    adamw = GrassTrainer(model=tiny_llama("lm", **TINY), args=adamw_args, train_dataset=lm_data())
    adamw.train()
    assert logged(trainer)[0] < logged(adamw)[0]  # the same first batch and weights
