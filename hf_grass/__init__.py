"""hf-grass: Grass (structured sparse gradients) for PyTorch and the Hugging Face Trainer."""

from .config import GrassConfig
from .distributed import GrassDataParallel, prepare_data_parallel
from .embedding import GrassEmbedding
from .layerwise import LayerwiseHandle, enable_layerwise
from .linear import GrassLinear, grass_linear, grassify, ungrassify
from .optim import GrassAdamW, clip_grad_norm_
from .projection import GrassProjection, projection_of
from .selection import SELECTIONS, select_rows
from .targets import grass_param_groups, grass_target_names, match_target_modules
from .trainer import GrassArguments, GrassTrainer, GrassTrainerMixin, GrassTrainingArguments

__all__ = [
    "SELECTIONS",
    "GrassAdamW",
    "GrassArguments",
    "GrassConfig",
    "GrassDataParallel",
    "GrassEmbedding",
    "GrassLinear",
    "GrassProjection",
    "GrassTrainer",
    "GrassTrainerMixin",
    "GrassTrainingArguments",
    "LayerwiseHandle",
    "clip_grad_norm_",
    "enable_layerwise",
    "grass_linear",
    "grass_param_groups",
    "grass_target_names",
    "grassify",
    "match_target_modules",
    "prepare_data_parallel",
    "projection_of",
    "select_rows",
    "ungrassify",
]

__version__ = "0.1.0"
