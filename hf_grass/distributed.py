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

With accelerate, ``accelerator.prepare`` is the DDP wrap: :func:`prepare_data_parallel` (a
``GrassDataParallel`` under several processes, ``None`` on one) goes before it, ``attach`` after.
The order matters: DDP reads ``_ddp_params_and_buffers_to_ignore`` only when it is built and
cannot drop a parameter afterwards, so a model already wrapped is refused (it would go on
all-reducing a dense zero gradient for every projected weight). A wrapped model without
GrassDataParallel stops in its first forward (``GrassProjection.check_data_parallel``).

How it averages, per backward pass on which DDP would synchronise (not inside ``no_sync()``, so
gradient accumulation sends nothing before the last micro-batch):

- each projected weight reports when its gradient is complete (its projection's grad-ready
  hook, after the compressed part and any full ``.grad`` from a use outside its layer, which is
  folded in); buckets of about ``bucket_cap_mb`` (``GrassConfig.bucket_cap_mb``, the Trainer's
  ``--grass_bucket_cap_mb``) have fixed members and a fixed order from
  construction, and each is flattened and all-reduced asynchronously, in order, as soon as all
  its members are ready, while the backward goes on;
- when the backward ends (a callback queued on the autograd engine, as DDP does), the buckets
  left are sent, every reduction is waited on and divided by the world size. So after
  ``loss.backward()`` every rank holds the same averaged compressed gradients.

A projected weight that some rank did not use in a backward (a branch, a route; HF ``Trainer``
turns DDP's ``find_unused_parameters`` on by default) is sent as zeros by that rank, with a flag
per weight in the bucket, so the collectives never depend on which weights got gradients: the
result is DDP's (the sum over the ranks that used it, divided by the world size), and a weight no
rank used gets no gradient.

Same rows everywhere. At a selection step (every ``update_proj_gap`` steps) each layer's full
gradient is all-reduced before its rows are chosen, so every rank selects from the gradient of
the global batch, what one process would choose; the sampled selections share their seed and
random stream. This costs one dense all-reduce per projected weight every K steps (it happens
on the first micro-batch of an accumulation window, the only traffic before the last one). Row
norms alone cannot be averaged (``||sum G|| != sum ||G||``).

Layer-wise mode (``layerwise=True``): each projected weight's compressed gradient is averaged
synchronously when its last micro-batch's gradient is complete, and the weight is updated at
once (:func:`hf_grass.enable_layerwise` with ``reduce_gradient=grass_dp.reduce_now``); a weight
whose window was cut short (the last window of an epoch) is averaged in ``optimizer.step()``;
the plain parameters keep DDP's averaging and are updated by ``optimizer.step()``.

The synchronous averages (selection steps, layer-wise mode) follow the backward's order, so there
every rank must use every projected weight: each is preceded by a 16-byte check that all ranks
average the same weight, and a weight missing on some rank stops the job with an error naming it
(rather than pairing unrelated gradients, or hanging).

All of Grass's collectives use a process group of their own, so their order cannot interleave
with DDP's. At construction every rank checks that all ranks have the same Grass settings and
weights, and fails with one clear error otherwise; then rank 0's projected weights are broadcast
(DDP broadcasts the others, but not the parameters it is told to ignore).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .bucket import Bucket
from .config import resolve_option
from .layers import is_grass_layer, layer_weights
from .projection import GrassProjection

logger = logging.getLogger(__name__)

_METERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# The model attribute naming the weights GrassDataParallel added to DDP's ignore list.
IGNORED_FOR_GRASS = "_grass_ddp_ignored"


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
        bucket_cap_mb: size of a compressed-gradient bucket in MB, as DDP's ``bucket_cap_mb``
            (default: :attr:`GrassConfig.bucket_cap_mb <hf_grass.GrassConfig>`; 0: each weight
            alone); :attr:`bucket_cap_bytes` is the cap in bytes.
        layerwise: averaging for layer-wise updates (see :meth:`reduce_now`) instead of buckets
            (default: ``GrassConfig.layerwise``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float | None = None,
        layerwise: bool | None = None,
    ):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "GrassDataParallel needs torch.distributed: launch with torchrun (or accelerate "
                "launch) and call torch.distributed.init_process_group first."
            )
        if _ddp_inside(model) is not None:
            raise ValueError(
                "GrassDataParallel got a model already wrapped in DistributedDataParallel, whose "
                "reducer cannot drop the projected weights any more: build GrassDataParallel on "
                "the model before wrapping it (before accelerator.prepare), then call "
                ".attach(wrapped_model)."
            )
        bucket_cap_mb = resolve_option("bucket_cap_mb", bucket_cap_mb)
        layerwise = resolve_option("layerwise", layerwise)
        while not hasattr(optimizer, "projection") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        self.group = dist.new_group(ranks=ranks)
        self.world_size = dist.get_world_size(self.group)
        self.layerwise = layerwise
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.meter = CommMeter()
        self._ddp: nn.Module | None = None
        self._selected = False  # this backward averaged a full gradient (a selection step)
        self._hooks = []

        self.projected: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if not is_grass_layer(module):
                continue
            for param_name, weight in layer_weights(module).items():
                if optimizer.projection(weight) is not None:
                    self.projected[f"{name}.{param_name}" if name else param_name] = weight
        # A tied embedding and head are one weight under two names: DDP must skip both names,
        # but the weight is averaged once.
        ignore_names = sorted(self.projected)
        unique = {id(w): n for n, w in reversed(list(self.projected.items()))}
        self.projected = {n: w for n, w in self.projected.items() if unique[id(w)] == n}
        _check_same_everywhere(self.group, optimizer, ignore_names)
        ignore = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
        model._ddp_params_and_buffers_to_ignore = sorted(ignore | set(ignore_names))
        # what ungrassify takes back out, so that a DDP built afterwards averages them again
        added = set(ignore_names) - ignore | set(getattr(model, IGNORED_FOR_GRASS, ()))
        setattr(model, IGNORED_FOR_GRASS, sorted(added))
        # DDP broadcasts rank 0's parameters at construction, but not the ones it ignores.
        with torch.no_grad():
            for weight in self.projected.values():
                dist.broadcast(
                    weight.data, src=dist.get_global_rank(self.group, 0), group=self.group
                )
        self._names = list(self.projected)
        self._device = next(iter(self.projected.values())).device if self.projected else None
        self._index = {id(w): i for i, w in enumerate(self.projected.values())}
        self._projection_of = {id(w): optimizer.projection(w) for w in self.projected.values()}
        for weight in self.projected.values():
            self._projection_of[id(weight)].reduce_full = self._full_gradient_reducer(weight)
        # Forms the fixed buckets (below), then ends each backward pass that needs it.
        self._buckets: list[_Bucket] = []
        self._bucketing = Bucket(
            self.bucket_cap_bytes, self._add_bucket, self._end_of_backward, self._backward_failed
        )
        if not layerwise:
            self._make_buckets()
        for index, bucket in enumerate(self._buckets):
            for projection in bucket.projections:
                handle = projection.register_grad_ready_hook(self._ready_hook(index, projection))
                self._hooks.append(handle)
        if layerwise:
            # A rank that skipped a weight's average meets the others' at the step's end.
            optimizer.register_step_post_hook(lambda *_: self._check_same_weight(len(self._names)))
        optimizer.register_step_post_hook(lambda *_: self.meter.end_step())
        _METERS[optimizer] = self.meter

    # ---- wiring ---------------------------------------------------------------------------------
    def attach(self, ddp_model: nn.Module) -> None:
        """Follow ``ddp_model``'s ``no_sync()`` and count its traffic in :attr:`meter`.

        ``ddp_model``: the model wrapped in ``DistributedDataParallel`` (what
        ``accelerator.prepare`` returns; a ``torch.compile`` of it too). Its DDP must have been
        built after this object, so that it skips the projected weights.
        """
        wrapped = ddp_model
        ddp_model = _ddp_inside(wrapped)
        if ddp_model is None:
            raise TypeError(
                f"attach() got a {type(wrapped).__name__}, not a model wrapped in "
                "DistributedDataParallel: pass what DDP(model) or accelerator.prepare returned."
            )
        if self._ddp is ddp_model:
            return
        ignored = getattr(ddp_model, "parameters_to_ignore", set())
        reduced = {id(p) for n, p in ddp_model.module.named_parameters() if n not in ignored}
        for name, weight in self.projected.items():
            if id(weight) in reduced:
                raise ValueError(
                    f"The DistributedDataParallel given to attach() all-reduces the projected "
                    f"weight {name!r}: it was built before GrassDataParallel (or on another "
                    "model); build GrassDataParallel(model, optimizer) before wrapping the "
                    "model in DDP (before accelerator.prepare)."
                )
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

    def _check_same_weight(self, index: int) -> None:
        """Stop unless every rank is about to average the same projected weight (``index``;
        ``len(names)`` stands for "no more weights").

        Synchronous averages (selection steps, layer-wise mode) happen in backward order, as
        each weight's gradient arrives; a weight that got no gradient on some rank (a branch or
        a route taken on some ranks only) would pair one rank's collective with another weight's
        on the others, and average unrelated gradients. A 16-byte all-reduce before each one
        turns that into an error naming the weights.
        """
        both = torch.tensor([index, -index], dtype=torch.int64, device=self._device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        highest, lowest = int(both[0]), -int(both[1])
        if highest != lowest:
            names = [self._names[i] if i < len(self._names) else "the end of the step"
                     for i in (lowest, highest)]  # fmt: skip
            raise RuntimeError(
                f"Ranks disagree on the projected weight to average: {names[0]!r} on some, "
                f"{names[1]!r} on others. A projected weight got no gradient on some ranks; "
                "Grass averages every projected weight on every rank at selection steps and in "
                "layer-wise mode: leave weights that ranks use differently out of target_modules."
            )

    # ---- selection steps ------------------------------------------------------------------------
    def _full_gradient_reducer(self, weight: torch.Tensor):
        index = self._index[id(weight)]

        def reduce_full(grad: torch.Tensor) -> torch.Tensor:
            """The rank-averaged full gradient of one layer (selection steps only)."""
            self._check_same_weight(index)
            self._selected = True
            self._bucketing.flush_after_backward()
            return self._average(grad.contiguous(), "selection")

        return reduce_full

    # ---- bucketed, asynchronous averaging ----------------------------------------------------------
    def _make_buckets(self) -> None:
        """Fixed buckets, in the reverse order of the model's modules (about the order in which
        the backward completes gradients), one dtype each, about :attr:`bucket_cap_bytes` each.

        Membership and order never depend on which weights got gradients, so every rank sends
        the same collectives in the same order: a weight unused on some rank is sent as zeros
        (see :class:`_Bucket`).
        """
        for weight in reversed(list(self.projected.values())):
            projection = self._projection_of[id(weight)]
            kept = self._bucketing.items
            if kept and kept[0].weight.dtype != weight.dtype:
                self._bucketing.flush()  # one dtype per bucket
            nbytes = math.prod(projection.compressed_shape) * weight.dtype.itemsize
            self._bucketing.add(projection, nbytes)
        self._bucketing.flush()

    def _add_bucket(self, projections: list[GrassProjection]) -> None:
        self._buckets.append(_Bucket(projections))

    def _ready_hook(self, index: int, projection: GrassProjection):
        def hook() -> None:
            if not self._syncing():
                return
            projection.absorb_full_grad()  # a use outside the Grass layer: average it too
            self._bucketing.flush_after_backward()
            self._buckets[index].ready.add(id(projection))
            self._launch_ready()

        return hook

    def _launch_ready(self) -> None:
        """Launch, in order, every bucket whose weights all have their gradients."""
        for bucket in self._buckets:
            if bucket.work is None:
                if len(bucket.ready) < len(bucket.projections):
                    return
                self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        flat = bucket.flatten()
        self.meter.add("compressed", flat.numel() * flat.element_size())
        bucket.work = dist.all_reduce(flat, group=self.group, async_op=True)
        bucket.flat = flat

    def _end_of_backward(self) -> None:
        """Check the ranks' selections met, send the buckets left, write back the averages."""
        if self._selected:
            self._selected = False
            self._check_same_weight(len(self._names))
        if not self._syncing() or not self._buckets:
            return
        for bucket in self._buckets:
            if bucket.work is None:
                self._launch(bucket)
        for bucket in self._buckets:
            bucket.work.wait()
            bucket.write_back(self.world_size)

    def _backward_failed(self) -> None:
        """A backward raised before its end (see :class:`~hf_grass.bucket.Bucket`): finish the
        averages it launched (every rank launched them in the same order) and forget them, so
        that the next backward averages from scratch."""
        self._selected = False
        for bucket in self._buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.reset()
        logger.warning(
            "Grass: a backward pass raised before its end; its partial gradient averages were "
            "dropped; zero the gradients (optimizer.zero_grad()) before the next one, as after any "
            "failed backward."
        )

    # ---- layer-wise ------------------------------------------------------------------------------
    def reduce_now(self, param: torch.Tensor) -> None:
        """Average ``param``'s compressed gradient across ranks, synchronously (layer-wise mode).

        Plain parameters are left to DDP (they are updated by ``optimizer.step()``).
        """
        projection = self._projection_of.get(id(param))
        if projection is None:
            return
        projection.absorb_full_grad()  # a use outside the Grass layer: average it too
        if projection.grad is not None:
            self._check_same_weight(self._index[id(param)])
            self._average(projection.grad, "compressed")

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for projection in self._projection_of.values():
            projection.reduce_full = None


def forget_data_parallel(model: nn.Module) -> None:
    """Give back to DDP the weights :class:`GrassDataParallel` told it to ignore in ``model``
    (called by :func:`~hf_grass.ungrassify`): a DDP built afterwards averages them again."""
    added = set(vars(model).pop(IGNORED_FOR_GRASS, ()))
    if not added:
        return
    kept = [n for n in getattr(model, "_ddp_params_and_buffers_to_ignore", ()) if n not in added]
    if kept:
        model._ddp_params_and_buffers_to_ignore = kept
    else:
        vars(model).pop("_ddp_params_and_buffers_to_ignore", None)


def prepare_data_parallel(
    model: nn.Module, optimizer: Any, **kwargs: Any
) -> GrassDataParallel | None:
    """:class:`GrassDataParallel` for ``model`` when several processes train it, else ``None``.

    Call it before the model is wrapped in DDP (before ``accelerator.prepare``), and
    ``attach`` the wrapped model after; the same loop then runs on one process and on N::

        opt = GrassAdamW(grassify(model, rank=64), lr=1e-3)
        grass_dp = prepare_data_parallel(model, opt)
        model, opt, loader = accelerator.prepare(model, opt, loader)
        if grass_dp is not None:
            grass_dp.attach(model)

    ``kwargs`` go to :class:`GrassDataParallel` (``process_group``, ``bucket_cap_mb``,
    ``layerwise``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(kwargs.get("process_group")) == 1:
        return None
    return GrassDataParallel(model, optimizer, **kwargs)


def _ddp_inside(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` that ``model`` is, or that a ``torch.compile`` of it
    wraps; ``None`` for a model not wrapped in DDP."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


class _Bucket:
    """Compressed gradients averaged by one all-reduce: fixed members, rank-independent layout.

    The flat tensor holds each member's gradient (zeros where this rank has none: a weight unused
    in this rank's backward), then one flag per member, 1 where this rank had a gradient. After
    the sum, a member no rank used gets no gradient, the others the sum over the world size,
    what DDP computes for a parameter some ranks did not use.
    """

    def __init__(self, projections: list[GrassProjection]):
        self.projections = projections
        self.dtype = projections[0].weight.dtype  # one dtype per bucket
        self.ready: set[int] = set()
        self.work: Any = None
        self.flat: torch.Tensor | None = None

    @staticmethod
    def _shape(projection: GrassProjection) -> tuple[int, int]:
        return projection.compressed_shape

    def flatten(self) -> torch.Tensor:
        used, grads = [], []
        for projection in self.projections:
            projection.absorb_full_grad()  # a weight used only outside its layer on this rank
            used.append(float(projection.grad is not None))
            if projection.grad is None:
                weight = projection.weight
                zeros = torch.zeros(self._shape(projection), dtype=self.dtype, device=weight.device)
                projection.accumulate(zeros)
            grads.append(projection.grad)
        flags = torch.tensor(used, dtype=self.dtype, device=grads[0].device)
        return _flatten_dense_tensors([*grads, flags])

    def write_back(self, world_size: int) -> None:
        grads = [p.grad for p in self.projections]
        flags = torch.empty(len(grads), dtype=self.dtype, device=self.flat.device)
        *averages, flags = _unflatten_dense_tensors(self.flat, [*grads, flags])
        for projection, average, used in zip(
            self.projections, averages, flags.tolist(), strict=True
        ):
            if used == 0:
                projection.grad = None
            else:
                projection.grad.copy_(average.div_(world_size))
        self.reset()

    def reset(self) -> None:
        self.ready.clear()
        self.work = self.flat = None


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
