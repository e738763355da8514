"""Hugging Face ``Trainer`` wiring for Grass: ``optim="grass"`` arguments and a Trainer mixin.

This layer only wires; the algorithm lives in :mod:`hf_grass.optim` (GrassAdamW),
:mod:`hf_grass.targets` (which weights are projected) and :mod:`hf_grass.linear` (the
compressed-gradient backward).

    args = GrassTrainingArguments("out", optim="grass", grass_rank=64, learning_rate=2e-4)
    trainer = GrassTrainer(model=model, args=args, train_dataset=ds)
    trainer.train()

Other Trainer subclasses get Grass the same way::

    @dataclass
    class MyArgs(GrassArguments, Seq2SeqTrainingArguments): ...

    class MyTrainer(GrassTrainerMixin, Seq2SeqTrainer): ...

Every other ``optim`` value (``adamw_torch``, ``galore_adamw``, ...) goes to the stock Trainer
unchanged. The clipping hooks overridden here (``_clip_grad_norm``/``_get_grad_norm``) are those of
transformers 5.x.
"""

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_grass.optim import PROJ_SIDES, PROJECTED_DEFAULTS, RESELECT_STATES
from hf_grass.selection import SELECTIONS

logger = logging.getLogger(__name__)

GRASS = "grass"
STATE_DTYPES = ("float32", "bfloat16", "float16", "float64")
# File written beside optimizer.pt in every checkpoint of a Grass run: what shaped its state.
GRASS_CHECKPOINT_CONFIG = "grass_config.json"
_REGEX_CHARS = re.compile(r"[*+?\[\]()|^$\\{}]")


def _optim_help() -> str:
    return (
        "The optimizer: 'grass' (GrassAdamW on the modules of --grass_target_modules) or any "
        f"transformers optimizer name ({', '.join(o.value for o in OptimizerNames)})."
    )


@dataclass
class GrassArguments:
    """The ``grass_*`` fields and ``optim="grass"``; mix into any ``TrainingArguments`` subclass.

    Put it first among the bases (``class MyArgs(GrassArguments, TrainingArguments)``) so that its
    ``__post_init__`` can let ``optim="grass"`` past transformers' check of optimizer names.
    """

    optim: str = field(default=TrainingArguments.default_optim, metadata={"help": _optim_help()})
    grass_rank: int = field(
        default=64,
        metadata={
            "help": "Rows (or columns) r of each projected weight that get optimizer state. 64 "
            "matches the GaLore/APOLLO baselines (r=64) on SmolLM2-135M; must not exceed the "
            "selected dimension of any targeted weight."
        },
    )
    grass_update_proj_gap: int = field(
        default=200, metadata={"help": "K: steps between two row selections (step 0 included)."}
    )
    grass_scale: float = field(
        default=1.0, metadata={"help": "alpha: multiplier of the projected updates."}
    )
    grass_selection: str = field(
        default="top_r",
        metadata={
            "help": "How rows are chosen from the gradient's row norms.",
            "choices": SELECTIONS,
        },
    )
    grass_reselect_state: str | None = field(
        default=None,
        metadata={
            "help": "Adam moments when the selected rows change: 'keep' (carry rows selected "
            "before and after) or 'reset'. Unset: the optimizer's default "
            f"({PROJECTED_DEFAULTS['reselect_state']!r}).",
            "choices": RESELECT_STATES,
        },
    )
    grass_proj_side: str = field(
        default="auto",
        metadata={
            "help": "Which dimension of a weight is selected: 'rows' (outputs), 'cols' "
            "(inputs) or 'auto' (the one giving the smaller state).",
            "choices": PROJ_SIDES,
        },
    )
    # Annotated as a list so that the command line takes several names; a string (regex or
    # "all-linear") is accepted too, from Python, JSON and YAML.
    grass_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear modules Grass projects: 'all-linear' (every nn.Linear but output "
            "heads), module names ('q_proj v_proj' or 'q_proj,v_proj', PEFT's suffix match) or "
            "one regex matched in full against module names (a value with regex characters "
            "such as '.*(attn|mlp).*'). Unset: --optim_target_modules if given, else "
            "'all-linear'."
        },
    )
    grass_layerwise: bool = field(
        default=False,
        metadata={
            "help": "Apply each parameter's update inside the backward pass and free its "
            "gradient at once (single process only). --max_grad_norm then clips each parameter's "
            "gradient separately (a global norm needs every gradient first)."
        },
    )
    grass_compressed_backward: bool = field(
        default=True,
        metadata={
            "help": "Swap targeted nn.Linear layers for compressed-gradient layers so the full "
            "weight gradient is never formed. Off: full .grad, projected in the optimizer. "
            "Multi-process runs use full gradients for now."
        },
    )
    grass_stochastic_rounding: bool = field(
        default=False,
        metadata={"help": "Round low-precision (bf16) weight updates stochastically."},
    )
    grass_state_dtype: str | None = field(
        default=None,
        metadata={
            "help": "dtype of Grass's Adam moments. Unset: the parameter's dtype.",
            "choices": STATE_DTYPES,
        },
    )
    grass_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the sampled selections. Unset: --seed."},
    )

    def __post_init__(self) -> None:
        is_grass = str(getattr(self.optim, "value", self.optim)).lower() == GRASS
        if is_grass:
            # transformers converts `optim` to its OptimizerNames enum, which has no "grass":
            # validate the stock fields with a stand-in, then put "grass" back.
            self.optim = OptimizerNames.ADAMW_TORCH.value
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()
        if is_grass:
            self.optim = GRASS
        self.grass_target_modules = normalize_target_modules(self.grass_target_modules)
        self._validate_grass()

    @property
    def use_grass(self) -> bool:
        return self.optim == GRASS

    def _validate_grass(self) -> None:
        for name, value, allowed in (
            ("grass_selection", self.grass_selection, SELECTIONS),
            ("grass_reselect_state", self.grass_reselect_state, (*RESELECT_STATES, None)),
            ("grass_proj_side", self.grass_proj_side, PROJ_SIDES),
            ("grass_state_dtype", self.grass_state_dtype, (*STATE_DTYPES, None)),
        ):
            if value not in allowed:
                choices = ", ".join(repr(a) for a in allowed if a is not None)
                raise ValueError(f"Invalid {name}={value!r}: use one of {choices}.")
        if not isinstance(self.grass_rank, int) or self.grass_rank < 1:
            raise ValueError(f"Invalid grass_rank={self.grass_rank!r}: use an integer >= 1.")
        if not isinstance(self.grass_update_proj_gap, int) or self.grass_update_proj_gap < 1:
            raise ValueError(
                f"Invalid grass_update_proj_gap={self.grass_update_proj_gap!r}: use an integer >= 1."
            )
        if not self.grass_scale > 0:
            raise ValueError(f"Invalid grass_scale={self.grass_scale!r}: use a positive number.")
        if self.use_grass and getattr(self, "fp16", False):
            if self.grass_compressed_backward or self.grass_layerwise:
                raise ValueError(
                    "fp16=True with Grass's compressed backward or layer-wise mode: fp16's loss "
                    "scaler cannot see those gradients. Use --bf16 (or fp32), or "
                    "--grass_compressed_backward false --grass_layerwise false."
                )

    def grass_targets(self) -> list[str] | str:
        """The target-module selector Grass uses (see ``grass_target_modules``)."""
        if self.grass_target_modules is not None:
            return self.grass_target_modules
        fallback = normalize_target_modules(getattr(self, "optim_target_modules", None))
        return "all-linear" if fallback is None else fallback

    def grass_options(self) -> dict[str, Any]:
        """Keys of a projected GrassAdamW param group, besides ``rank``."""
        options: dict[str, Any] = {
            "update_proj_gap": self.grass_update_proj_gap,
            "scale": self.grass_scale,
            "selection": self.grass_selection,
            "proj_side": self.grass_proj_side,
            "seed": self.grass_seed if self.grass_seed is not None else getattr(self, "seed", 0),
        }
        if self.grass_reselect_state is not None:
            options["reselect_state"] = self.grass_reselect_state
        return options

    def grass_optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``GrassAdamW`` (they apply to every parameter group)."""
        kwargs: dict[str, Any] = {
            "lr": getattr(self, "learning_rate", 1e-3),
            "betas": (getattr(self, "adam_beta1", 0.9), getattr(self, "adam_beta2", 0.999)),
            "eps": getattr(self, "adam_epsilon", 1e-8),
            "weight_decay": getattr(self, "weight_decay", 0.0),
            "stochastic_rounding": self.grass_stochastic_rounding,
        }
        if self.grass_state_dtype is not None:
            kwargs["state_dtype"] = getattr(torch, self.grass_state_dtype)
        return kwargs

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", **kwargs: Any):
        """``TrainingArguments.set_optimizer`` that also accepts ``name="grass"``."""
        is_grass = str(getattr(name, "value", name)).lower() == GRASS
        result = super().set_optimizer(OptimizerNames.ADAMW_TORCH if is_grass else name, **kwargs)
        if is_grass:
            self.optim = GRASS
        return result


@dataclass
class GrassTrainingArguments(GrassArguments, TrainingArguments):
    """``TrainingArguments`` with ``optim="grass"`` and the ``grass_*`` fields."""


def normalize_target_modules(value: Any) -> list[str] | str | None:
    """Bring a CLI/JSON/YAML target-module value to the engine's form.

    ``"all-linear"`` stays; a comma-separated string or a list is a list of module names; a single
    value with regex characters (``*+?[]()|^$\\{}``) is a regex; a single plain name is a list.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
        if len(items) != 1:
            if not items:
                raise ValueError(
                    "grass_target_modules is empty: use 'all-linear', names or a regex."
                )
            return items
        value = items[0]
    if not isinstance(value, str):
        raise ValueError(
            f"Invalid grass_target_modules={value!r}: use 'all-linear', a list of module names "
            "or a regex string."
        )
    value = value.strip()
    if value.replace("_", "-").lower() == "all-linear":
        return "all-linear"
    if _REGEX_CHARS.search(value):
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError("grass_target_modules is empty: use 'all-linear', names or a regex.")
    return names


class GrassTrainerMixin:
    """Installs Grass when ``args.optim == "grass"``; any other optimizer is the stock one.

    Put it before the Trainer class: ``class MyTrainer(GrassTrainerMixin, Trainer)``.
    """

    args: TrainingArguments
    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if _uses_grass(self.args):
            self._check_grass_setup()

    # ---- setup -------------------------------------------------------------------------------

    def _check_grass_setup(self) -> None:
        """Fail at construction, before any training, on a setup Grass cannot run."""
        if not isinstance(self.args, GrassArguments):
            raise TypeError(
                f"optim='grass' needs GrassTrainingArguments (or a TrainingArguments subclass "
                f"mixing in GrassArguments), got {type(self.args).__name__}."
            )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError(
                "optim='grass' does not support DeepSpeed or FSDP yet: use DDP (torchrun / "
                "accelerate launch without a DeepSpeed/FSDP config) or a stock optimizer."
            )
        if self.args.grass_layerwise and self.args.world_size > 1:
            raise ValueError(
                f"grass_layerwise=True with {self.args.world_size} processes: layer-wise updates "
                "would run before data-parallel gradients are averaged. Use --grass_layerwise "
                "false for multi-process runs."
            )
        if self.model is not None:
            # A dry run of the grouping: bad target modules or a rank too large raise here.
            try:
                self._grass_param_groups(self.model)
            except ValueError as e:
                raise ValueError(
                    f"optim='grass' cannot be set up on {type(self.model).__name__}: {e} "
                    "(flags: --grass_target_modules, --grass_rank, --grass_proj_side)"
                ) from e

    def _grass_param_groups(self, model: nn.Module, install: bool = False) -> list[dict]:
        """GrassAdamW's param groups for ``model``, with HF's weight-decay grouping.

        ``install=True`` also swaps the targeted layers for compressed-gradient layers (single
        process only); ``install=False`` is a dry run that validates targets and ranks.
        """
        from hf_grass.targets import grass_param_groups

        args = self.args
        decay = set(self.get_decay_parameter_names(model))
        no_decay = [n for n, _ in model.named_parameters() if n not in decay]
        kwargs = dict(
            rank=args.grass_rank,
            target_modules=args.grass_targets(),
            weight_decay=args.weight_decay,
            no_decay=no_decay,
            **args.grass_options(),
        )
        if install and args.grass_compressed_backward and args.world_size == 1:
            from hf_grass.linear import grassify

            return grassify(model, **kwargs)
        groups = grass_param_groups(model, **kwargs)
        if not install:
            _validate_groups(groups, args)
        return groups

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """GrassAdamW on the target modules when ``optim="grass"``; otherwise the stock optimizer."""
        if not _uses_grass(self.args) or self.optimizer is not None:
            return (
                super().create_optimizer(model) if model is not None else super().create_optimizer()
            )
        from hf_grass.optim import GrassAdamW

        args = self.args
        opt_model = self.model if model is None else model
        compressed = args.grass_compressed_backward and args.world_size == 1
        if args.grass_compressed_backward and not compressed:
            logger.warning(
                "Grass: %d processes, so targeted weights keep full gradients for DDP (compressed "
                "communication is not implemented yet); optimizer state is still r x n.",
                args.world_size,
            )
        groups = self._grass_param_groups(opt_model, install=True)
        self.optimizer = GrassAdamW(groups, **args.grass_optimizer_kwargs())
        if args.grass_layerwise:
            _enable_layerwise(self.optimizer, opt_model, args)
        # The Trainer clears gradients with model.zero_grad(), which does not know about
        # compressed gradients: drop them once the step has used them.
        self.optimizer.register_step_post_hook(_drop_compressed_grads)
        projected = sum(len(g["params"]) for g in groups if "rank" in g)
        logger.info(
            "Grass: rank %d on %d weights (%s); compressed backward %s; layer-wise %s.",
            args.grass_rank,
            projected,
            args.grass_targets(),
            compressed,
            args.grass_layerwise,
        )
        return self.optimizer

    # ---- clipping: include compressed gradients ----------------------------------------------

    # Layer-wise mode clips each parameter inside the backward pass (hf_grass.layerwise); the
    # Trainer's global clip then finds no gradients, and no global norm is logged.

    def _clip_grad_norm(self, model: nn.Module):
        if not _uses_grass(self.args):
            return super()._clip_grad_norm(model)
        if self.args.grass_layerwise:
            return None
        return self._grass_clip(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if not _uses_grass(self.args) or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.args.grass_layerwise:
            return None
        return self._grass_clip(model, float("inf"))

    def _grass_clip(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        from hf_grass.optim import clip_grad_norm_

        self.accelerator.unscale_gradients()  # no-op unless fp16 with full gradients
        return clip_grad_norm_(model.parameters(), max_norm)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if _uses_grass(self.args) and self.args.should_save:
            with open(os.path.join(output_dir, GRASS_CHECKPOINT_CONFIG), "w") as f:
                json.dump(_grass_fingerprint(self.args), f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        self._check_checkpoint_method(checkpoint)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(
                f"Cannot resume the optimizer from {checkpoint}: {e} This run uses "
                f"{_describe(self.args)}. {_resume_fix(checkpoint)}"
            ) from e

    def _check_checkpoint_method(self, checkpoint: str) -> None:
        """Compare the checkpoint's ``grass_config.json`` (if any) with this run's setting.

        Without the file (a checkpoint of another optimizer, or of Grass outside this Trainer),
        ``GrassAdamW.load_state_dict`` checks groups, ranks and shapes itself.
        """
        path = os.path.join(checkpoint, GRASS_CHECKPOINT_CONFIG)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            saved = json.load(f)
        fix = _resume_fix(checkpoint)
        if not _uses_grass(self.args):
            raise ValueError(
                f"Cannot resume {checkpoint} with {_describe(self.args)}: its optimizer "
                f"state was saved by Grass ({saved}). {fix}"
            )
        ours = _grass_fingerprint(self.args)
        diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"Cannot resume {checkpoint}: Grass setting differs ({changes}). {fix}"
            )


class GrassTrainer(GrassTrainerMixin, Trainer):
    """``transformers.Trainer`` that understands ``optim="grass"`` (see :class:`GrassTrainingArguments`)."""


def _uses_grass(args: Any) -> bool:
    return getattr(args, "optim", None) == GRASS


def _grass_fingerprint(args: GrassArguments) -> dict[str, Any]:
    """The settings that fix the shapes of Grass's optimizer state."""
    targets = args.grass_targets()
    return {
        "optim": GRASS,
        "rank": args.grass_rank,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "proj_side": args.grass_proj_side,
    }


def _describe(args: Any) -> str:
    if _uses_grass(args):
        return f"optim='grass', grass_rank={args.grass_rank}, targets {args.grass_targets()!r}"
    return f"optim={getattr(args.optim, 'value', args.optim)!r}"


def _resume_fix(checkpoint: str) -> str:
    return (
        "Resume with the flags it was trained with, or start a new run from its weights "
        f"(--model_name_or_path {checkpoint}) without --resume_from_checkpoint. The checkpoint is "
        "left as it was."
    )


def _validate_groups(groups: list[dict], args: GrassArguments) -> None:
    """Build a throwaway GrassAdamW (it checks ranks against shapes), leaving params as they were."""
    from hf_grass.optim import GrassAdamW

    params = [p for g in groups for p in g["params"]]
    saved = [p.__dict__.get("grass_projection", _MISSING) for p in params]
    try:
        GrassAdamW([dict(g) for g in groups], **args.grass_optimizer_kwargs())
    finally:
        for p, value in zip(params, saved, strict=True):
            if value is _MISSING:
                p.__dict__.pop("grass_projection", None)
            else:
                p.grass_projection = value


_MISSING = object()


def _drop_compressed_grads(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    for group in optimizer.param_groups:
        if "rank" in group:
            for p in group["params"]:
                if getattr(p, "compressed_grad", None) is not None:
                    p.compressed_grad = None


def _enable_layerwise(optimizer: torch.optim.Optimizer, model: nn.Module, args: Any) -> None:
    """Update each parameter inside the backward pass (``max_grad_norm`` clips per parameter)."""
    from hf_grass.layerwise import enable_layerwise

    enable_layerwise(
        optimizer,
        model,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
    )
