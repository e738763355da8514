"""grassify and ungrassify: a model's target layers turned into Grass layers in place, and back.

Which layers: :mod:`hf_grass.targets` (``target_modules``); into what: the dispatch table of
:mod:`hf_grass.layers`. GPT-2's ``Conv1D`` is registered here, since its Grass class
(:mod:`hf_grass.conv1d`) imports transformers, which only a model holding one has loaded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from torch import nn

from .config import check_option
from .distributed import forget_data_parallel
from .layers import (
    LayerType,
    conv1d_type,
    grass_class_of,
    is_grass_layer,
    register_layer,
    replaces,
    target_layer_names,
)
from .recompute import keep_norms
from .targets import (
    TargetModules,
    frozen_targets_problem,
    grass_param_groups,
    grass_target_names,
    target_module_name,
    weights_of_target,
)


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def _conv1d_class(cls: type[nn.Module]) -> type[nn.Module] | None:
    from .conv1d import GrassConv1D  # imports transformers, which a model holding Conv1D has

    return replaces(GrassConv1D)(cls)


register_layer(LayerType("conv1d", _is_conv1d, _conv1d_class, description="GPT-2's Conv1D"))


def grassify(
    model: nn.Module,
    rank: int,
    target_modules: TargetModules = "all-linear",
    weight_decay: float = 0.0,
    no_decay: Iterable[str] | None = None,
    embeddings: bool = False,
    lm_head: bool = False,
    **grass_options,
) -> list[dict]:
    """Turn the ``nn.Linear`` modules selected by ``target_modules`` into :class:`~hf_grass.GrassLinear`
    (GPT-2's ``Conv1D`` into :class:`~hf_grass.conv1d.GrassConv1D`, a MoE experts module into
    its Grass form, :mod:`hf_grass.experts`; and, with ``embeddings=True``, the input embedding
    into a
    :class:`~hf_grass.embedding.GrassEmbedding`; ``lm_head=True`` adds the output head).

    The modules change class in place: the module objects, their ``weight``/``bias`` Parameters,
    hooks and ``state_dict`` keys stay the same, so outputs are unchanged and ``save_pretrained``
    writes what the stock model class loads. Returns the param groups of
    :func:`~hf_grass.grass_param_groups` (``rank``, ``weight_decay``, ``no_decay`` and
    ``grass_options`` such as ``update_proj_gap``, ``selection``, ``proj_side``)::

        opt = GrassAdamW(grassify(model, rank=64), lr=1e-3)

    ``target_modules`` follows :func:`~hf_grass.match_target_modules` (``"all-linear"``, a regex
    or module names; on a PEFT model a module in ``modules_to_save`` is projected through its
    trainable copy); a selector that matches nothing or matches a non-linear module (a LoRA layer
    among them) raises ``ValueError``, as do targets that are all frozen (a PEFT model's base
    layers: Grass would project nothing), a weight shared with a module left out (tied
    embeddings: its other gradient would be lost) and a subclass of ``nn.Linear`` with a forward
    of its own.
    :func:`ungrassify` undoes it.
    """
    check_option("rank", rank)
    modules = dict(model.named_modules())
    names = grass_target_names(model, target_modules, embeddings, lm_head)
    frozen = frozen_targets_problem(model, names)
    if frozen:
        raise ValueError(
            f"grassify would project nothing: {frozen}. Unfreeze them "
            "(module.weight.requires_grad_(True)), choose trainable "
            "modules with target_modules, or train the other parameters with a plain optimizer "
            "such as torch.optim.AdamW."
        )
    targets = {m: modules[m] for m in (target_module_name(modules, n) for n in names)}
    for name, module in targets.items():
        if isinstance(module, nn.Embedding):
            if grass_class_of(module) is None or module.max_norm or module.sparse:
                raise ValueError(
                    f"Grass cannot project the embedding {name!r} ({type(module).__name__}, "
                    f"max_norm={module.max_norm}, sparse={module.sparse}): only a plain "
                    "nn.Embedding without max_norm or sparse gradients; drop --grass_embeddings."
                )
        elif grass_class_of(module) is None:
            raise ValueError(
                f"target_modules selects {name!r}, a {type(module).__name__} (a subclass of "
                "a layer type with its own forward); Grass replaces the forward of "
                f"{target_layer_names()} only: leave it out of target_modules."
            )
        if "forward" in vars(module):
            raise ValueError(
                f"Module {name!r} has its forward replaced on the instance (e.g. by accelerate's "
                "device-map hooks): grassify the model before dispatching or wrapping it."
            )
    _check_not_shared(model, targets, names)
    for module in targets.values():
        module.__class__ = grass_class_of(module)
        if not isinstance(module, nn.Embedding):
            module.grass_rank = rank
    return grass_param_groups(
        model, rank, target_modules, weight_decay, no_decay, embeddings, lm_head, **grass_options
    )


def _check_not_shared(model: nn.Module, targets: dict[str, nn.Module], names: list[str]) -> None:
    """Refuse a targeted weight that a module outside the targets also uses."""
    target_ids = {id(m) for m in targets.values()}
    users: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if id(module) not in target_ids:
                users[id(p)].append(name)
    modules = dict(model.named_modules())
    for target in names:
        name = target_module_name(modules, target)
        others = [u for w in weights_of_target(modules, target) for u in users.get(id(w), ())]
        if others:
            raise ValueError(
                f"{name}.weight is shared with {others[0]!r}, which Grass leaves out (tied "
                "weights): its gradient there would be lost. Project both (a tied embedding and "
                "head: --grass_embeddings with --grass_lm_head), untie the weights, or leave "
                f"{name!r} out."
            )


def ungrassify(model: nn.Module) -> nn.Module:
    """Turn every Grass layer of ``model`` (:class:`~hf_grass.GrassLinear`,
    :class:`~hf_grass.embedding.GrassEmbedding`, :class:`~hf_grass.conv1d.GrassConv1D`, a MoE
    experts module's Grass form) back into its original class (``nn.Linear``, ``nn.Embedding``,
    ``Conv1D``, the experts class), in place.

    Same module objects and Parameters, so outputs and ``state_dict`` are unchanged. What Grass
    set up around the layers goes too: recomputed norms (:func:`~hf_grass.recompute.keep_norms`)
    and the weights :class:`~hf_grass.GrassDataParallel` told DDP to ignore, so that a DDP
    built afterwards averages every weight. Returns ``model``.
    """
    keep_norms(model)
    forget_data_parallel(model)
    for module in model.modules():
        if is_grass_layer(module):
            module.__class__ = type(module).grass_base
            vars(module).pop("grass_rank", None)
    return model
