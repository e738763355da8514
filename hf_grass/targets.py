"""Which modules Grass projects, and the optimizer parameter groups that follow from it."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

# Modules excluded from "all-linear": output heads whose rows are the vocabulary or the labels,
# wherever they sit in a module's path (PEFT wraps a trained head as
# `score.modules_to_save.default`), and PEFT's adapter layers (`q_proj.lora_A.default`).
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")
_ADAPTER_PREFIXES = ("lora_",)


def is_adapter_module(name: str) -> bool:
    """True for a module inside a PEFT adapter (a path component ``lora_A``, ``lora_B``, ...)."""
    return any(part.startswith(_ADAPTER_PREFIXES) for part in name.split("."))


def _is_head_or_adapter(name: str) -> bool:
    return is_adapter_module(name) or any(part in _HEAD_NAMES for part in name.split("."))


TargetModules = str | Sequence[str]


def match_target_modules(
    model: nn.Module, target_modules: TargetModules = "all-linear"
) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``target_modules`` selects.

    ``target_modules`` is ``"all-linear"`` (every ``nn.Linear`` except output heads such as
    ``lm_head``/``score``, anywhere in the module's path, and PEFT adapter layers), a regex matched in full against module names, or a list of names,
    each matching a module whose name equals it or ends with ``"." + name`` (PEFT's convention:
    ``["q_proj", "v_proj"]``). A matched module that is not ``nn.Linear`` or a selector that
    matches nothing raises ``ValueError``.
    """
    modules = dict(model.named_modules())
    if isinstance(target_modules, str) and target_modules == "all-linear":
        names = [
            n for n, m in modules.items() if isinstance(m, nn.Linear) and not _is_head_or_adapter(n)
        ]
        selector = "all-linear"
    elif isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        names = [n for n in modules if n and pattern.fullmatch(n)]
        selector = f"regex {target_modules!r}"
    else:
        keys = list(target_modules)
        if not keys:
            raise ValueError("target_modules is empty: pass module names, a regex or 'all-linear'.")
        names = [n for n in modules if n and any(n == k or n.endswith("." + k) for k in keys)]
        unmatched = [k for k in keys if not any(n == k or n.endswith("." + k) for n in names)]
        if unmatched:
            raise ValueError(
                f"target_modules {unmatched} match no module of {type(model).__name__}; "
                f"its linear layers end in {sorted(_linear_suffixes(modules))}."
            )
        selector = f"names {keys}"
    if not names:
        raise ValueError(
            f"target_modules ({selector}) matches no module of {type(model).__name__}; "
            f"its linear layers end in {sorted(_linear_suffixes(modules))}."
        )
    wrong = [n for n in names if not isinstance(modules[n], nn.Linear)]
    if wrong:
        raise ValueError(
            f"target_modules ({selector}) matches {wrong[:3]} of type "
            f"{type(modules[wrong[0]]).__name__}; Grass projects nn.Linear weights only: "
            "narrow target_modules to linear layers."
        )
    return names


def _linear_suffixes(modules: dict[str, nn.Module]) -> set[str]:
    return {n.split(".")[-1] for n, m in modules.items() if isinstance(m, nn.Linear)}


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
    by_module = {id(m): n for n, m in model.named_modules()}
    if embeddings:
        getter = getattr(model, "get_input_embeddings", None)
        found = (
            [getter()]
            if callable(getter)
            else [m for m in model.modules() if isinstance(m, nn.Embedding)]
        )
        found = [m for m in found if isinstance(m, nn.Embedding)]
        if not found:
            raise ValueError(
                f"embeddings=True (--grass_embeddings), but {type(model).__name__} has no "
                "nn.Embedding input embedding: drop the flag."
            )
        names += [by_module[id(m)] for m in found]
    if lm_head:
        getter = getattr(model, "get_output_embeddings", None)
        if callable(getter):
            found = [getter()]
        else:
            found = [m for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"]
        found = [m for m in found if isinstance(m, nn.Linear)]
        if not found:
            raise ValueError(
                f"lm_head=True (--grass_lm_head), but {type(model).__name__} has no nn.Linear "
                "output head (a classifier's 'score' is not one): drop the flag."
            )
        names += [by_module[id(m)] for m in found]
    return list(dict.fromkeys(names))


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
    modules = dict(model.named_modules())
    names = grass_target_names(model, target_modules, embeddings, lm_head)
    projected = {id(modules[n].weight) for n in names}
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
