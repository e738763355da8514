"""Compressed-gradient linear layers: the full weight gradient is never formed on ordinary steps.

For ``y = x Wᵀ + b`` with ``x`` (..., n), ``W`` (m, n) and ``dY`` (..., m) flattened to ``X``
(T x n) and ``dY`` (T x m), the backward of :class:`GrassLinear` returns the usual input and
bias gradients, but for the weight only the compressed gradient that
:class:`~hf_grass.GrassAdamW` consumes::

    dX = dY W                                    # T x n, unchanged
    db = sum_t dY_t                              # m, dense
    C  = rho[:, None] * dY[:, rows]ᵀ X            # rows side: r x n, cost r/m of dYᵀ X
    C  = rho[:, None] * X[:, cols]ᵀ dY           # cols side: r x m, cost r/n of Xᵀ dY

``C`` equals ``rho[:, None] * G_oriented[rows]`` with ``G = dYᵀ X`` (m x n), but costs r/m (r/n)
of the dense weight-gradient matmul and is added to the weight's compressed gradient
(``projection_of(weight).grad``); ``weight.grad`` stays ``None``. The rows come from the weight's
:class:`~hf_grass.projection.GrassProjection`, which GrassAdamW owns. Since the cols side reads
only ``X[:, cols]``, its forward keeps only those r columns of ``X`` for the backward (T x r
instead of T x n) on ordinary steps.

Selection steps. When ``needs_full_gradient()`` (before the first step and every
``update_proj_gap`` steps), the backward forms ``G`` for this layer only, hands it to ``select``,
adds ``compress(G)`` to the compressed gradient and frees ``G`` before the next layer's backward
runs: at most one full weight gradient is alive at a time.

Gradient accumulation. Rows stay fixed within an accumulation window: the first micro-batch of a
selection window selects (from its own gradient), every later micro-batch compresses with those
rows, and the step consumes the sum. So with accumulation the rows are chosen from the first
micro-batch's gradient rather than from the window's sum, which would need every full gradient
alive until the last micro-batch. Without accumulation both are the same.

Gradient checkpointing. All side effects (selection, accumulation) happen in the backward, which
autograd runs once per use whether or not the forward is recomputed; the forward only saves
tensors. A recomputed forward must save what the original saved (checkpointing checks their
shapes), but it runs inside the backward, possibly after that backward selected: a weight shared
by layers in two checkpointed blocks selects in the later block's backward, before the earlier
block is recomputed. So a forward run inside the backward that selected its weight's columns
keeps all of ``X``, as its original did before the selection. The parameter itself is kept on
``ctx`` rather than through ``save_for_backward``: checkpointing (and ``save_on_cpu``) unpacks
saved tensors as new tensors, which are not the weight its projection is registered for.

Autocast. Under autocast the forward casts ``x``, ``W`` and ``b`` to the autocast dtype, as
autocast does for ``F.linear``, and the backward computes in that dtype with autocast off; the
gradients are returned (and the compressed gradient accumulated) in the dtypes of the original
tensors.

A weight without a live projection (no GrassAdamW built yet, or a deep copy) gets the ordinary
full ``.grad``. Data parallelism is applied from outside: :mod:`hf_grass.distributed`. Under
FSDP2 the layer holds FSDP2's unsharded weight: its compressed gradient (the selected columns)
is averaged across the ranks by :func:`hf_grass.fsdp2.reduce_compressed`, and on selection steps
FSDP2 gets the full gradient, from which the optimizer selects.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .fsdp2 import reduce_compressed
from .layers import LayerType, register_layer, replaces
from .projection import (
    GrassProjection,
    forward_anchor,
    projection_of,
    unsharded_projection_of,
)


def _autocast_off(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_cast(device_type: str, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` as autocast would hand them to a linear layer: under autocast, floating
    tensors other than float64 in its dtype; otherwise unchanged."""
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)
        for t in tensors
    )


class GrassLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` whose backward delivers the weight gradient compressed (see module doc).

    Inputs: ``x`` (..., n), ``weight`` (m, n), ``bias`` (m) or None, ``anchor`` (the
    projection's grad-ready anchor, see :mod:`hf_grass.layerwise`) or None, ``transposed``:
    the weight is stored (n, m) and ``y = x W + b`` (GPT-2's ``Conv1D``). Returns ``y`` (..., m).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, transposed=False):
        x_c, w_c, b_c = _autocast_cast(x.device.type, x, weight, bias)
        ctx.cols = _columns_to_keep(weight, x_c, transposed) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(x_c if ctx.cols is None else x_c.index_select(-1, ctx.cols), w_c)
        if ctx.cols is None:
            _KEPT_WHOLE[id(x_c)] = x_c
        ctx.weight = weight  # the Parameter itself: its projection is registered for it
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.anchor_device = None if anchor is None else anchor.device
        ctx.transposed = transposed
        return F.linear(x_c, w_c.t() if transposed else w_c, b_c)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        weight = ctx.weight
        if ctx.transposed:
            w = w.t()
        m, n = w.shape
        with _autocast_off(grad_out.device.type):
            dy2 = grad_out.to(w.dtype).reshape(-1, m)  # T x m
            x2 = x.reshape(-1, x.shape[-1])  # T x n, or T x r: X[:, cols]
            grad_x = grad_w = grad_b = grad_anchor = None
            if ctx.needs_input_grad[0]:
                grad_x = (dy2 @ w).reshape(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = dy2.sum(0, dtype=ctx.bias_dtype)
            if ctx.needs_input_grad[1]:
                grad_w = _weight_gradient(weight, dy2, x2, ctx.cols, ctx.transposed)
            if ctx.anchor_device is not None:
                grad_anchor = torch.empty(0, device=ctx.anchor_device)
        return grad_x, grad_w, grad_b, grad_anchor, None


# Inputs some GrassLinear saved whole for its backward, while they live: a later layer reading the
# same input (k_proj and v_proj after q_proj) keeps no slice of its own, which would add to it.
_KEPT_WHOLE: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def _columns_to_keep(
    weight: torch.Tensor, x: torch.Tensor, transposed: bool = False
) -> torch.Tensor | None:
    """The selected columns when the backward should save only ``X[:, cols]``, else ``None``.

    A weight that selects input features (an ``nn.Linear`` weight's columns, a transposed
    weight's rows) has the compressed gradient ``X[:, cols]ᵀ dY``, which reads r of X's n
    columns, so on an ordinary step its layer keeps r/n of its input (LLaMA's ``down_proj``: 64
    of 1,536 columns). A selection step needs all of ``X`` (the full gradient's norms), as does a
    weight without a live projection; and an input already kept whole costs nothing more.
    """
    projection = _projection(weight, transposed)
    input_side = "rows" if transposed else "cols"
    if projection is None or projection.side != input_side or _selecting(projection):
        return None
    if _KEPT_WHOLE.get(id(x)) is x:
        return None
    return projection.rows


# The backward (autograd graph task id) in which each projection last selected from a full
# gradient of a GrassLinear. A forward that runs inside that backward is gradient checkpointing's
# recomputation of a forward that ran before the selection.
_SELECTED_IN: weakref.WeakKeyDictionary[GrassProjection, int] = weakref.WeakKeyDictionary()


def _current_backward() -> int:
    """The id of the backward running on this thread, -1 outside a backward. (torch's own
    non-reentrant checkpointing keys its recomputations by the same id.)"""
    return torch._C._current_graph_task_id()


def _selecting(projection: GrassProjection) -> bool:
    """True when a forward of the weight must keep all of ``X`` for a selection.

    That is while the rows are still to be chosen, and also for a forward recomputed inside the
    backward that chose them: its original ran before the selection and kept all of ``X``, and a
    recomputation must save what the original saved. (Not covered: two checkpointed graphs
    forwarded on a selection step before either runs backward; the second one's recomputation
    runs after the first backward selected, in a backward of its own.)
    """
    if projection.needs_full_gradient():
        return True
    backward = _current_backward()
    return backward != -1 and _SELECTED_IN.get(projection) == backward


def _weight_gradient(
    weight: torch.Tensor,
    dy2: torch.Tensor,
    x2: torch.Tensor,
    cols: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor | None:
    """Deliver the gradient of ``weight`` from ``dY`` (T x m) and ``X`` (T x n).

    Returns the full gradient (m x n, or n x m for a ``transposed`` weight: the weight's own
    layout) for autograd to accumulate into ``.grad`` when the weight has no live projection;
    otherwise adds the compressed gradient to ``projection_of(weight).grad`` and returns
    ``None``. With ``cols`` given, ``x2`` is ``X[:, cols]`` (T x r), saved by the forward of an
    ordinary step; the projection must still select those input features.
    """
    projection = _projection(weight, transposed)
    if cols is not None:
        if projection is None or projection.needs_full_gradient() or projection.rows is not cols:
            raise RuntimeError(
                "The selected columns of a GrassLinear's weight changed between its forward and "
                "its backward (re-selected, optimizer state loaded, or optimizer dropped), and "
                "the forward kept only the old columns of its input: run each forward's backward "
                "before changing the optimizer."
            )
        compressed = x2.t() @ dy2  # (r x T)(T x m) = r x m
        projection.scale_rows_(compressed)
        _accumulate(projection, weight, compressed)
        return None
    a, b = (x2, dy2) if transposed else (dy2, x2)  # the gradient is aᵀ b in the weight's layout
    if projection is None or (projection.weight is not weight and projection.needs_full_gradient()):
        # No projection, or FSDP2's unsharded weight on a selection step: FSDP2 averages the
        # full gradient and the optimizer selects from it.
        return (a.t() @ b).to(weight.dtype)
    if projection.needs_full_gradient():
        full = a.t() @ b  # m x n, this layer only
        projection.select(full)  # under data parallelism, averages `full` across ranks first
        _SELECTED_IN[projection] = _current_backward()
        compressed = projection.compress(full)
        del full  # freed before the next layer's backward allocates its own
    else:
        rows = projection.rows
        if projection.side == "rows":
            compressed = a.index_select(1, rows).t() @ b  # Linear: (r x T)(T x n) = r x n
        else:
            compressed = b.index_select(1, rows).t() @ a  # Linear: (r x T)(T x m) = r x m
        projection.scale_rows_(compressed)
    _accumulate(projection, weight, compressed)
    return None


def _projection(weight: torch.Tensor, transposed: bool) -> GrassProjection | None:
    """The projection of ``weight``, or, for FSDP2's unsharded form of a weight sharded by rows
    (an ``nn.Linear`` weight, not a transposed one), the projection of the sharded weight."""
    projection = projection_of(weight)
    if projection is None and not transposed:
        projection = unsharded_projection_of(weight)
    return projection


def _accumulate(projection: GrassProjection, weight: torch.Tensor, compressed: torch.Tensor):
    """Add ``compressed`` to the weight's compressed gradient; for FSDP2's unsharded weight,
    first average it across the ranks, keeping this rank's columns (one reduce-scatter of r x m
    instead of FSDP2's m x n)."""
    if projection.weight is not weight:
        compressed = reduce_compressed(compressed, projection.weight)
    projection.accumulate(compressed)


def grass_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    transposed: bool = False,
) -> torch.Tensor:
    """Functional :class:`GrassLinear`: ``F.linear`` with the compressed weight gradient
    (``transposed``: ``x @ weight + bias``, the layout of GPT-2's ``Conv1D``)."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return F.linear(x, weight.t() if transposed else weight, bias)
    return _apply_grass_linear(x, weight, bias, transposed)


# torch.compile runs the Grass function eagerly, one graph break per layer: its forward keeps
# Python-side records for the backward (the inputs kept whole, the projection's anchor), on which
# dynamo would otherwise break inside and recompile at every call site.
@torch.compiler.disable
def _apply_grass_linear(x, weight, bias, transposed: bool) -> torch.Tensor:
    return GrassLinearFunction.apply(x, weight, bias, forward_anchor(weight), transposed)


class GrassLinear(nn.Linear):
    """``nn.Linear`` whose backward delivers a compressed weight gradient instead of ``weight.grad``.

    Same parameters (``weight``, ``bias``), same ``state_dict`` and same outputs as
    ``nn.Linear``; only the backward differs (see the module docstring). Usually made by
    :func:`grassify` rather than built directly.
    """

    grass_base = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        rank: int | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.grass_rank = rank

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return grass_linear(input, self.weight, self.bias)

    def extra_repr(self) -> str:
        projection = projection_of(self.weight)
        rank = projection.rank if projection is not None else getattr(self, "grass_rank", None)
        text = super().extra_repr()
        if rank is not None:
            text += f", rank={rank}"
        if projection is not None:
            text += f", side={projection.side}"
        return text


register_layer(
    LayerType(
        "linear",
        kind=lambda module: isinstance(module, nn.Linear),
        grass_class=replaces(GrassLinear),
        description="nn.Linear",
    )
)
