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
