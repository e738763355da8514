"""GrassTrainer / GrassTrainingArguments on a tiny random LLaMA (CPU, seconds)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types

import pytest
import torch
from conftest import compressed_grad, tiny_llama
from datasets import Dataset
from transformers import (
    HfArgumentParser,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    TrainerCallback,
)
from transformers.training_args import OptimizerNames

from hf_grass.optim import GrassAdamW
from hf_grass.projection import projection_of
from hf_grass.report import REPORT_NAME, ResourceReportCallback, gradient_bytes
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

SEQ = 12


# Token ids 1..255 (vocab 256); pad_token_id so the classifier accepts batches of several rows.
TINY = dict(vocab_size=256, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def tiny_classifier(seed: int = 0) -> LlamaForSequenceClassification:
    return tiny_llama("classifier", seed=seed, num_labels=2, **TINY)


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama("lm", seed=seed, **TINY)


def classification_data(n: int = 64, seed: int = 0) -> Dataset:
    """Label = which half of the vocabulary the first token is in: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 256, (n, SEQ), generator=g)
    labels = (ids[:, 0] >= 128).long()
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": labels.tolist(),
        }
    )


def lm_data(n: int = 32, seed: int = 0) -> Dataset:
    """Arithmetic progressions mod the vocabulary: the next token is predictable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(1, 256, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(SEQ)) % 255 + 1
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": torch.ones_like(ids).tolist(),
            "labels": ids.tolist(),
        }
    )


def make_args(tmp_path, **kw) -> GrassTrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=3,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
        lr_scheduler_type="linear",
        warmup_steps=0.1,
    )
    defaults.update(kw)
    return GrassTrainingArguments(**defaults)


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


RNG_BYTES = len(torch.Generator().get_state().numpy().tobytes())  # a CPU generator's state


def check_grass_state(optimizer, model, rank: int, steps: int) -> None:
    """``optimizer`` holds Grass state of rank ``rank`` for every decoder linear (``*_proj``) of
    ``model`` after ``steps`` steps: moments r x min(m, n), r rows of the larger dimension with
    their scales and counts, an RNG state; AdamW state of the parameter's shape elsewhere."""
    projected = 0
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        assert state["step"].item() == steps, name
        if name.endswith("_proj.weight"):
            projected += 1
            assert state["exp_avg"].shape == state["exp_avg_sq"].shape == (rank, min(p.shape))
            assert state["rows"].shape == state["rho"].shape == state["row_step"].shape == (rank,)
            rows = state["rows"]
            assert rows.dtype == torch.int64 and 0 <= rows.min() <= rows.max() < max(p.shape)
            assert isinstance(state["rng"], bytes) and len(state["rng"]) == RNG_BYTES
        else:
            assert "rows" not in state and state["exp_avg"].shape == p.shape, name
    layers = model.config.num_hidden_layers
    assert projected == 7 * layers  # q, k, v, o, gate, up, down


def grass_state_bytes(model, rank: int) -> int:
    """GrassAdamW's state for ``model`` (float32) by hand: per projected (m x n) weight two
    r x min(m, n) moments, per-row counts (float32), rows (int64), scales (float32), step and
    selected_step scalars and the RNG state; per other parameter AdamW's moments and step."""
    total = 0
    for name, p in model.named_parameters():
        if name.endswith("_proj.weight"):
            total += 2 * rank * min(p.shape) * 4 + rank * (4 + 8 + 4) + 2 * 4 + RNG_BYTES
        else:
            total += 2 * p.numel() * 4 + 4
    return total


# ---- arguments ---------------------------------------------------------------------------------


def test_optim_grass_accepted_and_stock_names_kept(tmp_path):
    args = make_args(tmp_path)
    assert args.optim == "grass" and args.use_grass
    stock = make_args(tmp_path, optim="adamw_torch")
    assert stock.optim == OptimizerNames.ADAMW_TORCH and not stock.use_grass
    assert make_args(tmp_path, optim="galore_adamw").optim == OptimizerNames.GALORE_ADAMW
    with pytest.raises(ValueError, match="not_an_optimizer"):
        make_args(tmp_path, optim="not_an_optimizer")
    assert stock.set_optimizer("grass", learning_rate=3e-4).optim == "grass"
    assert json.loads(args.to_json_string())["optim"] == "grass"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("grass_selection", "best_rows", "top_r"),
        ("grass_reselect_state", "forget", "keep"),
        ("grass_proj_side", "diagonal", "auto"),
        ("grass_state_dtype", "int8", "bfloat16"),
        ("grass_rank", 0, ">= 1"),
        ("grass_update_proj_gap", 0, ">= 1"),
    ],
)
def test_bad_grass_argument_names_value_and_choices(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as err:
        make_args(tmp_path, **{field: value})
    assert repr(value) in str(err.value) and allowed in str(err.value)


def test_target_modules_forms(tmp_path):
    assert make_args(tmp_path).grass_targets() == "all-linear"
    assert make_args(tmp_path, grass_target_modules=["all-linear"]).grass_targets() == "all-linear"
    assert make_args(tmp_path, grass_target_modules="q_proj,v_proj").grass_targets() == [
        "q_proj",
        "v_proj",
    ]
    assert make_args(tmp_path, grass_target_modules=[".*mlp.*"]).grass_targets() == ".*mlp.*"
    # optim_target_modules (GaLore's field) is the fallback when grass_target_modules is unset.
    assert make_args(tmp_path, optim_target_modules=["q_proj"]).grass_targets() == ["q_proj"]


def test_hf_argparser_reads_grass_flags_from_cli_json_yaml(tmp_path):
    parser = HfArgumentParser(GrassTrainingArguments)
    expected = dict(
        optim="grass",
        grass_rank=16,
        grass_update_proj_gap=50,
        grass_scale=0.5,
        grass_selection="multinomial",
        grass_reselect_state="reset",
        grass_proj_side="rows",
        grass_target_modules=["q_proj", "v_proj"],
        grass_layerwise=False,
        grass_compressed_backward=False,
        grass_stochastic_rounding=True,
        grass_state_dtype="float32",
        grass_seed=3,
    )
    cli = [
        "--output_dir", str(tmp_path), "--optim", "grass", "--grass_rank", "16",
        "--grass_update_proj_gap", "50", "--grass_scale", "0.5", "--grass_selection", "multinomial",
        "--grass_reselect_state", "reset", "--grass_proj_side", "rows",
        "--grass_target_modules", "q_proj", "v_proj", "--no_grass_compressed_backward",
        "--grass_stochastic_rounding", "--grass_state_dtype", "float32", "--grass_seed", "3",
    ]  # fmt: skip
    (from_cli,) = parser.parse_args_into_dataclasses(cli)
    data = {"output_dir": str(tmp_path), **expected}
    (tmp_path / "a.json").write_text(json.dumps(data))
    (from_json,) = parser.parse_json_file(str(tmp_path / "a.json"))
    import yaml

    (tmp_path / "a.yaml").write_text(yaml.safe_dump(data))
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "a.yaml"))
    for args in (from_cli, from_json, from_yaml):
        got = {k: getattr(args, k) for k in expected}
        assert got == expected
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--grass_selection", "best"]
        )


@pytest.mark.parametrize("rule, expected", [("adam", "GrassAdamW"), ("lion", "GrassOptimizer")])
def test_the_optimizer_handler_builds_what_the_trainer_builds(tmp_path, rule, expected):
    import copy

    from hf_grass import grass_optimizer_cls_and_kwargs

    args = make_args(tmp_path, weight_decay=0.1, grass_update_rule=rule)
    model = tiny_lm()
    trainer = GrassTrainer(model=model, args=args)
    other = copy.deepcopy(model)
    decay = trainer.get_decay_parameter_names(other)
    cls, kwargs = grass_optimizer_cls_and_kwargs(args, other, decay)
    built = trainer.create_optimizer()
    assert cls.__name__ == expected and type(built) is cls
    assert kwargs["lr"] == args.learning_rate and kwargs["update_rule"] == rule
    names = {id(p): n for m in (model, other) for n, p in m.named_parameters()}

    def summary(groups):
        return [(sorted(names[id(p)] for p in g["params"]), g.get("rank"), g["weight_decay"])
                for g in groups]  # fmt: skip

    assert summary(cls(**kwargs).param_groups) == summary(built.param_groups)
    # HF's weight-decay grouping: decay exactly on the names the Trainer gives
    for group in built.param_groups:
        for p in group["params"]:
            assert group["weight_decay"] == (0.1 if names[id(p)] in decay else 0.0)
    projected = {names[id(p)] for g in built.param_groups if "rank" in g for p in g["params"]}
    assert projected and all(n.endswith("_proj.weight") for n in projected)
    # install=True made the Grass layers of the model it was given, as the Trainer did
    assert type(other.model.layers[0].self_attn.q_proj).__name__ == "GrassLinear"


def test_mixin_gives_other_trainers_grass(tmp_path):
    """GrassArguments + GrassTrainerMixin on Seq2SeqTrainingArguments / Seq2SeqTrainer."""
    from dataclasses import dataclass

    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from hf_grass.optim import GrassAdamW
    from hf_grass.trainer import GrassArguments, GrassTrainerMixin

    @dataclass
    class Args(GrassArguments, Seq2SeqTrainingArguments):
        pass

    class Trainer(GrassTrainerMixin, Seq2SeqTrainer):
        pass

    cli = ["--output_dir", str(tmp_path), "--optim", "grass", "--grass_rank", "8"]
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(
        [*cli, "--predict_with_generate", "--max_steps", "1", "--use_cpu", "--save_strategy", "no"]
    )
    assert args.optim == "grass" and args.predict_with_generate
    model = tiny_lm()
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(n=8))
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, GrassAdamW)
    check_grass_state(trainer.optimizer.optimizer, model, rank=8, steps=1)


# ---- training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [True, False])
def test_grass_trainer_loss_falls(tmp_path, compressed):
    model = tiny_classifier()
    args = make_args(tmp_path, max_steps=16, grass_compressed_backward=compressed)
    trainer = GrassTrainer(model=model, args=args, train_dataset=classification_data())
    trainer.train()
    from hf_grass.optim import GrassAdamW

    assert isinstance(trainer.optimizer.optimizer, GrassAdamW)
    check_grass_state(trainer.optimizer.optimizer, model, rank=8, steps=16)
    ls = losses(trainer)
    assert len(ls) == 16
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4, ls


class _PostClipNorm(TrainerCallback):
    """Norm of every gradient the optimizer is about to use (after the Trainer clipped)."""

    def __init__(self):
        self.norms = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [
            g for p in model.parameters() for g in (p.grad, compressed_grad(p)) if g is not None
        ]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_clipping_includes_compressed_gradients(tmp_path):
    probe = _PostClipNorm()
    args = make_args(tmp_path, max_steps=2, max_grad_norm=1e-3)
    trainer = GrassTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(), callbacks=[probe]
    )
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert all(n > 1e-3 for n in logged)  # the pre-clip norm, compressed gradients included
    assert probe.norms == pytest.approx([1e-3, 1e-3], rel=1e-3)


def test_accumulation_and_layerwise_match_full_batch(tmp_path):
    """Batch 8 == 2 micro-batches of 4 == the same in layer-wise mode, bucketed or not (float64).

    A causal LM, whose loss honours the Trainer's token count across micro-batches (stock
    sequence-classification heads average per micro-batch, so they sum over accumulation), and
    uniform selection, whose rows do not depend on which micro-batch selects them.
    """
    results = []
    runs = ((8, 1, False, 0), (4, 2, False, 0), (4, 2, True, 0), (4, 2, True, 0.01))
    for bs, accum, layerwise, bucket_mb in runs:  # 0.01 MB: buckets of a few weights
        model = tiny_lm().double()
        args = make_args(
            tmp_path,
            max_steps=4,
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=accum,
            max_grad_norm=0.0,
            grass_selection="uniform",
            grass_layerwise=layerwise,
            grass_layerwise_bucket_mb=bucket_mb,
        )
        trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data(n=32))
        trainer.train()
        results.append(params_of(model))
        assert len(losses(trainer)) == 4
    for other in results[1:]:
        for name, p in results[0].items():
            torch.testing.assert_close(other[name], p, rtol=1e-9, atol=1e-10, msg=name)


def _train_counting_layer_calls(tmp_path, **kw):
    """Train ``tiny_lm()`` in float64: its weights and how often its first layer norm ran forward."""
    model = tiny_lm().double()
    calls = []
    model.model.layers[0].input_layernorm.register_forward_hook(lambda *_: calls.append(1))
    args = make_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, **kw)
    GrassTrainer(model=model, args=args, train_dataset=lm_data(n=32)).train()
    checkpointing = [
        m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")
    ]
    return params_of(model), len(calls), checkpointing


@pytest.mark.parametrize("user_checkpointing", [False, True])
def test_recomputation_changes_no_result(tmp_path, user_checkpointing):
    """With grass_recompute_selection (the default), the first micro-batch of each selection step
    (steps 0 and 3 of 6, gap 3) runs every layer's forward again in its backward: 12 micro-batches
    make 14 forwards. With it and grass_recompute_norms the weights equal a run without either,
    bit for bit, and checkpointing is off again afterwards. With the user's own checkpointing
    every micro-batch recomputes, and it stays on."""
    runs = {
        recompute: _train_counting_layer_calls(
            tmp_path / str(recompute),
            grass_recompute_selection=recompute,
            grass_recompute_norms=recompute,
            gradient_checkpointing=user_checkpointing,
        )
        for recompute in (True, False)
    }
    (weights, calls, checkpointing), (plain_weights, plain_calls, _) = runs.values()
    if user_checkpointing:
        assert calls == plain_calls == 24
        assert all(checkpointing)
    else:
        assert (calls, plain_calls) == (14, 12)
        assert not any(checkpointing)
    for name, p in plain_weights.items():
        assert torch.equal(weights[name], p), name


def _relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors together."""
    diff = torch.stack([(a[n].double() - b[n].double()).norm() for n in b]).norm()
    return float(diff / torch.stack([t.double().norm() for t in b.values()]).norm())


def test_bf16_autocast_gradient_checkpointing_and_accumulation(tmp_path):
    """bf16 autocast: checkpointing + 2 micro-batches of 4 train like one batch of 8 without them.

    Uniform selection, as in the float64 test above, so both runs pick the same rows. Measured
    differences (bf16 rounding of the micro-batch sums): losses 4e-5, grad norms 7e-4, parameter
    updates 0.02 (relative). A second micro-batch weighted 1.5x gives 0.25, 0.3 and 0.3; a loss
    scaled 2x leaves Adam's updates almost unchanged but doubles the losses and grad norms.
    """
    runs = {}
    for name, checkpointing, batch, accumulation in (
        ("reference", False, 8, 1),
        ("checkpointed", True, 4, 2),
    ):
        model = tiny_lm()
        before = params_of(model)
        args = make_args(
            tmp_path / name,
            max_steps=4,
            bf16=True,
            gradient_checkpointing=checkpointing,
            gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=batch,
            grass_selection="uniform",
        )
        trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
        trainer.train()
        assert model.is_gradient_checkpointing == checkpointing
        grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
        updates = {n: p.detach() - before[n] for n, p in model.named_parameters()}
        runs[name] = losses(trainer), grad_norms, updates
    (ref_losses, ref_norms, ref_updates), (got_losses, got_norms, got_updates) = runs.values()
    assert len(got_losses) == len(got_norms) == 4
    # every weight moved, the projected ones included (the comparisons below need updates)
    assert all(u.abs().sum() > 0 for u in got_updates.values())
    # The same loss and (pre-clip, compressed gradients included) gradient norm at every step ...
    assert got_losses == pytest.approx(ref_losses, rel=1e-3)
    assert got_norms == pytest.approx(ref_norms, rel=1e-2)
    # ... and the same parameter updates, up to bf16 rounding amplified by Adam's normalization.
    assert _relative_distance(got_updates, ref_updates) < 0.1


def _train_weights(tmp_path, dtype, **kw):
    """Train `tiny_lm()` (first rounded to bf16) in `dtype`: the trainer and the weight updates."""
    model = tiny_lm().to(torch.bfloat16).to(dtype)
    before = params_of(model)
    args = make_args(tmp_path, grass_state_dtype="float32", **kw)
    trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data())
    trainer.train()
    assert all(p.dtype == dtype for p in model.parameters())
    return trainer, {n: p.detach().float() - before[n].float() for n, p in model.named_parameters()}


def test_pure_bf16_model_with_stochastic_rounding(tmp_path):
    trainer, updates = _train_weights(
        tmp_path / "train", torch.bfloat16, max_steps=6, grass_stochastic_rounding=True
    )
    projected = [s for s in trainer.optimizer.optimizer.state.values() if "rows" in s]
    assert len(projected) == 14 and all(s["exp_avg"].dtype == torch.float32 for s in projected)
    ls = losses(trainer)
    assert len(ls) == 6
    assert min(ls[-2:]) < ls[0] - 0.2, ls  # it learns (measured: 5.55 -> 4.85)
    assert all(updates[n].abs().sum() > 0 for n in updates if n.endswith("_proj.weight"))

    # At lr 1e-5 Adam's steps (about 1e-5 a weight) are ~1/10 of bf16's spacing at the weights'
    # size (0.02): rounding to nearest drops most of them, stochastic rounding keeps them on
    # average. "Realized" = the share of the float32 run's update that a bf16 run reproduces
    # (projection onto it); measured 0.99 with stochastic rounding and 0.17 without.
    tiny = dict(max_steps=3, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0)
    _, reference = _train_weights(tmp_path / "fp32", torch.float32, **tiny)
    realized, changed = {}, {}
    for rounding in (True, False):
        _, got = _train_weights(
            tmp_path / str(rounding), torch.bfloat16, grass_stochastic_rounding=rounding, **tiny
        )
        dot = sum(float((got[n] * reference[n]).sum()) for n in reference)
        realized[rounding] = dot / sum(float(reference[n].square().sum()) for n in reference)
        changed[rounding] = sum(int((got[n] != 0).sum()) for n in got)
    assert 0.8 < realized[True] < 1.2, realized
    assert realized[False] < 0.5, realized
    assert changed[True] > 2 * changed[False], changed


# ---- checkpoints -------------------------------------------------------------------------------


def _resume_args(tmp_path, **kw):
    return make_args(
        tmp_path,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        grass_selection="multinomial",
        grass_update_proj_gap=2,
        **kw,
    )


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    data = classification_data()
    full = GrassTrainer(
        model=tiny_classifier(), args=_resume_args(tmp_path / "a"), train_dataset=data
    )
    full.train()
    checkpoint = str(tmp_path / "a" / "out" / "checkpoint-3")
    assert os.path.isfile(os.path.join(checkpoint, "grass_config.json"))

    resumed = GrassTrainer(
        model=tiny_classifier(seed=1), args=_resume_args(tmp_path / "b"), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=checkpoint)
    assert len(losses(full)) == 6 and losses(resumed)[3:] == losses(full)[3:]
    expected = params_of(full.model)
    for n, p in resumed.model.named_parameters():
        assert torch.equal(p, expected[n]), n
    rows = [
        {
            n: t.optimizer.optimizer.state[p]["rows"]
            for n, p in t.model.named_parameters()
            if "proj" in n
        }
        for t in (full, resumed)
    ]
    assert rows[0].keys() == rows[1].keys() and len(rows[0]) == 14
    assert all(torch.equal(rows[0][n], rows[1][n]) for n in rows[0])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """A Grass checkpoint, an AdamW one, and a Grass one without grass_config.json."""
    import shutil

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, optim in (("grass", "grass"), ("adamw", "adamw_torch")):
        args = make_args(root / name, optim=optim, max_steps=2, save_strategy="steps", save_steps=2)
        GrassTrainer(
            model=tiny_classifier(), args=args, train_dataset=classification_data(n=24)
        ).train()
        paths[name] = str(root / name / "out" / "checkpoint-2")
    paths["bare"] = str(root / "bare")
    shutil.copytree(paths["grass"], paths["bare"])
    os.remove(os.path.join(paths["bare"], "grass_config.json"))
    return paths


def _digest(folder) -> dict[str, str]:
    return {
        f: hashlib.sha1(open(os.path.join(folder, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(folder))
    }


@pytest.mark.parametrize(
    "saved, resumed, match",
    [
        # AdamW state into GrassAdamW: GrassAdamW.load_state_dict's own check, surfaced clearly.
        ("adamw", dict(), "Cannot resume the optimizer from .*This run uses optim='grass'"),
        ("grass", dict(optim="adamw_torch"), "saved by Grass"),
        ("grass", dict(grass_rank=4), "rank: checkpoint 8, now 4"),
        ("bare", dict(grass_rank=4), "Cannot resume the optimizer from .*grass_rank=4"),
    ],
)
def test_resume_with_another_method_or_rank_fails_cleanly(
    tmp_path, checkpoints, saved, resumed, match
):
    checkpoint = checkpoints[saved]
    before = _digest(checkpoint)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, **resumed)
    trainer = GrassTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(n=24)
    )
    with pytest.raises(ValueError, match=match) as err:
        trainer.train(resume_from_checkpoint=checkpoint)
    assert "Resume with the settings it was trained with" in str(err.value)
    assert "--model_name_or_path" not in str(err.value)
    assert _digest(checkpoint) == before
    assert not os.path.exists(tmp_path / "out" / "checkpoint-4")


@pytest.mark.parametrize("head", ["classifier", "lm"])
def test_save_model_loads_in_stock_transformers(tmp_path, head):
    model, data, cls = (
        (tiny_classifier(), classification_data(n=16), LlamaForSequenceClassification)
        if head == "classifier"
        else (tiny_lm(), lm_data(n=16), LlamaForCausalLM)
    )
    trainer = GrassTrainer(model=model, args=make_args(tmp_path, max_steps=2), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    loaded, info = cls.from_pretrained(str(tmp_path / "saved"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    trained = dict(model.state_dict())
    for n, t in loaded.state_dict().items():
        assert torch.equal(t, trained[n]), n


# ---- stock optimizers, bad setups, report -------------------------------------------------------


@pytest.mark.parametrize("optim", ["adamw_torch", "galore_adamw"])
def test_stock_optimizers_unchanged(tmp_path, optim):
    pytest.importorskip("galore_torch") if optim.startswith("galore") else None
    extra = (
        dict(optim_target_modules=["q_proj", "v_proj"], optim_args="rank=4")
        if "galore" in optim
        else {}
    )
    args = make_args(tmp_path, optim=optim, max_steps=2, **extra)
    trainer = GrassTrainer(
        model=tiny_classifier(), args=args, train_dataset=classification_data(n=16)
    )
    trainer.train()
    expected = "AdamW"  # galore_torch's class is galore_torch.adamw.AdamW
    optimizer = trainer.optimizer.optimizer
    module = "galore_torch" if "galore" in optim else "torch.optim"
    assert type(optimizer).__name__ == expected and type(optimizer).__module__.startswith(module)
    assert not any(projection_of(p) is not None for p in trainer.model.parameters())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(grass_target_modules=["no_such_proj"]), "no_such_proj"),
        (dict(grass_target_modules=".*nothing.*"), "matches no module"),
        (dict(grass_rank=1000, grass_proj_side="rows"), "rank 1000 is larger"),
    ],
)
def test_bad_grass_setup_fails_at_construction(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        GrassTrainer(
            model=tiny_classifier(),
            args=make_args(tmp_path, **kw),
            train_dataset=classification_data(n=8),
        )


def test_grass_needs_grass_arguments(tmp_path):
    from transformers import Trainer, TrainingArguments

    assert issubclass(GrassTrainer, Trainer)
    args = TrainingArguments(str(tmp_path), optim="adamw_torch", use_cpu=True, report_to="none")
    args.optim = "grass"
    with pytest.raises(TypeError, match="GrassTrainingArguments"):
        GrassTrainer(model=tiny_classifier(), args=args)


def _rss_bytes() -> int | None:
    """This process's resident set size now, from /proc (Linux), else None."""
    status = "/proc/self/status"
    if not os.path.exists(status):
        return None
    with open(status) as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024  # in kB


def test_resource_report(tmp_path):
    reports = {}
    for optim in ("grass", "adamw_torch"):
        cb = ResourceReportCallback()
        args = make_args(
            tmp_path / optim, optim=optim, max_steps=2, include_num_input_tokens_seen="non_padding"
        )
        model = tiny_classifier()
        trainer = GrassTrainer(
            model=model,
            args=args,
            train_dataset=classification_data(n=16),
            callbacks=[cb],
        )
        rss_before = _rss_bytes()
        trainer.train()
        path = tmp_path / optim / "out" / REPORT_NAME
        report = reports[optim] = json.loads(path.read_text())
        assert report == cb.report
        assert report["train_tokens"] == 2 * 8 * SEQ and report["steps"] == 2
        # tokens/s is the tokens over the summed step time (s_per_step, rounded to 0.1 ms)
        step_time = report["s_per_step"] * report["steps"]
        assert report["tokens_per_s"] == pytest.approx(report["train_tokens"] / step_time, rel=0.02)
        # a lifetime peak, in bytes: about what the process held before training or more (the
        # kernel updates its high-water mark lazily: it trailed the current RSS by 124 kB here)
        if rss_before is not None:
            assert report["peak_memory_bytes"] >= 0.9 * rss_before
        params = sum(p.numel() for p in model.parameters())
        assert report["param_bytes"] == report["trainable_param_bytes"] == 4 * params
        if optim == "grass":
            assert report["optimizer_state_bytes"] == grass_state_bytes(model, rank=8)
            # compressed r x min(m, n) gradients of the projected weights, dense ones elsewhere
            grads = sum(
                8 * min(p.shape) if n.endswith("_proj.weight") else p.numel()
                for n, p in model.named_parameters()
            )
            assert report["peak_grad_bytes"] == 4 * grads
        else:  # torch's AdamW: two moments per element and a step scalar per tensor
            tensors = len(list(model.parameters()))
            assert report["optimizer_state_bytes"] == 2 * 4 * params + 4 * tensors
            assert report["peak_grad_bytes"] == 4 * params
        assert report["tensor_peak_bytes"] == (
            report["param_bytes"] + report["peak_grad_bytes"] + report["optimizer_state_bytes"]
        )
    grass, adamw = reports["grass"], reports["adamw_torch"]
    assert grass["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert grass["peak_grad_bytes"] < adamw["peak_grad_bytes"]


def test_gradient_bytes_counts_compressed_gradients():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = GrassAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.zeros(4, 3)
    opt.projection(p).grad = torch.zeros(2, 3)
    assert gradient_bytes([p]) == (12 + 6) * 4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize(
    "flags",
    [dict(grass_compiled=True), dict(grass_implementation="compiled"),
     dict(grass_implementation="reference")],
)  # fmt: skip
def test_implementation_flags_reach_the_optimizer_and_train_like_the_default(tmp_path, flags):
    """--grass_implementation (and the older --grass_compiled) choose how the step runs;
    results equal the default grouped step (float64)."""
    results = []
    for chosen in ({}, flags):
        model = tiny_lm().double()
        args = make_args(tmp_path, max_steps=2, max_grad_norm=0.0, **chosen)
        trainer = GrassTrainer(model=model, args=args, train_dataset=lm_data(n=16))
        trainer.train()
        expected = (
            "compiled"
            if chosen.get("grass_compiled")
            else chosen.get("grass_implementation", "grouped")
        )
        groups = [g for g in trainer.optimizer.param_groups if "rank" in g]
        assert groups and all(g["implementation"] == expected for g in groups)
        results.append(params_of(model))
    for name, p in results[0].items():
        torch.testing.assert_close(results[1][name], p, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "fsdp_version, kw, match",
    [
        (1, {}, "needs FSDP2"),
        (2, dict(grass_layerwise=True), "grass_layerwise=True with FSDP2"),
        (2, dict(grass_proj_side="rows"), "selects columns there"),
        (2, dict(grass_rank=100, grass_target_modules=["up_proj"]), "larger than the columns"),
    ],
)
def test_fsdp_setups_grass_cannot_run_fail_with_the_fix(tmp_path, fsdp_version, kw, match):
    """The checks GrassTrainer runs when accelerate shards with FSDP (which the stock Trainer
    only runs on GPUs): FSDP1, layer-wise mode and row selection are refused in one line."""
    trainer = GrassTrainer(
        model=tiny_classifier(),
        args=make_args(tmp_path, **kw),
        train_dataset=classification_data(n=8),
    )
    trainer.is_fsdp_enabled = True
    trainer.accelerator.state.fsdp_plugin = types.SimpleNamespace(fsdp_version=fsdp_version)
    try:
        with pytest.raises(ValueError, match=match):
            trainer._check_grass_setup()
    finally:
        trainer.accelerator.state.fsdp_plugin = None  # accelerate's state is shared


def test_fsdp_without_a_gpu_is_refused_with_the_alternatives(tmp_path):
    """transformers would refuse --fsdp on one CPU process and ignore it on several."""
    with pytest.raises(ValueError, match="--fsdp needs GPUs.*torchrun without --fsdp"):
        GrassTrainer(
            model=tiny_classifier(),
            args=make_args(tmp_path, fsdp="full_shard", fsdp_config={"fsdp_version": 2}),
            train_dataset=classification_data(n=8),
        )
