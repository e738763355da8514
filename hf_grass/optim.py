"""GrassOptimizer and GrassAdamW: an optimizer whose state lives on r selected rows of each
projected weight. The base rule on those rows is AdamW by default (:mod:`hf_grass.rules`).

For a projected weight ``W`` (m x n, oriented so that the selected dimension comes first) and a
selection ``(rows, rho)`` (see :mod:`hf_grass.selection`), one step is::

    C   = rho[:, None] * G[rows]                 # compressed gradient, r x n
    m   = b1 m + (1 - b1) C                      # moments, r x n
    v   = b2 v + (1 - b2) C²
    D   = (m / bc1) / (sqrt(v / bc2) + eps)      # Adam direction, per-row bias correction
    W[rows] *= 1 - lr wd                         # decoupled weight decay, selected rows only
    W[rows] += -lr * scale * rho[:, None] * D    # index_add: a row drawn twice gets both

Rows are re-selected from the gradient's row norms every ``update_proj_gap`` steps (step 0
included). ``reselect_state="keep"`` carries the moments (and bias-correction counts) of rows
selected both times and starts new rows from zero; ``"reset"`` zeroes all of them. With
``rank = m``, ``top_r``, ``scale = 1`` and ``"keep"`` this is exactly AdamW. Another update
rule (``update_rule``: Lion, sign descent, one of your own) replaces the moments and the
direction ``D`` and keeps everything else.

The class keeps the bookkeeping (groups, state, selection, checkpoints); the arithmetic is the
functional core of :mod:`hf_grass.functional`. Each projected weight has a
:class:`~hf_grass.projection.GrassProjection` that this optimizer owns: it holds the weight's
compressed gradient (r x n, ``rho[:, None] * G[rows]``), which the compressed-gradient backward
of :mod:`hf_grass.linear` accumulates without ever forming ``G``; a full ``.grad`` is compressed
here instead. :func:`hf_grass.projection_of` finds a weight's projection.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as torch_adamw

from .bucket import at_end_of_backward
from .config import (
    GrassConfig,
    group_defaults,
    resolve_option,
    resume_conflicts,
    validate_group_options,
)
from .fsdp2 import (
    check_experts_sharding,
    first_expert,
    global_moment,
    global_per_row,
    local_per_row,
    placed_moment,
    shard_group,
)
from .functional import implementation_from_flags, residual_sign_update
from .layout import experts_sharded, local, oriented, row_sharded, selected_size, side_of
from .projection import DATA_PARALLEL_RECIPE, GrassProjection, projection_of, rng_bytes, rng_tensor
from .rules import UpdateRule, rule_of
from .state import state_format_of, stored_keys

logger = logging.getLogger(__name__)

# The update rule and state format of groups saved before they could be chosen.
_SAVED_WITHOUT_RULE = "adam"
_SAVED_WITHOUT_FORMAT = "plain"


LOSS_SCALER_REFUSAL = (
    "torch.amp.GradScaler (fp16 loss scaling) cannot unscale or inf-check Grass's compressed "
    "gradients: train in bf16 (autocast with dtype=torch.bfloat16 needs no scaler) or float32."
)
CLIPPED_ELSEWHERE_WARNING = (
    "Plain gradients were changed in place after the backward but Grass's compressed gradients "
    "were not, as torch.nn.utils.clip_grad_norm_ and accelerator.clip_grad_norm_ do: they cannot "
    "see compressed gradients, which go unclipped. Clip with "
    "hf_grass.clip_grad_norm_(model.parameters(), max_norm) instead."
)

# Group keys a resumed run takes from its own arguments rather than from the checkpoint (which is
# what torch.optim does for every key): the Grass keys whose GrassConfig field has
# resume="new" (the others, FIXED_ON_RESUME, are checked to be equal), and AdamW's own. lr and
# initial_lr stay the checkpoint's: the LR scheduler owns them.
_RESUME_TAKES_NEW = (
    *GrassConfig.on_resume("new", among=(*GrassConfig.GROUP_KEYS, *GrassConfig.OPTIMIZER_KEYS)),
    "betas",
    "eps",
    "weight_decay",
)

# Group keys of hf-grass 0.2 and earlier, which chose the implementation: (key, default).
_IMPLEMENTATION_FLAGS = (("foreach", True), ("batched", True), ("compiled", False))


class GrassOptimizer(Optimizer):
    """An update rule (AdamW by default) with Grass structured sparse projections on the groups
    that have a ``rank``.

    Args:
        params: parameters or param groups. A group with a ``rank`` key is projected; its other
            keys (defaults in brackets): ``update_proj_gap`` [200] steps between re-selections,
            ``scale`` [1.0] multiplier of the projected update, ``selection`` ["top_r"] one of
            ``top_r``/``multinomial``/``multinomial_nr``/``uniform``, ``reselect_state``
            ["keep"] or ``"reset"``, ``proj_side`` ["auto"] ``rows``/``cols``/``auto`` (the
            larger dimension), ``seed`` [0] for sampled selections. Groups without ``rank`` are
            plain AdamW. :func:`hf_grass.grass_param_groups` and :func:`hf_grass.grassify`
            build the groups from a model.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (decoupled weight decay;
            on projected weights it decays the selected rows only, so that a step changes only
            those rows).
        state_dtype: dtype of the moments (default: the parameter's dtype). With bf16 weights,
            ``torch.float32`` moments cost 2x the state and help stability.
        stochastic_rounding: round low-precision (bf16/fp16) weight updates stochastically, so
            that updates smaller than half a unit in the last place do not vanish in pure-bf16
            training. The arithmetic always runs in float32 at least. The noise comes from
            the global torch RNG (seed it with ``torch.manual_seed``); it is not part of the
            optimizer state, so a resumed run is exact only without stochastic rounding.
        implementation: how the step runs (:data:`hf_grass.functional.IMPLEMENTATIONS`):
            ``"grouped"`` (default: the projected weights whose compressed gradients share
            shape and dtypes stepped as one stacked (G, r, k) batch, a constant number of
            kernels per batch plus two per weight), ``"compiled"`` (grouped, each batch's
            arithmetic fused by ``torch.compile`` at the first step), ``"triton"`` (grouped,
            each batch one fused Triton kernel; needs Triton and a CUDA device), ``"foreach"``
            (``torch._foreach_*`` ops) or ``"reference"`` (one tensor at a time). Same results
            up to float rounding; the state stays per parameter. A param group may set its own.
        foreach, batched, compiled: the older way to choose (``foreach=False``: reference;
            ``batched=False``: foreach; ``compiled=True``: compiled); still accepted.
        update_rule: the base optimizer on the selected rows and on the plain parameters, by
            name (:data:`hf_grass.rules.RULES`): ``"adam"`` (default), ``"lion"``, ``"sign"``
            or a rule of your own. ``implementation`` applies to Adam; other rules run their
            own step.
        state_format: how the rule's per-row state is stored, by name
            (:data:`hf_grass.state.STATE_FORMATS`): ``"plain"`` (default) or a format of your
            own (which runs the rule's reference step).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        implementation: str | None = None,
        foreach: bool | None = None,
        batched: bool | None = None,
        compiled: bool | None = None,
        update_rule: str | None = None,
        state_format: str | None = None,
    ):
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}; use lr >= 0.")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}; use eps >= 0.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas}; use 0 <= beta < 1 for both.")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}; use weight_decay >= 0.")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            implementation=_implementation(
                implementation, dict(foreach=foreach, batched=batched, compiled=compiled)
            ),
            update_rule=resolve_option("update_rule", update_rule),
            state_format=resolve_option("state_format", state_format),
        )
        self._group_index: dict[int, dict] = {}
        self._projections: dict[int, GrassProjection] = {}
        self._averaging_checked = False  # see _check_averaged
        self._clipping_checked = False  # see _check_clipped_elsewhere
        self._watched_backward = -1
        self._grads_after_backward: tuple[set, set] | None = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        flags = {k: param_group.pop(k) for k, _ in _IMPLEMENTATION_FLAGS if k in param_group}
        if flags or "implementation" in param_group:
            param_group["implementation"] = _implementation(
                param_group.get("implementation"), flags
            )
        if "rank" in param_group:
            for key, value in group_defaults().items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            try:
                _validate_projected_group(group)
            except ValueError:
                self.param_groups.pop()  # leave the optimizer as it was, as torch.optim does
                raise
        self._index_group(group, sum(len(g["params"]) for g in self.param_groups[:-1]))

    def _index_groups(self) -> None:
        first = 0
        for group in self.param_groups:
            self._index_group(group, first)
            first += len(group["params"])

    def _index_group(self, group: dict, first: int) -> None:
        """Index ``group``'s parameters (the first at position ``first`` among all of them) and
        give each projected one its projection, which follows the group."""
        for index, p in enumerate(group["params"], start=first):
            self._group_index[id(p)] = group
            if "rank" not in group:
                continue
            projection = self._projections.get(id(p))
            if projection is None:
                projection = GrassProjection(self, p, group, index, self._watch_backward)
                self._projections[id(p)] = projection
            projection.group = group

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before a key existed get its default
            if "rank" in group:
                for key, value in group_defaults().items():
                    group.setdefault(key, value)
            group.setdefault("state_dtype", None)
            group.setdefault("stochastic_rounding", False)
            _upgrade_group(group)
        self._group_index = {}
        if not hasattr(self, "_projections"):  # unpickled
            self._projections = {}
        self._averaging_checked = getattr(self, "_averaging_checked", False)
        self._clipping_checked = getattr(self, "_clipping_checked", False)
        self._watched_backward = -1
        self._grads_after_backward = None
        self._index_groups()

    def follow_replaced_params(self) -> None:
        """Index the parameters that a wrapper put into ``param_groups`` after construction.

        accelerate's FSDP2 preparation (the Trainer's ``--fsdp`` with ``fsdp_version: 2``)
        builds the optimizer on the plain weights, then replaces each of them in the groups with
        its sharded DTensor. Their projections are made again (selecting columns of a weight
        sharded by rows). ``step()`` calls this; call it yourself before anything else reads
        the projections (:func:`clip_grad_norm_` before the first step). Only before the first
        step: after it the state belongs to the old tensors.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        if len(params) == len(self._group_index) and all(
            id(p) in self._group_index for p in params
        ):
            return
        if self.state:
            raise RuntimeError(
                "GrassAdamW's parameters were replaced after its first step (by a wrapper such "
                "as FSDP): wrap the model before training starts, or build the optimizer again."
            )
        self._group_index, self._projections = {}, {}
        for group in self.param_groups:
            if "rank" in group:
                _validate_projected_group(group)
        self._index_groups()

    def _group_of(self, p: torch.Tensor) -> dict:
        return self._group_index[id(p)]

    def _rule_of(self, p: torch.Tensor) -> UpdateRule:
        return rule_of(self._group_of(p)["update_rule"])

    def projection(self, p: torch.Tensor) -> GrassProjection | None:
        """The :class:`GrassProjection` of ``p`` (``None`` for a plain AdamW parameter)."""
        return self._projections.get(id(p))

    def selection_pending(self) -> bool:
        """True when the coming backward selects rows of some weight (from its full gradient)."""
        return any(projection.needs_full_gradient() for projection in self._projections.values())

    # ------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.follow_replaced_params()
        self._refuse_loss_scaler()
        self._check_averaged()
        self._check_clipped_elsewhere()
        for group in self.param_groups:
            if "rank" in group:
                self._projected_steps(group["params"], group)
            else:
                self._dense_steps([p for p in group["params"] if p.grad is not None], group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient (used by layer-wise training)."""
        self._check_averaged()
        group = self._group_of(p)
        if "rank" in group:
            self._projected_steps([p], group)
        elif p.grad is not None:
            self._dense_steps([p], group)

    @torch.no_grad()
    def step_params(self, params: Iterable[torch.Tensor]) -> None:
        """Update several parameters from their gradients, batched per param group (used by
        layer-wise training with buckets: one batched step instead of one per parameter)."""
        self.follow_replaced_params()
        self._check_averaged()
        by_group: dict[int, tuple[dict, list[torch.Tensor]]] = {}
        for p in params:
            group = self._group_of(p)
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, ps in by_group.values():
            if "rank" in group:
                self._projected_steps(ps, group)
            else:
                self._dense_steps([p for p in ps if p.grad is not None], group)

    def _check_averaged(self) -> None:
        """Refuse, before the first update, compressed gradients that DDP cannot average.

        A projected weight inside ``DistributedDataParallel`` gets no ``.grad`` from its Grass
        layer, so DDP all-reduces zeros for it and (by default) writes a dense zero ``.grad``
        after the backward, while the compressed gradient stays this rank's own: the ranks
        would drift apart. A Grass layer's forward inside DDP stops first
        (``GrassProjection.check_data_parallel``) unless GrassDataParallel was built; this
        catches the rest: a DDP built before GrassDataParallel, a layer run outside DDP's
        forward. The zero ``.grad`` next to a compressed gradient is the sign: a real second use
        of the weight outside its layer is not exactly zero, and :class:`GrassDataParallel`
        folds it in during the backward. Checked until a step brings gradients for projected
        weights, then never again.
        """
        if self._averaging_checked:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            self._averaging_checked = True
            return
        for projection in self._projections.values():
            p, compressed = projection.weight, projection.grad
            if compressed is None and p.grad is None:
                continue  # no gradient yet
            self._averaging_checked = True
            if compressed is None or p.grad is None or hasattr(p, "device_mesh"):
                continue  # a full gradient only (DDP or FSDP2 averaged it), or compressed only
            if not p.grad.any():
                if projection.reduce_full is None:
                    problem = (
                        "got a dense zero gradient from DistributedDataParallel and a compressed "
                        "gradient that no rank averages (ranks would drift apart)"
                    )
                else:
                    problem = "is still all-reduced densely by a DDP built before GrassDataParallel"
                raise RuntimeError(
                    f"A projected weight of shape {tuple(p.shape)} {problem}: build "
                    f"{DATA_PARALLEL_RECIPE}"
                )

    # ---- torch.amp.GradScaler: step() is told the scale, and refuses it --------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True while a projected weight holds a compressed gradient.

        ``torch.amp.GradScaler`` then hands ``grad_scale``/``found_inf`` to :meth:`step`
        (which refuses them) instead of unscaling and inf-checking the ``.grad`` it can see and
        stepping with the compressed gradients still multiplied by the loss scale. With full
        gradients only, the scaler works as for any optimizer.
        """
        return any(projection.grad is not None for projection in self._projections.values())

    def _refuse_loss_scaler(self) -> None:
        if hasattr(self, "found_inf"):  # set by GradScaler.step for this step
            raise RuntimeError(LOSS_SCALER_REFUSAL)

    # ---- clipping that cannot see compressed gradients --------------------------------------------
    def _watch_backward(self) -> None:
        """Called when a backward adds to a compressed gradient: once that backward has ended,
        after every callback queued during it (DDP's and GrassDataParallel's averaging), note
        which gradient tensors it left and their in-place version counters, for
        :meth:`_check_clipped_elsewhere`."""
        if self._clipping_checked:
            return
        backward = torch._C._current_graph_task_id()
        if backward == -1 or backward == self._watched_backward:
            return
        self._watched_backward = backward
        engine = torch.autograd.Variable._execution_engine
        at_end_of_backward(lambda: engine.queue_callback(self._note_grads_after_backward))

    def _current_grads(self) -> tuple[set, set]:
        """(tensor id, version) of every plain ``.grad`` and of every compressed gradient."""
        dense = {
            (id(p.grad), p.grad._version)
            for group in self.param_groups
            if "rank" not in group
            for p in group["params"]
            if p.grad is not None
        }
        compressed = {
            (id(projection.grad), projection.grad._version)
            for projection in self._projections.values()
            if projection.grad is not None
        }
        return dense, compressed

    def _note_grads_after_backward(self) -> None:
        self._grads_after_backward = self._current_grads()

    def _check_clipped_elsewhere(self) -> None:
        """Warn once when plain gradients were changed in place between the backward and this
        step while no compressed gradient was: what ``torch.nn.utils.clip_grad_norm_`` and
        ``accelerator.clip_grad_norm_`` do (they multiply every ``.grad`` they find, even by
        1), reading ``.grad``, which projected weights do not have. Their norm leaves the
        compressed gradients out and those go unclipped; :func:`clip_grad_norm_` sees both.
        Checked on the first step with compressed gradients after a watched backward.
        """
        if self._clipping_checked or self._grads_after_backward is None:
            return
        dense, compressed = self._current_grads()
        after_dense, after_compressed = self._grads_after_backward
        self._grads_after_backward = None
        if not compressed:
            return
        self._clipping_checked = True
        if dense - after_dense and not compressed - after_compressed:
            warnings.warn(CLIPPED_ELSEWHERE_WARNING, RuntimeWarning, stacklevel=3)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for projection in self._projections.values():
            projection.grad = None
            projection.residual = None

    def _dense_steps(self, params: list[torch.Tensor], group: dict) -> None:
        """The group's rule with every row selected. Adam on parameters whose moments have their
        own dtype goes through torch's own (foreach/fused-capable) AdamW kernel; low-precision
        ones with float32 moments or stochastic rounding, and other rules, through the rule's
        step (:mod:`hf_grass.rules`)."""
        rule = rule_of(group["update_rule"])
        state_format = state_format_of(group["state_format"])
        fast, core = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                dtype = group["state_dtype"] or p.dtype
                for key in rule.state_keys:
                    state.update(state_format.zeros(key, p.shape, dtype, p.device, like=p))
            plain = (
                rule.name == "adam"
                and state_format.name == "plain"
                and state["exp_avg"].dtype == p.dtype
                and not (group["stochastic_rounding"] and p.dtype == torch.bfloat16)
            )
            (fast if plain and not p.grad.is_sparse else core).append(p)
        if fast:
            beta1, beta2 = group["betas"]
            torch_adamw(
                fast,
                [p.grad for p in fast],
                [self.state[p]["exp_avg"] for p in fast],
                [self.state[p]["exp_avg_sq"] for p in fast],
                [],
                [self.state[p]["step"] for p in fast],
                amsgrad=False,
                maximize=False,
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
            )
        if core:
            implementation = "reference" if group["implementation"] == "reference" else "foreach"
            rule.step(
                core,
                [p.grad for p in core],
                [self.state[p] for p in core],
                [self.state[p]["step"] for p in core],
                [None] * len(core),
                [None] * len(core),
                [None] * len(core),
                group={**group, "implementation": implementation},
            )

    def _projected_steps(self, params: list[torch.Tensor], group: dict) -> None:
        """Grass steps for the projected ``params`` of ``group`` (see :mod:`hf_grass.functional`).

        Each weight's compressed gradient is consumed (and freed) by the step.
        """
        stepped, grads = [], []
        for p in params:
            grad = self._projections[id(p)].take_grad()
            if grad is not None:
                stepped.append(p)
                grads.append(grad)
        if not stepped:
            return
        states = [self.state[p] for p in stepped]
        projections = [self._projections[id(p)] for p in stepped]
        torch._foreach_add_([s["step"] for s in states], 1)
        rule_of(group["update_rule"]).step(
            [oriented(p, pr.side) for p, pr in zip(stepped, projections, strict=True)],
            grads,
            states,
            [s["row_step"] for s in states],
            [s["rows"] for s in states],
            [s["rho"] for s in states],
            [pr.unique for pr in projections],
            group=group,
        )
        if group["residual_update"] != "none":
            for p, projection in zip(stepped, projections, strict=True):
                self._residual_step(p, projection, group)

    def _residual_step(self, p: torch.Tensor, projection: GrassProjection, group: dict) -> None:
        """``residual_update="sign"``: the rows outside the selection, from the full gradient."""
        residual, projection.residual = projection.residual, None
        if residual is None:
            raise RuntimeError(
                f"residual_update={group['residual_update']!r} needs the full gradient of each "
                f"projected weight, but a weight of shape {tuple(p.shape)} got a compressed one: "
                "train without the compressed backward (grass_param_groups without grassify; "
                "--grass_compressed_backward false), or set residual_update='none'."
            )
        residual_sign_update(
            oriented(p, projection.side),
            oriented(residual, projection.side),
            projection.unique[0],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            scale=group["scale"],
            stochastic_rounding=group["stochastic_rounding"],
        )

    # ------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """``torch.optim``'s state dict; Grass moments of a weight sharded by rows are DTensors.

        Under FSDP2 each rank holds the moments of its own rows of the weight: oriented, this
        rank's columns of the r x m moments. They are returned as DTensors of the global r x m
        shape, sharded on dim 1 like the weight on dim 0 (for experts' weights, sharded by
        experts, every per-row tensor, rows included, as a DTensor over all E * r rows, sharded
        on dim 0 like the weight), so that
        ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``, ``dcp.save``) gathers,
        saves and reshards them like any sharded state, and a checkpoint resumes on any number
        of processes. The optimizer's own state is not changed.
        """
        state_dict = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for index, p in enumerate(params):
            entry = state_dict["state"].get(index)
            if entry is None or "rows" not in entry or not row_sharded(p):
                continue
            entry = dict(entry)  # torch.optim shares the state's own dicts
            rule = self._rule_of(p)
            if experts_sharded(p):
                rank = self._group_of(p)["rank"]
                m = selected_size(p, self._projections[id(p)].side)
                entry["rows"] = entry["rows"] + first_expert(p) * m
                for key in (*_PER_ROW_KEYS, *rule.state_keys):
                    entry[key] = global_per_row(entry[key], p, rank)
            else:
                for key in rule.state_keys:
                    entry[key] = global_moment(entry[key], p)
            state_dict["state"][index] = entry
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, keeping every tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` (whose load hooks run as usual) casts state
        tensors to the parameter's dtype and device, which would turn row indices into floats
        and move the RNG state off the CPU; here each comes back exactly. Moments take this
        optimizer's ``state_dtype``.

        Group settings: those of :data:`~hf_grass.config.FIXED_ON_RESUME` (rank, side,
        selection, seed) must equal the checkpoint's (``ValueError`` otherwise); the other Grass
        keys and ``betas``/``eps``/``weight_decay`` keep this optimizer's values (a change is
        logged); ``lr`` comes from the checkpoint, as in ``torch.optim`` (the LR scheduler owns
        it). Checkpoints of hf-grass 0.1 load unchanged.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"The optimizer state has {len(saved_groups)} parameter groups but this optimizer "
                f"has {len(self.param_groups)}: it was saved by another optimizer or another "
                "target_modules setting; resume with the same settings or start a new run."
            )
        for i, (saved, current) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            conflicts = resume_conflicts(saved, current)
            if ("rank" in saved) != ("rank" in current):
                conflicts.insert(
                    0, f"rank: checkpoint {saved.get('rank')!r}, now {current.get('rank')!r}"
                )
            if conflicts:
                raise ValueError(
                    f"Parameter group {i} of the checkpoint differs from this optimizer "
                    f"({'; '.join(conflicts)}): resume with the settings of the checkpoint, "
                    "or start a new run."
                )
        ours = [{k: g[k] for k in _RESUME_TAKES_NEW if k in g} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _upgrade_group(group)
        for i, (group, keep) in enumerate(zip(self.param_groups, ours, strict=True)):
            for key, value in keep.items():
                if group.get(key, value) != value:
                    logger.warning(
                        "Grass: resuming parameter group %d with %s=%r (the checkpoint had %r).",
                        i,
                        key,
                        value,
                        group[key],
                    )
                group[key] = value
        saved_state = state_dict["state"]
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params, strict=True):
            if pid in saved_state:
                state = _restore_state(p, saved_state[pid], self._group_of(p))
                _check_state_shapes(p, state, self._group_of(p))
                self.state[p] = state


def _implementation(name: str | None, flags: dict[str, bool | None]) -> str:
    """The implementation ``name`` (GrassConfig's default when ``None``), or the one the older
    flags choose (``ValueError`` when both are given and disagree, or Triton is asked for where
    it cannot run)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        values = {k: given.get(k, default) for k, default in _IMPLEMENTATION_FLAGS}
        chosen = implementation_from_flags(**values)
        if name is not None and name != chosen:
            raise ValueError(
                f"implementation={name!r} and {given} choose different implementations: give "
                "implementation only."
            )
        name = chosen
    name = resolve_option("implementation", name)
    if name == "triton":
        from .triton_step import triton_available

        if not triton_available():
            raise ValueError(
                "implementation='triton' needs Triton (pip install triton) and a CUDA device: "
                "use implementation='grouped' (the default) here."
            )
    return name


def _upgrade_group(group: dict) -> None:
    """Give a group saved before a key existed what it ran with: the ``implementation`` that
    hf-grass 0.2's ``foreach``/``batched``/``compiled`` keys chose (those keys dropped), and
    Adam on plain state."""
    flags = {k: group.pop(k) for k, _ in _IMPLEMENTATION_FLAGS if k in group}
    if "implementation" not in group:
        group["implementation"] = _implementation(None, flags)
    group.setdefault("update_rule", _SAVED_WITHOUT_RULE)
    group.setdefault("state_format", _SAVED_WITHOUT_FORMAT)


# Per-row state besides the update rule's (an experts' weight sharded by FSDP2 shards all of it
# with its experts: E * r rows in expert order).
_PER_ROW_KEYS = ("row_step", "rho", "rows")


def _restore_state(p: torch.Tensor, saved: dict, group: dict) -> dict:
    """One parameter's saved state with the dtypes and devices it needs here.

    Step counters stay float32 scalars on the CPU (as torch's AdamW keeps them), the RNG state
    bytes, row indices int64 and counts float32 on the parameter's device, moments in the
    group's ``state_dtype`` (or the parameter's dtype). Every tensor is a copy: training on must
    not change the caller's state dict (torch.optim shares ``step`` tensors). Derived tensors of hf-grass 0.1
    (``unique_rows``, ``inverse``) are dropped: they are recomputed.
    """
    state = {}
    moments_dtype = group["state_dtype"] or p.dtype
    state_format = state_format_of(group["state_format"])
    moments = stored_keys(state_format, rule_of(group["update_rule"]).state_keys)
    per_row = "rows" in saved and experts_sharded(p)
    for key, value in saved.items():
        if key in ("unique_rows", "inverse"):
            continue
        if per_row and key in (*_PER_ROW_KEYS, *moments):
            value = local_per_row(value, p, group["rank"])
            if key == "rows":
                side = side_of(p, group["proj_side"])
                value = value - first_expert(p) * selected_size(p, side)
            dtype = state_format.saved_dtype(key, moments_dtype) if key in moments else None
            dtype = dtype or value.dtype
            state[key] = value.to(p.device, dtype, copy=True)
        elif key == "rng":
            state[key] = value if isinstance(value, bytes) else rng_bytes(rng_tensor(value))
        elif key in ("step", "selected_step"):
            state[key] = value.to("cpu", torch.float32, copy=True)
        elif key in moments:
            state[key] = placed_moment(value, p, "rows" in saved)
            dtype = state_format.saved_dtype(key, moments_dtype) or value.dtype
            state[key] = state[key].to(p.device, dtype, copy=True)
        elif isinstance(value, torch.Tensor):
            state[key] = value.to(p.device, copy=True)
        else:
            state[key] = value
    return state


# ----------------------------------------------------------------------------------- validation
def validate_param_groups(groups: list[dict]) -> None:
    """Check param groups as :class:`GrassAdamW` would (``ValueError``), without building one."""
    for group in groups:
        if "rank" in group:
            _validate_projected_group({**group_defaults(), **group})


def _validate_projected_group(group: dict) -> None:
    validate_group_options(group)
    rank = group["rank"]
    state_format = state_format_of(group.get("state_format", _SAVED_WITHOUT_FORMAT))
    if len(state_format.stored_keys("state")) > 1 and any(
        hasattr(p, "device_mesh") for p in group["params"]
    ):
        raise ValueError(
            f"state_format={state_format.name!r} stores several tensors per state, which "
            "sharded weights (FSDP2) do not take: use a format of one tensor (plain, "
            "stochastic_bf16)."
        )
    for p in group["params"]:
        if p.dim() not in (2, 3):
            raise ValueError(
                f"A projected group (with 'rank') holds a {p.dim()}-D tensor of shape {tuple(p.shape)}: "
                "Grass projects matrices (2-D) and stacks of experts' matrices (3-D) only; put it "
                "in a group without 'rank'."
            )
        if p.dim() == 3 and hasattr(p, "device_mesh"):
            check_experts_sharding(p)
        side = side_of(p, group["proj_side"])
        size = selected_size(p, side)
        if rank > size:
            fix = f"use rank <= {size}"
            if group["proj_side"] != "auto":
                fix += ", or proj_side='auto' (the larger dimension)"
            raise ValueError(
                f"rank {rank} is larger than the selected dimension ({side}, size {size}) of a "
                f"weight of shape {tuple(p.shape)}: {fix}."
            )


def _check_state_shapes(p: torch.Tensor, state: dict, group: dict) -> None:
    if "rank" in group:
        side = side_of(p, group["proj_side"])
        experts = local(p).shape[0] if p.dim() == 3 else 1
        expected = (group["rank"] * experts, oriented(p, side).shape[-1])
    else:
        expected = tuple(local(p).shape)
    keys = rule_of(group["update_rule"]).state_keys
    found = {key: tuple(local(state[key]).shape) if key in state else None for key in keys}
    if "rank" in group and "rows" not in state:
        found = {key: None for key in (*keys, "rows")}
    wrong = {key: shape for key, shape in found.items() if shape != expected}
    if wrong and state:
        key, shape = next(iter(wrong.items()))
        raise ValueError(
            f"The saved optimizer state of a parameter of shape {tuple(p.shape)} has {key} of "
            f"shape {shape}, expected {expected}: the checkpoint was made with another method, "
            "rank or update rule; resume with the same settings or start a new run."
        )


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` over the gradients GrassAdamW steps with.

    That is ``.grad`` for plain parameters and the compressed gradient ``rho * G[rows]`` for
    projected weights (a full ``.grad`` of a projected weight is compressed first, selecting
    rows when due), so a run clips the same quantity with or without the compressed backward.
    Gradients on several devices are measured on the first one's; sharded ones (FSDP2) are
    summed over their ranks, so every rank clips by the same global norm. Returns the total norm
    before clipping.

    Use it instead of ``torch.nn.utils.clip_grad_norm_`` and ``accelerator.clip_grad_norm_``
    (same arguments): they read ``.grad``, which a projected weight never has, so they would
    measure the plain gradients only and leave the compressed ones unclipped.
    """
    grads = []
    for p in parameters:
        projection = projection_of(p)
        if projection is not None:
            projection.absorb_full_grad()
            grad = projection.grad
        else:
            grad = p.grad
        if grad is not None:
            grads.append((local(grad), shard_group(p) if row_sharded(p) else None))
    if not grads:
        return torch.tensor(0.0)
    device = grads[0][0].device
    dtype = torch.float64 if any(g.dtype == torch.float64 for g, _ in grads) else torch.float32
    infinite = norm_type == float("inf")
    # Per process group (None: not sharded), the sum of |g|^p (or the max of |g|) of its grads.
    parts: dict[Any, torch.Tensor] = {}
    for g, group in grads:
        norm = torch.linalg.vector_norm(g.detach(), norm_type).to(device, dtype)
        if infinite:
            parts[group] = torch.maximum(parts[group], norm) if group in parts else norm
        else:
            parts[group] = parts.get(group, 0) + norm.pow(norm_type)
    if any(group is not None for group in parts):
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if infinite else dist.ReduceOp.SUM
        for group, value in parts.items():
            if group is not None:
                dist.all_reduce(value, op=op, group=group)
    values = torch.stack(list(parts.values()))
    total = values.max() if infinite else values.sum().pow(1.0 / norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g, _ in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total


class GrassAdamW(GrassOptimizer):
    """:class:`GrassOptimizer` with AdamW on the selected rows (``update_rule="adam"``, the
    default): the class to reach for, by the name of the optimizer it stands in for."""
