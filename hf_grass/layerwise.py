"""Layer-wise updates: each parameter is updated inside the backward pass, then its gradient freed.

``enable_layerwise(optimizer, model)`` hooks every trainable parameter of ``model`` that
``optimizer`` holds. As soon as a parameter's gradient of the backward pass is complete, the hook
runs ``optimizer.step_param(p)`` and drops the gradient, so at most one layer's gradient is alive
at a time instead of the whole model's. "Complete" is signalled by autograd:

- a plain parameter's ``.grad``: ``p.register_post_accumulate_grad_hook``;
- a projected weight's gradient: its projection's grad-ready hook
  (:meth:`hf_grass.projection.GrassProjection.register_grad_ready_hook`), which runs once per
  backward, after every use of the weight has added to the compressed gradient and after a full
  ``.grad`` from a use outside its Grass layer, so such a weight is counted once, not twice.

Gradient accumulation. Each parameter counts the backward passes that delivered it a gradient;
the one that brings its count to ``gradient_accumulation_steps`` steps it (the last micro-batch
of the window) and resets the count. Earlier micro-batches only accumulate. A training loop
(or HF ``Trainer``) that calls ``loss.backward()`` N times, then ``optimizer.step()`` and
``zero_grad()``, works unchanged:

- ``optimizer.step()`` is a no-op for parameters already updated (their gradients are gone) and
  updates those that still hold a gradient: a parameter that missed the last micro-batch (a
  branch that was not taken, a short last window of an epoch). Then every count is reset, so
  windows stay aligned with the loop's own steps. Calling ``optimizer.step()`` once per window is
  therefore recommended, and needed when parameters can miss micro-batches.
- LR schedulers change ``group["lr"]`` after ``optimizer.step()``; the next window's layer-wise
  updates read it, exactly as the next ``step()`` would.

Gradient clipping. A global-norm clip needs the norm of every gradient before the first update,
and in layer-wise mode the first layer is updated before the last gradient exists. So
``max_grad_norm`` clips each parameter's gradient separately to that norm (for a compressed
gradient, the norm of ``C = rho * G[rows]``). This bounds every parameter's step like a global
clip does, but does not preserve the relative scale of the layers' gradients, and a given
``max_grad_norm`` clips more rarely than the same global value: tune it separately, and turn the
training loop's own clipping off (``Trainer``'s ``max_grad_norm=0``; it would see no gradients).
For an exact global clip, train without layer-wise mode. Loss scaling with inf checks
(``GradScaler``) is not supported for the same reason; use bf16.

A parameter used both inside and outside a reentrant checkpointed segment
(``use_reentrant=True``) gets two notifications per backward; non-reentrant checkpointing
(transformers' default) gives one.

Buckets (``bucket_mb``, ``GrassConfig.layerwise_bucket_mb``). By default each parameter is updated alone, as soon as its gradient is
complete: one optimizer call per parameter, which on a GPU is a dozen small kernel launches per
weight and leaves layer-wise mode launch-bound. With ``bucket_mb > 0`` ready parameters wait in
a bucket until their gradients reach ``bucket_mb`` megabytes (or the backward pass ends), then
are updated together by one batched ``optimizer.step_params`` (equal results: a parameter's
update depends only on its own gradient and state, and the backward pass no longer reads a
weight once its gradient is complete). Up to a bucket of gradients is then alive besides the
current layer's. Data-parallel averaging and clipping still run per parameter, when it is ready.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .bucket import Bucket
from .config import resolve_option
from .optim import clip_grad_norm_
from .projection import projection_of


class LayerwiseHandle:
    """The hooks of :func:`enable_layerwise`; ``remove()`` (or leaving a ``with`` block) undoes it."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[torch.Tensor],
        gradient_accumulation_steps: int,
        max_grad_norm: float | None,
        reduce_gradient: Callable[[torch.Tensor], None] | None = None,
        bucket_mb: float | None = None,
    ):
        bucket_mb = resolve_option("layerwise_bucket_mb", bucket_mb, shown="bucket_mb")
        self.optimizer = optimizer
        self.params = params
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.reduce_gradient = reduce_gradient
        self.bucket_bytes = int(bucket_mb * 2**20)
        # Ready parameters waiting for their update, by the bytes of their gradients.
        self._bucket = Bucket(self.bucket_bytes, self._step_together)
        self._counts: dict[int, int] = {id(p): 0 for p in params}
        self._hooks = []
        self._anchored = []
        for p in params:
            projection = projection_of(p)
            if projection is None:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook))
                continue
            if projection.anchor is None:
                self._anchored.append(projection)
            # One signal per backward, after the compressed part and any full .grad part.
            self._hooks.append(projection.register_grad_ready_hook(self._ready_hook(p)))
        self._hooks.append(optimizer.register_step_pre_hook(self._before_step))
        self._hooks.append(optimizer.register_step_post_hook(self._after_step))
        optimizer._grass_layerwise = self

    def _grad_hook(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._on_grad_ready(p)

    def _ready_hook(self, p: torch.Tensor) -> Callable[[], None]:
        return lambda: self._on_grad_ready(p)

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        self._counts[id(p)] += 1
        if self._counts[id(p)] < self.gradient_accumulation_steps:
            return  # not the last micro-batch of this parameter's window
        self._counts[id(p)] = 0
        self._update(p)

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        if self.reduce_gradient is not None:
            self.reduce_gradient(p)  # data parallel: average across ranks first
        if self.max_grad_norm is not None:
            clip_grad_norm_([p], self.max_grad_norm)
        if self.bucket_bytes <= 0:
            self.optimizer.step_param(p)
            _free_gradient(p)
            return
        self._bucket.add(p, _gradient_bytes(p))
        if self._bucket.items:  # the last bucket is rarely full: flushed when the backward ends
            self._bucket.flush_after_backward()

    @torch.no_grad()
    def _step_together(self, bucket: list[torch.Tensor]) -> None:
        """Update the parameters of a bucket in one batched call and free their gradients."""
        step_params = getattr(self.optimizer, "step_params", None)
        if step_params is not None:
            step_params(bucket)
        else:
            for p in bucket:
                self.optimizer.step_param(p)
        for p in bucket:
            _free_gradient(p)

    def _before_step(self, optimizer, args, kwargs) -> None:
        self._bucket.flush()  # normally empty: the end of the backward pass flushed it
        # optimizer.step() updates the parameters that still hold a gradient (a window cut
        # short, a parameter that missed the last micro-batch): average and clip them as the
        # hooks would have, in the same order on every rank.
        for p in self.params:
            if not _has_gradient(p):
                continue
            if self.reduce_gradient is not None:
                self.reduce_gradient(p)
            if self.max_grad_norm is not None:
                clip_grad_norm_([p], self.max_grad_norm)

    def _after_step(self, optimizer, args, kwargs) -> None:
        for p in self.params:
            self._counts[id(p)] = 0
            _free_gradient(p)

    def remove(self) -> None:
        """Remove every hook; the optimizer steps only when ``step()`` is called again."""
        self._bucket.flush()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for projection in self._anchored:
            projection.anchor = None
        self._anchored.clear()
        if getattr(self.optimizer, "_grass_layerwise", None) is self:
            del self.optimizer._grass_layerwise

    def __enter__(self) -> LayerwiseHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _gradient_bytes(p: torch.Tensor) -> int:
    """Bytes of the gradient ``p`` holds (full ``.grad`` and compressed gradient)."""
    projection = projection_of(p)
    grads = (p.grad, None if projection is None else projection.grad)
    return sum(g.numel() * g.element_size() for g in grads if g is not None)


def _has_gradient(p: torch.Tensor) -> bool:
    projection = projection_of(p)
    return p.grad is not None or (projection is not None and projection.grad is not None)


def _free_gradient(p: torch.Tensor) -> None:
    p.grad = None
    projection = projection_of(p)
    if projection is not None:
        projection.grad = None


def enable_layerwise(
    optimizer: torch.optim.Optimizer,
    model_or_params: nn.Module | Iterable[torch.Tensor] | None = None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    reduce_gradient: Callable[[torch.Tensor], None] | None = None,
    bucket_mb: float | None = None,
) -> LayerwiseHandle:
    """Update each parameter during the backward pass, as soon as its gradient is complete.

    Args:
        optimizer: a :class:`~hf_grass.GrassAdamW` (anything with ``step_param(p)``), or a
            wrapper of one with an ``optimizer`` attribute (accelerate's ``AcceleratedOptimizer``).
        model_or_params: the model (its trainable parameters that ``optimizer`` holds) or an
            iterable of parameters, all in ``optimizer``; default: every parameter of
            ``optimizer``. Parameters left out keep their gradients until ``optimizer.step()``.
        gradient_accumulation_steps: backward passes per update (see the module docstring).
        max_grad_norm: clip each parameter's gradient to this norm before its update (per
            parameter, not global: see the module docstring). ``None`` does not clip.
        reduce_gradient: called with each parameter before its update; data parallelism passes
            :meth:`hf_grass.distributed.GrassDataParallel.reduce_now` (and only the projected
            weights as ``model_or_params``: DDP averages the others, which
            ``optimizer.step()`` then updates).
        bucket_mb: update ready parameters together once their gradients reach this many
            megabytes, or at the end of the backward pass (see the module docstring); 0 updates
            each parameter alone, at once. Default: ``GrassConfig.layerwise_bucket_mb``.

    Enable it before the forward pass of the first step (a graph built earlier does not report
    its compressed gradients). Returns a :class:`LayerwiseHandle`; ``handle.remove()`` restores
    ordinary ``optimizer.step()`` training.
    """
    while not hasattr(optimizer, "step_param") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer  # accelerate's AcceleratedOptimizer and similar wrappers
    if not callable(getattr(optimizer, "step_param", None)):
        raise TypeError(
            f"enable_layerwise needs an optimizer with step_param(p), got {type(optimizer).__name__}: "
            "use hf_grass.GrassAdamW."
        )
    if getattr(optimizer, "_grass_layerwise", None) is not None:
        raise ValueError(
            "Layer-wise updates are already enabled on this optimizer: remove() the first handle."
        )
    steps = gradient_accumulation_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid gradient_accumulation_steps: {steps!r}; use an integer >= 1.")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"Invalid max_grad_norm: {max_grad_norm!r}; use a positive norm or None.")

    held = [p for g in optimizer.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    if model_or_params is None:
        params = held
    elif isinstance(model_or_params, nn.Module):
        params = [p for p in model_or_params.parameters() if id(p) in held_ids]
        if not params:
            raise ValueError(
                f"None of the parameters of {type(model_or_params).__name__} is in the optimizer: "
                "build the optimizer from this model's parameters."
            )
    else:
        params = list(dict.fromkeys(model_or_params))
        missing = [tuple(p.shape) for p in params if id(p) not in held_ids]
        if missing:
            raise ValueError(
                f"{len(missing)} parameter(s) (shapes {missing[:3]}) are not in the optimizer: "
                "pass only parameters the optimizer updates."
            )
    params = [p for p in params if p.requires_grad]
    return LayerwiseHandle(optimizer, params, steps, max_grad_norm, reduce_gradient, bucket_mb)
