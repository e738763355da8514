"""Update rules: how a weight's compressed gradient and per-row state become an update of its rows.

Grass's projection does not depend on the base optimizer. For a selection ``(rows, rho)`` of a
weight oriented with the selected dimension first, a rule turns the compressed gradient
``C = rho[:, None] * G[rows]`` (r x k) and its per-row state into a direction ``D`` (r x k); the
optimizer-agnostic row scatter (:func:`hf_grass.functional.apply_update`) then applies::

    W[rows] = W[rows] * (1 - lr wd) - lr * scale * rho[:, None] * D

A rule names the state tensors it keeps (:attr:`UpdateRule.state_keys`), each shaped like ``C``:
they are carried across a re-selection row by row (:func:`hf_grass.functional.remap_state`),
saved, resumed and sharded like Adam's moments, and counted by the memory planner. Per-row step
counts (``step`` here, for bias corrections) come with every rule. A dense parameter (not
projected) takes the same rule with every row selected once (``rows=None``, one step count).

- ``adam`` (default): AdamW's two moments; its step runs through the fast implementations of
  :mod:`hf_grass.functional` (``implementation``).
- ``lion``: one momentum ``m``; ``D = sign(b1 m + (1 - b1) C)``, then ``m = b2 m + (1 - b2) C``
  (Chen et al., 2023). Half of Adam's state; use a smaller learning rate than Adam's.
- ``sign``: sign descent, ``D = sign(C)``; no state at all.

A new rule is a subclass of :class:`UpdateRule` (its ``name``, ``state_keys`` and
:meth:`~UpdateRule.direction`) given to :func:`register_rule`; ``GrassConfig(update_rule=...)``,
``--grass_update_rule`` and ``GrassOptimizer(update_rule=...)`` then take its name. Its step is the
readable reference (one tensor at a time) unless it overrides :meth:`~UpdateRule.step` with a
faster one, tested equal to the reference (as Adam's are).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .functional import (
    apply_update,
    compute_dtype,
    grass_adamw,
    moments_and_direction,
    scaled_update,
    step_column,
)
from .registry import Registry
from .state import state_format_of


class UpdateRule:
    """How a compressed gradient (r x k) and per-row state become a direction (r x k)."""

    name: ClassVar[str] = ""
    # Per-row state tensors, each shaped like the compressed gradient and kept in the group's
    # state_dtype (or the parameter's dtype).
    state_keys: ClassVar[tuple[str, ...]] = ()

    def direction(
        self, grad: Tensor, state: dict[str, Tensor], step: Tensor, group: dict
    ) -> Tensor:
        """The direction ``D`` for one tensor; ``state`` (in the compute dtype) is updated in
        place. ``step``: the per-row counts as an (r, 1) column (a scalar for a dense tensor),
        already incremented. ``group``: the param group (``betas``, ``eps``, ...)."""
        raise NotImplementedError

    def step(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Tensor]],
        steps: list[Tensor],
        rows: list[Tensor | None],
        rhos: list[Tensor | None],
        uniques: list[tuple[Tensor, Tensor] | None],
        *,
        group: dict,
    ) -> None:
        """One step of every tensor in place: the reference, one tensor at a time.

        Arguments as :func:`hf_grass.functional.grass_adamw`'s, with each tensor's state as a
        dict of :attr:`state_keys` stored in the group's ``state_format``; ``group`` gives
        ``lr``, ``weight_decay``, ``scale`` and ``stochastic_rounding``.
        """
        state_format = state_format_of(group.get("state_format", "plain"))
        for i, param in enumerate(params):
            cdt = compute_dtype(param)
            steps[i].add_(1)
            stored = states[i]
            state = {key: state_format.load(stored, key, cdt) for key in self.state_keys}
            direction = self.direction(grads[i].to(cdt), state, step_column(steps[i], cdt), group)
            for key in self.state_keys:
                state_format.store(stored, key, state[key])
            update = scaled_update(direction, rhos[i], group["lr"], group.get("scale", 1.0))
            apply_update(
                param,
                update,
                rows[i],
                uniques[i],
                cdt,
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                stochastic_rounding=group["stochastic_rounding"],
            )


class Adam(UpdateRule):
    """AdamW's moments and bias-corrected direction (see :mod:`hf_grass.functional`)."""

    name = "adam"
    state_keys = ("exp_avg", "exp_avg_sq")

    def direction(self, grad, state, step, group):
        beta1, beta2 = group["betas"]
        return moments_and_direction(
            grad, state["exp_avg"], state["exp_avg_sq"], step, beta1, beta2, group["eps"]
        )

    def step(self, params, grads, states, steps, rows, rhos, uniques, *, group):
        if group.get("state_format", "plain") != "plain":  # only the reference reads formats
            super().step(params, grads, states, steps, rows, rhos, uniques, group=group)
            return
        beta1, beta2 = group["betas"]
        grass_adamw(
            params,
            grads,
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            steps,
            rows,
            rhos,
            uniques,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            scale=group.get("scale", 1.0),
            stochastic_rounding=group["stochastic_rounding"],
            implementation=group["implementation"],
        )


class Lion(UpdateRule):
    """Lion: the sign of an interpolation of momentum and gradient; one momentum tensor."""

    name = "lion"
    state_keys = ("exp_avg",)

    def direction(self, grad, state, step, group):
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        direction = exp_avg.lerp(grad, 1 - beta1).sign_()
        exp_avg.lerp_(grad, 1 - beta2)
        return direction


class Sign(UpdateRule):
    """Sign descent: the sign of the compressed gradient; no state."""

    name = "sign"

    def direction(self, grad, state, step, group):
        return grad.sign()


RULES: Registry[UpdateRule] = Registry("update rule")
register_rule = RULES.register  # register_rule(MyRule()): update_rule="<its name>" then works
rule_of = RULES.of  # the registered rule of a name, or a ValueError naming the registered ones


for _rule in (Adam(), Lion(), Sign()):
    register_rule(_rule)
