"""Data parallelism for a grassified model: workers exchange r x k compressed gradients.

DDP all-reduces every weight gradient (m x n). With the compressed backward a projected weight
has only ``C = rho * G[rows]`` (r x k), so :class:`GrassDataParallel` takes those weights out of
DDP's reducer and averages their compressed gradients itself; DDP averages the rest (embeddings,
norms, heads) as usual::

    groups = grassify(model, rank=64)
    opt = GrassAdamW(groups, lr=1e-3)
    grass_dp = GrassDataParallel(model, opt)        # before wrapping: DDP must skip Grass weights
    ddp = DistributedDataParallel(model)
    grass_dp.attach(ddp)                            # no_sync() and the communication meter
    ... ddp(x).loss.backward(); opt.step(); opt.zero_grad()   # as usual

How it averages, per backward pass on which DDP would synchronise (not inside ``no_sync()``, so
gradient accumulation sends nothing before the last micro-batch):

- each projected weight reports when its compressed gradient is complete (the grad-ready anchor
  of its projection); the gradient joins a bucket, and a full bucket (``bucket_cap_mb``) is
  flattened and all-reduced asynchronously while the backward goes on;
- when the backward ends (a callback queued on the autograd engine, as DDP does), the last bucket
  is sent, every reduction is waited on and divided by the world size. So after
  ``loss.backward()`` every rank holds the same averaged compressed gradients.

Same rows everywhere. At a selection step (every ``update_proj_gap`` steps) each layer's full
gradient is all-reduced before its rows are chosen, so every rank selects from the gradient of
the global batch, what one process would choose; the sampled selections share their seed and
random stream. This costs one dense all-reduce per projected weight every K steps (it happens
on the first micro-batch of an accumulation window, the only traffic before the last one). Row
norms alone cannot be averaged (``||sum G|| != sum ||G||``).

Layer-wise mode (``layerwise=True``): each projected weight's compressed gradient is averaged
synchronously when its last micro-batch's gradient is complete, and the weight is updated at
once (:func:`hf_grass.enable_layerwise` with ``reduce_gradient=grass_dp.reduce_now``); the
plain parameters keep DDP's averaging and are updated by ``optimizer.step()``.

Like DDP without ``find_unused_parameters``, every rank must give every projected weight a
gradient in every synchronising backward (the same buckets in the same order on all ranks).

All of Grass's collectives use a process group of their own, so their order cannot interleave
with DDP's. At construction every rank checks that all ranks have the same Grass settings and
weights, and fails with one clear error otherwise.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.autograd import Variable

from .embedding import GrassEmbedding
from .linear import GrassLinear
from .projection import GrassProjection

_METERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def comm_meter_of(optimizer: Any) -> CommMeter | None:
    """The :class:`CommMeter` of the data-parallel run ``optimizer`` belongs to, if any."""
    while optimizer not in _METERS and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return _METERS.get(optimizer)


class CommMeter:
    """Bytes handed to collectives, by kind, per optimizer step.

    ``compressed``: Grass's averaged compressed gradients; ``selection``: full layer gradients
    at selection steps; ``ddp``: DDP's buckets (counted by a DDP comm hook). Bytes are the
    payload of each all-reduce (a ring all-reduce moves about twice that per worker).
    """

    def __init__(self) -> None:
        self.current: dict[str, int] = defaultdict(int)
        self.total: dict[str, int] = defaultdict(int)
        self.steps = 0

    def add(self, kind: str, nbytes: int) -> None:
        self.current[kind] += nbytes

    def end_step(self) -> None:
        for kind, nbytes in self.current.items():
            self.total[kind] += nbytes
        self.current.clear()
        self.steps += 1

    def bytes_per_step(self) -> dict[str, float]:
        """Mean bytes per optimizer step, by kind and in ``"all"``."""
        steps = max(self.steps, 1)
        result = {kind: nbytes / steps for kind, nbytes in self.total.items()}
        result["all"] = sum(self.total.values()) / steps
        return result


class GrassDataParallel:
    """Averages the compressed gradients of a grassified model across ranks (module doc).

    Args:
        model: the model (not yet wrapped in DDP), grassified by :func:`hf_grass.grassify`.
        optimizer: the :class:`~hf_grass.GrassAdamW` built on it.
        process_group: the ranks to average over (default: the world); Grass makes its own
            group of the same ranks for its collectives.
        bucket_cap_mb: size of a compressed-gradient bucket, as DDP's ``bucket_cap_mb``.
        layerwise: averaging for layer-wise updates (see :meth:`reduce_now`) instead of buckets.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        layerwise: bool = False,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GrassDataParallel needs torch.distributed: launch with torchrun (or accelerate "
                "launch) and call torch.distributed.init_process_group first."
            )
        while not hasattr(optimizer, "projection") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        self.group = dist.new_group(ranks=ranks)
        self.world_size = dist.get_world_size(self.group)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.layerwise = layerwise
        self.meter = CommMeter()
        self._ddp: nn.Module | None = None
        self._pending: list[GrassProjection] = []
        self._pending_bytes = 0
        self._in_flight: list[tuple[Any, torch.Tensor, list[GrassProjection]]] = []
        self._callback_queued = False
        self._hooks = []

        self.projected: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            grass_module = isinstance(module, (GrassLinear, GrassEmbedding))
            if grass_module and optimizer.projection(module.weight) is not None:
                self.projected[f"{name}.weight" if name else "weight"] = module.weight
        # A tied embedding and head are one weight under two names: DDP must skip both names,
        # but the weight is averaged once.
        ignore_names = sorted(self.projected)
        unique = {id(w): n for n, w in reversed(list(self.projected.items()))}
        self.projected = {n: w for n, w in self.projected.items() if unique[id(w)] == n}
        _check_same_everywhere(self.group, optimizer, ignore_names)
        ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignore | set(ignore_names))
        for weight in self.projected.values():
            projection = optimizer.projection(weight)
            projection.reduce_full = self._average_full_gradient
            if not layerwise:
                anchor = projection.grad_ready_anchor()
                self._hooks.append(
                    anchor.register_post_accumulate_grad_hook(self._ready_hook(projection))
                )
        optimizer.register_step_post_hook(lambda *_: self.meter.end_step())
        _METERS[optimizer] = self.meter
        self._projection_of = {id(w): optimizer.projection(w) for w in self.projected.values()}

    # ---- wiring ---------------------------------------------------------------------------------
    def attach(self, ddp_model: nn.Module) -> None:
        """Follow ``ddp_model``'s ``no_sync()`` and count its traffic in :attr:`meter`."""
        if self._ddp is ddp_model:
            return
        self._ddp = ddp_model
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        meter, group = self.meter, getattr(ddp_model, "process_group", None)

        def counting_allreduce(state, bucket):
            meter.add("ddp", bucket.buffer().numel() * bucket.buffer().element_size())
            return allreduce_hook(group, bucket)

        ddp_model.register_comm_hook(None, counting_allreduce)

    def _syncing(self) -> bool:
        return self._ddp is None or bool(getattr(self._ddp, "require_backward_grad_sync", True))

    def _average(self, tensor: torch.Tensor, kind: str) -> torch.Tensor:
        """Average ``tensor`` across ranks in place, synchronously, counting it as ``kind``."""
        dist.all_reduce(tensor, group=self.group)
        tensor.div_(self.world_size)
        self.meter.add(kind, tensor.numel() * tensor.element_size())
        return tensor

    # ---- selection steps ------------------------------------------------------------------------
    def _average_full_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """The rank-averaged full gradient of one layer (selection steps only)."""
        return self._average(grad.contiguous(), "selection")

    # ---- bucketed, asynchronous averaging ----------------------------------------------------------
    def _ready_hook(self, projection: GrassProjection):
        def hook(anchor: torch.Tensor) -> None:
            anchor.grad = None
            if projection.grad is None or not self._syncing():
                return
            if not self._callback_queued:
                Variable._execution_engine.queue_callback(self._finish)
                self._callback_queued = True
            self._pending.append(projection)
            self._pending_bytes += projection.grad.numel() * projection.grad.element_size()
            if self._pending_bytes >= self.bucket_cap_bytes:
                self._launch()

        return hook

    def _launch(self) -> None:
        if not self._pending:
            return
        by_dtype: dict[torch.dtype, list[GrassProjection]] = defaultdict(list)
        for projection in self._pending:
            by_dtype[projection.grad.dtype].append(projection)
        for projections in by_dtype.values():
            flat = _flatten_dense_tensors([p.grad for p in projections])
            self.meter.add("compressed", flat.numel() * flat.element_size())
            work = dist.all_reduce(flat, group=self.group, async_op=True)
            self._in_flight.append((work, flat, projections))
        self._pending, self._pending_bytes = [], 0

    def _finish(self) -> None:
        """End of backward: send the last bucket, wait for all, write back the averages."""
        self._callback_queued = False
        self._launch()
        for work, flat, projections in self._in_flight:
            work.wait()
            flat.div_(self.world_size)
            grads = _unflatten_dense_tensors(flat, [p.grad for p in projections])
            for projection, grad in zip(projections, grads, strict=True):
                projection.grad.copy_(grad)
        self._in_flight.clear()

    # ---- layer-wise ------------------------------------------------------------------------------
    def reduce_now(self, param: torch.Tensor) -> None:
        """Average ``param``'s compressed gradient across ranks, synchronously (layer-wise mode).

        Plain parameters are left to DDP (they are updated by ``optimizer.step()``).
        """
        projection = self._projection_of.get(id(param))
        if projection is not None and projection.grad is not None:
            self._average(projection.grad, "compressed")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for projection in self._projection_of.values():
            projection.reduce_full = None


def dense_ddp_bytes(model: nn.Module) -> int:
    """Bytes plain DDP would all-reduce per step: every trainable parameter's gradient."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _check_same_everywhere(group, optimizer, projected_names: list[str]) -> None:
    """Every rank must project the same weights with the same settings; say which differ."""
    mine = {
        "weights": projected_names,
        "groups": [
            {k: v for k, v in g.items() if k != "params" and k != "lr" and k != "initial_lr"}
            | {"size": len(g["params"])}
            for g in optimizer.param_groups
        ],
    }
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, repr(mine), group=group)
    if any(other != everyone[0] for other in everyone):
        differing = [i for i, other in enumerate(everyone) if other != everyone[0]]
        raise ValueError(
            f"Grass settings differ between ranks (rank 0 vs rank(s) {differing}): every process "
            "must grassify the same model with the same grass_* flags and optimizer settings. "
            f"Rank 0 has {everyone[0][:300]}"
        )


# ---- FSDP2 ---------------------------------------------------------------------------------------
# GrassAdamW runs on fully_shard's DTensor weights directly (full gradients, reduce-scattered by
# FSDP2): see hf_grass.optim. Its state_dict() gives the moments of a row-sharded weight as
# DTensors, so torch.distributed.checkpoint handles them; the two functions below are the
# gathered form, one torch.save-able dict that resumes on any number of processes, one included.


def full_optimizer_state_dict(optimizer: Any) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor gathered from all ranks.

    Grass moments of a row-sharded weight (this rank's r x m/W) become r x m; the DTensor
    moments of plain parameters become full tensors. The result, the same on every rank, is what
    one process training the whole batch holds: save it from rank 0 with ``torch.save`` and
    resume with :func:`load_full_optimizer_state_dict` on any number of processes, or with
    ``GrassAdamW.load_state_dict`` on one. Collective: call it on every rank.
    """
    from torch.distributed.tensor import DTensor

    state_dict = optimizer.state_dict()
    state_dict["state"] = {
        index: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in entry.items()}
        for index, entry in state_dict["state"].items()
    }
    return state_dict


def load_full_optimizer_state_dict(optimizer: Any, state_dict: dict) -> None:
    """Load a state from :func:`full_optimizer_state_dict` (or from a single process) into an
    optimizer over ``fully_shard`` weights: each rank keeps its own rows' part. The same as
    ``GrassAdamW.load_state_dict``, which takes full and sharded states alike."""
    optimizer.load_state_dict(state_dict)
