"""hf-grass: Grass (structured sparse gradients) for PyTorch and the Hugging Face Trainer."""

from .optim import GrassAdamW, GrassProjection, clip_grad_norm_
from .selection import SELECTIONS, select_rows
from .targets import grass_param_groups, match_target_modules

__all__ = [
    "SELECTIONS",
    "GrassAdamW",
    "GrassProjection",
    "clip_grad_norm_",
    "grass_param_groups",
    "match_target_modules",
    "select_rows",
]

__version__ = "0.1.0"
