"""GrassProjection: one projected weight's selection and compressed gradient, in one place.

:class:`~hf_grass.GrassAdamW` makes one projection per projected weight and owns it; the
projection reads the selection (``rows``, ``rho``) from the optimizer's state and holds the
weight's compressed gradient ``grad`` (r x k) until the optimizer step consumes it. Every other
module reaches it through :func:`projection_of`:

- the compressed-gradient backward (:mod:`hf_grass.linear`) asks whether a full gradient is
  needed (``needs_full_gradient``), selects, and ``accumulate``-s ``rho * dY[:, rows]ᵀ X``;
- clipping, layer-wise updates and data-parallel averaging read and replace ``grad``;
- a full ``weight.grad`` (no compressed backward, or a second use of the weight outside its
  layer) is folded into ``grad`` by :meth:`GrassProjection.absorb_full_grad`.

Nothing is stored on the Parameter: the lookup is a weak identity map, so a parameter outlives
its optimizer cleanly (a weight whose optimizer is gone gets ordinary ``.grad`` again), and
nothing has to be undone after building a throwaway optimizer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from .functional import row_index, unique_rows

if TYPE_CHECKING:
    from .optim import GrassAdamW

_PROJECTIONS = WeakIdKeyDictionary()

# The fix for a data-parallel model whose compressed gradients nothing averages.
DATA_PARALLEL_RECIPE = (
    "hf_grass.prepare_data_parallel(model, optimizer) before wrapping the model in DDP (before "
    "accelerator.prepare), then call .attach(wrapped_model)."
)


def projection_of(weight: torch.Tensor) -> GrassProjection | None:
    """The live projection of ``weight`` (``None`` if no live GrassAdamW projects it)."""
    projection = _PROJECTIONS.get(weight)
    if projection is None or not projection.alive:
        return None
    return projection


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


class GrassProjection:
    """The selection and compressed gradient of one projected weight (see the module doc)."""

    def __init__(self, optimizer: GrassAdamW, param: torch.Tensor, rank: int, side: str):
        self._optimizer = weakref.ref(optimizer)
        self._param = weakref.ref(param)
        self.rank = rank
        self.side = side
        self.grad: torch.Tensor | None = None  # rho * G[rows], r x k
        self._grad_step: int | None = None  # the optimizer step `grad` belongs to
        self.anchor: torch.Tensor | None = None  # grad-ready signal (hf_grass.layerwise)
        self._unique: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._unit_rho: tuple[torch.Tensor, bool] | None = None
        self._expert_rows: tuple[torch.Tensor, torch.Tensor] | None = None
        # Set by hf_grass.distributed: averages a full gradient across ranks before selecting.
        self.reduce_full: Callable[[torch.Tensor], torch.Tensor] | None = None
        # residual_update: the full gradient with the selected rows zeroed, until the step.
        self.residual: torch.Tensor | None = None
        _PROJECTIONS[param] = self

    @property
    def alive(self) -> bool:
        """False once the optimizer that made this projection is gone."""
        return self._optimizer() is not None and self._param() is not None

    @property
    def weight(self) -> torch.Tensor:
        """The projected weight."""
        return self._param()

    @property
    def _state(self) -> dict:
        return self._optimizer().state[self._param()]

    @property
    def step(self) -> int:
        """Optimizer steps this weight has taken (identifies the accumulation window)."""
        return int(self._state.get("step", 0))

    def needs_full_gradient(self) -> bool:
        """True when the next step re-selects rows and they have not been chosen yet.

        Then the backward must deliver the full gradient (or call :meth:`select` with it).
        """
        state = self._state
        if "rows" not in state:
            return True
        step = int(state["step"])
        gap = self._optimizer()._group_of(self._param())["update_proj_gap"]
        return step % gap == 0 and int(state["selected_step"]) != step

    @property
    def rows(self) -> torch.Tensor:
        """Selected indices (int64, r, sorted; repeats possible with ``multinomial``); for
        experts' weights E * r flat indices (see :func:`row_index`)."""
        return self._state["rows"]

    @property
    def rho(self) -> torch.Tensor:
        """Scales of the selected indices (float32, r)."""
        return self._state["rho"]

    @property
    def unique(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``unique_rows(rows)``, recomputed only when the rows change (not saved)."""
        rows = self.rows
        if self._unique is None or self._unique[0] is not rows:
            self._unique = (rows, *unique_rows(rows))
        return self._unique[1], self._unique[2]

    def scale_rows_(self, compressed: torch.Tensor) -> torch.Tensor:
        """``rho[:, None] * compressed``, in place; nothing to do when every ``rho`` is 1.

        ``top_r`` and ``multinomial_nr`` select with ``rho = 1``: skipping the multiply saves
        two kernels per layer in every backward. Whether ``rho`` is all ones is read once per
        selection (one device sync every ``update_proj_gap`` steps).
        """
        rho = self.rho
        if self._unit_rho is None or self._unit_rho[0] is not rho:
            self._unit_rho = (rho, bool((rho == 1).all()))
        if self._unit_rho[1]:
            return compressed
        return compressed.mul_(rho.to(compressed.dtype)[:, None])

    def select(self, grad: torch.Tensor) -> None:
        """Choose new rows from a full gradient (m x n, the parameter's own layout).

        Under data parallelism the gradient is first averaged across ranks, in place when it is
        contiguous, so that every rank selects the same rows.
        """
        if self.reduce_full is not None:
            grad = self.reduce_full(grad)
        self._optimizer()._select(self._param(), grad)

    def compress(self, grad: torch.Tensor) -> torch.Tensor:
        """``rho[:, None] * G[rows]`` for a full gradient in the parameter's layout."""
        g = oriented(grad, self.side)
        return self.scale_rows_(g[row_index(g, self.rows)])

    @property
    def experts(self) -> int:
        """The number of matrices the weight stacks here: E for experts' weights (E, m, n) (this
        rank's experts when they are sharded), else 1."""
        weight = local(self._param())
        return weight.shape[0] if weight.dim() == 3 else 1

    @property
    def compressed_shape(self) -> tuple[int, int]:
        """The shape of ``grad``: (r, k), or (E * r, k) for experts (r rows of each)."""
        weight = self._param()
        return self.rank * self.experts, oriented(weight, self.side).shape[-1]

    @property
    def expert_rows(self) -> torch.Tensor:
        """For experts' weights: the selected rows of each expert, as (E, r) indices into that
        expert's own matrix (recomputed only when the rows change)."""
        rows = self.rows
        if self._expert_rows is None or self._expert_rows[0] is not rows:
            m = selected_size(self._param(), self.side)
            local_rows = rows.view(self.experts, self.rank) % m
            self._expert_rows = (rows, local_rows)
        return self._expert_rows[1]

    # ---- the compressed gradient's lifetime ---------------------------------------------------
    def check_data_parallel(self) -> None:
        """Stop a forward run by ``DistributedDataParallel`` over several processes when no
        :class:`~hf_grass.GrassDataParallel` averages this weight's compressed gradient.

        DDP cannot see a compressed gradient: it would all-reduce a zero (or, with
        ``find_unused_parameters`` or ``static_graph``, no) ``.grad`` while every rank stepped
        with its own, and the ranks would drift apart. Called by the Grass layers' forward; one
        attribute read when no DDP forward is running.
        """
        ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
        if ddp is None or self.reduce_full is not None:
            return
        group = getattr(ddp, "process_group", None)
        if torch.distributed.get_world_size(group) > 1:
            raise RuntimeError(
                f"DistributedDataParallel runs a Grass layer (weight of shape "
                f"{tuple(self._param().shape)}) whose compressed gradient it cannot average: "
                f"build {DATA_PARALLEL_RECIPE}"
            )

    def accumulate(self, compressed: torch.Tensor) -> None:
        """Add ``compressed`` (r x k) to ``grad``, or start it.

        A gradient left over from an earlier optimizer step is replaced, not added to: its rows
        may no longer be the selected ones, and ``nn.Module.zero_grad`` (which HF ``Trainer``
        calls) cannot see it.
        """
        param = self._param()
        self._optimizer()._watch_backward()
        compressed = compressed.to(param.dtype)
        step = self.step
        if self.grad is None or self._grad_step != step:
            self.grad = compressed
            self._grad_step = step
        else:
            self.grad.add_(compressed)

    def absorb_full_grad(self) -> None:
        """Fold a full ``weight.grad`` into ``grad`` (selecting rows first when due).

        A full gradient arrives when the compressed backward is off, or when the weight is also
        used outside its Grass layer (then both parts add up). ``weight.grad`` is freed.
        """
        param = self._param()
        if param.grad is None:
            return
        full = param.grad
        if self.needs_full_gradient():
            self.select(full)
        self.accumulate(self.compress(full))
        if self._optimizer()._group_of(param)["residual_update"] != "none":
            g = oriented(full, self.side)
            g[row_index(g, self.unique[0])] = 0  # in place: the compressed copy is taken
            self.residual = full
        param.grad = None

    def take_grad(self) -> torch.Tensor | None:
        """The step's compressed gradient, consumed: ``grad`` is cleared."""
        self.absorb_full_grad()
        grad, self.grad = self.grad, None
        if grad is not None and self.needs_full_gradient():
            raise RuntimeError(
                "GrassAdamW got a compressed gradient on a step that re-selects rows, before the "
                "rows were selected: deliver a full gradient when "
                "projection_of(param).needs_full_gradient() is True (or call its select())."
            )
        return grad

    def register_grad_ready_hook(self, hook: Callable[[], None]) -> GradReadyHandle:
        """Run ``hook()`` once per backward pass, when the weight's gradient of that pass is
        complete: after its Grass layer has added to ``grad`` (the anchor) and after a full
        ``weight.grad`` from a use outside the layer (an L2 penalty, ``F.linear(x, weight)``)
        has been accumulated, whichever comes last.

        Autograd runs the two post-accumulate-grad hooks in no fixed order, and runs the
        weight's own even when only the Grass layer (which returns no ``weight.grad``) used it;
        so the hook waits for each of the two that the engine will run in this backward.
        """
        return GradReadyHandle(self._param(), self.grad_ready_anchor(), hook)

    def grad_ready_anchor(self) -> torch.Tensor:
        """A zero-size leaf whose gradient hook fires when ``grad`` is complete for a backward.

        :class:`~hf_grass.GrassLinear` passes it through its autograd Function, whose backward
        returns an empty gradient for it; the engine accumulates a leaf after every node that
        feeds it, so the hook runs after every use of the weight has added to ``grad``.
        """
        if self.anchor is None:
            self.anchor = torch.empty(0, device=self._param().device, requires_grad=True)
        return self.anchor


def _grad_accumulator(t: torch.Tensor):
    """The autograd node that accumulates the leaf ``t``'s gradient.

    Held strongly: autograd keeps only a weak reference, and makes a new node for the next
    graph once nobody holds the old one.
    """
    with torch.enable_grad():
        return t.view_as(t).grad_fn.next_functions[0][0]


class GradReadyHandle:
    """The hooks of :meth:`GrassProjection.register_grad_ready_hook`; ``remove()`` undoes them."""

    def __init__(self, param: torch.Tensor, anchor: torch.Tensor, hook: Callable[[], None]):
        self._hook = hook
        self._nodes = {"weight": _grad_accumulator(param), "anchor": _grad_accumulator(anchor)}
        self._seen: set[str] = set()
        self._handles = [
            param.register_post_accumulate_grad_hook(lambda _: self._signal("weight")),
            anchor.register_post_accumulate_grad_hook(self._anchor_signal),
        ]

    def _anchor_signal(self, anchor: torch.Tensor) -> None:
        anchor.grad = None  # a zero-size signal, never a gradient to keep
        self._signal("anchor")

    def _signal(self, which: str) -> None:
        self._seen.add(which)
        expected = (
            name
            for name, node in self._nodes.items()
            if torch._C._will_engine_execute_node(node)  # the engine runs it in this backward
        )
        if all(name in self._seen for name in expected):
            self._seen.clear()
            self._hook()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
