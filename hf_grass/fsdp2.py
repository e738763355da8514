"""FSDP2 (``fully_shard``): every collective and DTensor placement of Grass's optimizer state.

A weight sharded by rows (dim 0) is projected by columns: the column norms are summed over the
ranks (one all-reduce of a k-vector) so that every rank selects the same columns, and each rank
keeps the r x m/W part of the moments for its own rows (saved as DTensors of the global r x m
shape, sharded on dim 1). Experts' weights sharded by experts keep every expert whole: rows are
selected per expert locally, and all per-row state is sharded with the experts.
"""

from __future__ import annotations

import torch

from .layout import experts_sharded, local, row_sharded


def first_expert(p: torch.Tensor) -> int:
    """The index, in the whole stack, of this rank's first expert of ``p`` (0 unless sharded)."""
    if not experts_sharded(p):
        return 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset
    return compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)[1][0]


def global_per_row(local_value: torch.Tensor, p: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's per-row state of an experts-sharded ``p`` as a DTensor over all E * r rows,
    sharded like ``p`` (row indices counted in the whole stack)."""
    from torch.distributed.tensor import DTensor

    shape = (p.shape[0] * rank, *local_value.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local_value, p.device_mesh, p.placements, shape=shape, stride=stride)


def local_per_row(value: torch.Tensor, p: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's part of saved per-row state of an experts-sharded ``p``: from a DTensor of
    any placement or from a full tensor (a single process's state)."""
    if hasattr(value, "redistribute"):
        return value.redistribute(p.device_mesh, p.placements).to_local()
    start = first_expert(p) * rank
    return value[start : start + local(p).shape[0] * rank]


def row_norms(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Norms of the rows of the oriented gradient ``g`` (float32 at least; fp64 stays fp64):
    (m,) for a matrix, (E, m) for experts' matrices (E, m, k).

    For a weight sharded by rows (FSDP2), ``g`` holds this rank's part of every column: the
    squared norms are summed over the ranks (one all-reduce of a k-vector), so every rank sees
    the norms of the whole gradient and selects the same columns.
    """
    g = g.to(torch.promote_types(g.dtype, torch.float32))
    if not row_sharded(p) or experts_sharded(p):  # sharded by experts: each expert is local
        return g.norm(dim=-1)
    import torch.distributed as dist

    squares = g.pow(2).sum(dim=1)
    dist.all_reduce(squares, group=p.device_mesh.get_group())
    return squares.sqrt()


def moment_placements(p: torch.Tensor) -> list:
    """Placements of the oriented (r x m) moments of a weight sharded by rows: its own, with
    the weight's dim-0 sharding on the moments' dim 1."""
    from torch.distributed.tensor import Shard

    return [Shard(1) if getattr(pl, "dim", None) == 0 else pl for pl in p.placements]


def global_moment(local_moment: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's r x m/W moments of a row-sharded ``p`` as a DTensor of shape r x m."""
    from torch.distributed.tensor import DTensor

    r, m = local_moment.shape[0], p.shape[0]
    return DTensor.from_local(
        local_moment, p.device_mesh, moment_placements(p), shape=(r, m), stride=(m, 1)
    )


def placed_moment(moment: torch.Tensor, p: torch.Tensor, projected: bool) -> torch.Tensor:
    """Saved moments as ``p``'s state holds them. For a sharded ``p`` (a DTensor) they may come
    as a DTensor of any placement (what ``torch.distributed.checkpoint`` loads) or as a full
    tensor (a single process's state, :func:`hf_grass.distributed.full_optimizer_state_dict`):
    Grass moments of a row-sharded weight become this rank's r x m/W part, plain AdamW moments a
    DTensor sharded like ``p``; sharded moments for a plain ``p`` are gathered."""
    if not hasattr(p, "device_mesh"):
        return moment.full_tensor() if hasattr(moment, "full_tensor") else moment
    from torch.distributed.tensor import DTensor, distribute_tensor

    grass_sharded = projected and row_sharded(p) and p.dim() == 2
    placements = moment_placements(p) if grass_sharded else list(p.placements)
    if isinstance(moment, DTensor):
        moment = moment.redistribute(p.device_mesh, placements)
    else:
        moment = distribute_tensor(moment.to(p.device), p.device_mesh, placements)
    return moment.to_local() if grass_sharded else moment


def check_experts_sharding(p: torch.Tensor) -> None:
    """Grass takes an experts' weight sharded by whole experts (FSDP2's dim 0), in equal parts."""
    from torch.distributed.tensor import Replicate, Shard

    shards = [
        (pl, p.device_mesh.size(i))
        for i, pl in enumerate(p.placements)
        if not isinstance(pl, Replicate)
    ]
    if any(not (isinstance(pl, Shard) and pl.dim == 0) for pl, _ in shards) or any(
        p.shape[0] % size for _, size in shards
    ):
        raise ValueError(
            f"An experts' weight of shape {tuple(p.shape)} is sharded as {list(p.placements)}: "
            "Grass needs it sharded by whole experts in equal parts (FSDP2's default Shard(0), "
            "with the number of experts divisible by the number of shards); shard it so, or "
            "leave the experts out of target_modules."
        )
