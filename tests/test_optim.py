"""GrassAdamW (hf_grass.optim) and its parameter groups (hf_grass.targets).

Exactness claims are checked in float64 against torch.optim.AdamW or against a row-by-row
re-implementation of the documented semantics; low-precision checks use bf16 tolerances.
"""

import io
import math
import warnings

import pytest
import torch
from conftest import FLOAT_DTYPES
from torch import nn

from hf_grass import SELECTIONS, GrassAdamW, grass_param_groups, match_target_modules
from hf_grass.projection import projection_of

F64 = torch.float64


def _randn(*shape, gen, dtype=F64, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=F64).to(device, dtype)


def _param(data: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(data.detach().clone())


def _round_trip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _grass_group(p, rank, **options):
    return {"params": [p], "rank": rank, **options}


def _assert_close(actual, expected, atol):
    assert actual.shape == expected.shape
    err = float((actual.detach().double() - expected.detach().double()).abs().max())
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g}"


# --------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_full_rank_top_r_equals_adamw(side, device):
    gen = torch.Generator().manual_seed(100)
    m, n, steps, gap = 12, 7, 25, 3
    w0 = _randn(m, n, gen=gen, device=device)
    p, q = _param(w0), _param(w0)
    hyper = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    rank = m if side == "rows" else n
    grass = GrassAdamW(
        [
            _grass_group(
                p,
                rank,
                update_proj_gap=gap,
                selection="top_r",
                scale=1.0,
                reselect_state="keep",
                proj_side=side,
            )
        ],
        **hyper,
    )
    adamw = torch.optim.AdamW([q], **hyper)
    for _ in range(steps):
        g = _randn(m, n, gen=gen, device=device)
        p.grad, q.grad = g.clone(), g.clone()
        grass.step()
        adamw.step()
        _assert_close(p, q, 1e-10)
    state = grass.state[p]
    assert int(state["selected_step"]) == (steps - 1) // gap * gap  # re-selected several times
    orient = (lambda t: t) if side == "rows" else (lambda t: t.t())
    _assert_close(state["exp_avg"], orient(adamw.state[q]["exp_avg"]), 1e-12)
    _assert_close(state["exp_avg_sq"], orient(adamw.state[q]["exp_avg_sq"]), 1e-12)
    assert float(p.detach().sub(w0).abs().max()) > 0.1  # the trajectory went somewhere


def test_plain_group_equals_adamw(device):
    gen = torch.Generator().manual_seed(101)
    shapes = [(9, 4), (4,), (3, 2, 2)]
    ours = [_param(_randn(*s, gen=gen, device=device)) for s in shapes]
    theirs = [_param(p) for p in ours]
    hyper = dict(lr=2e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    grass = GrassAdamW(ours, **hyper)
    adamw = torch.optim.AdamW(theirs, **hyper)
    for _ in range(15):
        for p, q in zip(ours, theirs, strict=True):
            g = _randn(*p.shape, gen=gen, device=device)
            p.grad, q.grad = g.clone(), g.clone()
        grass.step()
        adamw.step()
    for p, q in zip(ours, theirs, strict=True):
        _assert_close(p, q, 1e-10)
        assert grass.state[p]["exp_avg"].shape == p.shape


def _reference_top_r(w0, grads, rank, gap, lr, betas, eps, weight_decay, reselect_state):
    """Row-by-row re-implementation of the documented top_r semantics (rows side, float64)."""
    beta1, beta2 = betas
    w, exp_avg, exp_avg_sq = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    count = [0] * w0.shape[0]
    selected: set[int] = set()
    for t, g in enumerate(grads):
        if t % gap == 0:
            new = set(torch.topk(g.norm(dim=1), rank).indices.tolist())
            for i in range(w0.shape[0]):
                if reselect_state == "reset" or i not in new or i not in selected:
                    exp_avg[i], exp_avg_sq[i], count[i] = 0.0, 0.0, 0
            selected = new
        for i in sorted(selected):
            count[i] += 1
            exp_avg[i] = beta1 * exp_avg[i] + (1 - beta1) * g[i]
            exp_avg_sq[i] = beta2 * exp_avg_sq[i] + (1 - beta2) * g[i] ** 2
            m_hat = exp_avg[i] / (1 - beta1 ** count[i])
            v_hat = exp_avg_sq[i] / (1 - beta2 ** count[i])
            w[i] = w[i] * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps)
    return w, exp_avg, torch.tensor(count, dtype=F64)


@pytest.mark.parametrize("reselect_state", ["keep", "reset"])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_low_rank_top_r_matches_row_by_row_reference(side, reselect_state):
    """With r < m, each selected row follows AdamW with its own count; others stay put."""
    gen = torch.Generator().manual_seed(102)
    m, k, rank, gap, steps = 10, 6, 4, 3, 14
    hyper = dict(lr=2e-2, betas=(0.85, 0.97), eps=1e-8, weight_decay=0.2)
    w0 = _randn(m, k, gen=gen)
    # row norms re-drawn every step: top_r would pick other rows at every step
    grads = [_randn(m, k, gen=gen) * _randn(m, 1, gen=gen).exp() for _ in range(steps)]
    orient = (lambda t: t) if side == "rows" else (lambda t: t.t().contiguous())
    p = _param(orient(w0))
    opt = GrassAdamW(
        [_grass_group(p, rank, update_proj_gap=gap, proj_side=side, reselect_state=reselect_state)],
        **hyper,
    )
    for g in grads:
        p.grad = orient(g).clone()
        opt.step()
    expected_w, expected_m, expected_count = _reference_top_r(
        w0, grads, rank, gap, reselect_state=reselect_state, **hyper
    )
    _assert_close(orient(p.detach()), expected_w, 1e-10)
    state = opt.state[p]
    _assert_close(state["exp_avg"], expected_m[state["rows"]], 1e-12)
    _assert_close(state["row_step"], expected_count[state["rows"]], 0)


# --------------------------------------------------------------------- sparsity of the update
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_only_selected_rows_change(side, selection, device):
    gen = torch.Generator().manual_seed(103)
    shape, rank = (11, 8), 3
    p = _param(_randn(*shape, gen=gen, device=device))
    opt = GrassAdamW(
        [_grass_group(p, rank, update_proj_gap=2, selection=selection, proj_side=side)],
        lr=1e-2,
        weight_decay=0.1,
    )
    dim = 1 if side == "rows" else 0  # reduce over the other dimension
    for _ in range(7):
        before = p.detach().clone()
        p.grad = _randn(*shape, gen=gen, device=device)
        opt.step()
        changed = (p != before).any(dim=dim).nonzero().flatten().tolist()
        assert changed == opt.state[p]["rows"].unique().tolist()
        assert len(changed) <= rank


@pytest.mark.parametrize("side,shape,expected", [
    ("rows", (12, 5), (3, 5)),
    ("cols", (12, 5), (3, 12)),
    ("auto", (12, 5), (3, 5)),  # auto selects the larger dimension: state r x min(m, n)
    ("auto", (5, 12), (3, 5)),
])  # fmt: skip
def test_state_tensors_are_rank_by_other_dimension(side, shape, expected):
    gen = torch.Generator().manual_seed(104)
    p = _param(_randn(*shape, gen=gen))
    opt = GrassAdamW([_grass_group(p, 3, proj_side=side)])
    p.grad = _randn(*shape, gen=gen)
    opt.step()
    state = opt.state[p]
    assert state["exp_avg"].shape == expected
    assert state["exp_avg_sq"].shape == expected
    assert state["rows"].shape == (3,) and state["rho"].shape == (3,)
    assert state["row_step"].shape == (3,)
    assert projection_of(p).side == ("rows" if expected[1] == shape[1] else "cols")


def test_top_r_selects_the_largest_gradient_rows():
    gen = torch.Generator().manual_seed(105)
    p = _param(_randn(30, 4, gen=gen))
    opt = GrassAdamW([_grass_group(p, 5, proj_side="rows", update_proj_gap=1)])
    for _ in range(4):
        g = _randn(30, 4, gen=gen) * _randn(30, 1, gen=gen).exp()
        p.grad = g
        opt.step()
        expected = torch.topk(g.norm(dim=1), 5).indices.sort().values
        assert torch.equal(opt.state[p]["rows"], expected)


def test_float64_row_norms_are_compared_in_float64(fresh_warning):
    """Norms below float32's range, or equal in float32, still rank rows in a float64 run."""
    p = _param(torch.zeros(6, 3, dtype=F64))
    opt = GrassAdamW([_grass_group(p, 2, proj_side="rows", update_proj_gap=1)])
    g = torch.zeros(6, 3, dtype=F64)
    g[4], g[1], g[2] = 1e-50, 1e-60, 1e-70  # all flush to zero in float32
    p.grad = g
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no uniform fallback
        opt.step()
    assert opt.state[p]["rows"].tolist() == [1, 4]
    g = torch.ones(6, 3, dtype=F64)
    g[3] += 1e-12  # ties with the other rows in float32
    g[5] += 2e-12
    p.grad = g
    opt.step()
    assert opt.state[p]["rows"].tolist() == [3, 5]


def test_repeated_row_update_is_the_sum_of_its_contributions():
    """A row drawn twice by multinomial receives both of its updates (index_add, not assign)."""
    gen = torch.Generator().manual_seed(106)
    lr, wd, eps, betas = 1e-2, 0.1, 1e-3, (0.9, 0.999)
    w0 = _randn(4, 3, gen=gen)
    g = _randn(4, 3, gen=gen)
    g[1:] *= 1e-9  # row 0 carries all the norm: both draws land on it
    p = _param(w0)
    opt = GrassAdamW(
        [_grass_group(p, 2, selection="multinomial", proj_side="rows")],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
    )
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    assert state["rows"].tolist() == [0, 0]
    # one contribution, first Adam step: m_hat = c, v_hat = c², c = rho g[0]
    rho = state["rho"].double()
    contributions = [
        -lr * rho[j] * (rho[j] * g[0]) / ((rho[j] * g[0]).abs() + eps) for j in range(2)
    ]
    expected = w0[0] * (1 - lr * wd) + contributions[0] + contributions[1]
    _assert_close(p[0].detach(), expected, 1e-12)
    _assert_close(p[1:].detach(), w0[1:], 0)  # untouched, not even decayed
    # and it is not a single contribution
    assert float((p.detach()[0] - (w0[0] * (1 - lr * wd) + contributions[0])).abs().min()) > 1e-3


def test_multinomial_update_with_repeats_matches_index_add_reference():
    """Generic multinomial steps (repeats likely with r = m) against a per-draw reference."""
    gen = torch.Generator().manual_seed(107)
    lr, wd, eps, betas = 1e-2, 0.05, 1e-8, (0.9, 0.999)
    m, k = 6, 5
    p = _param(_randn(m, k, gen=gen))
    opt = GrassAdamW(
        [
            _grass_group(
                p,
                m,
                selection="multinomial",
                proj_side="rows",
                update_proj_gap=1,
                reselect_state="reset",
            )
        ],
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=wd,
    )
    saw_repeat = False
    for _ in range(6):
        w = p.detach().clone()
        g = _randn(m, k, gen=gen) * _randn(m, 1, gen=gen).exp()
        p.grad = g.clone()
        opt.step()
        rows, rho = opt.state[p]["rows"], opt.state[p]["rho"].double()
        saw_repeat |= rows.unique().numel() < rows.numel()
        c = rho[:, None] * g[rows]  # fresh moments at every re-selection (update_proj_gap=1)
        direction = c / (c.abs() + eps)
        expected = w.clone()
        expected[rows.unique()] *= 1 - lr * wd
        expected.index_add_(0, rows, -lr * rho[:, None] * direction)
        _assert_close(p.detach(), expected, 1e-12)
    assert saw_repeat


# ------------------------------------------------------------------------------ re-selection
@pytest.mark.parametrize("selection", SELECTIONS)
def test_rows_change_only_every_update_proj_gap_steps(selection):
    gen = torch.Generator().manual_seed(108)
    m, k, rank, gap, steps = 40, 3, 5, 4, 13
    p = _param(_randn(m, k, gen=gen))
    opt = GrassAdamW(
        [_grass_group(p, rank, update_proj_gap=gap, selection=selection, proj_side="rows")]
    )
    history, last_selection_grad = [], None
    for t in range(steps):
        g = _randn(m, k, gen=gen) * _randn(m, 1, gen=gen).exp()  # new row norms every step
        assert projection_of(p).needs_full_gradient() == (t % gap == 0)
        if t % gap == 0:
            last_selection_grad = g
        p.grad = g
        opt.step()
        rows = opt.state[p]["rows"].clone()
        if t % gap:
            assert torch.equal(rows, history[-1]), f"rows changed at step {t}"
        if selection == "top_r":
            expected = torch.topk(last_selection_grad.norm(dim=1), rank).indices.sort().values
            assert torch.equal(rows, expected)
        assert int(opt.state[p]["selected_step"]) == t // gap * gap
        history.append(rows)
    changes = sum(not torch.equal(a, b) for a, b in zip(history[:-1], history[1:], strict=True))
    assert changes == (steps - 1) // gap  # and it does change at every re-selection


def _two_phase_gradients(gen, m, k, hot):
    g = _randn(m, k, gen=gen) * 1e-3
    g[hot] += _randn(len(hot), k, gen=gen)
    return g


@pytest.mark.parametrize("reselect_state", ["keep", "reset"])
def test_reselection_carries_or_zeroes_moments_as_documented(reselect_state):
    """keep: rows selected before and after carry moments and counts, new rows start at 0."""
    gen = torch.Generator().manual_seed(109)
    m, k, rank, gap = 8, 4, 3, 2
    p = _param(_randn(m, k, gen=gen))
    opt = GrassAdamW(
        [
            _grass_group(
                p,
                rank,
                update_proj_gap=gap,
                proj_side="rows",
                reselect_state=reselect_state,
            )
        ],
        betas=(0.9, 0.999),
    )
    for _ in range(gap):
        p.grad = _two_phase_gradients(gen, m, k, [1, 4, 6])
        opt.step()
    state = opt.state[p]
    assert state["rows"].tolist() == [1, 4, 6]
    old_m, old_v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    assert state["row_step"].tolist() == [gap] * 3

    g = _two_phase_gradients(gen, m, k, [0, 4, 6])
    projection = projection_of(p)
    assert projection.needs_full_gradient()
    projection.select(g)  # the re-selection alone, before the update
    assert not projection.needs_full_gradient()
    assert state["rows"].tolist() == [0, 4, 6]
    if reselect_state == "keep":
        assert state["row_step"].tolist() == [0, gap, gap]
        assert torch.equal(state["exp_avg"][1:], old_m[1:])
        assert torch.equal(state["exp_avg_sq"][1:], old_v[1:])
    else:
        assert state["row_step"].tolist() == [0, 0, 0]
        assert not state["exp_avg"][1:].any() and not state["exp_avg_sq"][1:].any()
    assert not state["exp_avg"][0].any() and not state["exp_avg_sq"][0].any()

    p.grad = g
    opt.step()  # does not select again
    assert state["rows"].tolist() == [0, 4, 6]
    expected_count = [1, gap + 1, gap + 1] if reselect_state == "keep" else [1, 1, 1]
    assert state["row_step"].tolist() == expected_count
    c = g[[0, 4, 6]]
    if reselect_state == "keep":
        expected_m = torch.cat([0.1 * c[:1], 0.9 * old_m[1:] + 0.1 * c[1:]])
    else:
        expected_m = 0.1 * c
    _assert_close(state["exp_avg"], expected_m, 1e-15)


# ------------------------------------------------------------------------------- checkpoints
def _checkpoint_setup(params, selection="multinomial", **options):
    """A projected group, a second projected group on the other side and a plain group."""
    w1, w2, bias = params
    return GrassAdamW(
        [
            _grass_group(w1, 4, selection=selection, update_proj_gap=3, seed=5, **options),
            _grass_group(w2, 3, selection="uniform", update_proj_gap=2, reselect_state="reset"),
            {"params": [bias], "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=0.1,
    )


def _checkpoint_params(gen, dtype, device="cpu", m=300):
    return [
        _param(_randn(m, 8, gen=gen, device=device, dtype=dtype)),  # rows: m > 256
        _param(_randn(6, 20, gen=gen, device=device, dtype=dtype)),  # auto: cols
        _param(_randn(8, gen=gen, device=device, dtype=dtype)),
    ]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_state_dict_round_trips_through_weights_only_load(dtype):
    gen = torch.Generator().manual_seed(110)
    params = _checkpoint_params(gen, dtype)
    opt = _checkpoint_setup(params, selection="top_r")
    hot = [257, 258, 281, 299]  # rank 4; indices that bf16 cannot represent exactly
    for _ in range(4):
        for p in params:
            p.grad = _randn(*p.shape, gen=gen, dtype=dtype)
        params[0].grad[hot] *= 100
        opt.step()
    saved = opt.state_dict()
    loaded = _round_trip(saved)

    fresh = [_param(p) for p in params]
    restored = _checkpoint_setup(fresh, selection="top_r")
    restored.load_state_dict(loaded)
    for p, q in zip(params, fresh, strict=True):
        ours, theirs = opt.state[p], restored.state[q]
        assert ours.keys() == theirs.keys()
        if "rng" in ours:
            assert theirs["rng"] == ours["rng"] and isinstance(theirs["rng"], bytes)
        for key in ours.keys() - {"rng"}:
            assert theirs[key].dtype == ours[key].dtype, key
            assert torch.equal(theirs[key], ours[key]), key
    state = restored.state[fresh[0]]
    assert state["rows"].dtype == torch.int64
    assert set(hot) <= set(state["rows"].tolist())
    assert state["exp_avg"].dtype == dtype and state["exp_avg_sq"].dtype == dtype
    assert restored.state[fresh[2]]["exp_avg"].dtype == dtype
    assert restored.param_groups[0]["rank"] == 4 and restored.param_groups[0]["seed"] == 5
    assert projection_of(fresh[0]).rows is state["rows"]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_resume_from_state_dict_is_bit_exact(dtype, device):
    """2N steps == N steps, save, load into a fresh optimizer and params, N steps."""
    gen = torch.Generator().manual_seed(111)
    half = 5  # re-selections at 0, 3, 6, 9 (group 1) and every 2 steps (group 2) cross it
    initial = _checkpoint_params(gen, dtype, device, m=40)
    grads = [
        [_randn(*p.shape, gen=gen, dtype=dtype, device=device) for p in initial]
        for _ in range(2 * half)
    ]

    def run(params, opt, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()

    straight = [_param(p) for p in initial]
    straight_opt = _checkpoint_setup(straight)
    run(straight, straight_opt, grads)

    first = [_param(p) for p in initial]
    first_opt = _checkpoint_setup(first)
    run(first, first_opt, grads[:half])
    checkpoint = _round_trip(first_opt.state_dict())
    resumed = [_param(p) for p in first]
    resumed_opt = _checkpoint_setup(resumed)
    resumed_opt.load_state_dict(checkpoint)
    run(resumed, resumed_opt, grads[half:])

    for p, q in zip(straight, resumed, strict=True):
        assert torch.equal(p, q)
    for p, q in zip(straight, resumed, strict=True):
        for key in ("rows", "exp_avg", "exp_avg_sq"):
            if key in straight_opt.state[p]:
                assert torch.equal(straight_opt.state[p][key], resumed_opt.state[q][key])


def test_loading_a_state_saved_with_another_rank_raises():
    gen = torch.Generator().manual_seed(112)
    p = _param(_randn(10, 4, gen=gen))
    opt = GrassAdamW([_grass_group(p, 3)])
    p.grad = _randn(10, 4, gen=gen)
    opt.step()
    other = GrassAdamW([_grass_group(_param(p), 2)])
    with pytest.raises(ValueError, match=r"rank: checkpoint 3, now 2"):
        other.load_state_dict(_round_trip(opt.state_dict()))


def test_loading_a_plain_adamw_state_into_a_projected_group_raises():
    gen = torch.Generator().manual_seed(113)
    p = _param(_randn(10, 4, gen=gen))
    adamw = torch.optim.AdamW([p])
    p.grad = _randn(10, 4, gen=gen)
    adamw.step()
    grass = GrassAdamW([_grass_group(_param(p), 3)])
    with pytest.raises(ValueError, match="rank"):
        grass.load_state_dict(_round_trip(adamw.state_dict()))


def test_loading_a_state_with_another_group_count_raises():
    gen = torch.Generator().manual_seed(114)
    a, b = _param(_randn(6, 4, gen=gen)), _param(_randn(4, gen=gen))
    opt = GrassAdamW([_grass_group(a, 2), {"params": [b]}])
    with pytest.raises(ValueError, match="2 parameter groups but this optimizer has 1"):
        GrassAdamW([_param(a), _param(b)]).load_state_dict(opt.state_dict())


# ------------------------------------------------------------------------------- validation
def _bad_options(**group_options):
    def build(p):
        return GrassAdamW([{"params": [p], **group_options}])

    return build


@pytest.mark.parametrize(
    "build,match",
    [
        (_bad_options(rank=0), r"Invalid rank=0: use an integer rank >= 1"),
        (_bad_options(rank=-2), r"Invalid rank=-2: use an integer rank >= 1"),
        (_bad_options(rank=2.5), r"Invalid rank=2.5"),
        (_bad_options(rank=9, proj_side="rows"), r"rank 9 is larger .*size 8.*use rank <= 8"),
        (
            _bad_options(rank=6, proj_side="cols"),
            r"rank 6 is larger .*size 5.*use rank <= 5, or proj_side='auto'",
        ),
        (_bad_options(rank=9, proj_side="auto"), r"rank 9 is larger .*size 8.*use rank <= 8\.$"),
        (_bad_options(rank=2, selection="topr"), r"Invalid selection='topr': use one of top_r"),
        (_bad_options(rank=2, update_proj_gap=0), r"Invalid update_proj_gap=0: use an integer"),
        (_bad_options(rank=2, reselect_state="drop"), r"'drop': use one of keep, reset"),
        (_bad_options(rank=2, proj_side="both"), r"'both': use one of auto, rows, cols"),
        (_bad_options(rank=2, scale=0.0), r"Invalid scale=0.0: use a positive number"),
        (lambda p: GrassAdamW([p], lr=-1.0), r"Invalid learning rate: -1.0; use lr >= 0"),
        (lambda p: GrassAdamW([p], eps=-1e-8), r"Invalid epsilon value: -1e-08; use eps >= 0"),
        (lambda p: GrassAdamW([p], betas=(1.0, 0.9)), r"Invalid betas: \(1.0, 0.9\)"),
        (lambda p: GrassAdamW([p], weight_decay=-0.1), r"Invalid weight_decay value: -0.1"),
    ],
)
def test_bad_input_raises_value_error_naming_value_and_fix(build, match):
    p = _param(torch.zeros(8, 5))
    with pytest.raises(ValueError, match=match):
        build(p)


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4, 5)])
def test_rank_group_holding_a_tensor_neither_2d_nor_3d_raises(shape):
    with pytest.raises(ValueError, match=rf"{len(shape)}-D tensor .*group without 'rank'"):
        GrassAdamW([_grass_group(_param(torch.zeros(shape)), 1)])


@pytest.mark.parametrize("value", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_zero_or_nonfinite_gradient_falls_back_to_uniform_rows(value, selection, fresh_warning):
    p = _param(torch.ones(12, 4, dtype=F64))
    opt = GrassAdamW([_grass_group(p, 3, selection=selection, proj_side="rows")])
    p.grad = torch.full((12, 4), value, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    if selection != "uniform":
        assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    rows = opt.state[p]["rows"]
    assert rows.unique().numel() == 3 and int(rows.max()) < 12
    if value == 0.0:
        assert torch.equal(p, torch.ones(12, 4, dtype=F64))  # zero gradient, no decay: no move


# -------------------------------------------------------------------- torch.optim protocol
def test_lambda_lr_scheduler_drives_the_learning_rate():
    gen = torch.Generator().manual_seed(115)
    p, b = _param(_randn(8, 4, gen=gen)), _param(_randn(4, gen=gen))
    opt = GrassAdamW([_grass_group(p, 2), {"params": [b]}], lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 2 else 0.0)
    for step in range(4):
        before = [p.detach().clone(), b.detach().clone()]
        p.grad, b.grad = _randn(8, 4, gen=gen), _randn(4, gen=gen)
        opt.step()
        sched.step()
        moved = [not torch.equal(x, y) for x, y in zip(before, [p, b], strict=True)]
        assert moved == [step < 2, step < 2]
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]


def test_cosine_scheduler_full_rank_trajectory_equals_adamw():
    gen = torch.Generator().manual_seed(116)
    w0 = _randn(6, 5, gen=gen)
    p, q = _param(w0), _param(w0)
    grass = GrassAdamW([_grass_group(p, 6, update_proj_gap=2)], lr=0.05, weight_decay=0.01)
    adamw = torch.optim.AdamW([q], lr=0.05, weight_decay=0.01)
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8) for o in (grass, adamw)]
    for _ in range(8):
        g = _randn(6, 5, gen=gen)
        p.grad, q.grad = g.clone(), g.clone()
        grass.step()
        adamw.step()
        for s in schedulers:
            s.step()
        assert grass.param_groups[0]["lr"] == adamw.param_groups[0]["lr"]
    _assert_close(p, q, 1e-10)


def test_closure_is_evaluated_and_its_loss_returned():
    torch.manual_seed(117)
    model = nn.Linear(6, 5).double()
    twin = nn.Linear(6, 5).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 6, dtype=F64), torch.randn(16, 5, dtype=F64)

    def groups(m):
        return [_grass_group(m.weight, 2, proj_side="cols"), {"params": [m.bias]}]

    opt, twin_opt = GrassAdamW(groups(model), lr=1e-2), GrassAdamW(groups(twin), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
        twin_opt.zero_grad()
        twin_loss = nn.functional.mse_loss(twin(x), y)
        twin_loss.backward()
        twin_opt.step()
        assert loss.item() == twin_loss.item()
    assert torch.equal(model.weight, twin.weight) and torch.equal(model.bias, twin.bias)


def test_zero_grad_clears_grad_and_compressed_grad():
    gen = torch.Generator().manual_seed(118)
    p, b = _param(_randn(8, 4, gen=gen)), _param(_randn(4, gen=gen))
    opt = GrassAdamW([_grass_group(p, 2), {"params": [b]}])
    p.grad, b.grad = _randn(8, 4, gen=gen), _randn(4, gen=gen)
    opt.step()
    assert p.grad is None  # the step consumes a projected weight's gradient
    p.grad, b.grad = _randn(8, 4, gen=gen), _randn(4, gen=gen)
    projection_of(p).grad = projection_of(p).compress(p.grad)
    opt.zero_grad()
    assert p.grad is None and b.grad is None and projection_of(p).grad is None
    # nothing to step on: a step is a no-op
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p, before)


def test_add_param_group_adds_a_projected_group_with_defaults():
    gen = torch.Generator().manual_seed(119)
    b, w = _param(_randn(4, gen=gen)), _param(_randn(10, 4, gen=gen))
    opt = GrassAdamW([b], lr=1e-2)
    opt.add_param_group({"params": w, "rank": 3})
    group = opt.param_groups[1]
    assert group["update_proj_gap"] == 200 and group["selection"] == "top_r"
    assert group["reselect_state"] == "keep" and group["lr"] == 1e-2
    before = w.detach().clone()
    w.grad, b.grad = _randn(10, 4, gen=gen), _randn(4, gen=gen)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (3, 4)
    assert (w != before).any(dim=1).sum() == 3


def test_add_param_group_rejects_a_bad_group_and_leaves_the_optimizer_unchanged():
    gen = torch.Generator().manual_seed(120)
    b, w = _param(_randn(4, gen=gen)), _param(_randn(10, 4, gen=gen))
    opt = GrassAdamW([b])
    with pytest.raises(ValueError, match="rank 11 is larger"):
        opt.add_param_group({"params": [w], "rank": 11, "proj_side": "rows"})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [w], "rank": 2})  # the corrected group is accepted
    w.grad = _randn(10, 4, gen=gen)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (2, 4)


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_compressed_grad_gives_the_same_step_as_the_full_grad(side):
    gen = torch.Generator().manual_seed(121)
    w0 = _randn(9, 7, gen=gen)
    full, compressed = _param(w0), _param(w0)

    def make(p):
        options = dict(selection="multinomial", update_proj_gap=2, proj_side=side)
        return GrassAdamW([_grass_group(p, 3, **options)], lr=1e-2, weight_decay=0.1)

    full_opt, compressed_opt = make(full), make(compressed)
    for _ in range(7):
        g = _randn(9, 7, gen=gen)
        full.grad = g.clone()
        full_opt.step()
        projection = projection_of(compressed)
        if projection.needs_full_gradient():
            projection.select(g)
        projection_of(compressed).grad = projection.compress(g)
        compressed_opt.step()
        compressed_opt.zero_grad()
        assert torch.equal(full, compressed)
        assert torch.equal(full_opt.state[full]["rows"], compressed_opt.state[compressed]["rows"])


def test_compressed_grad_before_selection_raises():
    gen = torch.Generator().manual_seed(122)
    p = _param(_randn(9, 4, gen=gen))
    opt = GrassAdamW([_grass_group(p, 3)])
    projection_of(p).grad = _randn(3, 4, gen=gen)
    with pytest.raises(RuntimeError, match="needs_full_gradient"):
        opt.step()


def test_torch_compiled_model_trains():
    # The inductor backend needs ~80 s to compile even this model on a 2-core CPU; aot_eager
    # still traces forward and backward through AOTAutograd in about a second.
    torch.manual_seed(123)
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    compiled = torch.compile(model, backend="aot_eager")
    groups = grass_param_groups(model, rank=8, update_proj_gap=10, selection="multinomial")
    opt = GrassAdamW(groups, lr=1e-2)
    x = torch.randn(64, 8)
    y = torch.sin(x[:, :4]) + 0.5 * x[:, 4:]
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    assert all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------------------- precision
def test_bfloat16_step_matches_float32_within_bf16_tolerance(device):
    gen = torch.Generator().manual_seed(124)
    w0 = _randn(16, 12, gen=gen, device=device).bfloat16().float()  # representable in bf16
    b0 = _randn(12, gen=gen, device=device).bfloat16().float()
    row_scale = torch.linspace(1, 4, 16, dtype=F64)[:, None].to(device)  # well separated norms
    grads = [
        (
            (_randn(16, 12, gen=gen, device=device) * row_scale).bfloat16().float(),
            _randn(12, gen=gen, device=device).bfloat16().float(),
        )
        for _ in range(3)
    ]
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        w, b = _param(w0.to(dtype)), _param(b0.to(dtype))
        opt = GrassAdamW(
            [_grass_group(w, 5, proj_side="rows", update_proj_gap=2), {"params": [b]}],
            lr=0.05,
            weight_decay=0.1,
        )
        for gw, gb in grads:
            w.grad, b.grad = gw.to(dtype), gb.to(dtype)
            opt.step()
        assert w.dtype == dtype and opt.state[w]["exp_avg"].dtype == dtype
        results[dtype] = (w.float(), b.float(), opt.state[w]["rows"])
    (w32, b32, rows32), (w16, b16, rows16) = results[torch.float32], results[torch.bfloat16]
    assert torch.equal(rows32, rows16)
    # a few bf16 roundings of |w| <~ 4 (ulp 2^-6 at most) over 3 steps; the moves are ~0.15
    _assert_close(w16, w32, 3e-2)
    _assert_close(b16, b32, 3e-2)
    assert float((w32 - w0).detach().abs().max()) > 0.1


def test_state_dtype_float32_keeps_fp32_moments_with_bf16_params():
    gen = torch.Generator().manual_seed(125)
    w, b = _param(_randn(10, 6, gen=gen).bfloat16()), _param(_randn(6, gen=gen).bfloat16())
    opt = GrassAdamW(
        [_grass_group(w, 3, update_proj_gap=2), {"params": [b]}], state_dtype=torch.float32
    )
    for _ in range(3):
        w.grad, b.grad = _randn(10, 6, gen=gen).bfloat16(), _randn(6, gen=gen).bfloat16()
        opt.step()
    for p in (w, b):
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        assert opt.state[p]["exp_avg_sq"].dtype == torch.float32
    fresh = [_param(w), _param(b)]
    restored = GrassAdamW(
        [_grass_group(fresh[0], 3, update_proj_gap=2), {"params": [fresh[1]]}],
        state_dtype=torch.float32,
    )
    restored.load_state_dict(_round_trip(opt.state_dict()))
    assert restored.state[fresh[0]]["exp_avg"].dtype == torch.float32
    assert restored.param_groups[0]["state_dtype"] == torch.float32


@pytest.mark.parametrize("projected", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(sign, projected):
    """An update of 0.3 ulp: round-to-nearest loses it, stochastic rounding keeps it on average.

    The first Adam step with eps = 0 moves every entry by exactly lr; each entry then rounds up
    with probability 0.3, so the fraction that moved is within 5 binomial standard errors of 0.3.
    """
    torch.manual_seed(126)
    n = 128
    start = sign * 1.0
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    results = {}
    for stochastic in (False, True):
        p = _param(torch.full((n, n), start, dtype=torch.bfloat16))
        group = _grass_group(p, n, proj_side="rows") if projected else {"params": [p]}
        opt = GrassAdamW([group], lr=0.3 * ulp, eps=0.0, stochastic_rounding=stochastic)
        p.grad = torch.full((n, n), -sign, dtype=torch.bfloat16)  # moves away from zero
        opt.step()
        results[stochastic] = p.detach().double()
    assert torch.equal(results[False], torch.full((n, n), start, dtype=F64))
    moved = (results[True] - start) * sign / ulp
    assert set(moved.unique().tolist()) <= {0.0, 1.0}
    fraction, draws = float(moved.mean()), n * n
    standard_error = math.sqrt(0.3 * 0.7 / draws)
    assert abs(fraction - 0.3) <= 5 * standard_error, fraction


# --------------------------------------------------------------------------- param groups
class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.mlp = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)


class _TinyLM(nn.Module):
    def __init__(self, vocab=32, d=8):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([_Block(d) for _ in range(2)])
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied


def _group_names(model, groups):
    names = {id(p): n for n, p in model.named_parameters()}
    projected = [names[id(p)] for g in groups if "rank" in g for p in g["params"]]
    plain = [names[id(p)] for g in groups if "rank" not in g for p in g["params"]]
    return sorted(projected), sorted(plain)


def _assert_every_parameter_once(model, groups):
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_all_linear_projects_linear_weights_but_not_lm_head_or_embeddings():
    model = _TinyLM()
    groups = grass_param_groups(model, rank=4, update_proj_gap=7)
    projected, plain = _group_names(model, groups)
    assert projected == sorted(
        f"layers.{i}.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj", "mlp")
    )
    assert "embed_tokens.weight" in plain and "layers.0.q_proj.bias" in plain
    _assert_every_parameter_once(model, groups)
    (grass_group,) = [g for g in groups if "rank" in g]
    assert grass_group["rank"] == 4 and grass_group["update_proj_gap"] == 7
    assert "lm_head" not in match_target_modules(model, "all-linear")


def test_target_modules_by_names_and_by_regex():
    model = _TinyLM()
    projected, _ = _group_names(model, grass_param_groups(model, 2, ["q_proj"]))
    assert projected == ["layers.0.q_proj.weight", "layers.1.q_proj.weight"]
    projected, _ = _group_names(model, grass_param_groups(model, 2, r"layers\.1\.(q|v)_proj"))
    assert projected == ["layers.1.q_proj.weight", "layers.1.v_proj.weight"]
    projected, _ = _group_names(model, grass_param_groups(model, 2, ["layers.0.mlp"]))
    assert projected == ["layers.0.mlp.weight"]


def test_tied_weight_appears_once_when_its_lm_head_is_targeted():
    model = _TinyLM()
    groups = grass_param_groups(model, 4, ["lm_head", "q_proj"])
    _assert_every_parameter_once(model, groups)
    projected, plain = _group_names(model, groups)
    assert "embed_tokens.weight" in projected and "embed_tokens.weight" not in plain
    opt = GrassAdamW(groups)  # and the optimizer accepts the groups
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.lm_head.weight]["exp_avg"].shape == (4, 8)


def test_no_decay_parameters_get_zero_weight_decay():
    model = _TinyLM()
    no_decay = ["layers.0.q_proj.bias", "layers.0.norm.weight", "layers.1.q_proj.weight"]
    groups = grass_param_groups(model, 2, "all-linear", weight_decay=0.1, no_decay=no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for p in group["params"]:
            expected = 0.0 if names[id(p)] in no_decay else 0.1
            assert group["weight_decay"] == expected, names[id(p)]
    assert any("rank" in g and g["weight_decay"] == 0.0 for g in groups)  # projected, no decay
    _assert_every_parameter_once(model, groups)


@pytest.mark.parametrize(
    "target,match",
    [
        (["k_proj"], r"\['k_proj'\] match no module"),
        (r"layers\.9\..*", r"matches no module"),
        (["norm"], r"LayerNorm; Grass projects the weights of nn.Linear"),
        (r"layers", r"ModuleList; Grass projects the weights of nn.Linear"),
        ([], r"target_modules is empty"),
    ],
)
def test_target_modules_matching_nothing_or_a_non_linear_raises(target, match):
    with pytest.raises(ValueError, match=match):
        grass_param_groups(_TinyLM(), 2, target)


def test_parameters_replaced_before_the_first_step_are_followed():
    """A wrapper that swaps the weights in param_groups (accelerate's FSDP2 preparation) before
    training: the step updates and projects the new tensors; after training starts it refuses."""
    gen = torch.Generator().manual_seed(0)
    old = _param(_randn(6, 4, gen=gen))
    initial = old.detach().clone()
    opt = GrassAdamW([dict(params=[old], rank=2)], lr=0.1)
    new = _param(old.detach().clone())
    opt.param_groups[0]["params"] = [new]
    new.grad = _randn(6, 4, gen=gen)
    reference = _param(old.detach().clone())
    ref_opt = GrassAdamW([dict(params=[reference], rank=2)], lr=0.1)
    reference.grad = new.grad.clone()
    opt.step()
    ref_opt.step()
    assert projection_of(new) is not None and new in opt.state and old not in opt.state
    torch.testing.assert_close(new, reference, rtol=0, atol=0)
    assert torch.equal(old, initial) and not torch.equal(new, initial)
    opt.param_groups[0]["params"] = [old]
    with pytest.raises(RuntimeError, match="replaced after its first step"):
        opt.step()


# ---- the implementation setting ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "implementation"),
    [
        (dict(foreach=False), "reference"),
        (dict(batched=False), "foreach"),
        (dict(compiled=True), "compiled"),
        (dict(foreach=True, batched=True), "grouped"),
        ({}, "grouped"),
    ],
)
def test_the_older_flags_choose_the_implementation(flags, implementation):
    p = _param(torch.zeros(6, 4))
    opt = GrassAdamW([_grass_group(p, 2)], **flags)
    assert opt.param_groups[0]["implementation"] == implementation
    assert not {"foreach", "batched", "compiled"} & set(opt.param_groups[0])
    group_opt = GrassAdamW([{**_grass_group(_param(torch.zeros(6, 4)), 2), **flags}])
    assert group_opt.param_groups[0]["implementation"] == implementation


def test_an_implementation_that_contradicts_the_flags_or_cannot_run_is_refused():
    p = _param(torch.zeros(6, 4))
    with pytest.raises(ValueError, match="choose different implementations"):
        GrassAdamW([_grass_group(p, 2)], implementation="grouped", foreach=False)
    with pytest.raises(ValueError, match="Unknown implementation|Invalid implementation"):
        GrassAdamW([_grass_group(p, 2)], implementation="fast")
    if not torch.cuda.is_available():  # the CPU without Triton's interpreter: no device for it
        with pytest.raises(ValueError, match="implementation='triton' needs Triton"):
            GrassAdamW([_grass_group(p, 2)], implementation="triton")


def test_a_checkpoint_with_the_older_flags_resumes_with_this_runs_implementation():
    """Checkpoints of hf-grass 0.2 hold foreach/batched/compiled in their groups: they load, the
    run's own implementation applies and the older keys are gone."""
    torch.manual_seed(0)
    p = _param(torch.randn(6, 4))
    opt = GrassAdamW([_grass_group(p, 2)])
    p.grad = torch.randn(6, 4)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["implementation"]
        group.update(foreach=True, batched=True, compiled=True)
    resumed = GrassAdamW([_grass_group(p, 2)], implementation="reference")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["implementation"] == "reference"
    assert not {"foreach", "batched", "compiled"} & set(resumed.param_groups[0])
