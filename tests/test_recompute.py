"""Recomputed norms and selection steps: the same gradients as autograd's, with less kept."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

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
