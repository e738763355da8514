"""The batched fast path (``_grouped_grass_adamw``, GrassAdamW's default) equals the reference.

Tolerances: float64 and float32 results are compared with ``atol=0`` (the batch runs the
reference's elementwise ops in the reference's order, so every value is the same); bf16 weights
with float32 or bf16 state likewise bit for bit without stochastic rounding. With stochastic
rounding the noise is drawn in another order, so weights are compared within one bf16 ulp of each
other (moments and counts, which do not depend on the noise, exactly), and unbiasedness is
checked as in test_optim. ``torch.compile`` changes the arithmetic's rounding (fused kernels):
float64 within 1e-12.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import compressed_grad, functional_problem, tiny_llama
from torch import nn

from hf_grass import GrassAdamW, functional, grass_param_groups, grassify
from hf_grass.functional import grass_adamw, unique_rows
from hf_grass.layerwise import enable_layerwise

F64 = torch.float64
HP = dict(beta1=0.9, beta2=0.99, lr=1e-2, eps=1e-8, scale=0.7)


def _problem(dtype, state_dtype, repeats, gen, shapes=((10, 6), (12, 6), (9, 6), (7, 5))):
    """Projected weights (three share a compressed shape (4, 6), one (4, 5)) and a dense one.

    The fourth weight is stepped through a transposed view, as a column-selected weight is.
    """
    shapes = [(m, k, 4) for m, k in shapes]
    return functional_problem(dtype, state_dtype, repeats, gen, shapes, strided_last=True)


def _run(impl, dtype, state_dtype, repeats, weight_decay, stochastic=False, steps=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    params, grads, ms, vs, counts, rows, rhos = _problem(dtype, state_dtype, repeats, gen)
    uniques = [None if r is None else unique_rows(r) for r in rows]
    options = {
        "reference": dict(foreach=False),
        "foreach": dict(foreach=True),
        "batched": dict(batched=True),
        "compiled": dict(batched=True, compiled=True),
    }[impl]
    torch.manual_seed(0)
    for _ in range(steps):
        grass_adamw(
            params, grads, ms, vs, counts, rows, rhos, uniques, weight_decay=weight_decay,
            stochastic_rounding=stochastic, **HP, **options,
        )  # fmt: skip
    return params, ms, vs, counts


CASES = [
    (F64, F64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("dtype,state_dtype", CASES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_batched_core_equals_the_reference_bit_for_bit(dtype, state_dtype, repeats, weight_decay):
    ref = _run("reference", dtype, state_dtype, repeats, weight_decay)
    fast = _run("batched", dtype, state_dtype, repeats, weight_decay)
    for kind_ref, kind_fast in zip(ref, fast, strict=True):
        for a, b in zip(kind_ref, kind_fast, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("budget", [1, 30, None])
@pytest.mark.parametrize("dtype,state_dtype", [(F64, F64), (torch.bfloat16, torch.float32)])
def test_batches_of_any_size_equal_the_reference(budget, dtype, state_dtype, monkeypatch):
    """One tensor per batch (views of the state, updated in place), uneven batches of two, and
    the GPU default (whole groups) all give the reference's values."""
    budgets = {} if budget is None else {"cpu": budget}
    monkeypatch.setattr(functional, "BATCH_ELEMENTS", budgets)
    ref = _run("reference", dtype, state_dtype, True, 0.1)
    fast = _run("batched", dtype, state_dtype, True, 0.1)
    for kind_ref, kind_fast in zip(ref, fast, strict=True):
        for a, b in zip(kind_ref, kind_fast, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_batches_are_near_equal_and_bounded():
    cpu = torch.device("cpu")
    assert functional._chunks(list(range(7)), 1 << 16, cpu) == [[0, 1, 2, 3], [4, 5, 6]]
    assert functional._chunks(list(range(3)), 1 << 20, cpu) == [[0], [1], [2]]
    assert functional._chunks(list(range(5)), 10, torch.device("meta")) == [list(range(5))]


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_batched_stochastic_rounding_stays_within_one_ulp_of_the_reference(repeats, state_dtype):
    """The noise is drawn in another order: weights agree to one bf16 ulp, the state exactly."""
    ref = _run("reference", torch.bfloat16, state_dtype, repeats, 0.1, stochastic=True, steps=1)
    fast = _run("batched", torch.bfloat16, state_dtype, repeats, 0.1, stochastic=True, steps=1)
    exact = _run("reference", torch.bfloat16, state_dtype, repeats, 0.1, steps=1)
    for a, b, c in zip(ref[0], fast[0], exact[0], strict=True):
        a, b, c = a.double(), b.double(), c.double()
        ulp = torch.finfo(torch.bfloat16).eps * c.abs().clamp(min=2**-126) * 2
        assert bool(((a - b).abs() <= ulp).all())
        assert bool(((b - c).abs() <= ulp).all())
    for kind_ref, kind_fast in zip(ref[1:], fast[1:], strict=True):
        for a, b in zip(kind_ref, kind_fast, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_repeated_rows_round_stochastically_alike():
    """Positions of one repeated row write the same rounded value (one shared draw)."""
    torch.manual_seed(3)
    w = torch.ones(3, 64, dtype=torch.bfloat16)
    rows = torch.tensor([1, 1, 1, 2])
    for _ in range(20):
        grass_adamw(
            [w], [torch.full((4, 64), -1.0, dtype=torch.bfloat16)], [torch.zeros(4, 64)],
            [torch.zeros(4, 64)], [torch.zeros(4)], [rows], [torch.ones(4)], [None],
            beta1=0.9, beta2=0.99, lr=2.0**-9, eps=0.0, weight_decay=0.0, scale=1.0,
            stochastic_rounding=True, batched=True,
        )  # fmt: skip
    # Row 1 got 3 x lr per step (0.75 ulp near 1), row 2 lr: both moved, row 0 untouched.
    assert bool((w[0] == 1).all())
    assert float(w[1].float().mean()) > float(w[2].float().mean()) > 1.0


@pytest.mark.parametrize("repeats", [False, True])
def test_compiled_core_matches_the_reference(repeats):
    pytest.importorskip("torch._inductor")
    ref = _run("reference", F64, F64, repeats, 0.1)
    try:
        fast = _run("compiled", F64, F64, repeats, 0.1)
    except Exception as error:  # no C++ compiler for inductor's CPU backend
        pytest.skip(f"torch.compile unavailable here: {type(error).__name__}: {error}")
    for kind_ref, kind_fast in zip(ref, fast, strict=True):
        for a, b in zip(kind_ref, kind_fast, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------- the optimizer
class _Mixed(nn.Module):
    """Linears of equal and unequal compressed shapes (rows and cols sides), biases, a norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 12)  # rows side, (3, 8)
        self.b = nn.Linear(8, 12)  # rows side, (3, 8)
        self.c = nn.Linear(12, 8)  # cols side, (3, 8)
        self.d = nn.Linear(8, 5)  # cols side, (3, 5)
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + torch.tanh(self.b(x))
        return self.norm(self.d(torch.tanh(self.c(h))))


def _train(model, opt, steps=6, dtype=F64, gen_seed=1):
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        x = torch.randn(6, 8, generator=gen, dtype=F64).to(dtype)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
@pytest.mark.parametrize("reselect_state", ["keep", "reset"])
@pytest.mark.parametrize("compressed_backward", [False, True])
def test_optimizer_batched_trains_like_the_reference(
    selection, reselect_state, compressed_backward
):
    """Several steps with re-selections (moments remapped), decay, dense params, both sides."""
    results = []
    for batched in (False, True):
        model = _Mixed().double()
        make = grassify if compressed_backward else grass_param_groups
        groups = make(model, rank=3, target_modules=["a", "b", "c", "d"], update_proj_gap=2,
                      selection=selection, reselect_state=reselect_state, weight_decay=0.1)  # fmt: skip
        opt = GrassAdamW(groups, lr=1e-2, weight_decay=0.1, foreach=batched, batched=batched)
        _train(model, opt)
        results.append((model, opt))
    (ref, ref_opt), (model, opt) = results
    for p, q in zip(ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        for key, value in ref_opt.state[p].items():
            other = opt.state[q][key]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(other, value, rtol=0, atol=0)
            else:
                assert other == value


@pytest.mark.parametrize("state_dtype", [None, torch.float32])
def test_optimizer_batched_bf16_matches_the_reference(state_dtype):
    results = []
    for batched in (False, True):
        model = _Mixed().bfloat16()
        groups = grass_param_groups(
            model, rank=3, target_modules=["a", "b", "c", "d"], update_proj_gap=2
        )
        opt = GrassAdamW(
            groups, lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, foreach=batched,
            batched=batched,
        )  # fmt: skip
        _train(model, opt, dtype=torch.bfloat16)
        results.append(model)
    for p, q in zip(*(m.parameters() for m in results), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_state_dict_round_trip_is_unchanged_by_the_batched_path():
    """Per-parameter state tensors (no group buffers): a checkpoint of one path resumes in the
    other, and training on after the round trip equals training on without it."""
    model = _Mixed().double()
    groups = grass_param_groups(model, rank=3, target_modules=["a", "b", "c", "d"],
                                update_proj_gap=2, selection="multinomial")  # fmt: skip
    opt = GrassAdamW(groups, lr=1e-2)
    _train(model, opt, steps=3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    for p in model.parameters():
        state = opt.state[p]
        assert state["exp_avg"].is_contiguous() and state["exp_avg"]._base is None
    finals = []
    for batched in (False, True):
        clone = copy.deepcopy(model)
        groups = grass_param_groups(clone, rank=3, target_modules=["a", "b", "c", "d"],
                                    update_proj_gap=2, selection="multinomial")  # fmt: skip
        resumed = GrassAdamW(groups, lr=1e-2, foreach=batched, batched=batched)
        buffer.seek(0)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        _train(clone, resumed, steps=3, gen_seed=2)
        finals.append(clone)
    _train(model, opt, steps=3, gen_seed=2)
    for p, q, s in zip(*(m.parameters() for m in finals), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
        torch.testing.assert_close(s, p, rtol=0, atol=0)


# ------------------------------------------------------------------------------ layer-wise
def test_layerwise_buckets_equal_per_parameter_updates_and_ordinary_training():
    ref = tiny_llama(num_key_value_heads=2).double()
    per_param, bucketed = copy.deepcopy(ref), copy.deepcopy(ref)
    opts = []
    for model, bucket_mb in ((ref, None), (per_param, 0.0), (bucketed, 0.01)):
        opt = GrassAdamW(grassify(model, rank=8, update_proj_gap=2, selection="multinomial"),
                         lr=1e-3, weight_decay=0.1)  # fmt: skip
        if bucket_mb is not None:
            enable_layerwise(opt, model, gradient_accumulation_steps=2, bucket_mb=bucket_mb)
        opts.append(opt)
    calls = []
    step_params = opts[2].step_params
    opts[2].step_params = lambda ps: (calls.append(len(ps)), step_params(ps))
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for _ in range(2):
            ids = torch.randint(0, 64, (2, 8), generator=g)
            for model in (ref, per_param, bucketed):
                model(input_ids=ids, labels=ids).loss.backward()
        for model in (per_param, bucketed):  # updated in the backward: nothing left to step
            assert all(p.grad is None and compressed_grad(p) is None for p in model.parameters())
        for opt in opts:
            opt.step()
            opt.zero_grad()
        for p, q, s in zip(ref.parameters(), per_param.parameters(), bucketed.parameters(),
                           strict=True):  # fmt: skip
            torch.testing.assert_close(q, p, rtol=0, atol=0)
            torch.testing.assert_close(s, p, rtol=0, atol=0)
    n_params = len(list(ref.parameters()))
    assert sum(calls) == 3 * n_params and max(calls) > 1  # several parameters per update
    assert len(calls) < 3 * n_params


def test_layerwise_bucket_is_flushed_before_backward_returns():
    model = tiny_llama(num_key_value_heads=2).double()
    opt = GrassAdamW(grassify(model, rank=8), lr=1e-3)
    enable_layerwise(opt, model, bucket_mb=1e3)  # never full: flushed by the end-of-backward hook
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is None and compressed_grad(p) is None for p in model.parameters())
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
