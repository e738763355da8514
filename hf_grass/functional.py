"""The functional core of Grass's Adam: selection-aware AdamW on compressed (r x k) tensors.

For a weight ``W`` oriented so that the selected dimension comes first (m x k), a selection
``(rows, rho)`` and the compressed gradient ``C = rho[:, None] * G[rows]`` (r x k), one step is::

    m   = b1 m + (1 - b1) C                      # moments, r x k, updated in place
    v   = b2 v + (1 - b2) C²
    D   = (m / bc1) / (sqrt(v / bc2) + eps)      # bc_i = 1 - b_i^t with per-row step counts t
    W[rows] *= 1 - lr wd                         # decoupled weight decay, selected rows only
    W[rows] += -lr * scale * rho[:, None] * D    # index_add: a row drawn twice gets both

A dense parameter is the same step with every row selected once (``rows=None``, ``rho=1``, one
step count): so the plain AdamW parameters that need float32 arithmetic (bf16 weights with
float32 moments, stochastic rounding) share this code. Plain ones go to torch's own kernel.

Two implementations, as in :mod:`torch.optim.adamw`: ``_single_tensor_grass_adamw`` is the
readable reference, one tensor at a time; ``_multi_tensor_grass_adamw`` does the same arithmetic
with ``torch._foreach_*`` ops over all tensors of one dtype at once (a model has hundreds of
projected matrices, and per-matrix kernel launches dominate a GPU step). Tests hold them equal.
Another base optimizer (Adafactor, Lion, ...) is another function of this shape.

Arithmetic runs in float32 at least (``compute_dtype``); moments are written back in their own
dtype, tensor by tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for low-precision tensors, else their own dtype (float64 stays float64)."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique, inverse)`` of sorted ``rows``: ``unique[inverse] == rows``."""
    return torch.unique_consecutive(rows, return_inverse=True)


def remap_moments(
    state: dict, rows: Tensor, rank: int, width: int, dtype: torch.dtype, keep: bool
) -> None:
    """Give ``state`` moments for newly selected ``rows`` (r), in place.

    With ``keep``, rows selected before and after keep their moments and step counts; new rows
    start from zero (their bias correction restarts with them). Otherwise all start from zero.
    """
    device = rows.device
    exp_avg = torch.zeros(rank, width, dtype=dtype, device=device)
    exp_avg_sq = torch.zeros_like(exp_avg)
    row_step = torch.zeros(rank, dtype=torch.float32, device=device)
    if keep and "rows" in state:
        old = state["rows"]
        pos = torch.searchsorted(old, rows).clamp_(max=old.numel() - 1)
        kept = old[pos] == rows
        exp_avg[kept] = state["exp_avg"][pos[kept]].to(dtype)
        exp_avg_sq[kept] = state["exp_avg_sq"][pos[kept]].to(dtype)
        row_step[kept] = state["row_step"][pos[kept]]
    state.update(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, row_step=row_step)


def grass_adamw(
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
    foreach: bool = True,
) -> None:
    """One Grass AdamW step (see the module docstring), in place.

    Args:
        params: the weights, oriented so that the selected dimension comes first (m x k); a
            view is enough (``W.t()`` for a column selection).
        grads: compressed gradients ``rho[:, None] * G[rows]`` (r x k); dense: the gradient.
        exp_avg, exp_avg_sqs: moments (r x k, any float dtype), updated in place.
        steps: per-row step counts (float32, r) or one scalar count (dense); incremented here.
        rows, rhos: the selection (int64 r, sorted; float32 r), or ``None`` for a dense step.
        uniques: ``unique_rows(rows)`` (cached by the caller), or ``None`` to compute it when
            the update needs a gather and scatter (weight decay, low-precision weights).
        scale: the projected update's multiplier ``alpha``.
        stochastic_rounding: round bf16 weights stochastically (see :func:`round_to`).
        foreach: use the batched ``torch._foreach_*`` implementation.
    """
    impl = _multi_tensor_grass_adamw if foreach else _single_tensor_grass_adamw
    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        rows,
        rhos,
        uniques,
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        scale=scale,
        stochastic_rounding=stochastic_rounding,
    )


def _step_column(step: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-row counts as an (r, 1) column; a scalar count stays a scalar."""
    step = step.to(dtype)
    return step if step.dim() == 0 else step[:, None]


def _single_tensor_grass_adamw(
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, rhos, uniques, **hp
) -> None:
    for i, param in enumerate(params):
        cdt = compute_dtype(param)
        grad = grads[i].to(cdt)
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        steps[i].add_(1)
        m, v = exp_avg.to(cdt), exp_avg_sq.to(cdt)
        m.lerp_(grad, 1 - hp["beta1"])
        v.mul_(hp["beta2"]).addcmul_(grad, grad, value=1 - hp["beta2"])
        if m is not exp_avg:
            exp_avg.copy_(m)
            exp_avg_sq.copy_(v)
        t = _step_column(steps[i], cdt)
        bias_correction1 = 1 - hp["beta1"] ** t
        bias_correction2_sqrt = (1 - hp["beta2"] ** t).sqrt()
        direction = (m / bias_correction1) / (v.sqrt() / bias_correction2_sqrt + hp["eps"])
        if rows[i] is None:
            update = direction * -hp["lr"]
        else:
            update = direction * (rhos[i].to(cdt)[:, None] * (-hp["lr"] * hp["scale"]))
        _apply_update(param, update, rows[i], uniques[i], cdt, **hp)


def _multi_tensor_grass_adamw(
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, rhos, uniques, **hp
) -> None:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, param in enumerate(params):
        groups.setdefault((param.device, compute_dtype(param)), []).append(i)
    for (_, cdt), index in groups.items():
        beta1, beta2 = hp["beta1"], hp["beta2"]
        gs = [grads[i].to(cdt) for i in index]
        torch._foreach_add_([steps[i] for i in index], 1)
        ms = [exp_avgs[i].to(cdt) for i in index]
        vs = [exp_avg_sqs[i].to(cdt) for i in index]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        for i, m, v in zip(index, ms, vs, strict=True):
            if m is not exp_avgs[i]:  # moments kept in another dtype: write back, per tensor
                exp_avgs[i].copy_(m)
                exp_avg_sqs[i].copy_(v)
        t = [_step_column(steps[i], cdt) for i in index]
        bias_correction1 = torch._foreach_pow(beta1, t)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        bias_correction2_sqrt = torch._foreach_pow(beta2, t)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_add_(bias_correction2_sqrt, 1)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, hp["eps"])
        updates = torch._foreach_div(ms, bias_correction1)
        torch._foreach_div_(updates, denom)
        factors = [
            torch.tensor(-hp["lr"], dtype=cdt, device=updates[0].device)
            if rows[i] is None
            else rhos[i].to(cdt)[:, None] * (-hp["lr"] * hp["scale"])
            for i in index
        ]
        torch._foreach_mul_(updates, factors)
        for i, update in zip(index, updates, strict=True):
            _apply_update(params[i], update, rows[i], uniques[i], cdt, **hp)


def _apply_update(
    param: Tensor,
    update: Tensor,
    rows: Tensor | None,
    unique: tuple[Tensor, Tensor] | None,
    cdt: torch.dtype,
    **hp,
) -> None:
    """``W[rows] = round((W[rows] * (1 - lr wd)) + update)``; repeated rows add up."""
    decay = 1 - hp["lr"] * hp["weight_decay"]
    stochastic = hp["stochastic_rounding"]
    if rows is None:
        if param.dtype == cdt:
            param.mul_(decay).add_(update)
        else:
            w = param.to(cdt).mul_(decay).add_(update)
            param.copy_(round_to(w, param.dtype, stochastic))
        return
    if param.dtype == cdt and decay == 1:
        param.index_add_(0, rows, update)  # repeated rows add up
        return
    rows_u, inverse = unique if unique is not None else unique_rows(rows)
    if rows_u.numel() != rows.numel():
        update = update.new_zeros(rows_u.numel(), update.shape[1]).index_add_(0, inverse, update)
    w = param[rows_u].to(cdt)
    if decay != 1:
        w.mul_(decay)
    w.add_(update)
    param[rows_u] = round_to(w, param.dtype, stochastic)


def round_to(x: Tensor, dtype: torch.dtype, stochastic: bool) -> Tensor:
    """Cast float32 ``x`` to ``dtype``; to bfloat16 stochastically if asked.

    Stochastic rounding adds uniform noise below bf16's last bit to the float32 bit pattern and
    truncates, so a value rounds up with probability equal to its distance from the lower
    neighbour: ``E[round(x)] = x``, and small updates survive on average.
    """
    if not stochastic or dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)
