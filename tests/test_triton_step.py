"""The fused Triton step (``hf_grass.triton_step``) equals the reference step.

Every test runs the kernel and ``functional._single_tensor_grass_adamw`` on copies of the same
random inputs. With a GPU the compiled kernel runs on CUDA tensors. Without one the kernel runs in
Triton's interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1`` before Triton itself is
imported (Triton's own helper kernels are built at its import, and only interpreted ones can be
called by an interpreted kernel): ``test_in_the_interpreter`` runs this file in a subprocess with
it set, so that the rest of a test session keeps Triton's compiler; ``TRITON_INTERPRET=1 pytest
tests/test_triton_step.py`` shows the tests one by one.

Tolerances. Step counts and moments are computed with the reference's roundings (its ``lerp`` and
``addcmul`` are fused multiply-adds on CPU and GPU, and so are the kernel's): counts are compared
exactly, moments to four units in the last place of their dtype at the size of their operands
(``m + w (g - m)`` cancels where g and m nearly do, so a torch build whose kernel rounds
otherwise, torch 2.14's CPU kernels among them, differs by an ulp or two of the operands: many
ulps of the result). The direction ``m / bc1 / (sqrt(v) / sqrt(bc2) + eps)`` is correctly
rounded op by op in the kernel, while torch's CPU ``sqrt`` and ``pow`` are SIMD approximations
within one ulp: each costs a few ulp of relative error, except ``pow`` in ``bc2 = 1 - b2^t``,
where one ulp of ``b2^t`` (2^-24) is a relative error of 2^-24 / bc2 in bc2 (cancellation), half
of that after the square root: below 2e-5 for ``b2 = 0.999`` and t >= 2, and t = 1 is exact
(``b^1 = b``). So an update may differ by a relative ``UPDATE_RTOL = 1e-4`` and a weight by that
plus one ulp of its dtype (a rounding that goes the other way). Rows that are not selected stay
bit for bit. A wrong factor, bias correction or decay moves the updates by percents, far beyond.
Tensors the kernel does not take (float64, dense) fall back to ``_grouped_grass_adamw``, which
equals the reference bit for bit.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (pip install -e '.[dev]')")

from hf_grass import triton_step  # noqa: E402
from hf_grass.functional import _single_tensor_grass_adamw  # noqa: E402

UPDATE_RTOL = 1e-4
HP = dict(beta1=0.9, beta2=0.999, lr=2e-2, eps=1e-8, scale=0.7)
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda" if torch.cuda.is_available() else None


@pytest.fixture
def impl():
    """(module, device): the kernel's module and the device of its tensors."""
    if DEVICE is None:
        pytest.skip("no GPU: runs in Triton's interpreter, in test_in_the_interpreter")
    if INTERPRETED and not triton_step._interpreted():
        pytest.skip("TRITON_INTERPRET=1 was set after Triton was imported")
    return triton_step, torch.device(DEVICE)


@pytest.fixture
def fused(impl, monkeypatch):
    """The kernel, which must not fall back: a silent fallback would pass every comparison."""
    module, device = impl

    def no_fallback(params, *args, **kwargs):
        assert not params, f"{len(params)} tensors fell back"

    monkeypatch.setattr(module, "_grouped_grass_adamw", no_fallback)
    return module.triton_grass_adamw, device


def _problem(shapes, dtype, state_dtype, device, gen, repeats=False, transposed=()):
    """Inputs for projected weights of ``shapes`` ((m, k, r) each): weights, compressed
    gradients, moments, per-row counts (0 to 4, so bias corrections differ by row), sorted rows
    (drawn with replacement and at least one drawn twice if ``repeats``) and scales rho. The
    weights numbered in ``transposed`` are ``W.t()`` views of a (k, m) tensor."""
    params, grads, ms, vs, steps, rows, rhos = [], [], [], [], [], [], []
    for i, (m, k, r) in enumerate(shapes):
        if i in transposed:
            w = torch.randn(k, m, generator=gen).to(dtype).t()
        else:
            w = torch.randn(m, k, generator=gen).to(dtype)
        params.append(w)
        if repeats:
            index = torch.randint(0, m, (r,), generator=gen)
            index[-1] = index[0]
        else:
            index = torch.randperm(m, generator=gen)[:r]
        rows.append(index.sort().values)
        rhos.append(torch.rand(r, generator=gen) + 0.5)
        grads.append(torch.randn(r, k, generator=gen))
        ms.append((torch.randn(r, k, generator=gen) * 0.1).to(state_dtype))
        vs.append((torch.rand(r, k, generator=gen) * 0.01).to(state_dtype))
        steps.append(torch.randint(0, 5, (r,), generator=gen).float())
    lists = params, grads, ms, vs, steps, rows, rhos
    return [[t.to(device) for t in seq] for seq in lists]


def _clone(problem):
    """A deep copy (a transposed weight stays a transposed view of its own copy)."""
    params, *rest = problem
    params = [p.clone() if p.is_contiguous() else p.t().clone().t() for p in params]
    return [params, *[[None if t is None else t.clone() for t in seq] for seq in rest]]


def _step(fn, problem, steps=1, **hp):
    params, grads, ms, vs, counts, rows, rhos = problem
    hp = {**HP, "weight_decay": 0.0, "stochastic_rounding": False, **hp}
    for _ in range(steps):
        fn(params, grads, ms, vs, counts, rows, rhos, [None] * len(params), **hp)
    return problem


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at ``x`` (normal numbers), as float64."""
    exponent = torch.frexp(x.double().abs().clamp(min=torch.finfo(dtype).tiny)).exponent
    return torch.finfo(dtype).eps * torch.exp2(exponent.double() - 1)


def _assert_within_ulp(
    out: torch.Tensor, ref: torch.Tensor, ulps: int = 1, scale: torch.Tensor | None = None
) -> None:
    """|out - ref| within ``ulps`` units in the last place of ``ref``'s dtype at ``scale``
    (default: at ``ref``)."""
    assert out.dtype == ref.dtype
    gap = (out.double() - ref.double()).abs()
    bad = gap > ulps * _ulp(ref if scale is None else scale, ref.dtype)
    assert not bad.any(), f"{int(bad.sum())} values beyond {ulps} ulp; worst gap {gap.max()}"


def _assert_weights_close(out, ref, before, lr, weight_decay, rows) -> None:
    """|out - ref| <= UPDATE_RTOL |update| + one ulp of the weight's dtype, where the update is
    bounded by the reference's change plus the decay; unselected rows exactly unchanged."""
    out64, ref64, before64 = out.double(), ref.double(), before.double()
    update = (ref64 - before64).abs() + before64.abs() * lr * weight_decay
    bound = UPDATE_RTOL * update + _ulp(ref, ref.dtype)
    gap = (out64 - ref64).abs()
    assert (gap <= bound).all(), f"{int((gap > bound).sum())} weights off; worst gap {gap.max()}"
    untouched = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
    untouched[rows] = False
    assert torch.equal(out[untouched], before[untouched])


def _compare(fn, problem, steps=1, **hp):
    """Step copies of ``problem`` with ``fn`` and with the reference; compare as documented."""
    before = _clone(problem)
    ref = _step(_single_tensor_grass_adamw, _clone(problem), steps, **hp)
    out = _step(fn, _clone(problem), steps, **hp)
    lr = hp.get("lr", HP["lr"]) * steps
    for i, row_index in enumerate(problem[5]):
        _assert_weights_close(
            out[0][i], ref[0][i], before[0][i], lr, hp.get("weight_decay", 0.0), row_index
        )
        # Moments: m + w (g - m) and b2 v + (1 - b2) g^2 cancel where g and m (or the terms)
        # nearly cancel, so a rounding that goes the other way (a torch build whose CPU kernel
        # rounds otherwise) is an ulp or two of the operands, not of the result.
        grad = before[1][i].double().abs()
        m_scale = torch.maximum(before[2][i].double().abs(), grad)
        v_scale = torch.maximum(before[3][i].double().abs(), grad.square())
        _assert_within_ulp(
            out[2][i], ref[2][i], 2, torch.maximum(m_scale, ref[2][i].double().abs())
        )
        _assert_within_ulp(
            out[3][i], ref[3][i], 2, torch.maximum(v_scale, ref[3][i].double().abs())
        )
        assert torch.equal(out[4][i], ref[4][i])  # step counts
    # The reference must have moved the selected rows: the comparison is not vacuous.
    assert any(not torch.equal(a, b) for a, b in zip(ref[0], before[0], strict=True))


DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype,state_dtype", DTYPES, ids=["fp32", "bf16", "bf16-state", "fp16"])
def test_batch_equals_the_reference(fused, dtype, state_dtype, weight_decay):
    """Three weights of one compressed shape (different m, one a transposed view, different
    rows) in one launch, for each weight and state dtype; two steps with float32 moments (bf16
    ones: one, as a moment whose rounding went the other way changes the next step by 2^-8)."""
    fn, device = fused
    gen = torch.Generator().manual_seed(1)
    shapes = [(12, 40, 5), (20, 40, 5), (9, 40, 5)]
    problem = _problem(shapes, dtype, state_dtype, device, gen, transposed=(2,))
    steps = 2 if state_dtype == torch.float32 else 1
    _compare(fn, problem, steps=steps, weight_decay=weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_repeated_rows_get_the_sum_of_their_updates(fused, dtype, weight_decay):
    """Rows drawn twice (multinomial with replacement), in a plain and a transposed weight."""
    fn, device = fused
    gen = torch.Generator().manual_seed(2)
    problem = _problem([(6, 24, 6), (7, 24, 6)], dtype, torch.float32, device, gen, True, (1,))
    assert any(r.unique().numel() < r.numel() for r in problem[5])
    _compare(fn, problem, weight_decay=weight_decay)


@pytest.mark.parametrize(
    "shape",
    [(9, 17, 1), (6, 11, 6), (5, 1030, 2)],
    ids=["r=1", "r=m", "k over one block"],
)
def test_odd_shapes_equal_the_reference(fused, shape):
    """One row; every row (r = m); k = 1030, past the 1024-column block and not a multiple."""
    fn, device = fused
    gen = torch.Generator().manual_seed(3)
    problem = _problem([shape], torch.float32, torch.float32, device, gen)
    m, _, r = shape
    if r == m:
        assert torch.equal(problem[5][0], torch.arange(m, device=device))
    _compare(fn, problem, weight_decay=0.1)


def test_large_lerp_weight_and_scale_equal_the_reference(fused):
    """beta1 < 0.5 takes torch's other lerp formula; any scale multiplies the update."""
    fn, device = fused
    gen = torch.Generator().manual_seed(4)
    problem = _problem([(8, 16, 4)], torch.float32, torch.float32, device, gen, transposed=(0,))
    _compare(fn, problem, beta1=0.3, scale=2.5, weight_decay=0.05)


def test_stochastic_rounding_is_unbiased(fused):
    """bf16 weights rounded stochastically: each value is one of the two bf16 neighbours of the
    float32 result, and over many draws the mean equals it.

    ``N = 64`` identical weights in one launch are 64 independent draws (the noise depends on
    the weight's position in the batch). A value rounds up with probability ``p`` (its float32
    distance to the lower neighbour, in ulps), so ``(mean - x) / ulp`` averages N variables in
    [-1, 1] with mean 0: by Hoeffding, ``P(|.| >= 0.35) <= 2 exp(-2 N 0.35^2) < 2e-7`` per value,
    and over all ``N E`` draws ``P(|average| >= 0.01) <= 2 exp(-2 N E 1e-4) < 1e-11``. Always
    rounding to nearest would miss the first bound wherever 0.35 < p < 0.65.
    """
    fn, device = fused
    copies, m, k, r = 64, 6, 1024, 2
    gen = torch.Generator().manual_seed(5)
    (w,), (grad,), (m1,), (v1,), (count,), (rows,), (rho,) = _problem(
        [(m, k, r)], torch.bfloat16, torch.float32, device, gen
    )
    hp = dict(lr=5e-3, weight_decay=0.1)
    # The float32 result: the reference on a float32 copy of the (bf16-valued) weight.
    exact = [[w.float()], [grad], [m1.clone()], [v1.clone()], [count.clone()], [rows], [rho]]
    x = _step(_single_tensor_grass_adamw, exact, **hp)[0][0][rows].double()
    batch = [
        [w.clone() for _ in range(copies)],
        *[[t.clone() for _ in range(copies)] for t in (grad, m1, v1, count, rows, rho)],
    ]
    torch.manual_seed(0)
    _step(fn, batch, stochastic_rounding=True, **hp)
    draws = torch.stack([p[rows].double() for p in batch[0]])  # N x r x k
    ulp = _ulp(x, torch.bfloat16)
    # x itself may differ from the kernel's float32 value by UPDATE_RTOL of the update.
    slack = UPDATE_RTOL * (x - w[rows].double()).abs() + _ulp(x, torch.float32)
    assert ((draws - x).abs() <= ulp + slack).all(), "a value is not a bf16 neighbour"
    assert (draws != draws[0]).any(), "no noise"
    normalized = (draws.mean(0) - x) / ulp
    assert normalized.abs().max() < 0.35 + (slack / ulp).max()
    assert normalized.mean().abs() < 0.01 + (slack / ulp).max()
    # Moments and counts do not depend on the noise.
    scale = torch.maximum(m1.double().abs(), grad.double().abs())  # see _compare
    for i in range(copies):
        _assert_within_ulp(batch[2][i], exact[2][0], 4, torch.maximum(scale, exact[2][0].abs()))
        assert torch.equal(batch[4][i], exact[4][0])


def test_repeated_rows_round_their_sum_stochastically(fused):
    """A row drawn twice gets both updates, then one stochastic rounding: its value is a bf16
    neighbour of the float32 reference (updates here are several bf16 ulps: a missing one or a
    double rounding would land farther)."""
    fn, device = fused
    gen = torch.Generator().manual_seed(6)
    problem = _problem([(4, 64, 6)], torch.bfloat16, torch.float32, device, gen, repeats=True)
    hp = dict(lr=5e-2, weight_decay=0.1)
    rows = problem[5][0]
    exact = _clone(problem)
    exact[0] = [exact[0][0].float()]
    x = _step(_single_tensor_grass_adamw, exact, **hp)[0][0][rows].double()
    torch.manual_seed(0)
    out = _step(fn, problem, stochastic_rounding=True, **hp)[0][0][rows].double()
    slack = UPDATE_RTOL * (x - problem[0][0][rows].double()).abs() + _ulp(x, torch.float32)
    assert ((out - x).abs() <= _ulp(x, torch.bfloat16) + slack).all()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fallbacks_equal_the_reference(impl, monkeypatch, weight_decay):
    """float64 weights and dense parameters go to ``_grouped_grass_adamw`` (bit for bit the
    reference), float32 projected ones in the same call to the kernel (within the tolerances)."""
    module, device = impl
    gen = torch.Generator().manual_seed(7)
    f64 = _problem([(8, 12, 3), (9, 12, 3)], torch.float64, torch.float64, device, gen)
    f32 = _problem([(8, 12, 3)], torch.float32, torch.float32, device, gen)
    dense = [
        [torch.randn(5, generator=gen).to(device)],
        [torch.randn(5, generator=gen).to(device)],
        [torch.zeros(5, device=device)],
        [torch.zeros(5, device=device)],
        [torch.tensor(0.0, device=device)],
        [None],
        [None],
    ]
    problem = [a + b + c for a, b, c in zip(f64, dense, f32, strict=True)]
    launched = []
    launch = module._launch
    monkeypatch.setattr(module, "_launch", lambda batch, *a, **kw: launched.append(batch))
    _step(module.triton_grass_adamw, _clone(problem), weight_decay=weight_decay)
    assert [len(batch) for batch in launched] == [1]  # only the float32 projected weight
    assert launched[0][0][0].dtype == torch.float32
    monkeypatch.setattr(module, "_launch", launch)

    ref = _step(_single_tensor_grass_adamw, _clone(problem), weight_decay=weight_decay)
    out = _step(module.triton_grass_adamw, _clone(problem), weight_decay=weight_decay)
    for kind_ref, kind_out in zip(ref[:5], out[:5], strict=True):
        for a, b in zip(kind_ref[:3], kind_out[:3], strict=True):  # float64 and dense
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    _assert_weights_close(
        out[0][3], ref[0][3], problem[0][3], HP["lr"], weight_decay, problem[5][3]
    )


def test_empty_lists_do_nothing(impl):
    module, _ = impl
    _step(module.triton_grass_adamw, [[]] * 7)


def test_available_where_the_kernel_runs(impl):
    module, device = impl
    assert module.triton_available()
    assert module._runs_on(device)
    assert not module._runs_on(torch.device("meta"))


def test_grass_adamw_with_the_triton_implementation_trains_as_the_grouped_step(impl):
    """``GrassAdamW(implementation="triton")`` on a grassified tiny LLaMA (float32, compressed
    backward, re-selections) follows the default grouped step within the stated tolerance; the
    kernel, not a fallback, steps every projected weight."""
    import copy

    from conftest import tiny_llama

    from hf_grass import GrassAdamW, grassify

    module, device = impl
    reference = tiny_llama(seed=0, vocab_size=64).to(device)
    model = copy.deepcopy(reference)
    opts = [
        GrassAdamW(grassify(m, rank=4, update_proj_gap=2), lr=1e-2, implementation=name)
        for m, name in ((reference, "grouped"), (model, "triton"))
    ]
    calls = []
    kernel = module._launch
    module._launch = lambda *a, **k: (calls.append(1), kernel(*a, **k))
    try:
        for step in range(3):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            for m, opt in zip((reference, model), opts, strict=True):
                m(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
                opt.step()
                opt.zero_grad()
    finally:
        module._launch = kernel
    assert len(calls) >= 3  # one launch per batch and step
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_layerwise_updates_take_one_launch_per_weight(impl):
    """Layer-wise mode with ``implementation="triton"``: each projected weight is updated inside
    the backward by one kernel launch, and the run follows ordinary grouped steps."""
    import copy

    from conftest import tiny_llama

    from hf_grass import GrassAdamW, enable_layerwise, grassify

    module, device = impl
    reference = tiny_llama(seed=0, vocab_size=64).to(device)
    model = copy.deepcopy(reference)
    ref_opt = GrassAdamW(grassify(reference, rank=4, update_proj_gap=2), lr=1e-2)
    groups = grassify(model, rank=4, update_proj_gap=2)
    projected = sum(len(g["params"]) for g in groups if "rank" in g)
    opt = GrassAdamW(groups, lr=1e-2, implementation="triton")
    enable_layerwise(opt, model)
    calls = []
    kernel = module._launch
    module._launch = lambda *a, **k: (calls.append(len(a[0])), kernel(*a, **k))
    try:
        for step in range(3):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            for m, o in ((reference, ref_opt), (model, opt)):
                m(input_ids=ids.to(device), labels=ids.to(device)).loss.backward()
                o.step()
                o.zero_grad()
    finally:
        module._launch = kernel
    assert calls == [1] * (3 * projected)  # one weight per launch, every weight every step
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter's run")
def test_in_the_interpreter():
    """This file's tests, on CPU tensors, in a subprocess with ``TRITON_INTERPRET=1``."""
    from conftest import run_bounded

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    done = run_bounded(cmd, env, timeout=600)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert " passed" in done.stdout and " failed" not in done.stdout, tail


def test_kernel_compiles_for_a_gpu():
    """The compiled path (libdevice ``pow``, the launch options) builds for sm_90 without a GPU:
    Triton's own ptxas turns it into a cubin. Stochastic bf16 weights with bf16 moments."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    if triton_step._interpreted():
        pytest.skip("the kernel was built for the interpreter")
    kernel = triton_step._grass_adamw_kernel
    pointers = ["*bf16", "*fp32", "*bf16", "*bf16", "*fp32", "*i64", "*fp32", "*i64", "*i64"]
    constants = dict(LERP_SMALL=True, SUM_FIRST=True, STOCHASTIC=True, INTERPRETER=False)
    constants["BLOCK_K"] = 1024
    types = pointers + ["i32"] * 2 + ["fp32"] * 9 + ["constexpr"] * len(constants)
    signature = dict(zip(kernel.arg_names, types, strict=True))
    index = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=index)
    try:
        binary = compile(
            source,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4, "enable_fp_fusion": False},
        )
    except RuntimeError as error:  # no ptxas in this Triton build
        if "ptxas" not in str(error):
            raise
        pytest.skip(f"cannot assemble for sm_90 here: {error}")
    ptx = binary.asm["ptx"]
    # Correctly rounded division and square root, as torch's kernels (not the approximations).
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    assert "div.full.f32" not in ptx and "sqrt.approx" not in ptx
    assert binary.asm["cubin"][:4] == b"\x7fELF"
