"""The layer types Grass projects: an ordered dispatch table from a module to its Grass layer.

A :class:`LayerType` says which modules it covers (``kind``, subclasses included), the Grass class
that replaces a module's exact class in place (``grass_class``: ``None`` for a subclass with a
forward of its own, which Grass refuses rather than skips), the weights Grass projects
(``weights``; a layer with several, such as MoE experts, names them, and ``target_modules`` may
select them one by one), whether ``target_modules`` selects it (``"all-linear"`` and names), and
whether it is a plain linear map that any projection method (GaLore, APOLLO) handles.

Target matching, :func:`~hf_grass.grassify` / :func:`~hf_grass.ungrassify`, data parallelism
and the coverage report read this table only. The layer modules register their own entries
(``linear``, ``embedding``, ``experts``; ``conv1d`` in :mod:`hf_grass.install`); the first
entry whose ``kind`` matches a module is its type.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .registry import Registry


def _single_weight(module: nn.Module) -> dict[str, nn.Parameter]:
    return {"weight": module.weight}


@dataclass(frozen=True)
class LayerType:
    """One kind of layer Grass projects (see the module doc)."""

    name: str
    kind: Callable[[nn.Module], bool]
    grass_class: Callable[[type[nn.Module]], type[nn.Module] | None]
    weights: Callable[[nn.Module], dict[str, nn.Parameter]] = _single_weight
    by_target_modules: bool = True  # False: added by its own switch (the input embedding)
    linear: bool = True  # a plain linear map (one 2-D weight), as GaLore and APOLLO project
    description: str = ""  # for messages: "nn.Linear", "MoE experts"


LAYER_TYPES: Registry[LayerType] = Registry("layer type")


def register_layer(layer_type: LayerType) -> LayerType:
    """Add ``layer_type`` to the table (after the built-in ones); returns it."""
    return LAYER_TYPES.register(layer_type)


def is_grass_layer(module: nn.Module) -> bool:
    """True for a layer :func:`~hf_grass.grassify` made (its class names its ``grass_base``)."""
    return "grass_base" in type(module).__dict__


def layer_type_of(module: nn.Module) -> LayerType | None:
    """The first registered layer type whose ``kind`` covers ``module`` (``None``: Grass does not
    project such a layer)."""
    return next((t for t in LAYER_TYPES.values() if t.kind(module)), None)


def grass_class_of(module: nn.Module) -> type[nn.Module] | None:
    """The Grass class for ``module``'s exact class (its own class when it is one already)."""
    if is_grass_layer(module):
        return type(module)
    layer_type = layer_type_of(module)
    return None if layer_type is None else layer_type.grass_class(type(module))


def layer_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weights Grass projects in ``module``, by parameter name."""
    layer_type = layer_type_of(module)
    if layer_type is None:
        raise ValueError(f"{type(module).__name__} is not a layer type Grass projects.")
    return layer_type.weights(module)


def named_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The weights of ``module`` that ``target_modules`` may name one by one by their path
    (``experts.down_proj``): those of a layer type with weights other than ``weight``."""
    layer_type = layer_type_of(module)
    if layer_type is None or not layer_type.by_target_modules:
        return {}
    weights = layer_type.weights(module)
    return {} if list(weights) == ["weight"] else weights


def is_target_layer(module: nn.Module) -> bool:
    """True for a layer ``target_modules`` can select (``"all-linear"`` included)."""
    layer_type = layer_type_of(module)
    return layer_type is not None and layer_type.by_target_modules


def is_linear_layer(module: nn.Module) -> bool:
    """True for a plain linear layer (``nn.Linear``, GPT-2's ``Conv1D``)."""
    layer_type = layer_type_of(module)
    return layer_type is not None and layer_type.linear


def target_layer_names() -> str:
    """``nn.Linear, GPT-2's Conv1D, MoE experts``: the layer types ``target_modules`` selects."""
    return ", ".join(t.description or t.name for t in LAYER_TYPES.values() if t.by_target_modules)


# ---- predicates of the built-in layer types (torch only: nothing here imports transformers) ----


def conv1d_type() -> type[nn.Module] | None:
    """GPT-2's ``Conv1D`` (a linear layer whose weight is stored transposed) once transformers
    has loaded it (a model holding one has), else None: Grass never imports transformers for it."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


# The names transformers gives the 3-D weights of an experts module.
EXPERT_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")


def expert_weights(module: nn.Module) -> dict[str, nn.Parameter]:
    """The 3-D expert weights of ``module`` by name (``gate_up_proj``/``up_proj``, ``down_proj``)."""
    found = {}
    for name in EXPERT_WEIGHT_NAMES:
        p = module._parameters.get(name)
        if p is not None and p.dim() == 3:
            found[name] = p
    return found


def is_experts_module(module: nn.Module) -> bool:
    """True for a transformers MoE experts module whose 3-D weights Grass projects: one made by
    ``transformers.integrations.moe.use_experts_implementation``, which records the layout
    (``has_gate``, ``has_bias``, ``is_transposed``) that Grass's forward follows."""
    layout = ("has_gate", "has_bias", "is_transposed", "num_experts")
    return all(hasattr(module, a) for a in layout) and bool(expert_weights(module))


def replaces(grass_class: type[nn.Module]) -> Callable[[type[nn.Module]], type[nn.Module] | None]:
    """``grass_class`` for exactly its ``grass_base`` (a subclass has a forward Grass does not
    know): the ``grass_class`` of a :class:`LayerType` with one Grass class."""
    return lambda cls: grass_class if cls is grass_class.grass_base else None
