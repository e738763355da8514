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

Implementations (:data:`IMPLEMENTATIONS`, chosen by name with ``implementation``):
``_single_tensor_grass_adamw`` is the readable reference, one tensor at a time;
``_multi_tensor_grass_adamw`` does the same arithmetic with ``torch._foreach_*`` ops over all
tensors of one dtype at once, as :mod:`torch.optim.adamw` does; ``_grouped_grass_adamw`` (the
default of :class:`~hf_grass.GrassAdamW`) stacks the projected weights whose compressed
gradients share shape and dtypes into one (G, r, k) batch and runs the Adam arithmetic on it as
ordinary tensor ops (optionally one ``torch.compile``-d kernel), leaving two indexing kernels per
weight for the gather and scatter of its rows; :mod:`hf_grass.triton_step` runs such a batch as
one fused Triton kernel. A model has hundreds of projected matrices of a few shapes, and
per-matrix kernel launches dominate a GPU step. Tests hold them all equal to the reference.
Other base optimizers (Lion, sign descent, ...) are update rules (:mod:`hf_grass.rules`): a
direction from the compressed gradient and per-row state, then the same row scatter
(:func:`apply_update`).

Arithmetic runs in float32 at least (``compute_dtype``); moments are written back in their own
dtype, tensor by tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .state import StateFormat, round_to, state_format_of


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for low-precision tensors, else their own dtype (float64 stays float64)."""
    return torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype


def unique_rows(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(unique, inverse)`` of sorted ``rows``: ``unique[inverse] == rows``."""
    return torch.unique_consecutive(rows, return_inverse=True)


def row_index(oriented_t: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The index of the selected rows in an oriented weight, for ``t[index]`` and ``index_put_``.

    For a matrix (m, k), ``(rows,)``. For experts' matrices (E, m, k), ``rows`` are flat
    indices ``e * m + i`` (row i of expert e), expert-major and sorted, so everything that
    treats a selection as r sorted rows (moments, step counts, re-selection) works unchanged on
    E * r of them; the index is ``(rows // m, rows % m)``.
    """
    if oriented_t.dim() == 2:
        return (rows,)
    m = oriented_t.shape[1]
    return torch.div(rows, m, rounding_mode="floor"), rows % m


def remap_state(
    state: dict,
    rows: Tensor,
    keys: tuple[str, ...],
    shape: tuple[int, int],
    dtype: torch.dtype,
    keep: bool,
    state_format: StateFormat | None = None,
) -> None:
    """Give ``state`` per-row tensors ``keys`` (each of ``shape``: r, or E * r for experts, by
    k; stored in ``state_format``, plain by default) and per-row step counts for newly selected
    ``rows``, in place.

    With ``keep``, rows selected before and after keep their state and step counts; new rows
    start from zero (their bias correction restarts with them). Otherwise all start from zero.
    Every stored tensor has the rows first, so any format is carried row by row.
    """
    device = rows.device
    state_format = state_format or state_format_of("plain")
    fresh = {}
    for key in keys:
        fresh.update(state_format.zeros(key, shape, dtype, device))
    row_step = torch.zeros(shape[0], dtype=torch.float32, device=device)
    if keep and "rows" in state:
        old = state["rows"]
        pos = torch.searchsorted(old, rows).clamp_(max=old.numel() - 1)
        kept = old[pos] == rows
        for key, value in fresh.items():
            value[kept] = state[key][pos[kept]].to(value.dtype)
        row_step[kept] = state["row_step"][pos[kept]]
    state.update(fresh, row_step=row_step)


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
    implementation: str | None = None,
    foreach: bool = True,
    batched: bool = False,
    compiled: bool = False,
) -> None:
    """One Grass AdamW step (see the module docstring), in place.

    Args:
        params: the weights, oriented so that the selected dimension comes first (m x k, or
            E x m x k for experts' matrices with flat row indices, see :func:`row_index`); a
            view is enough (``W.t()`` for a column selection).
        grads: compressed gradients ``rho[:, None] * G[rows]`` (r x k); dense: the gradient.
        exp_avg, exp_avg_sqs: moments (r x k, any float dtype), updated in place.
        steps: per-row step counts (float32, r) or one scalar count (dense); incremented here.
        rows, rhos: the selection (int64 r, sorted; float32 r), or ``None`` for a dense step.
        uniques: ``unique_rows(rows)`` (cached by the caller), or ``None`` to compute it when
            the update needs a gather and scatter (weight decay, low-precision weights).
        scale: the projected update's multiplier ``alpha``.
        stochastic_rounding: round bf16 weights stochastically (see :func:`round_to`).
        implementation: one of :data:`IMPLEMENTATIONS` (see :func:`implementation_of`);
            ``None``: from the older flags below.
        foreach: use the ``torch._foreach_*`` implementation; False: the reference, everywhere.
        batched: with ``foreach``, step projected tensors of equal compressed shape and dtypes
            as one batch (``_grouped_grass_adamw``); dense ones (``rows=None``) go to foreach.
        compiled: with ``batched``, run the batch's Adam arithmetic as one ``torch.compile``-d
            function (compiled once per shape and dtype).
    """
    if implementation is None:
        implementation = implementation_from_flags(foreach, batched, compiled)
    implementation_of(implementation)(
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


# The implementations of one step, each tested equal to the reference:
# - reference: one tensor at a time, the readable definition (``_single_tensor_grass_adamw``);
# - foreach: ``torch._foreach_*`` ops over all tensors of one dtype (``_multi_tensor_...``);
# - grouped: projected weights of one compressed shape stacked into (G, r, k) batches;
# - compiled: grouped, with each batch's arithmetic one ``torch.compile``-d function;
# - triton: grouped batches as one fused Triton kernel each (:mod:`hf_grass.triton_step`; CUDA,
#   or Triton's interpreter). Tensors the kernel does not cover (dense, 3-D expert weights,
#   float64) take the grouped step.
IMPLEMENTATIONS = ("reference", "foreach", "grouped", "compiled", "triton")


def implementation_of(name: str) -> Callable[..., None]:
    """The step function of the implementation ``name`` (:data:`IMPLEMENTATIONS`)."""
    if name not in _STEP_FUNCTIONS:
        if name in IMPLEMENTATIONS:  # "triton": registered when hf_grass.triton_step is imported
            raise ValueError(
                f"implementation {name!r} is not loaded: import hf_grass.{name}_step first "
                "(GrassAdamW does when a param group asks for it)."
            )
        raise ValueError(
            f"Unknown implementation {name!r}: use one of {', '.join(IMPLEMENTATIONS)}."
        )
    return _STEP_FUNCTIONS[name]


def register_implementation(name: str, step: Callable[..., None]) -> None:
    """Make ``step`` (the arguments of :func:`grass_adamw` with lists of tensors, as
    ``_grouped_grass_adamw`` takes them) the implementation ``name``."""
    _STEP_FUNCTIONS[name] = step


def implementation_from_flags(foreach: bool, batched: bool, compiled: bool) -> str:
    """The implementation the older flags ``foreach``/``batched``/``compiled`` chose."""
    if not foreach:
        return "reference"
    if not batched:
        return "foreach"
    return "compiled" if compiled else "grouped"


def step_column(step: Tensor, dtype: torch.dtype) -> Tensor:
    """Per-row counts as an (r, 1) column; a scalar count stays a scalar."""
    step = step.to(dtype)
    return step if step.dim() == 0 else step[:, None]


def scaled_update(direction: Tensor, rho: Tensor | None, lr: float, scale: float) -> Tensor:
    """The update of a direction: ``-lr * D`` for a dense tensor (``rho`` None), else
    ``-lr * scale * rho[:, None] * D`` for the selected rows."""
    if rho is None:
        return direction * -lr
    return direction * (rho.to(direction.dtype)[:, None] * (-lr * scale))


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
        t = step_column(steps[i], cdt)
        bias_correction1 = 1 - hp["beta1"] ** t
        bias_correction2_sqrt = (1 - hp["beta2"] ** t).sqrt()
        direction = (m / bias_correction1) / (v.sqrt() / bias_correction2_sqrt + hp["eps"])
        update = scaled_update(direction, rhos[i], hp["lr"], hp["scale"])
        apply_update(param, update, rows[i], uniques[i], cdt, **hp)


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
        t = [step_column(steps[i], cdt) for i in index]
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
            apply_update(params[i], update, rows[i], uniques[i], cdt, **hp)


def _grouped_grass_adamw(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    steps,
    rows,
    rhos,
    uniques,
    *,
    compiled: bool,
    **hp,
) -> None:
    """The reference's arithmetic on one (G, r, k) batch per group of projected tensors.

    Tensors are grouped by device, the dtypes of weight, gradient and moments, and the shape
    (r, k) of the compressed gradient: in a transformer all attention and MLP matrices usually
    share one (r, k), so a step is a constant number of kernels plus two per weight (gather and
    scatter of its rows, which live in separate tensors). Per-tensor state stays where it is:
    the moments and counts are stacked in, updated, and copied back with one ``_foreach_copy_``
    each (a group of one works on views of the state, in place). Dense tensors (``rows=None``)
    and sparse gradients go to the foreach implementation.
    """
    groups: dict[tuple, list[int]] = {}
    rest: list[int] = []
    for i, param in enumerate(params):
        if rows[i] is None or grads[i].is_sparse:
            rest.append(i)
            continue
        key = (
            param.device,
            param.dtype,
            grads[i].dtype,
            exp_avgs[i].dtype,
            exp_avg_sqs[i].dtype,
            tuple(grads[i].shape),
        )
        groups.setdefault(key, []).append(i)
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps, rows, rhos, uniques)

    def pick(index: list[int]) -> list[list]:
        return [[seq[i] for i in index] for seq in lists]

    if rest:
        # One tensor alone (layer-wise updates): the reference has the least host overhead.
        impl = _single_tensor_grass_adamw if len(rest) == 1 else _multi_tensor_grass_adamw
        impl(*pick(rest), **hp)
    for (device, *_, shape), index in groups.items():
        for chunk in _chunks(index, shape[0] * shape[1], device):
            if len(chunk) == 1 and not compiled:
                _single_tensor_grass_adamw(*pick(chunk), **hp)
            else:
                _step_group(*pick(chunk), compiled=compiled, **hp)


# Elements in one batch (G x r x k). It bounds the step's temporaries (a few float32 batches:
# 64 MiB each on a GPU, instead of a whole model's compressed gradients at once) while keeping
# the kernels per batch few. On a CPU, where launches are cheap and memory traffic is not,
# batches stay cache-sized: one matrix at a time there is faster than any stack.
BATCH_ELEMENTS = {"cpu": 1 << 18}
DEFAULT_BATCH_ELEMENTS = 1 << 24


def _chunks(index: list[int], numel: int, device: torch.device) -> list[list[int]]:
    """``index`` split into near-equal batches of at most ``BATCH_ELEMENTS`` elements (at least
    one tensor each): two batch sizes at most, so a compiled step compiles twice at most."""
    budget = BATCH_ELEMENTS.get(device.type, DEFAULT_BATCH_ELEMENTS)
    per_batch = max(1, budget // max(numel, 1))
    count = -(-len(index) // per_batch)
    size = -(-len(index) // count)
    return [index[i : i + size] for i in range(0, len(index), size)]


def _batch(tensors: list[Tensor], dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``tensors`` as one (G, ...) batch in ``dtype``, and whether the batch is a view of them
    (one tensor already in ``dtype``), so that in-place updates of the batch reach them."""
    batch = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
    out = batch.to(dtype)
    return out, len(tensors) == 1 and out is batch


def _unbatch(tensors: list[Tensor], batch: Tensor) -> None:
    """Copy each slice of ``batch`` back into its tensor (one cast, one multi-tensor copy)."""
    torch._foreach_copy_(tensors, list(batch.to(tensors[0].dtype).unbind(0)))


def moments_and_direction(
    grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, beta1: float, beta2: float,
    eps: float,
) -> Tensor:  # fmt: skip
    """Update the moments in place and return the Adam direction ``(m / bc1) / (sqrt(v / bc2) + eps)``.

    ``step``: per-row counts (..., r, 1), already incremented. The reference's ops, in its order,
    so that eager results equal it elementwise; also the function ``compiled=True`` compiles.
    """
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    return (exp_avg / bias_correction1) / (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps)


@functools.cache
def _compiled_moments_and_direction():
    # Compiled lazily (importing hf_grass must not touch the compiler) and once per process;
    # torch.compile then specializes on each batch shape and dtype (dynamic=False: r and k are
    # fixed for a run, and static shapes give the simplest fused kernel).
    return torch.compile(moments_and_direction, fullgraph=True, dynamic=False)


def _step_group(
    params, grads, exp_avgs, exp_avg_sqs, steps, rows, rhos, uniques, *, compiled, **hp
) -> None:
    """One batch of :func:`_grouped_grass_adamw`: same device, dtypes and (r, k)."""
    cdt = compute_dtype(params[0])
    grad, _ = _batch(grads, cdt)  # G x r x k
    exp_avg, m_in_place = _batch(exp_avgs, cdt)
    exp_avg_sq, v_in_place = _batch(exp_avg_sqs, cdt)
    step, t_in_place = _batch(steps, steps[0].dtype)  # G x r
    step.add_(1)
    if not t_in_place:
        _unbatch(steps, step)
    core = _compiled_moments_and_direction() if compiled else moments_and_direction
    direction = core(
        grad, exp_avg, exp_avg_sq, step.to(cdt)[..., None], hp["beta1"], hp["beta2"], hp["eps"]
    )
    if not m_in_place:
        _unbatch(exp_avgs, exp_avg)
    if not v_in_place:
        _unbatch(exp_avg_sqs, exp_avg_sq)
    rho, _ = _batch(rhos, cdt)
    update = direction * (rho[..., None] * (-hp["lr"] * hp["scale"]))
    _apply_group_update(params, update, rows, uniques, cdt, **hp)


def _apply_group_update(
    params: list[Tensor],
    update: Tensor,
    rows: list[Tensor],
    uniques: list[tuple[Tensor, Tensor] | None],
    cdt: torch.dtype,
    **hp,
) -> None:
    """:func:`apply_update` for a batch: ``W_g[rows_g] = round(W_g[rows_g] * (1 - lr wd) + U_g)``.

    Same values as the reference: a row drawn several times gets the sum of its updates (here
    summed with ``scatter_add`` in the batch, then given to each of its positions, which all
    write the same value; with stochastic rounding they share one draw of noise).
    """
    decay = 1 - hp["lr"] * hp["weight_decay"]
    if params[0].dtype == cdt and decay == 1:
        for param, index, u in zip(params, rows, update.unbind(0), strict=True):
            _add_rows(param, index, u)  # the reference's op: repeated rows add up
        return
    uniques = [u if u is not None else unique_rows(r) for u, r in zip(uniques, rows, strict=True)]
    repeats = any(u.numel() != r.numel() for (u, _), r in zip(uniques, rows, strict=True))
    share = None
    if repeats:
        inverse, _ = _batch([inv for _, inv in uniques], torch.int64)  # G x r
        slots = inverse[..., None].expand_as(update)
        update = torch.zeros_like(update).scatter_add_(1, slots, update).gather(1, slots)
        if hp["stochastic_rounding"]:
            index, _ = _batch(rows, torch.int64)
            share = torch.searchsorted(index, index)  # first position of each row (sorted)
    selected = update.new_empty(update.shape, dtype=params[0].dtype)
    for param, index, out in zip(params, rows, selected.unbind(0), strict=True):
        if param.dim() == 2:
            torch.index_select(param, 0, index, out=out)
        else:
            out.copy_(param[row_index(param, index)])
    w = selected.to(cdt)
    if decay != 1:
        w.mul_(decay)
    w.add_(update)
    w = round_to(w, params[0].dtype, hp["stochastic_rounding"], share=share)
    for param, index, new in zip(params, rows, w.unbind(0), strict=True):
        param.index_put_(row_index(param, index), new)


def apply_update(
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
        _add_rows(param, rows, update)  # repeated rows add up
        return
    rows_u, inverse = unique if unique is not None else unique_rows(rows)
    if rows_u.numel() != rows.numel():
        update = update.new_zeros(rows_u.numel(), update.shape[1]).index_add_(0, inverse, update)
    index = row_index(param, rows_u)
    w = param[index].to(cdt)
    if decay != 1:
        w.mul_(decay)
    w.add_(update)
    param.index_put_(index, round_to(w, param.dtype, stochastic))


def _add_rows(param: Tensor, rows: Tensor, update: Tensor) -> None:
    """``param[rows] += update``, a row listed twice getting both (``index_add_``)."""
    if param.dim() == 2:
        param.index_add_(0, rows, update)
    else:
        param.index_put_(row_index(param, rows), update, accumulate=True)


def residual_sign_update(
    param: Tensor,
    residual: Tensor,
    selected: Tensor,
    *,
    lr: float,
    weight_decay: float,
    scale: float,
    stochastic_rounding: bool,
) -> None:
    """Every row moving: ``W[rest] = W[rest] (1 - lr wd) - lr scale sign(G[rest])``, in place.

    ``param``: the oriented weight; ``residual``: its oriented full gradient with the
    ``selected`` (unique, sorted) rows zeroed, so that ``sign`` leaves those rows alone, as the
    decay does (they took theirs in their own step).
    """
    cdt = compute_dtype(param)
    w = param.to(cdt)  # the weight itself when it is in the compute dtype
    if weight_decay:
        decay = w.new_full((*w.shape[:-1], 1), 1 - lr * weight_decay)
        decay[row_index(w, selected)] = 1
        w.mul_(decay)
    w.add_(residual.to(cdt).sign(), alpha=-lr * scale)
    if w is not param:
        param.copy_(round_to(w, param.dtype, stochastic_rounding))


# The torch implementations by name (built once: looked up on every step, per parameter in
# layer-wise mode); "triton" registers itself when hf_grass.triton_step is imported, which
# the optimizer does when a group asks for it (it needs Triton).
_STEP_FUNCTIONS: dict[str, Callable[..., None]] = {
    "reference": _single_tensor_grass_adamw,
    "foreach": _multi_tensor_grass_adamw,
    "grouped": functools.partial(_grouped_grass_adamw, compiled=False),
    "compiled": functools.partial(_grouped_grass_adamw, compiled=True),
}
