"""Which modules Grass projects, and the optimizer parameter groups that follow from it."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layers import (
    is_linear_layer,
    is_target_layer,
    layer_type_of,
    layer_weights,
    named_weights,
    target_layer_names,
)

# Modules excluded from "all-linear": output heads whose rows are the vocabulary or the labels,
# wherever they sit in a module's path (PEFT wraps a trained head as
# `score.modules_to_save.default`), and PEFT's adapter layers (`q_proj.lora_A.default`).
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
_ADAPTER_PREFIXES = ("lora_",)


def is_adapter_module(name: str) -> bool:
    """True for a module inside a PEFT adapter (a path component ``lora_A``, ``lora_B``, ...)."""
    return any(part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))


def is_head_module(name: str) -> bool:
    """True for an output head (a path component ``lm_head``, ``score``, ``classifier``, ...)."""
    return any(part in _HEAD_NAMES for part in name.split("."))


def _is_head_or_adapter(name: str) -> bool:
    return is_adapter_module(name) or is_head_module(name)


TargetModules = str | Sequence[str]


def weights_of_target(modules: dict[str, nn.Module], name: str) -> list[nn.Parameter]:
    """The weights of one target (a name of :func:`grass_target_names`) among ``modules``
    (``dict(model.named_modules())``): a module's :func:`layer_weights`, or the one expert
    weight a parameter path names."""
    if name in modules:
        return list(layer_weights(modules[name]).values())
    module_name, _, param_name = name.rpartition(".")
    return [modules[module_name]._parameters[param_name]]


def target_weights(model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """The weights of the targets ``names`` (:func:`grass_target_names`), in order."""
    modules = dict(model.named_modules())
    return [w for name in names for w in weights_of_target(modules, name)]


def target_module_name(model_modules: dict[str, nn.Module], name: str) -> str:
    """The module a target name belongs to: itself, or the experts module of a weight path."""
    return name if name in model_modules else name.rpartition(".")[0]


def _weight_paths(modules: dict[str, nn.Module]) -> list[str]:
    """``<module>.<weight>`` for every weight a target may name by its path (the 3-D weights of
    experts modules: :func:`~hf_grass.layers.named_weights`)."""
    return [
        f"{name}.{param}" for name, module in modules.items() for param in named_weights(module)
    ]


def match_target_modules(
    model: nn.Module, target_modules: TargetModules = "all-linear"
) -> list[str]:
    """Names of the linear layers (``nn.Linear``, GPT-2's ``Conv1D``) and MoE experts modules
    of ``model`` that ``target_modules`` selects.

    ``target_modules`` is ``"all-linear"`` (every linear layer and experts module except output
    heads such as ``lm_head``/``score``, anywhere in the module's path, and PEFT adapter
    layers), a regex matched in full against module names, or a list of names, each matching a
    module whose name equals it or ends with ``"." + name`` (PEFT's convention:
    ``["q_proj", "v_proj"]``). Both also match the 3-D weights of an experts module by their
    path, as PEFT's ``target_parameters`` names them: ``"experts"`` selects every expert
    weight, ``"down_proj"`` the linear layers of that name and the experts' ``down_proj``, a
    regex ``".*experts[.]gate_up_proj"`` one kind; such a name is returned as the weight's
    path (``model.layers.0.mlp.experts.down_proj``). A module PEFT trains whole
    (``LoraConfig(modules_to_save=...)``) is matched through its wrapper: the target is the
    trainable copy (``<name>.modules_to_save.<adapter>``), never the frozen
    ``original_module``. A matched
    module that is not a linear layer (a LoRA layer among them) or a selector that matches
    nothing raises ``ValueError``.
    """
    modules = dict(model.named_modules())
    # Names a selector can match: modules, and the expert weights inside experts modules.
    candidates = [n for n in modules if n] + _weight_paths(modules)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = [n for n, m in modules.items() if is_target_layer(m) and not _is_head_or_adapter(n)]
        selector = "all-linear"
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n in candidates if pattern.fullmatch(n)]
        selector = f"regex {target_modules!r}"
    else:
        keys = list(target_modules)
        if not keys:
            raise ValueError("target_modules is empty: pass module names, a regex or 'all-linear'.")
        names = [n for n in candidates if any(n == k or n.endswith("." + k) for k in keys)]
        unmatched = [k for k in keys if not any(n == k or n.endswith("." + k) for n in names)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; "
                f"its linear layers end in {sorted(_linear_suffixes(modules))}."
            )
        selector = f"names {keys}"
    names = _through_saved_wrappers(modules, names)
    if not names:
        raise ValueError(
            f"target_modules ({selector}) matches no module of {type(model).__name__}; "
            f"its linear layers end in {sorted(_linear_suffixes(modules))}."
        )
    # An expert weight whose experts module is selected too is covered by the module.
    names = [n for n in names if n in modules or n.rpartition(".")[0] not in names]
    wrong = [n for n in names if n in modules and not is_target_layer(modules[n])]
    lora = [n for n in wrong if _is_tuner_layer(modules[n])]
    if lora:
        cls = type(modules[lora[0]])
        kind = "a LoRA layer" if hasattr(modules[lora[0]], "lora_A") else "a PEFT adapter layer"
        raise ValueError(
            f"target_modules ({selector}) selects {lora[0]!r}, {kind} "
            f"({cls.__module__}.{cls.__qualname__}): its base weight is frozen and Grass trains "
            "full weights: leave it out of target_modules, or train modules fully with PEFT's "
            "modules_to_save."
        )
    if wrong:
        raise ValueError(
            f"target_modules ({selector}) matches {wrong[:3]} of type "
            f"{type(modules[wrong[0]]).__name__}; Grass projects the weights of "
            f"{target_layer_names()} only: narrow target_modules to those."
        )
    return names


def _is_tuner_layer(module: nn.Module) -> bool:
    """True for a PEFT adapter layer around a frozen base layer (``peft.tuners.lora.Linear``)."""
    return callable(getattr(module, "get_base_layer", None)) and hasattr(module, "base_layer")


def _saved_copies(modules: dict[str, nn.Module]) -> dict[str, str | None]:
    """PEFT's ``ModulesToSaveWrapper`` modules (``modules_to_save``): each wrapper's name and the
    name of the copy it trains (``<name>.modules_to_save.<active adapter>``; None when no adapter
    is active, and the frozen ``original_module`` runs)."""
    copies: dict[str, str | None] = {}
    for name, module in modules.items():
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict) and "original_module" in module._modules:
            active = [a for a in getattr(module, "active_adapters", []) if a in saved]
            copies[name] = f"{name}.modules_to_save.{active[0]}" if active else None
    return copies


def _through_saved_wrappers(modules: dict[str, nn.Module], names: list[str]) -> list[str]:
    """``names`` with each ``modules_to_save`` wrapper replaced by the copy it trains, and the
    modules inside a wrapper other than that copy (the frozen ``original_module``, the
    ``ModuleDict``, an inactive adapter's copy) left out."""
    copies = _saved_copies(modules)
    if not copies:
        return names
    result = []
    for name in names:
        wrapper = next((w for w in copies if name == w or name.startswith(w + ".")), None)
        copy = None if wrapper is None else copies[wrapper]
        if wrapper is None:
            result.append(name)
        elif copy is not None and name == wrapper:
            result.append(copy)
        elif copy is not None and (name == copy or name.startswith(copy + ".")):
            result.append(name)
    return list(dict.fromkeys(result))


def _linear_suffixes(modules: dict[str, nn.Module]) -> set[str]:
    suffixes = {n.split(".")[-1] for n, m in modules.items() if is_linear_layer(m)}
    return suffixes | {n.split(".")[-1] for n in _weight_paths(modules)}


def grass_target_names(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    embeddings: bool = False,
    lm_head: bool = False,
) -> list[str]:
    """The modules whose weights Grass projects: ``target_modules`` (linear layers), plus the
    input embedding (``embeddings``) and the output head (``lm_head``) when asked.

    The embedding and head are found as Hugging Face models expose them
    (``get_input_embeddings()``/``get_output_embeddings()``); in another model, every
    ``nn.Embedding`` and the ``nn.Linear`` modules named ``lm_head``. A tied embedding and head
    are one weight: project both or neither.
    """
    names = match_target_modules(model, target_modules)
    if embeddings:
        names += _found_or_refuse(
            model, "get_input_embeddings", nn.Embedding, lambda n, m: True,
            "embeddings=True (--grass_embeddings), but {} has no nn.Embedding input embedding",
        )  # fmt: skip
    if lm_head:
        names += _found_or_refuse(
            model, "get_output_embeddings", nn.Linear, lambda n, m: n.split(".")[-1] == "lm_head",
            "lm_head=True (--grass_lm_head), but {} has no nn.Linear output head (a "
            "classifier's 'score' is not one)",
        )  # fmt: skip
    return list(dict.fromkeys(names))


def frozen_targets_problem(model: nn.Module, names: Sequence[str]) -> str | None:
    """Why Grass would project nothing when every target weight is frozen; else None.

    PEFT freezes the base model (TRL's ``peft_config`` too), so all its linear layers are frozen
    and the optimizer built from them is plain AdamW on the adapters: callers refuse that rather
    than train without Grass and without a word. Some frozen targets among trainable ones are a
    deliberate choice and pass."""
    if not names or any(w.requires_grad for w in target_weights(model, names)):
        return None
    shown = ", ".join(repr(n) for n in names[:2]) + (
        f" and {len(names) - 2} more" if len(names) > 2 else ""
    )
    return (
        f"all {len(names)} target weights are frozen (requires_grad=False; PEFT/LoRA freezes "
        f"the base model): {shown}"
    )


# A share of the trainable parameters in layer types Grass cannot project above which it warns.
UNPROJECTABLE_WARN_SHARE = 0.25


def unprojectable_problem(model: nn.Module) -> str | None:
    """What Grass cannot project in ``model`` when it is more than a quarter of the trainable
    parameters (elements), else None.

    Counted: trainable parameters of two or more dimensions outside the layer types Grass
    projects (:mod:`hf_grass.layers`: linear layers, ``nn.Embedding``, experts): a convolution,
    the experts of a MoE family whose experts module transformers does not describe (no
    ``use_experts_implementation``), a router. Heads and embeddings left dense by
    choice are not counted; targets are not either, so the answer is the same for any.
    """
    seen: set[int] = set()
    total = 0
    by_type: dict[str, list[tuple[str, torch.Size, int]]] = {}
    for module_name, module in model.named_modules():
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.dim() >= 2 and layer_type_of(module) is None:
                name = f"{module_name}.{param_name}" if module_name else param_name
                by_type.setdefault(type(module).__name__, []).append((name, p.shape, p.numel()))
    outside = sum(n for found in by_type.values() for _, _, n in found)
    if not total or outside <= UNPROJECTABLE_WARN_SHARE * total:
        return None
    kind, found = max(by_type.items(), key=lambda item: sum(n for _, _, n in item[1]))
    example, shape, _ = found[0]
    return (
        f"{100 * outside / total:.1f}% of the trainable parameters are weights of layer types "
        f"Grass cannot project, most in {kind} ({len(found)} weight{'s' if len(found) > 1 else ''} "
        f"such as {example!r} of shape {tuple(shape)})"
    )


def _found_or_refuse(model, getter_name, cls, fallback, problem: str) -> list[str]:
    """Names of the modules a Hugging Face ``model.<getter_name>()`` returns (else the ``cls``
    modules that ``fallback(name, module)`` accepts); ``ValueError`` when there are none."""
    getter = getattr(model, getter_name, None)
    if callable(getter):
        found = {id(getter())}
    else:
        found = {id(m) for n, m in model.named_modules() if isinstance(m, cls) and fallback(n, m)}
    names = [n for n, m in model.named_modules() if id(m) in found and isinstance(m, cls)]
    if not names:
        raise ValueError(problem.format(type(model).__name__) + ": drop the flag.")
    return names


def grass_param_groups(
    model: nn.Module,
    rank: int,
    target_modules: TargetModules = "all-linear",
    weight_decay: float = 0.0,
    no_decay: Iterable[str] | None = None,
    embeddings: bool = False,
    lm_head: bool = False,
    **grass_options,
) -> list[dict]:
    """Parameter groups for :class:`~hf_grass.GrassAdamW`.

    The weights of the modules selected by ``target_modules`` form the projected group (with
    ``rank`` and ``grass_options``: ``update_proj_gap``, ``scale``, ``selection``, ...); every
    other trainable parameter goes to plain AdamW groups. Parameters named in ``no_decay`` get
    weight decay 0 (pass the complement of HF's ``Trainer.get_decay_parameter_names``). A tied or
    shared parameter appears once. Empty groups are left out. ``embeddings`` and ``lm_head`` add
    the input embedding and the output head (see :func:`grass_target_names`).
    """
    names = grass_target_names(model, target_modules, embeddings, lm_head)
    problem = unprojectable_problem(model)
    if problem:
        warnings.warn(
            f"{problem}: they train with plain AdamW and its full moments, so Grass saves "
            "little memory on this model. Freeze them (requires_grad_(False)) or choose "
            "another method if they must fit.",
            UserWarning,
            stacklevel=2,
        )
    projected = {id(w) for w in target_weights(model, names)}
    no_decay = set(no_decay or ())
    groups: dict[tuple[bool, bool], list] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = (id(p) in projected, name not in no_decay)
        groups.setdefault(key, []).append(p)
    result = []
    for (is_projected, decays), params in sorted(groups.items(), reverse=True):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if is_projected:
            group.update(rank=rank, **grass_options)
        result.append(group)
    return result
