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

import dataclasses
import json
import logging
import os
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import logging as hf_logging

from hf_grass.config import GrassConfig, check_option, default_of, resume_conflicts
from hf_grass.errors import UsageError
from hf_grass.recompute import layers_recomputed, recompute_norms
from hf_grass.report import coverage_line, unwrap_optimizer

logger = logging.getLogger(__name__)
# The logger the Trainer's own messages go to: its handler is the one stock scripts set up.
hf_logger = hf_logging.get_logger("transformers.trainer")

GRASS = "grass"
# File written beside optimizer.pt in every checkpoint of a Grass run: what shaped its state.
GRASS_CHECKPOINT_CONFIG = "grass_config.json"
_REGEX_CHARS = re.compile(r"[*+?\[\]()|^$\\{}]")
_CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(GrassConfig)}


def _optim_help() -> str:
    return (
        "The optimizer: 'grass' (GrassAdamW on the modules of --grass_target_modules) or any "
        f"transformers optimizer name ({', '.join(o.value for o in OptimizerNames)})."
    )


def _from_config(name: str, **override: Any) -> Any:
    """The ``grass_<name>`` argument: GrassConfig's default and help unless overridden.

    The metadata keeps what ``HfArgumentParser`` passes to argparse (``help``, ``choices``);
    ``resume`` stays GrassConfig's (:data:`~hf_grass.config.FIXED_ON_RESUME`).
    """
    metadata = {k: v for k, v in _CONFIG_FIELDS[name].metadata.items() if k != "resume"}
    default = override.pop("default", default_of(name))
    metadata.update(override)
    return field(default=default, metadata=metadata)


@dataclass
class GrassArguments:
    """The ``grass_*`` fields and ``optim="grass"``; mix into any ``TrainingArguments`` subclass.

    There is one ``grass_<name>`` field per :class:`~hf_grass.GrassConfig` setting, with its
    default and help; :meth:`grass_config` turns them into a ``GrassConfig``. Put it first among
    the bases (``class MyArgs(GrassArguments, TrainingArguments)``) so that its ``__post_init__``
    can let ``optim="grass"`` past transformers' check of optimizer names.
    """

    optim: str = field(default=TrainingArguments.default_optim, metadata={"help": _optim_help()})
    grass_rank: int = _from_config("rank")
    grass_update_proj_gap: int = _from_config("update_proj_gap")
    grass_scale: float = _from_config("scale")
    grass_selection: str = _from_config("selection")
    grass_reselect_state: str = _from_config("reselect_state")
    grass_proj_side: str = _from_config("proj_side")
    # Annotated as a list so that the command line takes several names; a string (regex or
    # "all-linear") is accepted too, from Python, JSON and YAML.
    grass_target_modules: list[str] | None = _from_config(
        "target_modules",
        default=None,
        help=_CONFIG_FIELDS["target_modules"].metadata["help"]
        + " Names may be given as 'q_proj v_proj' or 'q_proj,v_proj'; a value with regex "
        "characters such as '.*(attn|mlp).*' is a regex. Unset: --optim_target_modules if "
        f"given, else {default_of('target_modules')!r}.",
    )
    grass_embeddings: bool = _from_config("embeddings")
    grass_lm_head: bool = _from_config("lm_head")
    grass_seed: int | None = _from_config(
        "seed", default=None, help="Seed of the sampled selections. Unset: --seed."
    )
    grass_state_dtype: str | None = _from_config("state_dtype")
    grass_stochastic_rounding: bool = _from_config("stochastic_rounding")
    grass_compressed_backward: bool = _from_config("compressed_backward")
    grass_layerwise: bool = _from_config("layerwise")
    grass_layerwise_bucket_mb: float = _from_config("layerwise_bucket_mb")
    grass_bucket_cap_mb: float = _from_config("bucket_cap_mb")
    grass_recompute_selection: bool = _from_config("recompute_selection")
    grass_recompute_norms: bool = _from_config("recompute_norms")
    grass_implementation: str = _from_config("implementation")
    grass_compiled: bool = _from_config("compiled")
    grass_update_rule: str = _from_config("update_rule")
    grass_state_format: str = _from_config("state_format")
    grass_residual_update: str = _from_config("residual_update")

    def __post_init__(self) -> None:
        is_grass = str(getattr(self.optim, "value", self.optim)).lower() == GRASS
        if is_grass:
            # transformers converts `optim` to its OptimizerNames enum, which has no "grass":
            # validate the stock fields with a stand-in, then put "grass" back.
            self.optim = OptimizerNames.ADAMW_TORCH.value
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # Several CPU processes (torchrun, accelerate launch --multi_gpu): transformers needs
            # use_cpu and a CPU backend, or it leaves the model unwrapped and every process
            # trains alone.
            if hasattr(self, "use_cpu"):
                self.use_cpu = True
            if getattr(self, "ddp_backend", "unset") is None:
                self.ddp_backend = "gloo"
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
        for name in _CONFIG_FIELDS:
            value = getattr(self, f"grass_{name}")
            if value is not None or name not in ("seed", "target_modules"):
                check_option(name, value, prefix="grass_")
        if self.use_grass:
            self.grass_config()  # the checks across settings (residual_update, compiled)
        if self.use_grass and getattr(self, "fp16", False):
            _refuse_fp16(self, "fp16=True")

    def grass_config(self) -> GrassConfig:
        """The :class:`~hf_grass.GrassConfig` these arguments describe (unset values resolved)."""
        values = {name: getattr(self, f"grass_{name}") for name in _CONFIG_FIELDS}
        values["target_modules"] = self.grass_targets()
        if values["seed"] is None:
            values["seed"] = getattr(self, "seed", 0)
        return GrassConfig(**values)

    def grass_targets(self) -> list[str] | str:
        """The target-module selector Grass uses (see ``grass_target_modules``)."""
        if self.grass_target_modules is not None:
            return self.grass_target_modules
        fallback = normalize_target_modules(getattr(self, "optim_target_modules", None))
        return default_of("target_modules") if fallback is None else fallback

    def grass_optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``GrassAdamW`` (they apply to every parameter group)."""
        config = self.grass_config()
        return {
            "lr": getattr(self, "learning_rate", 1e-3),
            "betas": (getattr(self, "adam_beta1", 0.9), getattr(self, "adam_beta2", 0.999)),
            "eps": getattr(self, "adam_epsilon", 1e-8),
            "weight_decay": getattr(self, "weight_decay", 0.0),
            **config.optimizer_options(),
        }

    def grass_data_parallel_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``GrassDataParallel`` (several processes, compressed backward)."""
        config = self.grass_config()
        return {"layerwise": config.layerwise, "bucket_cap_mb": config.bucket_cap_mb}

    def set_optimizer(self, name: str | OptimizerNames = "adamw_torch", **kwargs: Any):
        """``TrainingArguments.set_optimizer`` that also accepts ``name="grass"``."""
        is_grass = str(getattr(name, "value", name)).lower() == GRASS
        result = super().set_optimizer(OptimizerNames.ADAMW_TORCH if is_grass else name, **kwargs)
        if is_grass:
            self.optim = GRASS
        return result


def _refuse_fp16(args: Any, what: str) -> None:
    """fp16's loss scaler cannot unscale or inf-check compressed gradients."""
    if args.grass_compressed_backward or args.grass_layerwise:
        raise UsageError(
            f"{what} with Grass's compressed backward or layer-wise mode: fp16's loss scaler "
            "cannot see those gradients. Use --bf16 (or fp32), or --grass_compressed_backward "
            "false --grass_layerwise false."
        )


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
                raise UsageError(
                    "grass_target_modules is empty: use 'all-linear', names or a regex."
                )
            return items
        value = items[0]
    if not isinstance(value, str):
        raise UsageError(
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
        raise UsageError("grass_target_modules is empty: use 'all-linear', names or a regex.")
    return names


class GrassTrainerMixin:
    """Installs Grass when ``args.optim == "grass"``; any other optimizer is the stock one.

    Put it before the Trainer class: ``class MyTrainer(GrassTrainerMixin, Trainer)``.
    """

    args: TrainingArguments
    model: nn.Module
    optimizer: torch.optim.Optimizer | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if _uses_grass(training_args):
            _refuse_fsdp_on_cpu(training_args)
        super().__init__(*args, **kwargs)
        if _uses_grass(self.args):
            _check_trainer_hooks()
            self._check_grass_setup()

    # ---- setup -------------------------------------------------------------------------------

    def _check_grass_setup(self) -> None:
        """Fail at construction, before any training, on a setup Grass cannot run."""
        if not isinstance(self.args, GrassArguments):
            raise TypeError(
                f"optim='grass' needs GrassTrainingArguments (or a TrainingArguments subclass "
                f"mixing in GrassArguments), got {type(self.args).__name__}."
            )
        if getattr(self, "is_deepspeed_enabled", False):
            raise UsageError(
                "optim='grass' does not run under DeepSpeed (it flattens weights into 1-D "
                "buffers, which row selection cannot address): use DDP (torchrun / accelerate "
                f"launch without a DeepSpeed config) or FSDP2 ({FSDP2_FLAGS})."
            )
        if getattr(self, "is_fsdp_enabled", False) and not self._grass_fsdp2():
            raise UsageError(
                "optim='grass' with FSDP needs FSDP2 (FSDP1 flattens weights into 1-D buffers, "
                f"which row selection cannot address): pass {FSDP2_FLAGS}."
            )
        if self._grass_fsdp2() and self.args.grass_layerwise:
            raise UsageError(
                "grass_layerwise=True with FSDP2: layer-wise updates need Grass's compressed "
                "backward, and under FSDP2 the gradients are FSDP2's own, reduce-scattered after "
                "the backward. Drop --grass_layerwise, or use DDP (without --fsdp)."
            )
        from transformers.training_args import ParallelMode

        if self.args.world_size > 1 and self.args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise UsageError(
                f"{self.args.world_size} processes, but transformers does not run them as one "
                f"data-parallel job (parallel mode {self.args.parallel_mode.value}): each would "
                "train alone. On CPUs pass --use_cpu true --ddp_backend gloo."
            )
        mixed_precision = str(getattr(self.accelerator, "mixed_precision", "no"))
        if mixed_precision == "fp16":
            _refuse_fp16(self.args, "Mixed precision fp16 (set through accelerate)")
        if (
            self.args.grass_layerwise
            and self.args.world_size > 1
            and not self.args.grass_compressed_backward
        ):
            raise UsageError(
                f"grass_layerwise=True with {self.args.world_size} processes needs the "
                "compressed backward (Grass averages those gradients before each layer's update; "
                "DDP averages full gradients only after the backward). Drop "
                "--grass_compressed_backward false, or --grass_layerwise."
            )
        if self.model is not None:
            # A dry run of the grouping: bad target modules or a rank too large raise here.
            try:
                _refuse_adapter_targets(self.model, self.args.grass_targets())
                groups = self._grass_param_groups(self.model)
                if self._grass_fsdp2():
                    _check_fsdp2_groups(groups)
            except UsageError:
                raise  # already one line with its fix
            except ValueError as e:
                raise UsageError(
                    f"optim='grass' cannot be set up on {type(self.model).__name__}: {e} "
                    "(set by grass_target_modules, grass_rank, grass_proj_side)"
                ) from e

    def _grass_param_groups(self, model: nn.Module) -> list[dict]:
        """A dry run of the grouping (nothing installed): validates targets and ranks."""
        decay = self.get_decay_parameter_names(model)
        _, kwargs = grass_optimizer_cls_and_kwargs(self.args, model, decay, install=False)
        return kwargs["params"]

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """GrassAdamW on the target modules when ``optim="grass"``; otherwise the stock optimizer."""
        if not _uses_grass(self.args) or self.optimizer is not None:
            return (
                super().create_optimizer(model) if model is not None else super().create_optimizer()
            )
        args = self.args
        opt_model = self.model if model is None else model
        # Under FSDP2 the backward is FSDP2's (full gradients, reduce-scattered); accelerate
        # then swaps the weights in the optimizer for their shards (followed at the first step).
        compressed = self._grass_compressed_backward()
        optimizer_class, kwargs = grass_optimizer_cls_and_kwargs(
            args, opt_model, self.get_decay_parameter_names(opt_model), install=compressed
        )
        groups = kwargs["params"]
        if args.grass_recompute_norms and not self._grass_fsdp2():
            recompute_norms(opt_model)
        self.optimizer = optimizer_class(**kwargs)
        self._grass_dp = None
        if args.world_size > 1 and compressed:
            # Before accelerate wraps the model in DDP: Grass weights leave DDP's reducer.
            from hf_grass.distributed import GrassDataParallel

            self._grass_dp = GrassDataParallel(
                opt_model, self.optimizer, **args.grass_data_parallel_kwargs()
            )
        if args.grass_layerwise:
            _enable_layerwise(self.optimizer, opt_model, args, self._grass_dp)
        if self.is_world_process_zero():
            # Stock scripts such as run_clm.py configure transformers' logger, not ours, and a
            # default Trainer run (log_level "passive") prints its warnings only: this line is
            # how a user sees that Grass is on and what it covers.
            hf_logger.warning(
                coverage_line(
                    opt_model,
                    groups,
                    self.optimizer.defaults.get("state_dtype"),
                    self.optimizer.defaults.get("update_rule"),
                    self.optimizer.defaults.get("state_format"),
                )
            )
        projected = sum(len(g["params"]) for g in groups if "rank" in g)
        logger.info(
            "Grass: rank %d on %d weights (%s); compressed backward %s; layer-wise %s; %d "
            "process(es)%s.",
            args.grass_rank,
            projected,
            args.grass_targets(),
            compressed,
            args.grass_layerwise,
            args.world_size,
            ", compressed gradients averaged across them"
            if self._grass_dp
            else (", sharded by FSDP2" if self._grass_fsdp2() else ""),
        )
        return self.optimizer

    def _grass_compressed_backward(self) -> bool:
        """Whether Grass's layers deliver compressed gradients (under FSDP2 FSDP2's backward does,
        with full gradients reduce-scattered)."""
        return self.args.grass_compressed_backward and not self._grass_fsdp2()

    def _grass_fsdp2(self) -> bool:
        """Whether accelerate shards the model with FSDP2 (``fully_shard``)."""
        state = getattr(getattr(self, "accelerator", None), "state", None)
        plugin = getattr(state, "fsdp_plugin", None)
        return plugin is not None and getattr(plugin, "fsdp_version", 1) == 2

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any):
        if _uses_grass(self.args) and self._grass_fsdp2():
            # accelerate replaced the weights with their shards: project those before clipping.
            unwrap_optimizer(self.optimizer).follow_replaced_params()
        dp = getattr(self, "_grass_dp", None)
        if dp is not None and isinstance(model, nn.parallel.DistributedDataParallel):
            dp.attach(model)  # once: follow no_sync() and meter DDP's buckets
        if (
            _uses_grass(self.args)
            and self.args.grass_recompute_selection
            and self._grass_compressed_backward()  # what makes ordinary steps keep less
            and unwrap_optimizer(self.optimizer).selection_pending()
        ):
            with layers_recomputed(self.accelerator.unwrap_model(model)):
                return super().training_step(model, inputs, *args, **kwargs)
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        dp = getattr(self, "_grass_dp", None)
        if dp is not None and "loss" in logs:
            for kind, nbytes in dp.meter.bytes_per_step().items():
                logs[f"comm_mb_per_step_{kind}"] = round(nbytes / 2**20, 4)
        super().log(logs, *args, **kwargs)

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
        _check_complete(os.path.join(checkpoint, "optimizer.pt"), checkpoint)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (ValueError, KeyError, RuntimeError) as e:
            raise UsageError(
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
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise UsageError(f"a JSON {type(saved).__name__}, not an object")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UsageError(
                f"{path} is unreadable ({e}): the checkpoint is incomplete or corrupt. Resume "
                f"from an earlier checkpoint of {os.path.dirname(checkpoint) or '.'}, or start a "
                "new run. The checkpoint is left as it was."
            ) from None
        fix = _resume_fix(checkpoint)
        if not _uses_grass(self.args):
            raise UsageError(
                f"Cannot resume {checkpoint} with {_describe(self.args)}: its optimizer "
                f"state was saved by Grass ({saved}). {fix}"
            )
        conflicts = resume_conflicts(saved, _grass_fingerprint(self.args))
        if conflicts:
            raise UsageError(
                f"Cannot resume {checkpoint}: Grass setting differs ({'; '.join(conflicts)}). {fix}"
            )


def grass_optimizer_cls_and_kwargs(
    args: GrassArguments,
    model: nn.Module,
    decay_parameter_names: Iterable[str],
    install: bool = True,
) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Grass's optimizer for ``model``, in the shape of transformers' optimizer handlers
    (``Trainer.get_optimizer_cls_and_kwargs``): the class (:class:`~hf_grass.GrassAdamW`, or
    :class:`~hf_grass.GrassOptimizer` for another update rule) and its keyword arguments, with
    ``params`` the projected and plain param groups (weight decay on
    ``decay_parameter_names`` only, as the Trainer's ``get_decay_parameter_names`` gives them).

    ``install=True`` also turns the targeted layers into Grass layers in place
    (:func:`~hf_grass.grassify`: the compressed backward); ``install=False`` leaves the model as
    it is and checks the groups (targets, ranks) as the optimizer would, raising ``ValueError``.
    Build the optimizer with ``cls(**kwargs)``; :class:`GrassTrainerMixin` adds data
    parallelism and layer-wise updates around it.
    """
    from hf_grass import grassify
    from hf_grass.optim import GrassAdamW, GrassOptimizer, validate_param_groups
    from hf_grass.targets import grass_param_groups

    config = args.grass_config()
    _refuse_frozen_targets(model, config)
    decay = set(decay_parameter_names)
    no_decay = [n for n, _ in model.named_parameters() if n not in decay]
    options = dict(
        target_modules=config.target_modules,
        weight_decay=args.weight_decay,
        no_decay=no_decay,
        embeddings=config.embeddings,
        lm_head=config.lm_head,
        **config.group_options(),
    )
    if install:
        groups = grassify(model, **options)
    else:
        groups = grass_param_groups(model, **options)
        validate_param_groups(groups)
    kwargs = args.grass_optimizer_kwargs()
    optimizer_class = GrassAdamW if kwargs["update_rule"] == "adam" else GrassOptimizer
    return optimizer_class, {"params": groups, **kwargs}


class GrassTrainer(GrassTrainerMixin, Trainer):
    """``transformers.Trainer`` that understands ``optim="grass"`` (see :class:`GrassTrainingArguments`)."""


FSDP2_FLAGS = "--fsdp full_shard --fsdp_config '{\"fsdp_version\": 2}'"


def _refuse_fsdp_on_cpu(args: Any) -> None:
    """transformers runs FSDP on GPUs only: without one it refuses ``--fsdp`` (one process) or
    ignores it (several, which then train with DDP). Say so, with the alternatives."""
    if getattr(args, "fsdp", None) and (args.use_cpu or not torch.cuda.is_available()):
        raise UsageError(
            "--fsdp needs GPUs (transformers runs FSDP on GPUs only). On CPUs train with DDP "
            "(torchrun without --fsdp), or use fully_shard with GrassAdamW in your own loop "
            "(README: FSDP2)."
        )


def _check_fsdp2_groups(groups: list[dict]) -> None:
    """FSDP2 shards weights by rows, and Grass selects their columns (``hf_grass.optim``):
    refuse ``proj_side='rows'`` and a rank above a weight's column count before training."""
    for group in groups:
        if "rank" not in group:
            continue
        if group.get("proj_side") == "rows":
            raise ValueError(
                "proj_side='rows' under FSDP2, which shards weights by rows: Grass selects "
                "columns there; use --grass_proj_side auto or cols"
            )
        narrow = [
            tuple(p.shape) for p in group["params"] if p.dim() == 2 and p.shape[1] < group["rank"]
        ]
        if narrow:
            raise ValueError(
                f"rank {group['rank']} is larger than the columns of a weight of shape {narrow[0]}, "
                f"which Grass selects under FSDP2; use a rank <= {narrow[0][1]}"
            )


def _uses_grass(args: Any) -> bool:
    return getattr(args, "optim", None) == GRASS


def _grass_fingerprint(args: GrassArguments) -> dict[str, Any]:
    """The settings a resumed run must share with its checkpoint (``GrassConfig.fingerprint``)."""
    return {"optim": GRASS, **args.grass_config().fingerprint()}


def _check_trainer_hooks() -> None:
    """Grass clips compressed gradients through two Trainer hooks of transformers 5; without
    them clipping would silently skip those gradients."""
    missing = [h for h in ("_clip_grad_norm", "_get_grad_norm") if not hasattr(Trainer, h)]
    if missing:
        import transformers

        raise RuntimeError(
            f"optim='grass' needs the Trainer hooks {', '.join(missing)}, which transformers "
            f"{transformers.__version__} lacks: upgrade with pip install 'transformers>=5'."
        )


def _refuse_adapter_targets(model: nn.Module, target_modules: Any) -> None:
    """Grass and LoRA on the same weights: refuse (train one or the other)."""
    from hf_grass.targets import is_adapter_module, match_target_modules

    adapters = [n for n in match_target_modules(model, target_modules) if is_adapter_module(n)]
    if adapters:
        raise UsageError(
            f"target_modules selects LoRA adapter layers ({adapters[0]!r}, ...): Grass and LoRA "
            "on the same weights do not combine. Train the adapters with a stock optimizer, or "
            "use Grass on the model without LoRA."
        )


def _refuse_frozen_targets(model: nn.Module, config: GrassConfig) -> None:
    """optim='grass' with every target frozen (a PEFT model, TRL's ``peft_config``) would train
    as plain AdamW on the other parameters: refuse, with the ways out."""
    from hf_grass.targets import frozen_targets_problem, grass_target_names

    names = grass_target_names(model, config.target_modules, config.embeddings, config.lm_head)
    problem = frozen_targets_problem(model, names)
    if problem:
        raise UsageError(
            f"optim='grass' on {type(model).__name__} would project nothing and train as plain "
            f"AdamW: {problem}. Train them fully (on a PEFT model, list them in "
            "LoraConfig(modules_to_save=...): PEFT saves only adapters and those), choose "
            "trainable modules with grass_target_modules, drop LoRA, or train the adapters with "
            "a non-Grass optim such as adamw_torch."
        )


def _check_complete(path: str, checkpoint: str) -> None:
    """Refuse an empty or truncated ``torch.save`` file (an interrupted save) with one line."""
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        raise UsageError(
            f"{path} is empty or truncated ({os.path.getsize(path)} bytes; the save was "
            f"interrupted): resume from an earlier checkpoint of "
            f"{os.path.dirname(checkpoint) or '.'}, or start a new run. The checkpoint is left "
            "as it was."
        )


def _describe(args: Any) -> str:
    if _uses_grass(args):
        return f"optim='grass', grass_rank={args.grass_rank}, targets {args.grass_targets()!r}"
    return f"optim={getattr(args.optim, 'value', args.optim)!r}"


def _resume_fix(checkpoint: str) -> str:
    # Worded in TrainingArguments/GrassArguments fields: the script running this Trainer (TRL's,
    # a user's) may have no flag naming the model.
    return (
        "Resume with the settings it was trained with (optim and the grass_* arguments), or "
        f"start a new run from its weights: load the model from {checkpoint} and train without "
        "resume_from_checkpoint. The checkpoint is left as it was."
    )


def _enable_layerwise(
    optimizer: torch.optim.Optimizer, model: nn.Module, args: Any, data_parallel: Any = None
) -> None:
    """Update each parameter inside the backward pass (``max_grad_norm`` clips per parameter).

    Under data parallelism only the projected weights update in the backward, each once its
    compressed gradient is averaged; DDP averages the others for ``optimizer.step()``.
    """
    from hf_grass.layerwise import enable_layerwise

    enable_layerwise(
        optimizer,
        model if data_parallel is None else list(data_parallel.projected.values()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
        reduce_gradient=None if data_parallel is None else data_parallel.reduce_now,
        bucket_mb=args.grass_layerwise_bucket_mb,
    )
