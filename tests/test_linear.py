"""Compressed-gradient linear layers, grassify/ungrassify and their Hugging Face round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import compressed_grad, tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from hf_grass import grassify, ungrassify
from hf_grass.linear import GrassLinear
from hf_grass.optim import GrassAdamW
from hf_grass.projection import projection_of
from hf_grass.targets import grass_param_groups

F64 = torch.float64


def _layer_and_optimizer(m, n, rank, side, selection, bias, dtype=F64, gap=1000, seed=0):
    torch.manual_seed(seed)
    layer = GrassLinear(n, m, bias=bias, dtype=dtype)
    groups = [
        dict(
            params=[layer.weight],
            rank=rank,
            proj_side=side,
            selection=selection,
            update_proj_gap=gap,
        )
    ]
    if bias:
        groups.append(dict(params=[layer.bias]))
    return layer, GrassAdamW(groups, lr=1e-2)


def _full_gradients(layer, x):
    """Autograd's gradients of ``sum(F.linear(x, W, b) * probe)`` with plain tensors."""
    w = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = nn.functional.linear(xr, w, b)
    probe = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(7))
    probe = probe.to(y.device)
    (y * probe).sum().backward()
    return xr.grad, w.grad, None if b is None else b.grad, probe


def _backward(layer, x, probe):
    x = x.detach().clone().requires_grad_()
    (layer(x) * probe).sum().backward()
    return x.grad


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
@pytest.mark.parametrize("shape", [(11, 24), (3, 5, 24)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_compressed_gradient_equals_rho_times_selected_rows_of_full_gradient(
    side, selection, shape, bias
):
    m, n, rank = 10, 24, 7
    if side == "cols":
        m, n, shape = 24, 10, shape[:-1] + (10,)
    layer, opt = _layer_and_optimizer(m, n, rank, side, selection, bias)
    projection = projection_of(layer.weight)
    for step in range(3):  # a selection step, then ordinary steps
        x = torch.randn(shape, dtype=F64)
        grad_x, full, grad_b, probe = _full_gradients(layer, x)
        selecting = projection.needs_full_gradient()
        got_x = _backward(layer, x, probe)
        assert selecting == (step == 0)
        assert layer.weight.grad is None
        rows, rho = projection.rows, projection.rho
        oriented = full if side == "rows" else full.t()
        expected = rho.to(F64)[:, None] * oriented[rows]
        torch.testing.assert_close(projection_of(layer.weight).grad, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_x, grad_x, rtol=0, atol=1e-12)
        if bias:
            torch.testing.assert_close(layer.bias.grad, grad_b, rtol=0, atol=1e-12)
        opt.step()
        opt.zero_grad()
    if selection == "multinomial":
        assert rows.unique().numel() < rows.numel(), "the test should exercise repeated rows"


def test_weight_without_optimizer_gets_the_ordinary_full_gradient():
    torch.manual_seed(0)
    layer = GrassLinear(6, 5, dtype=F64)
    x = torch.randn(4, 3, 6, dtype=F64)
    grad_x, full, grad_b, probe = _full_gradients(layer, x)
    got_x = _backward(layer, x, probe)
    torch.testing.assert_close(layer.weight.grad, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, grad_b, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_x, grad_x, rtol=0, atol=1e-12)
    assert compressed_grad(layer.weight) is None


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.add(tuple(t.shape))
        return out


def _mlp(dtype=F64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 6, bias=False)
    ).to(dtype)


def test_ordinary_step_never_allocates_a_full_weight_gradient():
    model = _mlp()
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=100), lr=1e-3)
    weights = [m.weight for m in model if isinstance(m, GrassLinear)]
    for step in range(2):
        x = torch.randn(8, 12, dtype=F64)
        loss = model(x).square().mean()
        recorder = _ShapeRecorder()
        with recorder:
            loss.backward()
        if step == 1:  # an ordinary step: no m x n tensor anywhere in the backward
            for w in weights:
                assert tuple(w.shape) not in recorder.shapes
                assert w.grad is None
                assert projection_of(w).grad.shape[0] == 3
                state = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor)]
                floats = [v for v in state if v.is_floating_point()]
                assert all(tuple(v.shape) != tuple(w.shape) for v in state)
                assert all(v.numel() <= projection_of(w).grad.numel() for v in floats)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_grassified_training_equals_grass_adamw_on_full_gradients(selection):
    reference = _mlp()
    model = copy.deepcopy(reference)
    options = dict(rank=4, update_proj_gap=3, selection=selection, weight_decay=0.1)
    ref_opt = GrassAdamW(grass_param_groups(reference, **options), lr=1e-2)
    opt = GrassAdamW(grassify(model, **options), lr=1e-2)
    for _ in range(10):  # re-selections at steps 0, 3, 6, 9
        x = torch.randn(2, 5, 12, dtype=F64)
        for m, o in ((reference, ref_opt), (model, opt)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_module_zero_grad_is_enough_between_steps():
    """HF Trainer calls model.zero_grad(), which leaves compressed_grad alone: it must not leak."""
    reference = _mlp()
    model = copy.deepcopy(reference)
    options = dict(rank=4, update_proj_gap=2)
    ref_opt = GrassAdamW(grass_param_groups(reference, **options), lr=1e-2)
    opt = GrassAdamW(grassify(model, **options), lr=1e-2)
    for _ in range(5):
        x = torch.randn(4, 12, dtype=F64)
        for m, o in ((reference, ref_opt), (model, opt)):
            m(x).square().mean().backward()
            o.step()
            m.zero_grad()
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_accumulation_selects_from_the_first_micro_batch_and_keeps_rows_for_the_window():
    """Grassified accumulation = full-gradient Grass whose rows come from the first micro-batch."""
    reference = _mlp()
    model = copy.deepcopy(reference)
    options = dict(rank=4, update_proj_gap=2, selection="multinomial")
    ref_opt = GrassAdamW(grass_param_groups(reference, **options), lr=1e-2)
    opt = GrassAdamW(grassify(model, **options), lr=1e-2)
    weights = [m.weight for m in model if isinstance(m, GrassLinear)]
    for _ in range(6):
        batches = [torch.randn(3, 12, dtype=F64) for _ in range(3)]
        for k, x in enumerate(batches):
            reference(x).square().mean().backward()
            if k == 0:
                for p in reference.parameters():
                    projection = projection_of(p)
                    if projection is not None and projection.needs_full_gradient():
                        projection.select(p.grad)
            model(x).square().mean().backward()
            if k == 0:
                rows = [projection_of(w).rows.clone() for w in weights]
            assert all(
                torch.equal(projection_of(w).rows, r) for w, r in zip(weights, rows, strict=True)
            )
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_weight_gradient_matmul_costs_r_over_m_of_the_dense_one(side):
    m, n, rank = 64, 48, 8
    dense = nn.Linear(n, m)
    layer, opt = _layer_and_optimizer(m, n, rank, side, "top_r", True, dtype=torch.float32)
    selected = m if side == "rows" else n
    x = torch.randn(4, 16, n)
    layer(x).sum().backward()  # the selection step
    opt.step()
    opt.zero_grad()

    def backward_flops(module, needs_input_grad):
        y = module(x.clone().requires_grad_(needs_input_grad)).sum()
        with FlopCounterMode(display=False) as counter:
            y.backward()
        return counter.get_total_flops()

    tokens = x.shape[0] * x.shape[1]
    assert backward_flops(dense, False) == 2 * tokens * m * n
    assert backward_flops(layer, False) == 2 * tokens * m * n * rank // selected
    assert layer.weight.grad is None
    # With dX: 4 units of forward cost (2 T m n each) drop to 2 + 2 r / m.
    assert backward_flops(dense, True) == 4 * tokens * m * n
    assert backward_flops(layer, True) == 2 * tokens * m * n + 2 * tokens * m * n * rank // selected


class _Blocks(nn.Module):
    def __init__(self, checkpointing=None):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(10, 14), nn.GELU(), nn.Linear(14, 10)) for _ in range(3)
        )
        self.checkpointing = checkpointing

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.checkpointing)
        return x


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_compressed_gradients(use_reentrant):
    plain, ckpt = _Blocks().double(), _Blocks(checkpointing=use_reentrant).double()
    ckpt.load_state_dict(plain.state_dict())
    options = dict(rank=5, update_proj_gap=2, selection="multinomial")
    opts = [GrassAdamW(grassify(m, **options), lr=1e-2) for m in (plain, ckpt)]
    for _ in range(4):  # selection and ordinary steps
        x = torch.randn(6, 10, dtype=F64, requires_grad=True)
        for model in (plain, ckpt):
            model(x).square().sum().backward()
        for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
            if p.dim() == 2:
                assert p.grad is None and q.grad is None
                assert torch.equal(projection_of(p).rows, projection_of(q).rows)
                torch.testing.assert_close(
                    projection_of(q).grad, projection_of(p).grad, rtol=0, atol=1e-12
                )
            else:
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-12)
        for opt in opts:
            opt.step()
            opt.zero_grad()


class _SharedAcrossBlocks(nn.Module):
    """Two residual blocks whose second layers share one 6 x 24 weight (wider than tall: Grass
    selects its columns), each block checkpointed (non-reentrant) when ``checkpointing``. The
    shared layers read an activation of their block, which checkpointing recomputes."""

    def __init__(self, checkpointing: bool):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Tanh(), nn.Linear(24, 6), nn.GELU(), nn.Linear(6, 24))
            for _ in range(2)
        )
        self.blocks[1][1].weight = self.blocks[0][1].weight
        self.checkpointing = checkpointing

    def forward(self, x):
        for block in self.blocks:
            if self.checkpointing:
                x = x + checkpoint(block, x, use_reentrant=False)
            else:
                x = x + block(x)
        return x


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_weight_shared_by_two_checkpointed_blocks_trains_as_without_checkpointing(micro_batches):
    """The second block's backward selects the shared weight's columns before the first block is
    recomputed; the recomputed forward keeps all of X, as its original did. Each step's compressed
    gradient is rho * G[rows] of the dense gradient of both uses (rows fixed by the first
    micro-batch), and the weights equal those of the same run without checkpointing."""
    plain, ckpt = _SharedAcrossBlocks(False).double(), _SharedAcrossBlocks(True).double()
    options = dict(rank=3, update_proj_gap=2, selection="multinomial")
    opts = [GrassAdamW(grassify(m, **options), lr=1e-2) for m in (plain, ckpt)]
    assert projection_of(ckpt.blocks[1][1].weight).side == "cols"
    for _ in range(4):  # selections at steps 0 and 2
        batches = [torch.randn(5, 24, dtype=F64) for _ in range(micro_batches)]
        dense = _SharedAcrossBlocks(False).double()  # nn.Linear: autograd's full gradients
        dense.load_state_dict(plain.state_dict())
        for x in batches:
            for model in (dense, plain, ckpt):
                model(x).square().mean().backward()
        full = dense.blocks[0][1].weight.grad  # both uses, all micro-batches: 6 x 24
        for model in (plain, ckpt):
            projection = projection_of(model.blocks[0][1].weight)
            expected = projection.rho.to(F64)[:, None] * full.t()[projection.rows]
            torch.testing.assert_close(projection.grad, expected, rtol=0, atol=1e-12)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
            assert torch.equal(q, p), name


def _tiny_llama(tie=False, seed=0):
    # Grouped-query attention: k_proj and v_proj are narrower than q_proj.
    return tiny_llama(seed=seed, num_key_value_heads=2, tie_word_embeddings=tie)


def test_hf_gradient_checkpointing_gives_the_same_compressed_gradients():
    plain = _tiny_llama().double()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable()
    plain.train()
    ckpt.train()
    opts = [GrassAdamW(grassify(m, rank=8), lr=1e-3) for m in (plain, ckpt)]
    ids = torch.randint(0, 64, (2, 12))
    for model in (plain, ckpt):
        model(input_ids=ids, labels=ids).loss.backward()
    for opt in opts:
        opt.step()
        opt.zero_grad()
    for model in (plain, ckpt):
        model(input_ids=ids.flip(1), labels=ids.flip(1)).loss.backward()
    compressed = 0
    for p, q in zip(plain.parameters(), ckpt.parameters(), strict=True):
        if compressed_grad(p) is not None:
            compressed += 1
            torch.testing.assert_close(
                projection_of(q).grad, projection_of(p).grad, rtol=0, atol=1e-12
            )
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-12)
    assert compressed == 2 * 7


def test_grassify_ungrassify_round_trip_keeps_outputs_and_state_dict():
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    before = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    groups = grassify(model, rank=4)
    grassified = [n for n, m in model.named_modules() if isinstance(m, GrassLinear)]
    assert len(grassified) == 2 * 7 and "lm_head" not in grassified
    assert sum(len(g["params"]) for g in groups if "rank" in g) == len(grassified)
    assert torch.equal(model(input_ids=ids).logits, before)
    assert list(model.state_dict()) == list(state)
    assert "rank=4" in repr(model.model.layers[0].mlp.up_proj)
    GrassAdamW(groups, lr=1e-3)
    ungrassify(model)
    assert not any(isinstance(m, GrassLinear) for m in model.modules())
    assert all(params[n] is p for n, p in model.named_parameters())
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_ungrassify_undoes_recomputed_norms_and_the_ddp_ignore_list(one_process_group):
    from torch.nn.parallel import DistributedDataParallel

    from hf_grass import GrassDataParallel
    from hf_grass.recompute import recompute_norms

    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 10))
    before = model(input_ids=ids).logits
    model._ddp_params_and_buffers_to_ignore = ["model.embed_tokens.weight"]  # the user's own
    opt = GrassAdamW(grassify(model, rank=4), lr=1e-3)
    assert recompute_norms(model)
    one_process_group()
    GrassDataParallel(model, opt)
    projected = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, GrassLinear)]
    assert len(projected) == 2 * 7
    ignored = sorted([*projected, "model.embed_tokens.weight"])
    assert sorted(model._ddp_params_and_buffers_to_ignore) == ignored
    ungrassify(model)
    assert model._ddp_params_and_buffers_to_ignore == ["model.embed_tokens.weight"]
    assert not any("forward" in vars(m) for m in model.modules())  # norms keep activations
    ddp = DistributedDataParallel(model)  # averages every weight but the user's ignored one
    assert ddp.parameters_to_ignore == {"model.embed_tokens.weight"}
    assert torch.equal(model(input_ids=ids).logits, before)


def _llama_after_one_step(seq: int, rank: int = 4):
    """A grassified tiny LLaMA, its GrassAdamW and a batch, after one (selecting) step."""
    model = _tiny_llama()
    opt = GrassAdamW(grassify(model, rank=rank), lr=1e-2)
    ids = torch.randint(0, 64, (2, seq))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt, ids


def test_save_pretrained_of_a_grassified_llama_loads_into_the_stock_class(tmp_path):
    from transformers import LlamaForCausalLM

    model, _, ids = _llama_after_one_step(seq=10)
    model.save_pretrained(tmp_path)
    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any(isinstance(m, GrassLinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    "target_modules, message",
    [
        (["nonexistent_proj"], "match no module"),
        (r".*\.nothing_here", "matches no module"),
        (["input_layernorm"], "the weights of nn.Linear, .*MoE experts.* only"),
        (r"model\.layers\.0\.mlp", "the weights of nn.Linear, .*MoE experts.* only"),
    ],
)
def test_bad_target_modules_raise_a_clear_error(target_modules, message):
    model = _tiny_llama()
    with pytest.raises(ValueError, match=message):
        grassify(model, rank=4, target_modules=target_modules)
    assert not any(isinstance(m, GrassLinear) for m in model.modules())


def test_grassify_refuses_tied_weights_and_bad_ranks():
    with pytest.raises(ValueError, match="tied weights"):
        grassify(_tiny_llama(tie=True), rank=4, target_modules=["lm_head", "q_proj"])
    with pytest.raises(ValueError, match="Invalid rank"):
        grassify(_tiny_llama(), rank=0)


def test_bf16_autocast_matches_float32_and_keeps_dtypes():
    torch.manual_seed(0)
    layer = GrassLinear(32, 48)
    opt = GrassAdamW([dict(params=[layer.weight], rank=8), dict(params=[layer.bias])], lr=1e-3)
    x = torch.randn(2, 6, 32)
    layer(x).sum().backward()  # select rows in float32
    opt.step()
    opt.zero_grad()

    probe = torch.randn(2, 6, 48)
    x32 = x.clone().requires_grad_()
    (layer(x32) * probe).sum().backward()
    reference = projection_of(layer.weight).grad.clone()
    opt.zero_grad()

    dense = ungrassify(copy.deepcopy(layer))
    x16 = x.clone().requires_grad_()
    xd = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x16)
        yd = dense(xd)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, yd)  # the same forward as autocast's own linear
    (y.float() * probe).sum().backward()
    (yd.float() * probe).sum().backward()
    assert x16.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    assert projection_of(layer.weight).grad.dtype == torch.float32
    torch.testing.assert_close(x16.grad, xd.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=1e-2, atol=1e-2)
    scale = reference.abs().max()
    torch.testing.assert_close(
        projection_of(layer.weight).grad / scale, reference / scale, rtol=0, atol=2e-2
    )


def test_pure_bf16_weights_train_with_compressed_gradients():
    model = _mlp(dtype=torch.bfloat16)
    reference = _mlp(dtype=F64)  # plain layers: full float64 gradients
    opt = GrassAdamW(grassify(model, rank=4), lr=1e-3)
    x = torch.randn(8, 12)
    model(x.bfloat16()).float().square().mean().backward()
    reference(x.to(F64)).square().mean().backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if p.dim() == 2:
            # the larger dimension is selected: rows of (20 x 12), columns of (16 x 20), (6 x 16)
            projection = projection_of(p)
            side = "rows" if p.shape[0] >= p.shape[1] else "cols"
            assert projection.side == side and projection.rows.shape == (4,)
            oriented = q.grad if side == "rows" else q.grad.t()
            got = projection.grad
            want = projection.rho.to(F64)[:, None] * oriented[projection.rows]
        else:
            got, want = p.grad, q.grad
        assert got.dtype == torch.bfloat16
        scale = want.abs().max()
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=3e-2)
    opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_on_each_device_compressed_gradient_and_bf16_autocast(side, device):
    layer, opt = _layer_and_optimizer(48, 32, 8, side, "multinomial", True)
    layer.to(device)
    projection = projection_of(layer.weight)
    for _ in range(2):  # a selection step, then an ordinary one
        x = torch.randn(2, 5, 32, dtype=F64, device=device)
        grad_x, full, grad_b, probe = _full_gradients(layer, x)
        got_x = _backward(layer, x, probe)
        oriented = full if side == "rows" else full.t()
        expected = projection.rho.to(F64)[:, None] * oriented[projection.rows]
        torch.testing.assert_close(projection_of(layer.weight).grad, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(got_x, grad_x, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, grad_b, rtol=0, atol=1e-12)
        opt.step()
        opt.zero_grad()

    layer.float()
    x = torch.randn(2, 5, 32, device=device, requires_grad=True)
    probe = torch.randn(2, 5, 48, device=device)
    (layer(x) * probe).sum().backward()
    reference = projection_of(layer.weight).grad.clone()
    opt.zero_grad()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    (y.float() * probe).sum().backward()
    got = projection_of(layer.weight).grad
    assert got.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    scale = reference.abs().max()
    torch.testing.assert_close(got / scale, reference / scale, rtol=0, atol=2e-2)


def test_unit_scales_skip_the_multiply_and_others_apply_it():
    """rho = 1 (top_r) leaves the compressed gradient as it is; a new, non-unit rho scales it."""
    layer, opt = _layer_and_optimizer(12, 6, 4, "rows", "top_r", False)
    x = torch.randn(5, 6, dtype=F64)
    _backward(layer, x, torch.ones(5, 12, dtype=F64))  # selects: rho = 1
    projection = projection_of(layer.weight)
    c = torch.randn(4, 6, dtype=F64)
    before = c.clone()
    assert projection.scale_rows_(c) is c and torch.equal(c, before)
    rho = torch.tensor([1.0, 2.0, 0.5, 3.0])
    opt.state[layer.weight]["rho"] = rho  # a new selection's scales
    expected = c * rho.to(F64)[:, None]
    assert torch.equal(projection.scale_rows_(c), expected)


def _inputs_and_saved(model, x, forward=None):
    """A loss of ``model(x)`` (or ``forward(x)``), and each GrassLinear's input and what it
    saved for its backward."""
    seen = {}

    def record(module, args, out):
        seen[module] = (args[0], out.grad_fn.saved_tensors[0])

    layers = [m for m in model.modules() if isinstance(m, GrassLinear)]
    hooks = [m.register_forward_hook(record) for m in layers]
    loss = (forward or model)(x).square().sum()
    for h in hooks:
        h.remove()
    return loss, seen


def test_ordinary_steps_keep_only_the_selected_columns_of_a_cols_side_input():
    """Ordinary steps save X[:, cols] (r of n columns) for a cols-side layer; selection steps and
    rows-side layers save X itself. (The gradients from X[:, cols] are checked against autograd's
    in test_compressed_gradient_equals_rho_times_selected_rows_of_full_gradient.)"""
    model = _mlp()  # 12 -> 20 (rows side), 20 -> 16 and 16 -> 6 (cols side)
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=2), lr=1e-2)
    layers = [m for m in model if isinstance(m, GrassLinear)]
    assert [projection_of(m.weight).side for m in layers] == ["rows", "cols", "cols"]
    for step in range(4):  # selections at steps 0 and 2
        loss, seen = _inputs_and_saved(model, torch.randn(4, 7, 12, dtype=F64))
        for layer in layers:
            x, kept = seen[layer]
            projection = projection_of(layer.weight)
            if projection.side == "cols" and step % 2 == 1:
                assert kept.shape == (4, 7, 3)
                assert torch.equal(kept, x[..., projection.rows])
            else:
                assert kept is x
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_an_input_kept_whole_by_one_layer_is_not_sliced_by_the_next():
    """q_proj (rows side) keeps the attention input whole; k_proj and v_proj (cols side, same
    input) then keep no slices of their own, which would only add memory."""
    model, opt, ids = _llama_after_one_step(seq=12)  # opt keeps the projections alive
    _, seen = _inputs_and_saved(model, ids, lambda x: model(input_ids=x).logits)
    attention = model.model.layers[0].self_attn
    assert projection_of(attention.k_proj.weight).side == "cols"
    for name in ("q_proj", "k_proj", "v_proj"):
        x, kept = seen[getattr(attention, name)]
        assert kept is x, name
    mlp = model.model.layers[0].mlp
    assert projection_of(mlp.down_proj.weight).side == "cols"
    assert seen[mlp.down_proj][1].shape[-1] == 4


@pytest.mark.parametrize("change", ["load_state_dict", "drop_optimizer"])
def test_backward_after_the_columns_changed_since_its_forward_is_refused(change):
    """The forward kept X[:, cols] of the columns selected then: a backward after the optimizer's
    state was replaced cannot be computed, and says so rather than mixing columns. (An optimizer
    step in between is refused by autograd already: it modified the weight in place.)"""
    model = _mlp()
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=2), lr=1e-2)
    model(torch.randn(5, 12, dtype=F64)).square().sum().backward()
    opt.step()
    opt.zero_grad()
    stale = model(torch.randn(5, 12, dtype=F64)).square().sum()  # step 1: keeps X[:, cols]
    if change == "load_state_dict":
        opt.load_state_dict(opt.state_dict())
    else:
        del opt
    with pytest.raises(RuntimeError, match="changed between its forward and its backward"):
        stale.backward()
