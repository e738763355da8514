"""FSDP2 (``fully_shard``): every collective and DTensor placement of Grass.

A weight sharded by rows (dim 0) is projected by columns: the column norms are summed over the
ranks (one all-reduce of a k-vector) so that every rank selects the same columns, and each rank
keeps the r x m/W part of the moments for its own rows (saved as DTensors of the global r x m
shape, sharded on dim 1). Experts' weights sharded by experts keep every expert whole: rows are
selected per expert locally, and all per-row state is sharded with the experts.

A Grass linear layer under FSDP2 sees FSDP2's unsharded weight, not the sharded parameter the
optimizer holds: :func:`sharded_param_of` finds the one behind the other, and
:func:`reduce_compressed` averages the layer's compressed gradient (the r selected columns,
r x m) into this rank's r x m/W, so that FSDP2 gets no gradient for that weight on ordinary
steps.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .layout import experts_sharded, local, row_sharded

# FSDP2's unsharded parameter (what a module holds during forward and backward) -> a weak
# reference to FSDP2's record of it, which names the sharded parameter the optimizer holds.
_RECORD_OF_UNSHARDED = WeakIdKeyDictionary()
_NOT_UNSHARDED = WeakIdKeyDictionary()  # tensors looked up and found to be no such parameter


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


def shard_group(p: torch.Tensor):
    """The process group over which ``p`` is split by rows: its mesh dimension placed Shard(0)
    (FSDP2's only one; HSDP replicates over the other, where gradients are already equal)."""
    dim = next(i for i, pl in enumerate(p.placements) if getattr(pl, "dim", None) == 0)
    return p.device_mesh.get_group(dim)


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
    dist.all_reduce(squares, group=shard_group(p))
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


def sharded_param_of(t: torch.Tensor) -> torch.Tensor | None:
    """The sharded parameter (a DTensor) for which FSDP2 put ``t`` into a module during its
    forward and backward; ``None`` when ``t`` is no such unsharded parameter.

    FSDP2 keeps one unsharded parameter per weight and swaps it in and out; which sharded
    parameter it stands for is read from FSDP2's records of the sharded modules (private
    attributes: on a torch whose FSDP2 keeps them elsewhere, nothing is found and the layer
    falls back to the full gradient, which FSDP2 reduce-scatters).
    """
    if t in _NOT_UNSHARDED or hasattr(t, "device_mesh"):
        return None
    record = _RECORD_OF_UNSHARDED.get(t)
    if record is None or record() is None:
        _index_unsharded_params()
        record = _RECORD_OF_UNSHARDED.get(t)
    record = record() if record is not None else None
    if record is None:
        # Not FSDP2's: a module's unsharded parameter exists before its first forward reads it.
        _NOT_UNSHARDED[t] = True
        return None
    return getattr(record, "sharded_param", None)


def _index_unsharded_params() -> None:
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return
    for state in list(_module_state_mapping.values()):
        state = state() if isinstance(state, weakref.ref) else state
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch < 2.10 keeps one group per sharded module
            groups = [getattr(state, "_fsdp_param_group", None)]
        for group in groups:
            for record in getattr(group, "fsdp_params", ()):
                unsharded = getattr(record, "_unsharded_param", None)
                if unsharded is not None:
                    _RECORD_OF_UNSHARDED[unsharded] = weakref.ref(record)


def can_reduce_compressed(p: torch.Tensor) -> bool:
    """Whether :func:`reduce_compressed` takes ``p``: a matrix sharded by rows (Shard(0)) on
    one mesh dimension, replicated on any other (FSDP2 and HSDP)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = getattr(p, "placements", ())
    shards = [pl for pl in placements if isinstance(pl, Shard)]
    return (
        p.dim() == 2
        and len(shards) == 1
        and shards[0].dim == 0
        and all(isinstance(pl, Shard | Replicate) for pl in placements)
    )


def reduce_compressed(compressed: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Average one rank's compressed gradient (r x m, the selected columns of a weight sharded
    by rows) over the data-parallel ranks, as FSDP2 averages full gradients, keeping this rank's
    columns (r x m/W, the local part of the moments' r x m).

    One reduce-scatter of r x m over the sharding dimension (padded to equal parts, as FSDP2
    pads uneven rows) and an all-reduce of this rank's part over a replicated one (HSDP):
    r/n of what FSDP2 sends for the full gradient.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    r, m = compressed.shape
    data_parallel = 1
    # in the layer's compute dtype, as FSDP2 reduces in its param_dtype unless told otherwise
    part = compressed.t()  # m x r: this rank's rows are contiguous
    # the sharding dimension first: a replicated one then reduces this rank's part only
    dims = sorted(range(mesh.ndim), key=lambda d: not isinstance(p.placements[d], Shard))
    for dim in dims:
        group = mesh.get_group(dim)
        size = mesh.size(dim)
        data_parallel *= size
        if isinstance(p.placements[dim], Shard):
            chunk = -(-m // size)  # torch.chunk's (and FSDP2's) rows per rank
            padded = part.new_zeros(chunk * size, r)
            padded[:m] = part
            out = part.new_empty(chunk, r)
            # newer torch names reduce_scatter_tensor reduce_scatter_single (the old name warns)
            reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
            reduce_scatter(out, padded, group=group)
            start = min(mesh.get_local_rank(dim) * chunk, m)
            part = out[: min(m - start, chunk)]
        else:
            part = part.contiguous()
            dist.all_reduce(part, group=group)
    # (on the sharded weight's device: FSDP2's CPU offload keeps it, and the state, on the CPU)
    return part.t().div_(data_parallel).to(p.device, p.dtype).contiguous()
