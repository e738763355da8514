"""hf-grass: Grass (structured sparse gradients) for PyTorch and the Hugging Face Trainer."""

from .config import GrassConfig
from .distributed import GrassDataParallel, prepare_data_parallel
from .embedding import GrassEmbedding
from .experts import grass_experts_class
from .install import grassify, ungrassify
from .layers import LAYER_TYPES, LayerType, register_layer
from .layerwise import LayerwiseHandle, enable_layerwise
from .linear import GrassLinear, grass_linear
from .optim import GrassAdamW, GrassOptimizer, clip_grad_norm_
from .projection import GrassProjection, projection_of
from .rules import RULES, UpdateRule, register_rule
from .selection import SELECTIONS, select_rows
from .targets import grass_param_groups, grass_target_names, match_target_modules

# The Hugging Face Trainer integration, imported on first use: the engine above needs torch only,
# and `import hf_grass` does not load transformers.
_TRAINER_NAMES = (
    "GrassArguments",
    "GrassTrainer",
    "GrassTrainerMixin",
    "GrassTrainingArguments",
    "grass_optimizer_cls_and_kwargs",
)


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYER_TYPES",
    "RULES",
    "SELECTIONS",
    "GrassAdamW",
    "GrassArguments",
    "GrassConfig",
    "GrassDataParallel",
    "GrassEmbedding",
    "GrassLinear",
    "GrassOptimizer",
    "GrassProjection",
    "GrassTrainer",
    "GrassTrainerMixin",
    "GrassTrainingArguments",
    "LayerType",
    "LayerwiseHandle",
    "clip_grad_norm_",
    "enable_layerwise",
    "grass_experts_class",
    "grass_optimizer_cls_and_kwargs",
    "grass_linear",
    "grass_param_groups",
    "grass_target_names",
    "grassify",
    "match_target_modules",
    "prepare_data_parallel",
    "register_layer",
    "register_rule",
    "projection_of",
    "select_rows",
    "ungrassify",
    "UpdateRule",
]

__version__ = "0.1.0"
