"""Grass's Adam step for a batch of projected weights as one fused Triton kernel.

For a weight ``W`` (m x k, oriented), its selection ``(rows, rho)`` (r sorted int64 rows, float32
scales), compressed gradient ``C`` (r x k), moments ``m, v`` (r x k, any float dtype) and per-row
step counts ``t`` (float32, r), the step is the reference's
(:func:`hf_grass.functional._single_tensor_grass_adamw`), in its order::

    t += 1
    m = lerp(m, C, 1 - b1)                         # stored back in the moments' dtype
    v = b2 v + (1 - b2) C²
    D = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)
    W[rows] = round(W[rows] * (1 - lr wd) + (-lr scale) rho[:, None] D)

where a row drawn twice gets the sum of its updates and ``round`` casts float32 to ``W``'s dtype
(to bf16 stochastically when asked: uniform 16-bit noise added to the float32 bit pattern, which
is then truncated, as :func:`hf_grass.functional.round_to` does).

What is fused: the default step (``_grouped_grass_adamw``) stacks a batch into float32 (G, r, k)
copies of the gradient and the moments, runs the arithmetic as a dozen kernels over them, copies
the moments back and gathers and scatters each weight's rows (two kernels per weight). Here one
launch per batch of weights that share (r, k) and dtypes does it all: one program per (weight,
row position) reads that row of ``W`` through its row index and its own strides (``W.t()`` is a
view, not a copy), the moments, the gradient and the step count, updates them in place, and
writes the row of ``W`` back; nothing of batch size is allocated. The weights of a batch live in
separate tensors: the kernel gets the first tensor of each kind as a typed pointer and a small
int64 table (cached) with every weight's element offsets from it and its strides. A run of equal
rows (sorted, so adjacent) is handled by the program of its first position, which sums the run's
updates and writes the row once (the others only count the run and stop), so repeats need no
atomics and share one draw of rounding noise, as in the reference.

Arithmetic is float32 with the reference's roundings: ``lerp`` and ``addcmul`` as fused
multiply-adds (as torch's CPU and CUDA kernels compute them), divisions and square roots correctly
rounded (``div_rn``, ``sqrt_rn``; Triton's plain ``/`` and ``sqrt`` are approximations on a GPU),
no other contraction (``enable_fp_fusion=False``), hyper-parameters rounded to float32 as torch
rounds Python scalars, results rounded to nearest even. ``b^t`` is libdevice's ``pow`` on a GPU
(CUDA's ``powf``, as in torch's CUDA kernel); the interpreter has no libdevice, so there it is
``exp2(t log2 b)`` in float64, rounded to float32. Torch's CPU ``sqrt`` and ``pow`` are SIMD
approximations within one ulp, so on a CPU the two differ by a few ulp (see the tests).

What falls back to ``_grouped_grass_adamw``, with the same arguments: dense tensors
(``rows=None``: no rows to gather, and torch's foreach kernels step them), sparse gradients,
weights that are not 2-D (3-D expert weights with flat row indices), float64 weights (the kernel
computes in float32, and Triton passes Python floats as float32), step counts that are not one
float32 count per row, empty tensors, and tensors on a device the kernel cannot run on. On a GPU
the kernel is compiled; with ``TRITON_INTERPRET=1`` set before Triton is imported, it runs in
Triton's interpreter on CPU tensors only (for tests). Rows must be sorted, as the contract says:
unsorted repeats would be written by two programs at once.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import Tensor

from hf_grass.functional import _grouped_grass_adamw, compute_dtype, register_implementation

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the optimizer works without Triton: every tensor falls back
    triton = None

__all__ = ["triton_available", "triton_grass_adamw"]

logger = logging.getLogger(__name__)

# Columns of the per-weight table: element offsets from the batch's first tensors, and strides.
_TABLE_COLUMNS = 18
# Widest block of columns one program processes at a time (it loops over the rest of k).
_MAX_BLOCK_K = 1024

if triton is not None:

    @triton.jit
    def _round(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
        """float32 ``x`` to ``dtype``, to nearest even. The interpreter truncates to bf16, so
        there the rounding is done on the bit pattern (as torch's conversion does)."""
        if INTERPRETER and dtype == tl.bfloat16:
            bits = x.to(tl.int32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            x = (bits & -65536).to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _grass_adamw_kernel(
        param_ptr,  # first weight of the batch (m x k view): the others are at offsets from it
        grad_ptr,
        exp_avg_ptr,
        exp_avg_sq_ptr,
        step_ptr,
        row_ptr,
        rho_ptr,
        table_ptr,  # int64 (G, _TABLE_COLUMNS)
        seed_ptr,  # int64 scalar, read only with STOCHASTIC
        R,
        K,
        lerp_coeff,  # 1 - b1, or (1 - b1) - 1 when the weight is large (torch's lerp)
        beta1,
        beta2,
        log2_beta1,  # float64 log2(b) in the interpreter (its Python floats stay float64)
        log2_beta2,
        one_minus_beta2,
        eps,
        neg_lr_scale,
        decay,
        LERP_SMALL: tl.constexpr,
        SUM_FIRST: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        INTERPRETER: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        g = pid // R  # weight of the batch
        j = pid % R  # row position in its selection
        entry = table_ptr + g * 18  # _TABLE_COLUMNS
        param = param_ptr + tl.load(entry + 0)
        p_s0 = tl.load(entry + 1)
        p_s1 = tl.load(entry + 2)
        grad = grad_ptr + tl.load(entry + 3)
        g_s0 = tl.load(entry + 4)
        g_s1 = tl.load(entry + 5)
        exp_avg = exp_avg_ptr + tl.load(entry + 6)
        m_s0 = tl.load(entry + 7)
        m_s1 = tl.load(entry + 8)
        exp_avg_sq = exp_avg_sq_ptr + tl.load(entry + 9)
        v_s0 = tl.load(entry + 10)
        v_s1 = tl.load(entry + 11)
        step = step_ptr + tl.load(entry + 12)
        t_s = tl.load(entry + 13)
        rows = row_ptr + tl.load(entry + 14)
        r_s = tl.load(entry + 15)
        rho = rho_ptr + tl.load(entry + 16)
        rho_s = tl.load(entry + 17)

        # Rows are sorted: equal rows are adjacent. The first position of a run does the run.
        row = tl.load(rows + j * r_s)
        previous = tl.load(rows + (j - 1) * r_s, mask=j > 0, other=-1)
        first = previous != row
        run = j - j + 1
        following = tl.load(rows + (j + 1) * r_s, mask=j + 1 < R, other=-1)
        while following == row:
            run += 1
            following = tl.load(rows + (j + run) * r_s, mask=j + run < R, other=-1)
        run = tl.where(first, run, 0)
        k_end = tl.where(first, K, 0)

        if STOCHASTIC:
            seed = tl.load(seed_ptr)
        w_row = param + row * p_s0
        for start in range(0, k_end, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            mask = cols < K
            w = tl.load(w_row + cols * p_s1, mask=mask, other=0.0).to(tl.float32)
            total = tl.zeros([BLOCK_K], dtype=tl.float32)
            for q in range(0, run):
                p = j + q
                t = tl.load(step + p * t_s) + 1.0
                c = tl.load(grad + p * g_s0 + cols * g_s1, mask=mask, other=0.0).to(tl.float32)
                m_at = exp_avg + p * m_s0 + cols * m_s1
                v_at = exp_avg_sq + p * v_s0 + cols * v_s1
                m = tl.load(m_at, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_at, mask=mask, other=0.0).to(tl.float32)
                if LERP_SMALL:
                    m = tl.fma(lerp_coeff, c - m, m)
                else:
                    m = tl.fma(lerp_coeff, c - m, c)
                v = tl.fma(one_minus_beta2 * c, c, v * beta2)  # torch's addcmul_
                tl.store(m_at, _round(m, exp_avg_ptr.dtype.element_ty, INTERPRETER), mask=mask)
                tl.store(v_at, _round(v, exp_avg_sq_ptr.dtype.element_ty, INTERPRETER), mask=mask)
                if INTERPRETER:  # no libdevice there
                    t64 = t.to(tl.float64)
                    power1 = tl.exp2(t64 * log2_beta1).to(tl.float32)
                    power2 = tl.exp2(t64 * log2_beta2).to(tl.float32)
                else:
                    power1 = libdevice.pow(beta1, t)
                    power2 = libdevice.pow(beta2, t)
                bias_correction1 = 1.0 - power1
                bias_correction2_sqrt = tl.sqrt_rn(1.0 - power2)
                denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
                direction = tl.div_rn(tl.div_rn(m, bias_correction1), denom)
                factor = tl.load(rho + p * rho_s).to(tl.float32) * neg_lr_scale
                update = direction * factor
                if SUM_FIRST:  # the reference sums a row's updates, then adds them
                    total += update
                else:  # the reference's index_add_: one update after another
                    w += update
            if SUM_FIRST:
                w = w * decay + total
            if STOCHASTIC:
                noise, _, _, _ = tl.philox(seed, cols, pid + 0 * cols, 0 * cols, 0 * cols)
                bits = w.to(tl.int32, bitcast=True) + (noise & 0xFFFF).to(tl.int32)
                w = (bits & -65536).to(tl.float32, bitcast=True)
            tl.store(
                w_row + cols * p_s1, _round(w, param_ptr.dtype.element_ty, INTERPRETER), mask=mask
            )
        for q in range(0, run):
            at = step + (j + q) * t_s
            tl.store(at, tl.load(at) + 1.0)


def _interpreted() -> bool:
    """Whether the kernel was built for Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return triton is not None and isinstance(_grass_adamw_kernel, InterpretedFunction)


def triton_available() -> bool:
    """Triton is importable and the kernel has a device: a GPU, or the interpreter on the CPU."""
    return triton is not None and (_interpreted() or torch.cuda.is_available())


def _runs_on(device: torch.device) -> bool:
    if triton is None:
        return False
    # The interpreter reads CPU memory directly (other tensors than the pointer arguments are
    # reached through offsets, so its copying of GPU arguments to the host would not cover them).
    return device.type == ("cpu" if _interpreted() else "cuda")


def _fused(param: Tensor, grad: Tensor, step: Tensor, rows: Tensor | None) -> bool:
    """Whether the kernel does this tensor (else it goes to ``_grouped_grass_adamw``)."""
    return (
        rows is not None
        and not grad.is_sparse
        and param.dim() == 2
        and grad.dim() == 2
        and compute_dtype(param) == torch.float32
        and step.dim() == 1
        and step.dtype == torch.float32
        and grad.numel() > 0
        and _runs_on(param.device)
    )


def _f32(x: float) -> float:
    """``x`` rounded to float32, as torch rounds a Python scalar for a float32 tensor."""
    return torch.tensor(x, dtype=torch.float32).item()


_tables: dict[tuple, Tensor] = {}


def _table(columns: list[tuple[Tensor, ...]], device: torch.device) -> Tensor:
    """The (G, _TABLE_COLUMNS) int64 table of offsets and strides, cached by its contents."""
    bases = [tensors[0].data_ptr() for tensors in columns]
    values: list[int] = []
    for weight in zip(*columns, strict=True):
        for base, t in zip(bases, weight, strict=True):
            offset, rest = divmod(t.data_ptr() - base, t.element_size())
            if rest:
                raise ValueError(f"misaligned tensor at {t.data_ptr()} (element {t.dtype})")
            values.append(offset)
            values.extend(t.stride())
    key = (device, *values)
    table = _tables.get(key)
    if table is None:
        if len(_tables) >= 256:  # state reallocated many times (reselection): start over
            _tables.clear()
        table = torch.tensor(values, dtype=torch.int64, device=device)
        _tables[key] = table
    return table


def triton_grass_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    rows: list[Tensor | None],
    rhos: list[Tensor | None],
    uniques: list[tuple[Tensor, Tensor] | None],
    *,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    scale: float = 1.0,
    stochastic_rounding: bool = False,
) -> None:
    """One Grass AdamW step, in place: ``_grouped_grass_adamw``'s contract (see its arguments in
    :func:`hf_grass.functional.grass_adamw`), one kernel launch per batch of projected weights of
    equal compressed shape and dtypes; the rest goes to ``_grouped_grass_adamw``.

    ``uniques`` is not needed by the kernel (it finds repeated rows in the sorted ``rows``); it is
    passed on with the tensors that fall back.
    """
    hp = dict(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        scale=scale,
        stochastic_rounding=stochastic_rounding,
    )
    groups: dict[tuple, list[int]] = {}
    rest: list[int] = []
    for i, param in enumerate(params):
        if not _fused(param, grads[i], steps[i], rows[i]):
            rest.append(i)
            continue
        key = (
            param.device,
            param.dtype,
            grads[i].dtype,
            exp_avgs[i].dtype,
            exp_avg_sqs[i].dtype,
            rows[i].dtype,
            rhos[i].dtype,
            tuple(grads[i].shape),
        )
        groups.setdefault(key, []).append(i)
    if rest:
        _say_what_falls_back(params, rows, rest)
        lists = (params, grads, exp_avgs, exp_avg_sqs, steps, rows, rhos, uniques)
        _grouped_grass_adamw(*[[seq[i] for i in rest] for seq in lists], compiled=False, **hp)
    for (device, param_dtype, *_, (r, k)), index in groups.items():
        _launch(
            [(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], steps[i], rows[i], rhos[i])
             for i in index],
            device, param_dtype, r, k, **hp,
        )  # fmt: skip


_said_fallback = False


def _say_what_falls_back(params: list[Tensor], rows: list[Tensor | None], rest: list[int]) -> None:
    """Log once which projected weights the kernel leaves to the grouped step (dense parameters
    are not Triton's to take and go unmentioned)."""
    global _said_fallback
    projected = [i for i in rest if rows[i] is not None]
    if _said_fallback or not projected:
        return
    _said_fallback = True
    kinds = sorted({f"{params[i].dim()}-D {str(params[i].dtype).removeprefix('torch.')}"
                    for i in projected})  # fmt: skip
    logger.warning(
        "Grass: the Triton step leaves %d projected weights (%s) to the grouped step: the "
        "kernel takes 2-D weights of 16- or 32-bit floats on its device.",
        len(projected),
        ", ".join(kinds),
    )


def _launch(batch, device, param_dtype, r, k, **hp) -> None:
    """One kernel launch over ``batch`` (tuples of a weight's tensors, same (r, k) and dtypes)."""
    columns = list(zip(*batch, strict=True))  # per kind: the batch's tensors
    table = _table(columns, device)
    lr = float(hp["lr"])  # a tensor learning rate becomes a kernel argument
    decay = 1 - lr * hp["weight_decay"]
    lerp_weight = 1 - hp["beta1"]
    small = abs(lerp_weight) < 0.5  # torch's lerp switches formula at a weight of 0.5
    stochastic = hp["stochastic_rounding"] and param_dtype == torch.bfloat16
    # One seed per launch from torch's generator (manual_seed reproduces it), read by the kernel.
    seed = torch.empty((), dtype=torch.int64, device=device).random_() if stochastic else table
    block = min(triton.next_power_of_2(k), _MAX_BLOCK_K)
    # Triton launches on the current device.
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        _grass_adamw_kernel[(len(batch) * r,)](
            *[tensors[0] for tensors in columns],
            table,
            seed,
            r,
            k,
            _f32(lerp_weight) if small else _f32(_f32(lerp_weight) - 1),
            hp["beta1"],
            hp["beta2"],
            math.log2(_f32(hp["beta1"])),
            math.log2(_f32(hp["beta2"])),
            1 - hp["beta2"],
            hp["eps"],
            -lr * hp["scale"],
            decay,
            LERP_SMALL=small,
            # The reference adds updates to float32 weights with index_add_ when there is no
            # decay (a repeated row: one after the other), else sums them first (apply_update).
            SUM_FIRST=not (param_dtype == torch.float32 and decay == 1),
            STOCHASTIC=stochastic,
            INTERPRETER=_interpreted(),
            BLOCK_K=block,
            num_warps=max(1, min(4, block // 256)),
            enable_fp_fusion=False,  # round every product and sum, as the reference's ops do
        )


register_implementation("triton", triton_grass_adamw)
