"""Mixture-of-experts layers with the compressed weight gradient: each expert's matrix projected.

In transformers 5 a MoE block's experts are one module holding 3-D parameters, e.g.
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) (transposed in some families), made
by ``transformers.integrations.moe.use_experts_implementation``, which also records the
layout: ``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm``. Grass treats
each expert's matrix as a projected weight of its own: rank r means r rows of every expert,
chosen from that expert's gradient, with state r x k per expert (see
:func:`hf_grass.functional.row_index` for how E * r rows are stored).

The Grass form of an experts module (:func:`grass_experts_class`) routes tokens as
transformers' own ``grouped_mm`` implementation does (the (token, expert) pairs sorted by
expert) and runs both projections through :class:`GrassExpertsFunction`. For expert e with
its routed inputs ``X_e`` (T_e x n) and output gradients ``dY_e`` (T_e x m)::

    dX_e = dY_e W_e                              # unchanged
    C_e  = rho_e[:, None] * dY_e[:, rows_e]ᵀ X_e  # rows side: r x n, cost r/m of dY_eᵀ X_e
    C_e  = rho_e[:, None] * X_e[:, cols_e]ᵀ dY_e  # cols side: r x m

so the full (E, m, n) gradient is formed only at selection steps, one layer at a time, as for
:class:`~hf_grass.GrassLinear`. An expert that no token reached gets a zero ``C_e`` (so the
compressed gradient has the same shape on every data-parallel rank). Biases get their ordinary
dense gradient.

Under FSDP2 the forward sees the unsharded copy of the weight, which has no projection: the
backward returns the full gradient for FSDP2 to reduce-scatter, and the optimizer compresses
each rank's own experts (see :mod:`hf_grass.optim`).

This is the reference path: one matmul pair per expert that received tokens, in plain
PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import LayerType, expert_weights, is_experts_module, register_layer
from .linear import _autocast_cast, _autocast_off
from .projection import forward_anchor, projection_of

__all__ = ["expert_weights", "is_experts_module", "grass_experts_class", "grass_experts_linear"]


class GrassExpertsFunction(torch.autograd.Function):
    """``y[tokens of e] = x[tokens of e] W_eᵀ + b_e`` for every expert e, whose backward delivers
    the weight gradient compressed (see the module doc).

    Inputs: ``x`` (S, n), the routed tokens sorted by expert; ``weight`` (E, m, n), or (E, n, m)
    when ``transposed`` (``y = x W_e + b_e``); ``bias`` (E, m) or None; ``anchor`` (the
    projection's grad-ready anchor) or None; ``counts``: tokens per expert (E Python ints,
    summing to S). Returns ``y`` (S, m).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, anchor, counts, transposed):
        x_c, w_c, b_c = _autocast_cast(x.device.type, x, weight, bias)
        ctx.save_for_backward(x_c, w_c)
        ctx.weight = weight  # the Parameter itself: its projection is registered for it
        ctx.counts = counts
        ctx.transposed = transposed
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.anchor_device = None if anchor is None else anchor.device
        m = w_c.shape[-1] if transposed else w_c.shape[-2]
        out = x_c.new_empty(x_c.shape[0], m)
        for e, (xs, ys) in _segments(counts, x_c, out):
            w = w_c[e] if transposed else w_c[e].t()
            if b_c is None:
                torch.matmul(xs, w, out=ys)
            else:
                torch.addmm(b_c[e], xs, w, out=ys)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w = ctx.saved_tensors
        grad_x = grad_w = grad_b = grad_anchor = None
        with _autocast_off(grad_out.device.type):
            dy = grad_out.to(w.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = x.new_zeros(x.shape, dtype=w.dtype)
                for e, (dys, dxs) in _segments(ctx.counts, dy, grad_x):
                    torch.matmul(dys, w[e].t() if ctx.transposed else w[e], out=dxs)
                grad_x = grad_x.to(ctx.x_dtype)
            if ctx.needs_input_grad[2]:
                grad_b = dy.new_zeros(len(ctx.counts), dy.shape[1], dtype=ctx.bias_dtype)
                for e, (dys,) in _segments(ctx.counts, dy):
                    grad_b[e] = dys.sum(0)
            if ctx.needs_input_grad[1]:
                grad_w = _experts_weight_gradient(ctx.weight, dy, x, ctx.counts, ctx.transposed)
            if ctx.anchor_device is not None:
                grad_anchor = torch.empty(0, device=ctx.anchor_device)
        return grad_x, grad_w, grad_b, grad_anchor, None, None


def _segments(counts: list[int], *tensors: torch.Tensor):
    """``(e, (t[rows of e] for t in tensors))`` for every expert e with tokens."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            yield e, tuple(t[start : start + count] for t in tensors)
        start += count


def _experts_weight_gradient(
    weight: torch.Tensor, dy: torch.Tensor, x: torch.Tensor, counts: list[int], transposed: bool
) -> torch.Tensor | None:
    """The full gradient of ``weight`` (its own layout) when it has no live projection, else
    ``None`` after adding the compressed gradient (E * r, k) to its projection."""
    a, b = (x, dy) if transposed else (dy, x)  # expert e's gradient is a_eᵀ b_e
    projection = projection_of(weight)
    if projection is None or projection.needs_full_gradient():
        full = torch.zeros(weight.shape, dtype=dy.dtype, device=dy.device)
        for e, (a_e, b_e) in _segments(counts, a, b):
            torch.matmul(a_e.t(), b_e, out=full[e])
        if projection is None:
            return full.to(weight.dtype)
        projection.select(full)  # under data parallelism, averages `full` across ranks first
        compressed = projection.compress(full)
        del full  # freed before the next layer's backward allocates its own
    else:
        rows = projection.expert_rows  # E x r, each expert's own indices
        experts, rank = rows.shape
        picked, other = (a, b) if projection.side == "rows" else (b, a)
        compressed = dy.new_zeros(experts, rank, other.shape[1])
        for e, (p_e, o_e) in _segments(counts, picked, other):
            torch.matmul(p_e.index_select(1, rows[e]).t(), o_e, out=compressed[e])
        compressed = projection.scale_rows_(compressed.view(experts * rank, -1))
    projection.accumulate(compressed)
    return None


@torch.compiler.disable  # as hf_grass.linear's Grass function: eager under torch.compile
def grass_experts_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: list[int],
    transposed: bool,
) -> torch.Tensor:
    """Every expert's linear map on its routed tokens (``x`` sorted by expert, ``counts`` per
    expert), with the compressed weight gradient of :class:`GrassExpertsFunction`."""
    return GrassExpertsFunction.apply(x, weight, bias, forward_anchor(weight), counts, transposed)


def grass_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The experts module's forward (``hidden_states`` (T, h), the router's ``top_k_index`` and
    ``top_k_weights`` (T, k)), with both projections through :func:`grass_experts_linear`.

    The same routing arithmetic as transformers' ``grouped_mm`` experts implementation: pairs
    sorted by expert, gate (``self._apply_gate``) or activation, optional post-expert norm,
    outputs weighted, put back in token order and summed over each token's k slots, keeping for
    the backward what ``grouped_mm`` keeps. Expert indices >= E (expert parallelism's masked
    slots) are dropped (their slots add zero).
    """
    num_tokens, top_k = top_k_index.shape
    experts = self.num_experts
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=experts)[:experts]
    order = order[: int(counts.sum())]  # masked slots (ids >= E) sort last
    counts = counts.tolist()
    tokens = torch.div(order, top_k, rounding_mode="floor")
    x = hidden_states[tokens]
    up, up_bias = (
        ("gate_up_proj", "gate_up_proj_bias") if self.has_gate else ("up_proj", "up_proj_bias")
    )
    h = grass_experts_linear(
        x, getattr(self, up), getattr(self, up_bias) if self.has_bias else None, counts,
        self.is_transposed,
    )  # fmt: skip
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = grass_experts_linear(
        h, self.down_proj, self.down_proj_bias if self.has_bias else None, counts,
        self.is_transposed,
    )  # fmt: skip
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order, None].to(out.dtype)
    # Back to (token, slot) order and summed over the k slots: index_put keeps only the index
    # for the backward (index_add would keep `out` too: S x h more per MoE layer), and the sum
    # has a fixed order (deterministic, unlike index_add with repeated indices on a GPU).
    pairs = out.new_zeros(num_tokens * top_k, out.shape[1]).index_put((order,), out)
    return pairs.view(num_tokens, top_k, -1).sum(1).to(hidden_states.dtype)


_GRASS_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def grass_experts_class(base: type[nn.Module]) -> type[nn.Module]:
    """The Grass form of the experts class ``base`` (made once per class): ``base`` with
    :func:`grass_experts_forward` as its forward. Same parameters and ``state_dict``."""
    if base not in _GRASS_CLASSES:
        name = f"Grass{base.__name__}"
        cls = type(name, (base,), {"forward": grass_experts_forward, "grass_base": base})
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls  # importable by name, so a pickled model loads
        _GRASS_CLASSES[base] = cls
    return _GRASS_CLASSES[base]


register_layer(
    LayerType(
        "experts",
        kind=is_experts_module,
        grass_class=grass_experts_class,
        weights=expert_weights,
        linear=False,  # 3-D weights: GaLore and APOLLO leave them dense
        description="MoE experts",
    )
)
