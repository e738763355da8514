"""Compressed-gradient embeddings: Grass rows of the vocabulary, without the V x d gradient.

An embedding lookup ``y_t = W[ids_t]`` (W: V x d) has the gradient ``G = sum_t e_{ids_t} dY_t``:
only the rows of the batch's tokens are non-zero. For selected rows ``rows`` (vocabulary entries)
and scales ``rho`` the compressed gradient is::

    U, inv = unique(ids)                 # the batch's distinct tokens, |U| <= T
    G_U    = index_add(inv, dY)          # their gradient rows, |U| x d
    C[j]   = rho_j * G_U[U == rows_j]    # zero for a selected row absent from the batch

which costs O(T d) and never forms V x d. Positions holding ``padding_idx`` contribute nothing, as
in ``nn.Embedding``. At a selection step the sparse rows ``G_U`` give the row norms (every other
row's norm is zero), and rows are selected from them.

A weight tied to an output head (``lm_head``) is one projected weight used twice: both uses add
to the same compressed gradient. The head's backward runs first, so at a selection step the rows
are chosen from the head's part of the gradient (the larger one: every vocabulary row gets a
gradient from the softmax) and the embedding's part is compressed with those rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .layers import LayerType, register_layer, replaces
from .projection import forward_anchor, projection_of


class GrassEmbeddingFunction(torch.autograd.Function):
    """``F.embedding(ids, weight, padding_idx)`` whose backward delivers the weight gradient
    compressed (see the module doc). Inputs: ``ids``, ``weight`` (V x d), ``padding_idx`` or
    None, ``anchor`` (the projection's grad-ready anchor) or None."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, anchor):
        ctx.save_for_backward(ids)
        ctx.weight = weight  # the Parameter itself: its projection is registered for it
        ctx.padding_idx = padding_idx
        ctx.anchor_device = None if anchor is None else anchor.device
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        dy = grad_out.reshape(-1, weight.shape[1])  # T x d
        flat = ids.reshape(-1)  # T
        if ctx.padding_idx is not None:
            keep = flat != ctx.padding_idx
            dy, flat = dy[keep], flat[keep]
        grad_anchor = (
            None if ctx.anchor_device is None else torch.empty(0, device=ctx.anchor_device)
        )
        return None, _weight_gradient(weight, flat, dy), None, grad_anchor


def _weight_gradient(weight: torch.Tensor, ids: torch.Tensor, dy: torch.Tensor):
    """The full gradient (V x d) without a live projection; else ``None`` after adding the
    compressed gradient to the projection."""
    projection = projection_of(weight)
    if projection is None:
        return torch.zeros_like(weight).index_add_(0, ids, dy.to(weight.dtype))
    if projection.needs_full_gradient() or projection.side != "rows":
        full = torch.zeros(weight.shape, dtype=dy.dtype, device=dy.device).index_add_(0, ids, dy)
        if projection.needs_full_gradient():
            projection.select(full)
        projection.accumulate(projection.compress(full))
        return None
    tokens, inverse = torch.unique(ids, return_inverse=True)  # sorted
    rows_of_tokens = torch.zeros(tokens.numel(), dy.shape[1], dtype=dy.dtype, device=dy.device)
    rows_of_tokens.index_add_(0, inverse, dy)  # |U| x d
    rows = projection.rows
    pos = torch.searchsorted(tokens, rows).clamp_(max=max(tokens.numel() - 1, 0))
    present = tokens[pos] == rows if tokens.numel() else torch.zeros_like(rows, dtype=torch.bool)
    compressed = torch.zeros(rows.numel(), dy.shape[1], dtype=dy.dtype, device=dy.device)
    compressed[present] = rows_of_tokens[pos[present]]
    projection.accumulate(projection.scale_rows_(compressed))
    return None


class GrassEmbedding(nn.Embedding):
    """``nn.Embedding`` whose backward delivers a compressed weight gradient (module doc).

    Same parameters, ``state_dict`` and outputs as ``nn.Embedding``; made by
    :func:`hf_grass.grassify` with ``embeddings=True``. ``max_norm`` and ``sparse`` are not
    supported (``grassify`` refuses such embeddings).
    """

    grass_base = nn.Embedding

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.embedding(input, self.weight, self.padding_idx)
        return _apply_grass_embedding(input, self.weight, self.padding_idx)


@torch.compiler.disable  # as hf_grass.linear's Grass function: eager under torch.compile
def _apply_grass_embedding(ids, weight, padding_idx) -> torch.Tensor:
    return GrassEmbeddingFunction.apply(ids, weight, padding_idx, forward_anchor(weight))


register_layer(
    LayerType(
        "embedding",
        kind=lambda module: isinstance(module, nn.Embedding),
        grass_class=replaces(GrassEmbedding),
        by_target_modules=False,  # selected by embeddings=True (--grass_embeddings)
        linear=False,
        description="nn.Embedding",
    )
)
