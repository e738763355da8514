"""GrassProjection: one projected weight's selection and compressed gradient, in one place.

:class:`~hf_grass.GrassAdamW` makes one projection per projected weight and owns it; the
projection runs the selection step (rows from the gradient's row norms, the update rule's state
carried to them) and keeps the selection (``rows``, ``rho``, the sampling generator's state)
in the weight's entry of the optimizer's state, where checkpoints find it; it holds the weight's
compressed gradient ``grad`` (r x k) until the optimizer step consumes it. Every other module
reaches it through :func:`projection_of`:

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

import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.weak import WeakIdKeyDictionary

from .fsdp2 import can_reduce_compressed, first_expert, row_norms, sharded_param_of
from .functional import remap_state, row_index, unique_rows
from .layout import local, oriented, selected_size, side_of
from .rules import rule_of
from .selection import select_rows
from .state import state_format_of

if TYPE_CHECKING:
    from torch.optim import Optimizer

_PROJECTIONS = WeakIdKeyDictionary()
# Optimizers that have warned about a selection from one rank's own gradient (once each).
_WARNED_LOCAL_SELECTION: weakref.WeakSet = weakref.WeakSet()

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


def unsharded_projection_of(weight: torch.Tensor) -> GrassProjection | None:
    """The live projection of the sharded weight for which FSDP2 put ``weight`` (its
    unsharded form) into a module during forward and backward, when that weight's compressed
    gradient can be averaged by :func:`~hf_grass.fsdp2.reduce_compressed`; else ``None``."""
    sharded = sharded_param_of(weight)
    if sharded is None or not can_reduce_compressed(sharded):
        return None
    return projection_of(sharded)


def forward_anchor(weight: torch.Tensor) -> torch.Tensor | None:
    """What a Grass layer's forward takes from the projection of ``weight``: its grad-ready
    anchor (:mod:`hf_grass.layerwise`; ``None`` without one or without a projection), after
    :meth:`GrassProjection.check_data_parallel`."""
    projection = projection_of(weight)
    if projection is None:
        return None
    projection.check_data_parallel()
    return projection.anchor


class GrassProjection:
    """The selection and compressed gradient of one projected weight (see the module doc).

    Made by the optimizer for ``param`` of its param ``group`` (``rank``, ``proj_side``,
    ``selection``, ``seed``, ...); ``index`` is the parameter's position among all of the
    optimizer's parameters, which offsets the group's ``seed`` so that every weight draws its
    own rows. ``on_accumulate`` is called whenever a backward adds to ``grad``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        param: torch.Tensor,
        group: dict,
        index: int,
        on_accumulate: Callable[[], None] | None = None,
    ):
        self._optimizer = weakref.ref(optimizer)
        self._param = weakref.ref(param)
        self.group = group  # re-set by the optimizer when its groups are replaced (a load)
        self.index = index
        self.rank = group["rank"]
        self.side = side_of(param, group["proj_side"])
        # a weak method: the projection must not keep the optimizer alive
        self._on_accumulate = None if on_accumulate is None else weakref.WeakMethod(on_accumulate)
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
        return step % self.group["update_proj_gap"] == 0 and int(state["selected_step"]) != step

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

    @torch.no_grad()
    def select(self, grad: torch.Tensor) -> None:
        """Choose new rows from a full gradient (m x n, the parameter's own layout) and carry
        the update rule's state to them.

        Under data parallelism the gradient is first averaged across ranks, in place when it is
        contiguous, so that every rank selects the same rows.
        """
        if self.reduce_full is not None:
            grad = self.reduce_full(grad)
        else:
            self._warn_local_selection(grad)
        p, group, state = self._param(), self.group, self._state
        g = oriented(grad, self.side)
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
        seed = group["seed"] + self.index
        norms = row_norms(p, g)
        with warnings.catch_warnings():
            if group["lr"] == 0:
                # torch.distributed.checkpoint creates missing state with an lr-0 step on zero
                # gradients before loading a checkpoint over it: no warning for that selection.
                warnings.simplefilter("ignore", RuntimeWarning)
            if norms.dim() == 1:
                generator = torch.Generator()
                if "rng" in state:
                    generator.set_state(rng_tensor(state["rng"]))
                else:
                    generator.manual_seed(seed)
                rows, rho = select_rows(norms, group["rank"], group["selection"], generator)
                state["rng"] = rng_bytes(generator.get_state())
            else:
                rows, rho = _select_expert_rows(norms, group, state, seed, first_expert(p))
        remap_state(
            state,
            rows,
            rule_of(group["update_rule"]).state_keys,
            (rows.numel(), g.shape[-1]),
            group["state_dtype"] or p.dtype,
            keep=group["reselect_state"] == "keep",
            state_format=state_format_of(group["state_format"]),
        )
        state.update(rows=rows, rho=rho, selected_step=state["step"].clone())

    def _warn_local_selection(self, grad: torch.Tensor) -> None:
        """Warn once per optimizer when, under several processes, a compressed backward selects
        rows from this rank's own gradient (no :class:`GrassDataParallel`): data-parallel ranks
        would pick different rows and never average their compressed gradients.

        A full ``.grad`` is fine (DDP averaged it when the model is wrapped), and so is a
        sharded weight (FSDP2 sums its row norms across ranks). It is only a warning: a process
        may train a model of its own (a reference, an evaluation) next to other processes.
        """
        p, optimizer = self._param(), self._optimizer()
        if optimizer in _WARNED_LOCAL_SELECTION or grad is p.grad or hasattr(p, "device_mesh"):
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        _WARNED_LOCAL_SELECTION.add(optimizer)
        warnings.warn(
            f"A compressed backward selected rows of a weight of shape {tuple(p.shape)} from this "
            f"rank's own gradient, and no GrassDataParallel averages it across the "
            f"{dist.get_world_size()} processes: if the model is data-parallel, ranks drift "
            f"apart; build {DATA_PARALLEL_RECIPE} (Ignore this if each process trains a model "
            "of its own.)",
            RuntimeWarning,
            stacklevel=3,
        )

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
        on_accumulate = self._on_accumulate() if self._on_accumulate is not None else None
        if on_accumulate is not None:
            on_accumulate()
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
        if self.group["residual_update"] != "none":
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


def _select_expert_rows(
    norms: torch.Tensor, group: dict, state: dict, seed: int, first_expert: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of each expert's matrix from its own row norms (E, m), as flat sorted indices
    ``e * m + i`` (see :func:`~hf_grass.functional.row_index`) and their scales.

    A sampled selection draws expert e's rows from a generator of its own, seeded by the
    parameter's seed, the expert's index in the whole stack (``first_expert + e`` on a rank
    that holds experts from ``first_expert`` on) and the step: the draws are the same however
    the experts are sharded, and a resumed run repeats them without a saved generator state.
    An expert that no token reached in the selection step's batch has an all-zero gradient: it
    keeps its previous rows and scales (the first time, rows drawn uniformly, as for any
    gradient with no signal), without the zero-gradient warning, which is meant for a whole
    model's gradient.
    """
    experts, m = norms.shape
    rank = group["rank"]
    step = int(state["step"])
    rows, rhos = [], []
    for e in range(experts):
        keep = slice(e * rank, (e + 1) * rank)
        silent = bool(norms[e].eq(0).all())
        if silent and "rows" in state:
            rows.append(state["rows"][keep] - e * m)
            rhos.append(state["rho"][keep])
            continue
        generator = torch.Generator()
        generator.manual_seed(hash((seed, first_expert + e, step)) % 2**63)
        with warnings.catch_warnings():
            if silent:
                warnings.simplefilter("ignore", RuntimeWarning)
            expert_rows, rho = select_rows(norms[e], rank, group["selection"], generator)
        rows.append(expert_rows)
        rhos.append(rho)
    offsets = torch.arange(experts, device=norms.device)[:, None] * m
    flat = (torch.stack(rows).to(norms.device) + offsets).reshape(-1)
    return flat, torch.cat(rhos).to(norms.device)


def rng_bytes(state: torch.Tensor) -> bytes:
    """A generator state as bytes: untouched by ``map_location`` and by dtype casts."""
    return bytes(state.cpu().numpy())


def rng_tensor(state: bytes | torch.Tensor) -> torch.Tensor:
    """A saved generator state as ``Generator.set_state`` takes it (hf-grass 0.1 saved a uint8
    tensor)."""
    if isinstance(state, torch.Tensor):
        return state.to("cpu", torch.uint8)
    return torch.frombuffer(bytearray(state), dtype=torch.uint8)


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
