"""GrassConfig: every Grass setting in one place, with its default, its check and its help.

Everything else derives from it: the projected param groups of :class:`~hf_grass.GrassAdamW`
(:meth:`GrassConfig.group_options`), the ``grass_*`` fields of
:class:`~hf_grass.GrassArguments` (one per field, same default and help), and the checks made on
resume (:data:`FIXED_ON_RESUME`, :func:`resume_conflicts`)::

    config = GrassConfig(rank=64, update_proj_gap=200)
    opt = GrassAdamW(grassify(model, **config.group_options()), lr=1e-3)

A function elsewhere that takes a Grass setting as an argument defaults it to ``None``, meaning
GrassConfig's default, and resolves and checks it with :func:`resolve_option`; it never restates
the value.

Resume policy. Each field's metadata says what a resumed run does with it: ``resume="fixed"``
(it shapes the optimizer state or its random stream: the run must use the checkpoint's value,
:data:`FIXED_ON_RESUME`) or ``resume="new"`` (the new run's value applies,
:data:`TAKES_NEW_ON_RESUME`). A field cannot be declared without it, and both lists, and the keys
``GrassAdamW.load_state_dict`` takes from its own groups, derive from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .functional import IMPLEMENTATIONS
from .rules import RULES
from .selection import SELECTIONS
from .state import STATE_FORMATS

RESELECT_STATES = ("keep", "reset")
RESIDUAL_UPDATES = ("none", "sign")
PROJ_SIDES = ("auto", "rows", "cols")
STATE_DTYPES = ("float32", "bfloat16", "float16", "float64")

# The values of a field's ``resume`` metadata (see the module docstring).
FIXED = "fixed"  # shapes the optimizer state or its random stream: the checkpoint's value stays
TAKES_NEW = "new"  # may change on resume: the new run's value applies
RESUME_POLICIES = (FIXED, TAKES_NEW)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _one_of(choices: Sequence[Any]):
    return lambda value: value in choices


def _megabytes(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


# name -> (test, what a valid value is, or a function giving it). The message names the value and
# the fix. The registries (selections, rules, formats) are read when checking: names registered
# after import count too.
_CHECKS: dict[str, tuple[Any, str]] = {
    "rank": (_positive_int, "use an integer rank >= 1"),
    "update_proj_gap": (_positive_int, "use an integer >= 1 (steps between re-selections)"),
    "scale": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "use a positive number",
    ),
    "selection": (lambda v: v in SELECTIONS, lambda: f"use one of {', '.join(SELECTIONS)}"),
    "reselect_state": (_one_of(RESELECT_STATES), f"use one of {', '.join(RESELECT_STATES)}"),
    "proj_side": (_one_of(PROJ_SIDES), f"use one of {', '.join(PROJ_SIDES)}"),
    "residual_update": (_one_of(RESIDUAL_UPDATES), f"use one of {', '.join(RESIDUAL_UPDATES)}"),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "use an integer"),
    "layerwise_bucket_mb": (
        _megabytes,
        "use a number of megabytes >= 0 (0: each parameter alone)",
    ),
    "bucket_cap_mb": (_megabytes, "use a number of megabytes >= 0 (0: each weight alone)"),
    "implementation": (_one_of(IMPLEMENTATIONS), f"use one of {', '.join(IMPLEMENTATIONS)}"),
    "update_rule": (lambda v: v in RULES, lambda: f"use one of {', '.join(RULES)}"),
    "state_format": (
        lambda v: v in STATE_FORMATS,
        lambda: f"use one of {', '.join(STATE_FORMATS)}",
    ),
    "state_dtype": (
        _one_of((*STATE_DTYPES, None)),
        f"use one of {', '.join(STATE_DTYPES)}, or leave it unset (the parameter's dtype)",
    ),
}


def check_option(name: str, value: Any, prefix: str = "", shown: str | None = None) -> None:
    """Raise ``ValueError`` naming ``prefix + name`` (or ``shown``), the bad value and the fix."""
    check = _CHECKS.get(name)
    if check is not None and not check[0](value):
        fix = check[1]() if callable(check[1]) else check[1]  # registries: the names now
        raise ValueError(f"Invalid {shown or prefix + name}={value!r}: {fix}.")


def _setting(default: Any, help: str, *, resume: str, **metadata: Any) -> Any:
    """A GrassConfig field: its default, its help, its resume policy (``FIXED`` or ``TAKES_NEW``)
    and argparse's other keys (``choices``)."""
    if resume not in RESUME_POLICIES:
        raise ValueError(f"Invalid resume={resume!r}: use one of {', '.join(RESUME_POLICIES)}.")
    metadata = {"help": help, "resume": resume, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class GrassConfig:
    """The settings of Grass (structured sparse gradients) for one model."""

    rank: int = _setting(
        64,
        "Rows (or columns) r of each projected weight that get optimizer state; at most the "
        "selected dimension of every targeted weight.",
        resume=FIXED,
    )
    update_proj_gap: int = _setting(
        200,
        "K: optimizer steps between two row selections (step 0 included).",
        resume=TAKES_NEW,
    )
    scale: float = _setting(1.0, "alpha: multiplier of the projected updates.", resume=TAKES_NEW)
    selection: str = _setting(
        "top_r",
        "How rows are chosen from the gradient's row norms: top_r, multinomial (unbiased, with "
        "replacement), multinomial_nr (without replacement) or uniform.",
        choices=tuple(SELECTIONS),
        resume=FIXED,
    )
    reselect_state: str = _setting(
        "keep",
        "Adam moments when the selected rows change: 'keep' (carry the rows selected before "
        "and after) or 'reset'.",
        choices=RESELECT_STATES,
        resume=TAKES_NEW,
    )
    proj_side: str = _setting(
        "auto",
        "Which dimension of a weight is selected: 'rows' (outputs), 'cols' (inputs) or 'auto' "
        "(the larger one, which gives the smaller state).",
        choices=PROJ_SIDES,
        resume=FIXED,
    )
    target_modules: str | list[str] = _setting(
        "all-linear",
        "Modules Grass projects: 'all-linear' (every linear layer and MoE experts module but "
        "output heads and adapter layers), module names (PEFT's suffix match) or one regex "
        "matched in full against module names; both also match an experts module's 3-D "
        "weights by path (down_proj, experts.gate_up_proj).",
        resume=FIXED,
    )
    embeddings: bool = _setting(
        False,
        "Also project the input embedding (rows = vocabulary entries): its compressed gradient "
        "comes from the batch's tokens without forming the vocabulary x hidden gradient. A "
        "tied embedding needs lm_head too.",
        resume=FIXED,
    )
    lm_head: bool = _setting(
        False,
        "Also project the output head (lm_head): its weight-gradient matmul costs r/V of the "
        "dense one.",
        resume=FIXED,
    )
    residual_update: str = _setting(
        "none",
        "Every row moving: 'sign' also moves the rows outside the selection each step, by "
        "lr * scale * sign of their gradient (state-free sign descent, as FRUGAL), so every "
        "weight gets a full-rank update while the optimizer state stays r rows. It needs the "
        "full weight gradient (compressed_backward off): it gives up the compressed "
        "backward's smaller weight-gradient matmul and data-parallel traffic, and keeps the "
        "state memory. 'none': only the selected rows change.",
        choices=RESIDUAL_UPDATES,
        resume=TAKES_NEW,
    )
    seed: int = _setting(0, "Seed of the sampled selections.", resume=FIXED)
    state_dtype: str | None = _setting(
        None,
        "dtype of Grass's Adam moments (float32, bfloat16, ...). Unset: the parameter's dtype.",
        choices=STATE_DTYPES,
        resume=TAKES_NEW,
    )
    stochastic_rounding: bool = _setting(
        False,
        "Round low-precision (bf16) weight updates stochastically (pure bf16 training).",
        resume=TAKES_NEW,
    )
    compressed_backward: bool = _setting(
        True,
        "Swap targeted nn.Linear layers for compressed-gradient layers so the full weight "
        "gradient is never formed. Off: full .grad, projected in the optimizer.",
        resume=TAKES_NEW,
    )
    layerwise: bool = _setting(
        False,
        "Apply each parameter's update inside the backward pass and free its gradient at once. "
        "Gradient clipping then acts per parameter (a global norm needs every gradient first).",
        resume=TAKES_NEW,
    )
    layerwise_bucket_mb: float = _setting(
        0.0,
        "Layer-wise mode: let ready parameters wait until their gradients reach this many MB "
        "(or the backward ends) and update them with one batched step: same results, fewer "
        "kernel launches, up to this much more gradient memory. 0: each parameter alone.",
        resume=TAKES_NEW,
    )
    bucket_cap_mb: float = _setting(
        25.0,
        "Data parallelism (several processes, compressed backward, not layer-wise): average "
        "the compressed gradients in buckets of about this many MB, one all-reduce each, sent "
        "while the backward goes on (as DDP's bucket_cap_mb). 0: each weight alone.",
        resume=TAKES_NEW,
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
        resume=TAKES_NEW,
    )
    recompute_norms: bool = _setting(
        True,
        "GrassTrainer: recompute normalization layers (RMSNorm, LayerNorm) with trainable "
        "weights in the backward instead of keeping their normalized input for the weight's "
        "gradient: two hidden-size activations fewer per LLaMA layer, for an elementwise "
        "recompute. Same results.",
        resume=TAKES_NEW,
    )
    implementation: str = _setting(
        "grouped",
        "How the optimizer step runs: 'grouped' (same-shape projected weights stacked into "
        "batches), 'compiled' (grouped, each batch's arithmetic fused by torch.compile at the "
        "first step), 'triton' (grouped, each batch one fused Triton kernel; needs Triton and a "
        "CUDA device), 'foreach' (torch's multi-tensor ops) or 'reference' (one tensor at a "
        "time). Same results up to float rounding.",
        choices=IMPLEMENTATIONS,
        resume=TAKES_NEW,
    )
    compiled: bool = _setting(
        False,
        "Same as implementation='compiled' (kept for existing command lines).",
        resume=TAKES_NEW,
    )
    update_rule: str = _setting(
        "adam",
        "The base optimizer on the selected rows (and on the dense parameters): 'adam' "
        "(AdamW), 'lion' (one momentum: half of Adam's state) or 'sign' (sign descent, no "
        "state); see hf_grass.rules.",
        choices=tuple(RULES),
        resume=FIXED,
    )
    state_format: str = _setting(
        "plain",
        "How the update rule's per-row state is stored: 'plain' (one tensor in state_dtype), or "
        "a format registered with hf_grass.state.register_state_format.",
        choices=tuple(STATE_FORMATS),
        resume=FIXED,
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
        "residual_update",
    )
    # GrassAdamW's keyword arguments that are Grass settings: keys of every param group.
    OPTIMIZER_KEYS = (
        "state_dtype",
        "stochastic_rounding",
        "implementation",
        "update_rule",
        "state_format",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_option(f.name, getattr(self, f.name))
        if not self.target_modules:
            raise ValueError(
                "Invalid target_modules: empty; use 'all-linear', module names or a regex."
            )
        if self.residual_update != "none" and self.compressed_backward:
            raise ValueError(
                f"Invalid residual_update={self.residual_update!r} with compressed_backward=True: "
                "moving the rows outside the selection needs their gradient; set "
                "compressed_backward=False (--grass_compressed_backward false)."
            )
        if self.compiled and self.implementation not in ("grouped", "compiled"):
            raise ValueError(
                f"Invalid compiled=True with implementation={self.implementation!r}: compiled is "
                "implementation='compiled'; give one of the two."
            )

    def group_options(self) -> dict[str, Any]:
        """The keys of a projected param group: ``rank``, ``update_proj_gap``, ``selection``, ..."""
        return {key: getattr(self, key) for key in self.GROUP_KEYS}

    def optimizer_options(self) -> dict[str, Any]:
        """GrassAdamW's Grass keyword arguments (:attr:`OPTIMIZER_KEYS`), ``state_dtype`` as a
        ``torch.dtype``."""
        options = {key: getattr(self, key) for key in self.OPTIMIZER_KEYS}
        if self.compiled:
            options["implementation"] = "compiled"
        if options["state_dtype"] is not None:
            options["state_dtype"] = getattr(torch, options["state_dtype"])
        return options

    @classmethod
    def on_resume(cls, policy: str, among: Sequence[str] | None = None) -> tuple[str, ...]:
        """The settings whose ``resume`` metadata is ``policy`` (``FIXED`` or ``TAKES_NEW``), in
        field order; only those in ``among`` if given (e.g. the param-group keys)."""
        if policy not in RESUME_POLICIES:
            raise ValueError(f"Invalid policy={policy!r}: use one of {', '.join(RESUME_POLICIES)}.")
        return tuple(
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata["resume"] == policy and (among is None or f.name in among)
        )

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with its checkpoint (:data:`FIXED_ON_RESUME`)."""
        values = {key: getattr(self, key) for key in FIXED_ON_RESUME}
        if not isinstance(values["target_modules"], str):
            values["target_modules"] = list(values["target_modules"])
        return values


# Settings that shape the optimizer state or its random stream: a resumed run must use the
# checkpoint's values. Every other setting may change on resume and takes the new value.
FIXED_ON_RESUME = GrassConfig.on_resume(FIXED)
TAKES_NEW_ON_RESUME = GrassConfig.on_resume(TAKES_NEW)
_FIELDS = {f.name: f for f in dataclasses.fields(GrassConfig)}


def default_of(name: str) -> Any:
    """GrassConfig's default of the setting ``name`` (a fresh copy of a list)."""
    f = _FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def resolve_option(name: str, value: Any = None, shown: str | None = None) -> Any:
    """``value`` of the setting ``name``, checked as GrassConfig checks it (``ValueError`` naming
    ``shown`` or ``name``); ``None`` stands for GrassConfig's default.

    For functions outside this module that take a Grass setting as an argument: they default it
    to ``None`` and call this, so that the default has one home.
    """
    if value is None:
        return default_of(name)
    check_option(name, value, shown=shown)
    return value


def group_defaults() -> dict[str, Any]:
    """Defaults of the projected group keys (``GrassConfig``'s)."""
    return {key: default_of(key) for key in GrassConfig.GROUP_KEYS}


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
