"""GrassAdamW: AdamW whose state lives on r selected rows of each projected weight.

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
``rank = m``, ``top_r``, ``scale = 1`` and ``"keep"`` this is exactly AdamW.

A projected weight's gradient can arrive in two ways, through one entry point: a full ``.grad``
(compressed by the optimizer) or ``param.compressed_grad`` (r x n, already equal to
``rho[:, None] * G[rows]``), which the compressed-gradient backward of :mod:`hf_grass.linear`
accumulates without ever forming ``G``. To do that it reads ``param.grass_projection``
(:class:`GrassProjection`), which says which rows are selected and when a full gradient is needed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as torch_adamw

from .selection import SELECTIONS, select_rows

PROJECTED_DEFAULTS = {
    "update_proj_gap": 200,
    "scale": 1.0,
    "selection": "top_r",
    "reselect_state": "keep",
    "proj_side": "auto",
    "seed": 0,
}
RESELECT_STATES = ("keep", "reset")
PROJ_SIDES = ("auto", "rows", "cols")


def projection_side(shape: torch.Size | tuple[int, ...], proj_side: str = "auto") -> str:
    """``"rows"`` or ``"cols"``: the dimension selected for a weight of ``shape`` (m, n).

    ``"auto"`` selects the larger dimension, which leaves the smaller state r x min(m, n).
    """
    if proj_side != "auto":
        return proj_side
    return "rows" if shape[0] >= shape[1] else "cols"


def _oriented(t: torch.Tensor, side: str) -> torch.Tensor:
    """A view of ``t`` with the selected dimension first."""
    return t if side == "rows" else t.t()


class GrassProjection:
    """The selection of one projected weight, as the compressed-gradient backward sees it.

    Published by :class:`GrassAdamW` as ``param.grass_projection``. It reads the optimizer's state,
    so it stays valid across ``load_state_dict``.
    """

    def __init__(self, optimizer: GrassAdamW, param: torch.Tensor, group: dict):
        self._optimizer = weakref.ref(optimizer)
        self._param = weakref.ref(param)
        self.rank: int = group["rank"]
        self.side: str = projection_side(param.shape, group["proj_side"])

    def __reduce__(self):
        # A pickled or deep-copied parameter does not drag its optimizer along.
        return (_no_projection, ())

    @property
    def _state(self) -> dict:
        return self._optimizer().state[self._param()]

    @property
    def alive(self) -> bool:
        """False once the optimizer that published this projection is gone."""
        return self._optimizer() is not None

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
        """Selected indices (int64, r, sorted; repeats possible with ``multinomial``)."""
        return self._state["rows"]

    @property
    def rho(self) -> torch.Tensor:
        """Scales of the selected indices (float32, r)."""
        return self._state["rho"]

    def select(self, grad: torch.Tensor) -> None:
        """Choose new rows from a full gradient (m x n, the parameter's own layout)."""
        self._optimizer()._select(self._param(), grad)

    def compress(self, grad: torch.Tensor) -> torch.Tensor:
        """``rho[:, None] * G[rows]`` for a full gradient in the parameter's layout."""
        g = _oriented(grad, self.side)
        return g[self.rows] * self.rho.to(g.dtype)[:, None]


def _no_projection() -> None:
    return None


class GrassAdamW(Optimizer):
    """AdamW with Grass structured sparse projections on the groups that have a ``rank``.

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
        )
        self._group_index: dict[int, dict] = {}
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- param groups
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in PROJECTED_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "rank" in group:
            try:
                _validate_projected_group(group)
            except ValueError:
                self.param_groups.pop()  # leave the optimizer as it was, as torch.optim does
                raise
        for p in group["params"]:
            self._group_index[id(p)] = group
        if "rank" in group:
            for p in group["params"]:
                p.grass_projection = GrassProjection(self, p, group)

    def _group_of(self, p: torch.Tensor) -> dict:
        return self._group_index[id(p)]

    def _param_index(self, p: torch.Tensor) -> int:
        return next(
            i for i, q in enumerate(q for g in self.param_groups for q in g["params"]) if q is p
        )

    # ------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if "rank" in group:
                self._projected_steps(group["params"], group)
            else:
                self._dense_steps([p for p in group["params"] if p.grad is not None], group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor) -> None:
        """Update one parameter from its gradient (used by layer-wise training)."""
        group = self._group_of(p)
        if "rank" in group:
            self._projected_steps([p], group)
        elif p.grad is not None:
            self._dense_steps([p], group)

    def _dense_steps(self, params: list[torch.Tensor], group: dict) -> None:
        """Plain AdamW. Parameters whose state has their own dtype go through torch's own
        (foreach/fused-capable) AdamW kernel; low-precision ones with float32 state or
        stochastic rounding through :meth:`_dense_step`."""
        fast = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                sdt = group["state_dtype"] or p.dtype
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=sdt, memory_format=torch.preserve_format
                )
                state["exp_avg_sq"] = torch.zeros_like(
                    p, dtype=sdt, memory_format=torch.preserve_format
                )
            plain = state["exp_avg"].dtype == p.dtype and not (
                group["stochastic_rounding"] and p.dtype == torch.bfloat16
            )
            if plain and not p.grad.is_sparse:
                fast.append(p)
            else:
                self._dense_step(p, p.grad, group)
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
                beta1=beta1,
                beta2=beta2,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for group in self.param_groups:
            if "rank" in group:
                for p in group["params"]:
                    p.compressed_grad = None

    def _dense_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] += 1
        cdt = _compute_dtype(p)
        direction = _adam_direction(grad.to(cdt), state, group, state["step"].to(cdt))
        w = p.to(cdt)
        if group["weight_decay"]:
            w = w * (1 - group["lr"] * group["weight_decay"])
        w = w.add(direction, alpha=-group["lr"])
        p.copy_(_round_to(w, p.dtype, group["stochastic_rounding"]))

    def _compressed_gradient(self, p: torch.Tensor) -> torch.Tensor | None:
        """The step's compressed gradient of ``p``: ``p.compressed_grad``, or ``.grad`` compressed
        (selecting rows first when the schedule says so)."""
        projection: GrassProjection = p.grass_projection
        compressed = getattr(p, "compressed_grad", None)
        if compressed is None:
            if p.grad is None:
                return None
            if projection.needs_full_gradient():
                self._select(p, p.grad)
            return projection.compress(p.grad)
        if projection.needs_full_gradient():
            raise RuntimeError(
                "GrassAdamW got a compressed gradient on a step that re-selects rows, before the "
                "rows were selected: deliver a full gradient when "
                "param.grass_projection.needs_full_gradient() is True (or call its select())."
            )
        return compressed

    def _projected_steps(self, params: list[torch.Tensor], group: dict) -> None:
        """Grass steps for the projected ``params`` of ``group``.

        The Adam arithmetic on the compressed (r x k) tensors runs as ``torch._foreach_*`` ops
        over all parameters of one dtype at once: a model has hundreds of projected matrices and
        per-matrix kernel launches would dominate the step on a GPU.
        """
        batches: dict[torch.dtype, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            compressed = self._compressed_gradient(p)
            if compressed is not None:
                batches.setdefault(_compute_dtype(p), []).append((p, compressed))
        for cdt, batch in batches.items():
            self._projected_batch([p for p, _ in batch], [c.to(cdt) for _, c in batch], group, cdt)

    def _projected_batch(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict, cdt: torch.dtype
    ) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        torch._foreach_add_([s["step"] for s in states], 1)
        counts = [s["row_step"] for s in states]
        torch._foreach_add_(counts, 1)
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        ms = [m.to(cdt) for m in exp_avgs]
        vs = [v.to(cdt) for v in exp_avg_sqs]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        if ms[0] is not exp_avgs[0]:
            torch._foreach_copy_(exp_avgs, ms)
            torch._foreach_copy_(exp_avg_sqs, vs)
        # Per-row bias correction: rows kept across a re-selection have seen more steps.
        t = [c.to(cdt)[:, None] for c in counts]
        bias_correction1 = torch._foreach_pow(beta1, t)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        bias_correction2_sqrt = torch._foreach_pow(beta2, t)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_add_(bias_correction2_sqrt, 1)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(ms, bias_correction1)
        torch._foreach_div_(updates, denom)
        factors = torch._foreach_mul(
            [s["rho"].to(cdt)[:, None] for s in states], -group["lr"] * group["scale"]
        )
        torch._foreach_mul_(updates, factors)
        decay = 1 - group["lr"] * group["weight_decay"]
        for p, state, update in zip(params, states, updates, strict=True):
            view = _oriented(p, p.grass_projection.side)
            if p.dtype == cdt and decay == 1:
                view.index_add_(0, state["rows"], update)  # repeated rows add up
                continue
            rows = state["unique_rows"]
            if rows.numel() != state["rows"].numel():
                update = update.new_zeros(rows.numel(), update.shape[1]).index_add_(
                    0, state["inverse"], update
                )
            w = view[rows].to(cdt)
            if decay != 1:
                w.mul_(decay)
            w.add_(update)
            view[rows] = _round_to(w, p.dtype, group["stochastic_rounding"])

    # -------------------------------------------------------------------------------- selection
    @torch.no_grad()
    def _select(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Choose rows from the full gradient ``grad`` and re-map the moments."""
        group = self._group_of(p)
        state = self.state[p]
        side = p.grass_projection.side
        g = _oriented(grad, side)
        r, k = group["rank"], g.shape[1]
        if not state:
            state["step"] = torch.tensor(0.0)
            generator = torch.Generator().manual_seed(group["seed"] + self._param_index(p))
        else:
            generator = torch.Generator()
            generator.set_state(state["rng"])
        norms = g.to(torch.promote_types(g.dtype, torch.float32)).norm(dim=1)  # fp64 stays fp64
        rows, rho = select_rows(norms, r, group["selection"], generator)
        state["rng"] = generator.get_state()

        sdt = group["state_dtype"] or p.dtype
        new_m = torch.zeros(r, k, dtype=sdt, device=p.device)
        new_v = torch.zeros_like(new_m)
        new_count = torch.zeros(r, dtype=torch.float32, device=p.device)
        if "rows" in state and group["reselect_state"] == "keep":
            old = state["rows"]
            pos = torch.searchsorted(old, rows).clamp_(max=old.numel() - 1)
            kept = old[pos] == rows
            new_m[kept] = state["exp_avg"][pos[kept]]
            new_v[kept] = state["exp_avg_sq"][pos[kept]]
            new_count[kept] = state["row_step"][pos[kept]]
        unique_rows, inverse = torch.unique_consecutive(rows, return_inverse=True)
        state.update(
            rows=rows,
            rho=rho,
            unique_rows=unique_rows,
            inverse=inverse,
            exp_avg=new_m,
            exp_avg_sq=new_v,
            row_step=new_count,
            selected_step=state["step"].clone(),
        )

    # ------------------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`, keeping every tensor's saved dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts state tensors to the parameter's dtype,
        which would turn row indices and RNG states into floats; here they come back exactly.
        A state saved with another rank, side or method raises ``ValueError``.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"The optimizer state has {len(saved_groups)} parameter groups but this optimizer "
                f"has {len(self.param_groups)}: it was saved by another optimizer or another "
                "target_modules setting; resume with the same settings or start a new run."
            )
        for i, (saved, current) in enumerate(zip(saved_groups, self.param_groups, strict=True)):
            keys = ("rank", "proj_side", "selection")
            if any(saved.get(k) != current.get(k) for k in keys):
                was = ", ".join(f"{k}={saved.get(k)!r}" for k in keys)
                now = ", ".join(f"{k}={current.get(k)!r}" for k in keys)
                raise ValueError(
                    f"Parameter group {i} was saved with {was} but this optimizer uses {now}: "
                    "resume with the settings of the checkpoint, or start a new run."
                )
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        self._group_index = {id(p): g for g in self.param_groups for p in g["params"]}
        for pid, p in zip(ids, params, strict=True):
            if pid not in saved_state:
                continue
            state = {
                k: v.to(p.device)
                if isinstance(v, torch.Tensor) and k not in ("step", "rng", "selected_step")
                else v
                for k, v in saved_state[pid].items()
            }
            _check_state_shapes(p, state, self._group_of(p))
            self.state[p] = state


# ----------------------------------------------------------------------------------- functional
def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _adam_direction(
    grad: torch.Tensor, state: dict, group: dict, step: torch.Tensor
) -> torch.Tensor:
    """Update Adam's moments with ``grad`` and return the bias-corrected direction.

    ``step`` is a scalar or a per-row column (r x 1) of step counts, in the compute dtype.
    """
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    m, v = exp_avg.to(grad.dtype), exp_avg_sq.to(grad.dtype)
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if m is not exp_avg:
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step).sqrt()
    denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    return (m / bias_correction1).div_(denom)


def _round_to(x: torch.Tensor, dtype: torch.dtype, stochastic: bool) -> torch.Tensor:
    """Cast float32 ``x`` to ``dtype``; to bfloat16 stochastically if asked.

    Stochastic rounding adds uniform noise below bf16's last bit to the float32 bit pattern and
    truncates, so a value rounds up with probability equal to its distance from the lower
    neighbour: ``E[round(x)] = x``, and small updates survive on average.
    """
    if not stochastic or dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)


# ----------------------------------------------------------------------------------- validation
def _validate_projected_group(group: dict) -> None:
    rank = group["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Invalid rank: {rank!r}; use an integer rank >= 1.")
    gap = group["update_proj_gap"]
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(
            f"Invalid update_proj_gap: {gap!r}; use an integer >= 1 (steps between re-selections)."
        )
    if group["selection"] not in SELECTIONS:
        raise ValueError(
            f"Unknown selection {group['selection']!r}: use one of {', '.join(SELECTIONS)}."
        )
    if group["reselect_state"] not in RESELECT_STATES:
        raise ValueError(
            f"Unknown reselect_state {group['reselect_state']!r}: use one of {', '.join(RESELECT_STATES)}."
        )
    if group["proj_side"] not in PROJ_SIDES:
        raise ValueError(
            f"Unknown proj_side {group['proj_side']!r}: use one of {', '.join(PROJ_SIDES)}."
        )
    if not group["scale"] > 0:
        raise ValueError(f"Invalid scale: {group['scale']!r}; use scale > 0.")
    for p in group["params"]:
        if p.dim() != 2:
            raise ValueError(
                f"A projected group (with 'rank') holds a {p.dim()}-D tensor of shape {tuple(p.shape)}: "
                "Grass projects 2-D weights only; put it in a group without 'rank'."
            )
        side = projection_side(p.shape, group["proj_side"])
        size = p.shape[0] if side == "rows" else p.shape[1]
        if rank > size:
            raise ValueError(
                f"rank {rank} is larger than the selected dimension ({side}, size {size}) of a "
                f"weight of shape {tuple(p.shape)}: use rank <= {size}, or proj_side='auto'."
            )


def _check_state_shapes(p: torch.Tensor, state: dict, group: dict) -> None:
    if "rank" in group:
        side = projection_side(p.shape, group["proj_side"])
        expected = (group["rank"], _oriented(p, side).shape[1])
    else:
        expected = tuple(p.shape)
    found = tuple(state["exp_avg"].shape) if "exp_avg" in state else expected
    if "rank" in group and "rows" not in state:
        found = None
    if found != expected:
        raise ValueError(
            f"The saved optimizer state of a parameter of shape {tuple(p.shape)} has moments of "
            f"shape {found}, expected {expected}: the checkpoint was made with another method "
            "or rank; resume with the same settings or start a new run."
        )


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """:func:`torch.nn.utils.clip_grad_norm_` over ``.grad`` and ``.compressed_grad`` alike.

    The compressed gradients of a grassified model live in ``param.compressed_grad``; stock
    clipping would not see them. Returns the total norm before clipping.
    """
    grads = []
    for p in parameters:
        for g in (p.grad, getattr(p, "compressed_grad", None)):
            if g is not None:
                grads.append(g)
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), norm_type).float() for g in grads])
    total = torch.linalg.vector_norm(norms, norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.device, g.dtype))
    return total
