"""Recomputed norms and selection steps: the same gradients as autograd's, with less kept."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from hf_grass import grassify
from hf_grass.optim import GrassAdamW
from hf_grass.projection import projection_of
from hf_grass.recompute import is_norm, keep_norms, layers_recomputed, recompute_norms


def _llama(seed: int = 0):
    # float32, the dtype of the norms' arithmetic (a float64 model's norms compute in float32
    # too): equality is checked bit for bit, so the dtype does not weaken it.
    model = tiny_llama(seed=seed, num_key_value_heads=2)
    model.train()
    return model


def _kept_bytes_and_grads(model, ids):
    """Bytes of the distinct non-parameter tensors autograd keeps for the backward, and every
    parameter's gradient after it."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return sum(kept.values()), grads


def test_recomputed_norms_give_the_same_gradients_and_keep_two_activations_fewer_per_layer():
    plain, recomputed = _llama(), _llama()
    names = recompute_norms(recomputed)
    layers = recomputed.config.num_hidden_layers
    assert len(names) == 2 * layers + 1  # two per layer and the final norm
    assert all(is_norm(recomputed.get_submodule(n)) for n in names)
    ids = torch.randint(0, 64, (3, 10))
    plain_bytes, plain_grads = _kept_bytes_and_grads(plain, ids)
    kept_bytes, grads = _kept_bytes_and_grads(recomputed, ids)
    for name, g in plain_grads.items():
        assert torch.equal(grads[name], g), name
    # Each norm no longer keeps x̂ (T x h, float32); the input x is kept either way.
    hidden = recomputed.config.hidden_size
    assert plain_bytes - kept_bytes >= (2 * layers + 1) * ids.numel() * hidden * 4


def test_frozen_norms_are_left_alone_and_keep_norms_undoes():
    model = _llama()
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    names = recompute_norms(model)
    assert "model.layers.0.input_layernorm" not in names
    assert "model.layers.0.post_attention_layernorm" in names
    assert recompute_norms(model) == names  # idempotent
    keys = list(model.state_dict())
    copied = copy.deepcopy(model)  # the copy recomputes its own norms
    ids = torch.randint(0, 64, (2, 8))
    _, grads = _kept_bytes_and_grads(model, ids)
    _, copied_grads = _kept_bytes_and_grads(copied, ids)
    assert grads.keys() == copied_grads.keys()
    for name, g in grads.items():
        assert torch.equal(copied_grads[name], g), name
    keep_norms(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys


def test_norms_run_plainly_without_gradients():
    model = _llama()
    recompute_norms(model)
    norm = model.model.norm
    x = torch.randn(2, 5, norm.weight.numel())
    with torch.no_grad():
        assert torch.equal(norm(x), type(norm).forward(norm, x))


def test_recomputed_norms_inside_checkpointed_layers_give_the_same_gradients():
    plain, recomputed = _llama(), _llama()
    recompute_norms(recomputed)
    ids = torch.randint(0, 64, (2, 9))
    _, plain_grads = _kept_bytes_and_grads(plain, ids)
    with layers_recomputed(recomputed):
        assert all(layer.gradient_checkpointing for layer in recomputed.model.layers)
        _, grads = _kept_bytes_and_grads(recomputed, ids)
    assert not any(layer.gradient_checkpointing for layer in recomputed.model.layers)
    for name, g in plain_grads.items():
        assert torch.equal(grads[name], g), name


def _llama_sharing_down_proj():
    """``_llama()`` in float64 whose two layers share one ``mlp.down_proj`` weight (64 x 128:
    Grass selects its columns)."""
    model = _llama().double()
    first, second = model.model.layers
    second.mlp.down_proj.weight = first.mlp.down_proj.weight
    return model


@pytest.mark.parametrize("recomputed_steps", ["selection", "all"])
def test_recomputed_layers_with_a_weight_shared_by_two_layers_change_no_result(recomputed_steps):
    """Layers recomputed on selection steps (as GrassTrainer does) or on every step (the user's
    own gradient checkpointing): layer 1's backward selects the shared weight's columns before
    layer 0 is recomputed, and the recomputation keeps what layer 0's forward kept. The weights
    equal, bit for bit, those of a run that recomputes nothing."""
    plain, recomputed = _llama_sharing_down_proj(), _llama_sharing_down_proj()
    opts = [
        GrassAdamW(grassify(m, rank=8, update_proj_gap=2), lr=1e-2) for m in (plain, recomputed)
    ]
    assert projection_of(recomputed.model.layers[1].mlp.down_proj.weight).side == "cols"
    if recomputed_steps == "all":
        recomputed.gradient_checkpointing_enable()  # non-reentrant, transformers' default
    for _ in range(3):  # selections at steps 0 and 2
        ids = torch.randint(0, 64, (2, 16))
        for model, opt in zip((plain, recomputed), opts, strict=True):
            recompute = model is recomputed and opt.selection_pending()
            with layers_recomputed(model) if recompute else contextlib.nullcontext():
                model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        for (name, p), q in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
            assert torch.equal(q, p), name


def _train_sharing_down_proj(output_dir, recompute: bool):
    """GrassTrainer on ``_llama_sharing_down_proj()`` for 3 steps of two micro-batches (gap 2):
    how often layer 0's attention ran forward, and the weights."""
    from datasets import Dataset

    from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

    ids = torch.randint(1, 64, (24, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    model = _llama_sharing_down_proj()
    calls = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    args = GrassTrainingArguments(
        output_dir=str(output_dir),
        optim="grass",
        grass_rank=8,
        grass_update_proj_gap=2,
        grass_recompute_selection=recompute,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    GrassTrainer(model=model, args=args, train_dataset=data).train()
    return len(calls), {n: p.detach() for n, p in model.named_parameters()}


def test_grass_trainer_with_a_weight_shared_by_two_layers_recomputes_and_changes_no_result(
    tmp_path,
):
    """GrassTrainer's grass_recompute_selection (the default) with the shared down_proj weight:
    the first micro-batch of each selection step (steps 0 and 2 of 3) is recomputed, so 6
    micro-batches make 8 forwards of layer 0's attention, and the weights equal, bit for bit,
    those of a run that recomputes nothing."""
    calls, weights = _train_sharing_down_proj(tmp_path / "recomputed", recompute=True)
    plain_calls, plain_weights = _train_sharing_down_proj(tmp_path / "plain", recompute=False)
    assert (calls, plain_calls) == (8, 6)
    for name, p in plain_weights.items():
        assert torch.equal(weights[name], p), name


def test_layers_recomputed_leaves_the_users_checkpointing_and_plain_modules_alone():
    model = _llama()
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    with layers_recomputed(model):
        pass
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    plain = nn.Sequential(nn.Linear(3, 3))
    with layers_recomputed(plain):
        pass


@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.Linear(6, 6)])
def test_is_norm(norm):
    assert is_norm(norm) == isinstance(norm, nn.LayerNorm)
