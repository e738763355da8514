"""How Grass reads a projected weight's layout: which dimension it selects, and its local shard.

A weight is (m, n), or (E, m, n) for a stack of MoE experts' matrices; Grass's arithmetic runs on
an oriented view with the selected dimension first. Under FSDP2 a weight is a DTensor: Grass works
on the local shard, and a weight sharded by rows (dim 0) is projected by columns.
"""

from __future__ import annotations

import torch


def projection_side(shape: torch.Size | tuple[int, ...], proj_side: str = "auto") -> str:
    """``"rows"`` or ``"cols"``: the dimension selected for a weight of ``shape`` (m, n), or
    for each matrix of a stack of experts' weights (E, m, n).

    ``"auto"`` selects the larger dimension, which leaves the smaller state r x min(m, n).
    """
    if proj_side != "auto":
        return proj_side
    return "rows" if shape[-2] >= shape[-1] else "cols"


def side_of(param: torch.Tensor, proj_side: str = "auto") -> str:
    """The selected side of ``param``: :func:`projection_side`, except for a matrix sharded by
    rows (FSDP2's ``fully_shard``), where Grass selects columns (see :mod:`hf_grass.optim`).
    Experts' weights sharded by experts keep every expert's matrix whole: any side."""
    if not row_sharded(param) or experts_sharded(param):
        return projection_side(param.shape, proj_side)
    if proj_side == "rows":
        raise ValueError(
            f"proj_side='rows' on a weight of shape {tuple(param.shape)} sharded by rows "
            "(FSDP2): Grass selects the unsharded columns there; use proj_side='auto' or 'cols'."
        )
    return "cols"


def row_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor sharded along dim 0 (what ``fully_shard`` makes of a weight)."""
    placements = getattr(t, "placements", None)
    return placements is not None and any(getattr(p, "dim", None) == 0 for p in placements)


def experts_sharded(t: torch.Tensor) -> bool:
    """True for experts' weights (E, m, n) as a DTensor sharded by experts (dim 0, what
    ``fully_shard`` does): each rank holds whole experts."""
    return t.dim() == 3 and row_sharded(t)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise): Grass's arithmetic is local."""
    return t.to_local() if hasattr(t, "to_local") else t


def oriented(t: torch.Tensor, side: str) -> torch.Tensor:
    """A view of ``t`` (its local shard for a DTensor) with the selected dimension first: (m, k),
    or (E, m, k) for a stack of experts' matrices."""
    t = local(t)
    return t if side == "rows" else t.transpose(-2, -1)


def selected_size(t: torch.Tensor, side: str) -> int:
    """The size of the selected dimension of ``t`` (of each expert's matrix in a stack)."""
    return oriented(t, side).shape[-2]
