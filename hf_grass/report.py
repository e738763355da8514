"""Resource report of a training run: optimizer state, gradients, peak memory, tokens/s.

Add :class:`ResourceReportCallback` to any ``Trainer``; at the end of ``train()`` it writes
``resource_report.json`` to ``output_dir`` and logs it. What is counted:

- ``optimizer_state_bytes``: bytes of every tensor reachable from ``optimizer.state`` (including
  tensors held by objects in the state, such as GaLore's projection matrices) plus the length of
  every ``bytes`` value there (GrassAdamW's per-matrix selection RNG state), after training.
- ``peak_grad_bytes``: the largest sum, over optimizer steps, of the bytes of all ``.grad`` and
  compressed-gradient tensors alive right before ``optimizer.step()``. Layer-wise methods free
  gradients inside the backward pass, so for them it reads (close to) zero.
- ``tensor_peak_bytes``: parameters + peak gradients + optimizer state (the tensor accounting of
  peak memory, activations left out).
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` on a GPU (reset at train start); on
  a CPU the process's peak resident set size (``getrusage``; a lifetime peak that includes loading
  the model and data).
- ``projected_param_fraction``: the share of the trainable parameters (elements) that sit in a
  projected optimizer group (one with a ``rank``: Grass's, or GaLore's); 0 for AdamW. A Grass run
  that projects little is mostly plain AdamW.
- ``tokens_per_s``: non-padding training tokens (``state.num_input_tokens_seen``; set
  ``include_num_input_tokens_seen="non_padding"``) divided by the summed wall time of the
  training steps (evaluation and checkpointing left out); ``train_wall_s`` includes everything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback

from .layout import local
from .projection import projection_of

logger = logging.getLogger(__name__)

REPORT_NAME = "resource_report.json"


def tensor_bytes(
    obj: Any, _seen: set[Any] | None = None, _depth: int = 0, *, host_bytes: bool = False
) -> int:
    """Bytes of the distinct tensors reachable from ``obj`` (dicts, sequences, object attributes).

    A DTensor (FSDP2) counts its local shard: the bytes this process holds. ``host_bytes``: also
    count ``bytes``/``bytearray`` values (their length), which optimizers use for host-side state
    such as GrassAdamW's selection RNG state."""
    seen = set() if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        obj = local(obj)
        if obj.device.type == "meta":
            return 0
        key = hash((obj.data_ptr(), obj.numel(), obj.dtype)) if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if host_bytes and isinstance(obj, (bytes, bytearray)):
        # keyed apart from the tensors' integer keys: one object held twice counts once
        key = ("bytes", id(obj))
        if key in seen:
            return 0
        seen.add(key)
        return len(obj)
    if _depth > 6 or isinstance(obj, (str, bytes, bytearray, int, float, bool, type(None))):
        return 0
    if isinstance(obj, dict):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple, set)):
        items = obj
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
        items = vars(obj).values()
    else:
        return 0
    return sum(tensor_bytes(x, seen, _depth + 1, host_bytes=host_bytes) for x in items)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under accelerate's ``AcceleratedOptimizer`` (and similar) wrappers."""
    while hasattr(optimizer, "optimizer") and isinstance(
        optimizer.optimizer, torch.optim.Optimizer
    ):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the optimizer's state (layer-wise optimizer dicts included): its tensors and its
    ``bytes`` values (GrassAdamW keeps each matrix's selection RNG state as ``bytes``, about
    5 KB, which is memory held like any tensor's)."""
    optimizer = unwrap_optimizer(optimizer)
    seen: set[Any] = set()
    total = tensor_bytes(getattr(optimizer, "state", {}), seen, host_bytes=True)
    # HF's layer-wise GaLore keeps one optimizer per parameter in `optimizer_dict`.
    for inner in getattr(optimizer, "optimizer_dict", {}).values():
        total += tensor_bytes(unwrap_optimizer(inner).state, seen, host_bytes=True)
    return total


def trainable_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The distinct parameters of ``model`` that require gradients (a tied weight once)."""
    return list({id(p): p for p in model.parameters() if p.requires_grad}.values())


def projected_parameters(optimizer: Any) -> list[torch.Tensor]:
    """The parameters in the optimizer's projected groups (those with a ``rank``)."""
    optimizer = unwrap_optimizer(optimizer)
    inner = [unwrap_optimizer(o) for o in getattr(optimizer, "optimizer_dict", {}).values()]
    groups = [g for o in [optimizer, *inner] for g in getattr(o, "param_groups", [])]
    return list({id(p): p for g in groups if "rank" in g for p in g["params"]}.values())


def projected_param_fraction(model: torch.nn.Module, optimizer: Any) -> float:
    """Share of ``model``'s trainable parameter elements that ``optimizer`` projects."""
    projected = {id(p) for p in projected_parameters(optimizer)}
    return _projected_share(trainable_parameters(model), projected)


def _projected_share(trainable: list[torch.Tensor], projected: Iterable[int]) -> float:
    """Share of the elements of ``trainable`` in parameters whose ``id`` is in ``projected``."""
    projected = set(projected)
    total = sum(p.numel() for p in trainable)
    return sum(p.numel() for p in trainable if id(p) in projected) / total if total else 0.0


def coverage_line(
    model: torch.nn.Module,
    groups: list[dict],
    state_dtype: torch.dtype | None = None,
    update_rule: str | None = None,
    state_format: str | None = None,
) -> str:
    """One line saying what Grass projects and what stays dense (plain AdamW), e.g.

    ``Grass: 14 of 16 weight matrices projected at rank 8 (69.0% of trainable parameters); Adam
    moments 306.5 KiB vs 834.5 KiB for AdamW (36.7%); dense: embed_tokens (embedding), lm_head
    (head), 5 norms.``

    Weight matrices are the trainable parameters of two or more dimensions. The moments are
    counted from the shapes before the first step: ``2 r k`` elements per projected weight
    (``k`` its unselected dimension), two per element of every other one, in ``state_dtype``
    (default: each parameter's dtype), as GrassAdamW and torch's AdamW keep them; row indices
    and step counters are left out. Another ``update_rule`` keeps its own number of state
    tensors (Lion one, sign descent none), another ``state_format`` its own bytes per element.
    """
    from .config import default_of, resolve_option
    from .layout import projection_side
    from .rules import rule_of
    from .state import state_format_of

    rule = rule_of(resolve_option("update_rule", update_rule))
    stored = state_format_of(resolve_option("state_format", state_format))
    tensors = len(rule.state_keys)

    trainable = trainable_parameters(model)
    group_of = {id(p): g for g in groups if "rank" in g for p in g["params"]}
    ranks = {key: g["rank"] for key, g in group_of.items()}
    projected = [p for p in trainable if id(p) in ranks]
    matrices = [p for p in trainable if p.dim() >= 2]
    fraction = _projected_share(trainable, ranks)

    def moment_bytes(p: torch.Tensor) -> int:
        size = (state_dtype or p.dtype).itemsize
        if id(p) not in ranks:
            return round(tensors * p.numel() * stored.element_bytes(size, p.shape[-1]))
        side = projection_side(p.shape, group_of[id(p)].get("proj_side", default_of("proj_side")))
        unselected = p.shape[-1] if side == "rows" else p.shape[-2]
        experts = p.shape[0] if p.dim() == 3 else 1
        per_element = stored.element_bytes(size, unselected)
        return round(tensors * ranks[id(p)] * experts * unselected * per_element)

    grass_state = sum(moment_bytes(p) for p in trainable)
    adamw_state = sum(2 * p.numel() * p.dtype.itemsize for p in trainable)
    rank_values = sorted(set(ranks.values()))
    rank = "/".join(str(r) for r in rank_values) or "-"
    return (
        f"Grass: {len(projected)} of {len(matrices)} weight matrices projected at rank {rank} "
        f"({100 * fraction:.1f}% of trainable parameters); "
        f"{'Adam moments' if rule.name == 'adam' else rule.name + ' state'} {_size(grass_state)} vs "
        f"{_size(adamw_state)} for AdamW ({100 * grass_state / max(adamw_state, 1):.1f}%); "
        f"dense: {_describe_dense(model, [p for p in trainable if id(p) not in ranks])}."
    )


# What the coverage line calls a dense parameter (singular, plural), in the line's order.
_DENSE_KINDS = {
    "embedding": ("embedding", "embeddings"),
    "head": ("head", "heads"),
    "norm": ("norm", "norms"),
    "bias": ("bias", "biases"),
    "adapter": ("LoRA adapter weight", "LoRA adapter weights"),
    "linear": ("untargeted linear weight", "untargeted linear weights"),
    "router": ("MoE router", "MoE routers"),
    "unprojectable": ("layer Grass cannot project", "layers Grass cannot project"),
    "other": ("other parameter", "other parameters"),
}
# PEFT's wrapper components, skipped when naming a module briefly (`lm_head`, not `default`).
_WRAPPER_PARTS = {"base_layer", "modules_to_save", "original_module", "default"}


def _describe_dense(model: torch.nn.Module, dense: list[torch.Tensor]) -> str:
    """``embed_tokens (embedding), lm_head (head), 5 norms``: the modules holding ``dense``, by
    kind; a kind with one module is named, a kind with several is counted."""
    from .layers import is_linear_layer
    from .targets import is_adapter_module, is_head_module

    if not dense:
        return "none"
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    owner: dict[int, tuple[str, torch.nn.Module, str]] = {}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module_name, module, param_name))
    # kind -> the modules holding such parameters (a LayerNorm's weight and bias: one norm)
    found: dict[str, dict[int, str]] = {}
    for p in dense:
        module_name, module, param_name = owner.get(id(p), ("", None, ""))
        if is_adapter_module(module_name):
            kind = "adapter"
        elif module is not None and (module is head or is_head_module(module_name)):
            kind = "head"
        elif isinstance(module, torch.nn.Embedding):
            kind = "embedding"
        elif p.dim() == 1 and "norm" in type(module).__name__.lower():
            kind = "norm"
        elif param_name == "bias":
            kind = "bias"
        elif is_linear_layer(module):
            kind = "linear"
        elif "router" in type(module).__name__.lower():
            kind = "router"  # an MoE block's (E, h) gate, not a linear layer in transformers 5
        elif p.dim() >= 2:
            kind = "unprojectable"
        else:
            kind = "other"
        parts = [part for part in module_name.split(".") if part not in _WRAPPER_PARTS]
        found.setdefault(kind, {}).setdefault(id(module), parts[-1] if parts else param_name)
    described = []
    for kind, (singular, plural) in _DENSE_KINDS.items():
        names = list(found.get(kind, {}).values())
        if len(names) == 1:
            described.append(f"{names[0]} ({singular})")
        elif names:
            described.append(f"{len(names)} {plural}")
    return ", ".join(described)


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} B"


def gradient_bytes(parameters: Iterable[torch.Tensor]) -> int:
    """Bytes of the ``.grad`` and compressed gradients (``projection_of(p).grad``) of ``parameters``."""
    seen: set[int] = set()
    total = 0
    for p in parameters:
        projection = projection_of(p)
        for g in (p.grad, None if projection is None else projection.grad):
            if g is not None:
                total += tensor_bytes(g, seen)
    return total


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
# glibc's default threshold; mallopt fixes it, which turns off its dynamic raising.
MMAP_THRESHOLD_BYTES = 128 * 1024
# Set to 0 to leave glibc's malloc as it is (`limit_malloc_caching` does nothing then).
MALLOC_ENV = "HF_GRASS_MALLOC_TUNING"


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (with ``mallopt``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl and others lack it)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_caching(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Let glibc return freed tensors of ``threshold`` bytes and more to the system at once.

    glibc serves allocations from ``threshold`` bytes (128 KiB) up with their own ``mmap`` and
    unmaps them when freed, but raises the threshold to the size of each such block freed (up to
    32 MiB). After the first backward pass has freed its activations (mostly 0.2-4 MiB each for a
    small model and short sequences), the next steps' activations come from the heap, which keeps
    what they leave behind: 0.4-0.7 GB more peak RSS when finetuning a 135M model on a CPU (see
    ``benchmarks/memory_timeline.py``). Fixing the threshold with ``mallopt`` turns the raising
    off; results are unchanged. The price is CPU time: every such tensor is a fresh mapping whose
    pages the kernel zeroes on first touch (in a 4-step run of the default finetune, 12x the minor
    page faults and 13 s of system CPU time instead of 1.5 s, against 38 s of user time), so
    ``scripts/finetune.py`` calls it only with ``--limit_malloc_caching``. Does nothing (returns
    False) without glibc, when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice wins) or with
    ``HF_GRASS_MALLOC_TUNING=0``.
    """
    if os.environ.get(MALLOC_ENV, "1") == "0" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class ResourceReportCallback(TrainerCallback):
    """Measures a ``Trainer`` run and writes ``resource_report.json`` (see the module docstring)."""

    def __init__(self, method: str | None = None) -> None:
        self.method = method
        self.report: dict[str, Any] = {}
        self._peak_grad = 0
        self._step_time = 0.0
        self._steps = 0
        self._t_step: float | None = None
        self._t_train = 0.0
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._peak_grad, self._step_time, self._steps = 0, 0.0, 0
        self._tokens0 = state.num_input_tokens_seen
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._t_train = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_step = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._peak_grad = max(self._peak_grad, gradient_bytes(model.parameters()))

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_step is not None:
            self._step_time += time.perf_counter() - self._t_step
            self._steps += 1
            self._t_step = None

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        wall = time.perf_counter() - self._t_train
        params = list(model.parameters()) if model is not None else []
        param_bytes = tensor_bytes(params)
        opt_bytes = optimizer_state_bytes(optimizer) if optimizer is not None else 0
        tokens = state.num_input_tokens_seen - self._tokens0
        on_gpu = torch.cuda.is_available() and args.device.type == "cuda"
        report = {
            "method": self.method or str(getattr(args.optim, "value", args.optim)),
            "device": torch.cuda.get_device_name() if on_gpu else "cpu",
            "world_size": args.world_size,
            "steps": self._steps,
            "param_bytes": param_bytes,
            "trainable_param_bytes": tensor_bytes([p for p in params if p.requires_grad]),
            "projected_param_fraction": projected_param_fraction(model, optimizer)
            if model is not None and optimizer is not None
            else 0.0,
            "optimizer_state_bytes": opt_bytes,
            "peak_grad_bytes": self._peak_grad,
            "tensor_peak_bytes": param_bytes + self._peak_grad + opt_bytes,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else peak_rss_bytes(),
            "peak_memory_kind": "cuda_max_memory_allocated" if on_gpu else "cpu_peak_rss",
            "train_tokens": tokens or None,
            "train_wall_s": round(wall, 3),
            "s_per_step": round(self._step_time / self._steps, 4) if self._steps else None,
            "tokens_per_s": round(tokens / self._step_time, 1)
            if tokens and self._step_time
            else None,
        }
        if args.world_size > 1 and model is not None:
            from .distributed import comm_meter_of, dense_ddp_bytes

            meter = comm_meter_of(optimizer)
            sent = meter.bytes_per_step() if meter is not None else {}
            report["comm_bytes_per_step"] = round(sent["all"]) if sent else None
            report["comm_bytes_per_step_by_kind"] = {k: round(v) for k, v in sent.items()}
            report["dense_ddp_comm_bytes_per_step"] = dense_ddp_bytes(model)
        self.report = report
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
            logger.info("Resource report: %s", format_report(report))


def format_report(report: dict[str, Any]) -> str:
    """One line of the headline numbers, in MiB and tokens/s."""

    def mib(key: str) -> str:
        value = report.get(key)
        return "n/a" if value is None else f"{value / 2**20:,.1f} MiB"

    return (
        f"{report.get('method')}: optimizer state {mib('optimizer_state_bytes')}, peak gradients "
        f"{mib('peak_grad_bytes')}, tensors at peak {mib('tensor_peak_bytes')}, peak memory "
        f"{mib('peak_memory_bytes')} ({report.get('peak_memory_kind')}), "
        f"{report.get('tokens_per_s')} tokens/s, {report.get('s_per_step')} s/step"
    )
