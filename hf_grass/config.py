"""GrassConfig: every Grass setting in one place, with its default, its check and its help.

Everything else derives from it: the projected param groups of :class:`~hf_grass.GrassAdamW`
(:meth:`GrassConfig.group_options`), the ``grass_*`` fields of
:class:`~hf_grass.GrassArguments` (one per field, same default and help), and the checks made on
resume (:data:`FIXED_ON_RESUME`, :func:`resume_conflicts`)::

    config = GrassConfig(rank=64, update_proj_gap=200)
    opt = GrassAdamW(grassify(model, **config.group_options()), lr=1e-3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .selection import SELECTIONS

RESELECT_STATES = ("keep", "reset")
PROJ_SIDES = ("auto", "rows", "cols")
STATE_DTYPES = ("float32", "bfloat16", "float16", "float64")

# Settings that shape the optimizer state or its random stream: a resumed run must use the
# checkpoint's values. Every other setting may change on resume and takes the new value.
FIXED_ON_RESUME = (
    "target_modules",
    "embeddings",
    "lm_head",
    "rank",
    "proj_side",
    "selection",
    "seed",
)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _one_of(choices: Sequence[Any]):
    return lambda value: value in choices


# name -> (test, what a valid value is). The message names the value and the fix.
_CHECKS: dict[str, tuple[Any, str]] = {
    "rank": (_positive_int, "use an integer rank >= 1"),
    "update_proj_gap": (_positive_int, "use an integer >= 1 (steps between re-selections)"),
    "scale": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "use a positive number",
    ),
    "selection": (_one_of(SELECTIONS), f"use one of {', '.join(SELECTIONS)}"),
    "reselect_state": (_one_of(RESELECT_STATES), f"use one of {', '.join(RESELECT_STATES)}"),
    "proj_side": (_one_of(PROJ_SIDES), f"use one of {', '.join(PROJ_SIDES)}"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "use an integer"),
    "layerwise_bucket_mb": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
        "use a number of megabytes >= 0 (0: each parameter alone)",
    ),
    "state_dtype": (
        _one_of((*STATE_DTYPES, None)),
        f"use one of {', '.join(STATE_DTYPES)}, or leave it unset (the parameter's dtype)",
    ),
}


def check_option(name: str, value: Any, prefix: str = "") -> None:
    """Raise ``ValueError`` naming ``prefix + name``, the bad value and the fix."""
    check = _CHECKS.get(name)
    if check is not None and not check[0](value):
        raise ValueError(f"Invalid {prefix}{name}={value!r}: {check[1]}.")


def _setting(default: Any, help: str, **metadata: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class GrassConfig:
    """The settings of Grass (structured sparse gradients) for one model."""

    rank: int = _setting(
        64,
        "Rows (or columns) r of each projected weight that get optimizer state; at most the "
        "selected dimension of every targeted weight.",
    )
    update_proj_gap: int = _setting(
        200, "K: optimizer steps between two row selections (step 0 included)."
    )
    scale: float = _setting(1.0, "alpha: multiplier of the projected updates.")
    selection: str = _setting(
        "top_r",
        "How rows are chosen from the gradient's row norms: top_r, multinomial (unbiased, with "
        "replacement), multinomial_nr (without replacement) or uniform.",
        choices=SELECTIONS,
    )
    reselect_state: str = _setting(
        "keep",
        "Adam moments when the selected rows change: 'keep' (carry the rows selected before "
        "and after) or 'reset'.",
        choices=RESELECT_STATES,
    )
    proj_side: str = _setting(
        "auto",
        "Which dimension of a weight is selected: 'rows' (outputs), 'cols' (inputs) or 'auto' "
        "(the larger one, which gives the smaller state).",
        choices=PROJ_SIDES,
    )
    target_modules: str | list[str] = _setting(
        "all-linear",
        "Linear modules Grass projects: 'all-linear' (every nn.Linear but output heads and "
        "adapter layers), module names (PEFT's suffix match) or one regex matched in full "
        "against module names.",
    )
    embeddings: bool = _setting(
        False,
        "Also project the input embedding (rows = vocabulary entries): its compressed gradient "
        "comes from the batch's tokens without forming the vocabulary x hidden gradient. A "
        "tied embedding needs lm_head too.",
    )
    lm_head: bool = _setting(
        False,
        "Also project the output head (lm_head): its weight-gradient matmul costs r/V of the "
        "dense one.",
    )
    seed: int = _setting(0, "Seed of the sampled selections.")
    state_dtype: str | None = _setting(
        None,
        "dtype of Grass's Adam moments (float32, bfloat16, ...). Unset: the parameter's dtype.",
        choices=STATE_DTYPES,
    )
    stochastic_rounding: bool = _setting(
        False, "Round low-precision (bf16) weight updates stochastically (pure bf16 training)."
    )
    compressed_backward: bool = _setting(
        True,
        "Swap targeted nn.Linear layers for compressed-gradient layers so the full weight "
        "gradient is never formed. Off: full .grad, projected in the optimizer.",
    )
    layerwise: bool = _setting(
        False,
        "Apply each parameter's update inside the backward pass and free its gradient at once. "
        "Gradient clipping then acts per parameter (a global norm needs every gradient first).",
    )
    layerwise_bucket_mb: float = _setting(
        0.0,
        "Layer-wise mode: let ready parameters wait until their gradients reach this many MB "
        "(or the backward ends) and update them with one batched step: same results, fewer "
        "kernel launches, up to this much more gradient memory. 0: each parameter alone.",
    )
    recompute_selection: bool = _setting(
        True,
        "GrassTrainer: on the steps that select rows (every update_proj_gap steps), recompute "
        "the decoder layers' activations in the backward (the model's activation "
        "checkpointing, for that step only). Selection steps need every linear layer's whole "
        "input, ordinary steps only the selected columns of a cols-side layer's input, so this "
        "keeps the run's peak memory at an ordinary step's, for one extra forward every "
        "update_proj_gap steps. Same results. No effect when activation checkpointing is on "
        "already or the model cannot checkpoint.",
    )
    recompute_norms: bool = _setting(
        True,
        "GrassTrainer: recompute normalization layers (RMSNorm, LayerNorm) with trainable "
        "weights in the backward instead of keeping their normalized input for the weight's "
        "gradient: two hidden-size activations fewer per LLaMA layer, for an elementwise "
        "recompute. Same results.",
    )
    compiled: bool = _setting(
        False,
        "Fuse the Adam arithmetic of each batch of same-shape projected weights with "
        "torch.compile (compiled at the first step, once per shape).",
    )

    # Keys of a projected GrassAdamW param group, besides "params" and the AdamW ones.
    GROUP_KEYS = (
        "rank",
        "update_proj_gap",
        "scale",
        "selection",
        "reselect_state",
        "proj_side",
        "seed",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name))
        if not self.target_modules:
            raise ValueError(
                "Invalid target_modules: empty; use 'all-linear', module names or a regex."
            )

    def group_options(self) -> dict[str, Any]:
        """The keys of a projected param group: ``rank``, ``update_proj_gap``, ``selection``, ..."""
        return {key: getattr(self, key) for key in self.GROUP_KEYS}

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (:data:`FIXED_ON_RESUME`)."""
        values = {key: getattr(self, key) for key in FIXED_ON_RESUME}
        if not isinstance(values["target_modules"], str):
            values["target_modules"] = list(values["target_modules"])
        return values


def group_defaults() -> dict[str, Any]:
    """Defaults of the projected group keys (``GrassConfig``'s)."""
    return {
        f.name: f.default
        for f in dataclasses.fields(GrassConfig)
        if f.name in GrassConfig.GROUP_KEYS
    }


def validate_group_options(group: dict[str, Any]) -> None:
    """Check the Grass keys of a projected param group (``ValueError`` naming value and fix)."""
    for key in GrassConfig.GROUP_KEYS:
        check_option(key, group[key])


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"key: checkpoint X, now Y"`` for each :data:`FIXED_ON_RESUME` key the two disagree on.

    Keys missing from one side (a checkpoint from before a setting existed) are not compared.
    """
    return [
        f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}"
        for key in FIXED_ON_RESUME
        if key in saved and key in current and saved[key] != current[key]
    ]
