"""Layer-wise updates inside the backward pass equal ordinary optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compressed_grad, tiny_llama
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_grass import grassify
from hf_grass.layerwise import enable_layerwise
from hf_grass.linear import GrassLinear
from hf_grass.optim import GrassAdamW, clip_grad_norm_
from hf_grass.projection import projection_of

F64 = torch.float64


class _Net(nn.Module):
    """Embedding, grassified linears (both sides), a LayerNorm and a dense head."""

    def __init__(self, checkpointing=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 12)
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)
        self.checkpointing = checkpointing

    def block(self, h):
        return h + self.down(torch.tanh(self.up(h)))

    def forward(self, ids):
        h = self.embed(ids)
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointing else self.block(h)
        return self.head(self.norm(h))


def _setup(layerwise, accumulation=1, max_grad_norm=None, checkpointing=False, device="cpu"):
    model = _Net(checkpointing).double().to(device)
    groups = grassify(
        model,
        rank=5,
        target_modules=["up", "down"],
        update_proj_gap=2,
        selection="multinomial",
        weight_decay=0.01,
    )
    opt = GrassAdamW(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    handle = None
    if layerwise:
        handle = enable_layerwise(opt, model, accumulation, max_grad_norm)
    return model, opt, scheduler, handle


def _batches(steps, accumulation):
    g = torch.Generator().manual_seed(1)
    return [
        [
            (
                torch.randint(0, 20, (3, 4), generator=g),
                torch.randn(3, 4, 5, generator=g, dtype=F64),
            )
            for _ in range(accumulation)
        ]
        for _ in range(steps)
    ]


def _loss(model, batch):
    ids, target = batch
    return (model(ids) - target).square().mean()


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_layerwise_training_equals_stepping_after_backward(accumulation, max_grad_norm):
    ref, ref_opt, ref_sched, _ = _setup(False)
    model, opt, sched, _ = _setup(True, accumulation, max_grad_norm)
    for window in _batches(6, accumulation):  # re-selections at steps 0, 2, 4
        for batch in window:
            _loss(ref, batch).backward()
            _loss(model, batch).backward()
        if max_grad_norm is not None:
            for p in ref.parameters():
                clip_grad_norm_([p], max_grad_norm)
        ref_opt.step()
        ref_sched.step()
        ref_opt.zero_grad()
        # Already updated during the last backward: no gradients are left and step() is a no-op.
        assert all(p.grad is None for p in model.parameters())
        assert all(compressed_grad(p) is None for p in model.parameters())
        before = [p.clone() for p in model.parameters()]
        opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
        sched.step()
        opt.zero_grad()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 1e-2


def test_layerwise_updates_before_the_backward_pass_ends_with_one_layer_gradient_alive():
    model, opt, _, _ = _setup(True)
    modules = {id(p): name for name, m in model.named_modules() for p in m.parameters(False)}
    alive_at_update = []
    step_param = opt.step_param

    def recording_step_param(p):
        alive = [
            q for q in model.parameters() if q.grad is not None or compressed_grad(q) is not None
        ]
        alive_at_update.append({modules[id(q)] for q in alive})
        assert any(q is p for q in alive)
        step_param(p)

    opt.step_param = recording_step_param
    for window in _batches(3, 1):
        _loss(model, window[0]).backward()
    params = list(model.parameters())
    assert len(alive_at_update) == 3 * len(params)
    assert all(len(names) == 1 for names in alive_at_update)  # gradients of one module at most


def _step_both_and_compare(ref, ref_opt, model, opt) -> None:
    """``step()`` both optimizers (the layer-wise one updates what the hooks left), then the
    layer-wise model must equal the reference."""
    for optimizer in (ref_opt, opt):
        optimizer.step()
        optimizer.zero_grad()
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_optimizer_step_updates_parameters_that_missed_the_last_micro_batch():
    """A branch used only in the first micro-batch of a window is updated by optimizer.step()."""
    ref, ref_opt, _, _ = _setup(False)
    model, opt, _, _ = _setup(True, accumulation=2)

    def loss(m, batch, use_norm):
        ids, target = batch
        h = m.block(m.embed(ids))
        return (m.head(m.norm(h) if use_norm else h) - target).square().mean()

    for window in _batches(4, 2):
        for k, batch in enumerate(window):
            loss(ref, batch, k == 0).backward()
            loss(model, batch, k == 0).backward()
        assert model.norm.weight.grad is not None  # missed micro-batch 2: not stepped yet
        _step_both_and_compare(ref, ref_opt, model, opt)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_weight_also_used_outside_its_layer_is_updated_once_per_window(accumulation):
    """An L2 penalty on a projected weight gives it a full .grad besides its compressed one:
    both parts add up, and the weight steps once per window (not once per part)."""
    ref, ref_opt, _, _ = _setup(False)
    model, opt, _, _ = _setup(True, accumulation)
    steps = []
    step_param = opt.step_param
    opt.step_param = lambda p: (steps.append(p is model.up.weight), step_param(p))

    def loss(m, batch):
        return _loss(m, batch) + 0.1 * m.up.weight.square().sum()

    windows = _batches(4, accumulation)
    for window in windows:
        for batch in window:
            loss(ref, batch).backward()
            loss(model, batch).backward()
        _step_both_and_compare(ref, ref_opt, model, opt)
    assert sum(steps) == len(windows)


def test_layerwise_with_gradient_checkpointing_equals_stepping_after_backward():
    ref, ref_opt, _, _ = _setup(False)
    model, opt, _, _ = _setup(True, checkpointing=True)
    for window in _batches(4, 1):
        _loss(ref, window[0]).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        _loss(model, window[0]).backward()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_remove_restores_ordinary_steps():
    model, opt, _, handle = _setup(True)
    batch = _batches(1, 1)[0][0]
    handle.remove()
    assert projection_of(model.up.weight).anchor is None
    before = [p.clone() for p in model.parameters()]
    _loss(model, batch).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert projection_of(model.up.weight).grad is not None and model.head.weight.grad is not None
    opt.step()
    assert not torch.equal(model.head.weight, before[-2])
    with enable_layerwise(opt, model):
        pass
    assert getattr(opt, "_grass_layerwise", None) is None


def test_layerwise_on_a_grassified_llama_matches_ordinary_training():
    ref = tiny_llama(num_key_value_heads=2).double()
    model = copy.deepcopy(ref)
    ref_opt = GrassAdamW(grassify(ref, rank=8, update_proj_gap=2), lr=1e-3)
    opt = GrassAdamW(grassify(model, rank=8, update_proj_gap=2), lr=1e-3)
    enable_layerwise(opt, model, gradient_accumulation_steps=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 8), generator=g)
            ref(input_ids=ids, labels=ids).loss.backward()
            model(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)
    assert sum(isinstance(m, GrassLinear) for m in model.modules()) == 14


def test_hf_trainer_with_accumulation_and_scheduler_matches_ordinary_training(tmp_path):
    """Trainer: backward x N, optimizer.step(), scheduler.step(), model.zero_grad()."""
    from transformers import Trainer, TrainingArguments

    base = tiny_llama(num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(0, 64, (8,), generator=g)
        data.append({"input_ids": ids, "labels": ids})

    def train(layerwise):
        model = copy.deepcopy(base)
        opt = GrassAdamW(grassify(model, rank=8, update_proj_gap=2), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (1 + step))
        if layerwise:
            enable_layerwise(opt, model, gradient_accumulation_steps=2)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(layerwise)),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=4,
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
        )
        Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, scheduler)).train()
        return model

    ref, model = train(False), train(True)
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    assert not any(
        torch.equal(p, q) for p, q in zip(base.parameters(), model.parameters(), strict=True)
    )


def test_bad_arguments_raise_clear_errors():
    model, opt, _, _ = _setup(True)
    with pytest.raises(ValueError, match="already enabled"):
        enable_layerwise(opt, model)
    model, opt, _, _ = _setup(False)
    with pytest.raises(TypeError, match="step_param"):
        enable_layerwise(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        enable_layerwise(opt, model, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        enable_layerwise(opt, model, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="not in the optimizer"):
        enable_layerwise(opt, [nn.Parameter(torch.zeros(2))])


def test_on_each_device_layerwise_with_accumulation_equals_stepping_after_backward(device):
    ref, ref_opt, _, _ = _setup(False, device=device)
    model, opt, _, _ = _setup(True, accumulation=2, max_grad_norm=0.05, device=device)
    for window in _batches(4, 2):
        for ids, target in window:
            batch = ids.to(device), target.to(device)
            _loss(ref, batch).backward()
            _loss(model, batch).backward()
        for p in ref.parameters():
            clip_grad_norm_([p], 0.05)
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
        for p, q in zip(ref.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-10)
