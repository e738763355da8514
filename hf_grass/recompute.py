"""Recompute, in the backward, activations that cost less to redo than to keep.

Two exact trades (the recomputed forward repeats the same operations on the same inputs, so
results are bit for bit the same), both with PyTorch's non-reentrant ``torch.utils.checkpoint``:

Normalization layers. ``y = w * x̂`` with ``x̂ = x / rms(x)`` (RMSNorm; LayerNorm alike). A
trainable ``w`` has the gradient ``dw = sum_t dy_t * x̂_t``, so autograd keeps ``x̂`` (T x h)
from the forward, next to ``x`` (the residual stream, which the norm's backward needs anyway).
:func:`recompute_norms` keeps only ``x`` and redoes the elementwise norm in the backward: two
T x h activations fewer per LLaMA layer. A frozen ``w`` keeps no ``x̂``; such norms are left alone.

Selection steps. A cols-side Grass layer keeps ``X[:, cols]`` on ordinary steps but all of
``X`` on the steps that select (:mod:`hf_grass.linear`), so those steps set a run's peak memory.
:func:`layers_recomputed` switches on a transformers model's own activation checkpointing for
one step; :class:`~hf_grass.GrassTrainer` wraps selection steps in it, which costs one extra
forward every ``update_proj_gap`` steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

NORM_SUFFIXES = ("RMSNorm", "LayerNorm")


def is_norm(module: nn.Module) -> bool:
    """An ``nn.LayerNorm``/``nn.RMSNorm`` or a model's own ``...RMSNorm``/``...LayerNorm`` leaf."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(NORM_SUFFIXES) and not any(module.children())


class _Recomputed:
    """A module's forward run under non-reentrant checkpointing while gradients are recorded."""

    def __init__(self, module: nn.Module) -> None:
        self.forward = type(module).forward.__get__(module)

    def __call__(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.forward(*args, **kwargs)
        # A norm draws no random numbers: no RNG state to stash and restore.
        return checkpoint(
            self.forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs
        )


def recompute_norms(model: nn.Module) -> list[str]:
    """Recompute ``model``'s normalization layers with trainable weights in the backward (see
    the module doc). Returns their names; :func:`keep_norms` undoes it. Outputs, gradients and
    ``state_dict`` are unchanged."""
    names = []
    for name, module in model.named_modules():
        if is_norm(module) and any(p.requires_grad for p in module.parameters(recurse=False)):
            if not isinstance(module.__dict__.get("forward"), _Recomputed):
                module.forward = _Recomputed(module)
            names.append(name)
    return names


def keep_norms(model: nn.Module) -> None:
    """Undo :func:`recompute_norms`: the norms keep their activations again."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _Recomputed):
            del module.forward


@contextlib.contextmanager
def layers_recomputed(model: nn.Module) -> Iterator[None]:
    """transformers' activation checkpointing of ``model``'s layers, on for the ``with`` block.

    Nothing changes when it is on already or the model does not support it.
    """
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if (
        not getattr(model, "supports_gradient_checkpointing", False)
        or not layers
        or any(m.gradient_checkpointing for m in layers)
    ):
        yield
        return
    # The setter itself, not `activation_checkpointing_enable`, which also installs an input
    # hook that `..._disable` does not remove (a new one every selection step).
    model._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=partial(checkpoint, use_reentrant=False)
    )
    try:
        yield
    finally:
        model._set_gradient_checkpointing(enable=False)
