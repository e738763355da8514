"""The training methods, one registry: what ``--optim`` selects, its defaults, who builds it.

Every place that names methods reads :data:`REGISTRY`: ``cli.method_name`` (an optim name to its
method), the scripts' learning rates and extra Trainer arguments, the memory planner's method
list (``planned``) and the benchmarks. A :class:`Method` says::

    Method("galore", optims=("galore_adamw", ...),   # the --optim values that select it
           ranked=True,                               # takes a rank
           finetune_lr=2e-4, pretrain_lr=1e-2,        # default --learning_rate per script
           finetune_args={"optim_args": "rank=64"},   # extra TrainingArguments defaults
           pretrain_args={...},
           grass_targets=True,                        # optim_target_modules: Grass's targets
           planned=True,                              # hf_grass.memory models it
           package="galore-torch", module="galore_torch")

transformers builds the optimizers it knows by their ``optim`` names (AdamW, 8-bit AdamW, GaLore,
APOLLO); ``GrassTrainer`` builds Grass. The memory-efficient peers that transformers does not know
have a ``build`` function here, which the scripts call on the model and hand to the Trainer as
``optimizers=(optimizer, None)``; their options come from ``--optim_args`` (``key=value,...``):

- ``muon``: ``torch.optim.Muon`` on the 2-D matrices of ``optim_target_modules`` (Grass's
  targets: attention and MLP, not embeddings, heads or norms), ``torch.optim.AdamW`` on the rest,
  as Muon's documentation recommends; ``adjust_lr_fn="match_rms_adamw"`` so that AdamW's
  learning rate and weight decay carry over. Options: momentum, nesterov, ns_steps, adjust_lr_fn.
- ``adam_mini``: ``adam_mini.Adam_mini`` (one second moment per head, neuron or block), told the
  model's hidden size and head counts. Options: dim, n_heads, n_kv_heads.
- ``fira_adamw``: ``fira.FiraAdamW``, GaLore's projection of ``optim_target_modules`` plus Fira's
  norm-based scaling of the residual. Options: rank, update_proj_gap, alpha, proj_type.
- ``badam``: ``badam.BlockOptimizer`` (block coordinate descent) around ``torch.optim.AdamW``,
  one decoder layer at a time. Options: switch_block_every, switch_mode, start_block,
  include_embedding, include_lm_head.

Fira keeps a projector object in its state (as galore-torch does), so a Fira run cannot resume
from a Trainer checkpoint (transformers loads ``optimizer.pt`` with ``weights_only=True``).

8-bit AdamW is transformers' ``adamw_bnb_8bit`` (bitsandbytes, whose 8-bit optimizers run on the
CPU too, so torchao's ``adamw_torch_8bit`` is not needed here). Every peer of the list above
landed: each installs without changing torch or transformers and runs on the CPU.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .errors import UsageError

FINETUNE = "finetune"
PRETRAIN = "pretrain"
SCRIPTS = (FINETUNE, PRETRAIN)

# The attention and MLP matrices of a LLaMA (what Grass's "all-linear" projects) as one regex on
# module names, for optimizers that take `optim_target_modules` in pretraining (transformers'
# GaLore/APOLLO match it in full; "all-linear" would take the output head as well).
PROJECTED_MODULES = r".*(self_attn|mlp).*"


@dataclass(frozen=True, eq=False)
class Method:
    """A training method: its name, how it is selected, its defaults and who builds it."""

    name: str
    # The `optim` values (TrainingArguments/--optim) that select it; the first is its default.
    optims: tuple[str, ...]
    ranked: bool = False
    # Default learning rates of scripts/finetune.py and scripts/pretrain.py (None: the Trainer's).
    finetune_lr: float | None = None
    pretrain_lr: float | None = None
    # Extra TrainingArguments defaults per script (flags still win).
    finetune_args: Mapping[str, Any] = field(default_factory=dict)
    pretrain_args: Mapping[str, Any] = field(default_factory=dict)
    # optim_target_modules defaults to the modules Grass projects (scripts/finetune.py resolves
    # them on the loaded model; pretraining names them with PROJECTED_MODULES).
    grass_targets: bool = False
    planned: bool = False  # hf_grass.memory.plan_memory models it
    # Builds the optimizer from (model, TrainingArguments) when transformers does not.
    build: Callable[[nn.Module, Any], torch.optim.Optimizer] | None = None
    package: str = "transformers"  # what provides it (pip name) ...
    module: str = "transformers"  # ... and the module it imports
    # The flags of scripts/finetune.py that select it (default: --optim <first optim>).
    script_flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("finetune_args", "pretrain_args"):  # read-only, as the registry is shared
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def flags(self) -> tuple[str, ...]:
        return self.script_flags or ("--optim", self.optims[0])

    def learning_rate(self, script: str) -> float | None:
        _check_script(script)
        return self.finetune_lr if script == FINETUNE else self.pretrain_lr

    def trainer_defaults(self, script: str) -> dict[str, Any]:
        """The TrainingArguments defaults ``script`` sets for this method (learning rate, extra
        arguments)."""
        lr = self.learning_rate(script)
        extra = self.finetune_args if script == FINETUNE else self.pretrain_args
        return {**({"learning_rate": lr} if lr is not None else {}), **extra}

    def require(self) -> None:
        """Refuse, with the install command, a method whose package is not installed."""
        if importlib.util.find_spec(self.module) is None:
            raise UsageError(
                f"{' '.join(self.flags)} needs the {self.package} package: pip install "
                f"'hf-grass[baselines]' (or pip install {self.package})."
            )

    def build_optimizer(self, model: nn.Module, args: Any) -> torch.optim.Optimizer:
        """The optimizer of ``model`` for a method transformers does not build, from the
        TrainingArguments ``args`` (learning rate, betas, eps, weight decay,
        ``optim_target_modules`` and ``optim_args``)."""
        if self.build is None:
            raise ValueError(f"{self.name} is built by the Trainer from optim={self.optims[0]!r}.")
        self.require()
        return self.build(model, args)


def _check_script(script: str) -> None:
    if script not in SCRIPTS:
        raise ValueError(f"Unknown script {script!r}: use one of {', '.join(SCRIPTS)}.")


# ---- the optimizers built here ----------------------------------------------------------------


def parse_optim_args(text: str | None) -> dict[str, Any]:
    """``"rank=64,alpha=0.25,nesterov=false"`` as a dict of ints, floats, booleans and strings
    (transformers' ``--optim_args`` format)."""
    options: dict[str, Any] = {}
    for item in (text or "").replace(" ", "").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--optim_args {text!r}: write key=value pairs separated by commas.")
        options[key] = _value(value)
    return options


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _options(name: str, args: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """``args.optim_args`` over ``defaults``; a key ``name`` does not take is a ValueError."""
    given = parse_optim_args(getattr(args, "optim_args", None))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"--optim_args {', '.join(unknown)}: {name} takes {', '.join(defaults) or 'none'}."
        )
    return {**defaults, **given}


def _adam(args: Any) -> dict[str, Any]:
    """AdamW's hyper-parameters from TrainingArguments."""
    return dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def target_matrices(model: nn.Module, target_modules: Any, method: str) -> list[nn.Parameter]:
    """The trainable 2-D weights of the ``nn.Linear`` modules that ``target_modules`` selects,
    matched as transformers matches ``optim_target_modules`` for GaLore (a regex in full, or
    names; ``"all-linear"``: every linear layer)."""
    if target_modules is None:
        raise ValueError(
            f"{method} needs optim_target_modules (the matrices it treats apart): pass "
            "--optim_target_modules, e.g. '.*(self_attn|mlp).*'."
        )
    from transformers.trainer_utils import check_target_module_exists

    all_linear = (
        isinstance(target_modules, str) and target_modules.replace("_", "-") == "all-linear"
    )
    found = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and m.weight.requires_grad
        and (all_linear or check_target_module_exists(target_modules, name))
    ]
    if not found:
        raise ValueError(
            f"optim_target_modules {target_modules!r} selects no trainable linear layer of "
            f"{type(model).__name__} for {method}."
        )
    return list({id(p): p for p in found}.values())


def _adamw_rest(params: list[nn.Parameter], adam: dict[str, Any]) -> torch.optim.AdamW:
    """AdamW on ``params``, no weight decay on vectors (norms, biases)."""
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], **adam)


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, stepped, zeroed and saved as one.

    ``param_groups`` are the children's own group dicts, so an LR scheduler on the chain sets
    every child's learning rate; ``state`` is the children's states, one entry per parameter;
    ``state_dict()`` holds each child's state dict.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("OptimizerChain needs at least one optimizer.")
        super().__init__([g for o in self.optimizers for g in o.param_groups], {})

    @property
    def state(self) -> dict[torch.Tensor, Any]:  # type: ignore[override]
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @state.setter
    def state(self, value: Any) -> None:
        if value:  # Optimizer.__init__ sets an empty one; the children hold the state
            raise AttributeError("OptimizerChain.state is its optimizers' states.")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        states = state_dict["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError(
                f"The state holds {len(states)} optimizers' states; this chain has "
                f"{len(self.optimizers)}."
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        # load_state_dict gives each child new group dicts: share those
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]


def build_muon(model: nn.Module, args: Any) -> OptimizerChain:
    """``torch.optim.Muon`` on the target matrices, ``torch.optim.AdamW`` on the rest."""
    options = _options(
        "muon", args, dict(momentum=0.95, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
    )
    adam = _adam(args)
    matrices = target_matrices(model, getattr(args, "optim_target_modules", None), "muon")
    muon = torch.optim.Muon(matrices, lr=adam["lr"], weight_decay=adam["weight_decay"], **options)
    ids = {id(p) for p in matrices}
    rest = [p for _, p in _trainable(model) if id(p) not in ids]
    return OptimizerChain([muon, _adamw_rest(rest, adam)] if rest else [muon])


def build_adam_mini(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """``adam_mini.Adam_mini`` told the model's hidden size and attention heads."""
    from adam_mini import Adam_mini

    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 32)
    options = _options(
        "adam_mini",
        args,
        dict(
            dim=getattr(config, "hidden_size", 2048),
            n_heads=heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        ),
    )
    return Adam_mini(_trainable(model), **_adam(args), **options, verbose=False)


def build_fira(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """``fira.FiraAdamW``: the target matrices projected (a group with ``rank``), AdamW on the
    rest, as ``fira.divide_params`` groups them."""
    from fira import FiraAdamW

    options = _options(
        "fira_adamw", args, dict(rank=8, update_proj_gap=200, alpha=1.0, proj_type="std")
    )
    matrices = target_matrices(model, getattr(args, "optim_target_modules", None), "fira_adamw")
    ids = {id(p) for p in matrices}
    regular = [p for _, p in _trainable(model) if id(p) not in ids]
    groups = [{"params": regular}, {"params": matrices, **options}]
    return FiraAdamW([g for g in groups if g["params"]], **_adam(args), no_deprecation_warning=True)


def build_badam(model: nn.Module, args: Any) -> torch.optim.Optimizer:
    """``badam.BlockOptimizer`` around ``torch.optim.AdamW``: the decoder layers one block at a
    time (and the embedding, the head and the other parameters as blocks of their own when
    asked); parameters in no block stay frozen."""
    from badam import BlockOptimizer

    class _BlockOptimizer(BlockOptimizer):
        # The AdamW that holds the state, under the name that wrappers use (accelerate's
        # AcceleratedOptimizer; hf_grass.report reads the state through it).
        optimizer = property(lambda self: self.base_optimizer)

    options = _options(
        "badam",
        args,
        dict(
            switch_block_every=50,
            switch_mode="descending",
            start_block=None,
            include_embedding=False,
            include_lm_head=False,
        ),
    )
    named = _trainable(model)
    base = torch.optim.AdamW([p for _, p in named], **_adam(args))
    with warnings.catch_warnings():
        # it lists every float32 parameter: BAdam keeps a float32 copy of the active block
        # beside bf16 weights, and of float32 weights too
        warnings.filterwarnings("ignore", "BAdam expect model", UserWarning)
        return _BlockOptimizer(base, named, **options)


# ---- the registry -----------------------------------------------------------------------------

# Learning rates: finetuning from BENCHMARKS.md, Protocol 1; pretraining from the ablations of
# BENCHMARKS.md section 12 (configs/pretrain/ablation_*.yaml): GaLore's and APOLLO's papers' 1e-2
# (with their scales) was also their best here; AdamW's best was 3e-3 on the demo preset. 8-bit
# AdamW, Muon (its learning rate matched to AdamW's), Adam-mini and BAdam take AdamW's; Fira,
# GaLore's projection with a scaled residual, takes GaLore's rate, rank and scale (alpha).
REGISTRY: tuple[Method, ...] = (
    Method(
        "adamw",
        # every optim whose name starts with adamw_torch (torchao's 4- and 8-bit AdamW included)
        optims=(
            "adamw_torch_fused",
            "adamw_torch",
            "adamw_torch_xla",
            "adamw_torch_npu_fused",
            "adamw_torch_4bit",
            "adamw_torch_8bit",
        ),
        finetune_lr=5e-5,
        pretrain_lr=3e-3,
        planned=True,
        package="torch",
        module="torch",
    ),
    Method(
        "adamw-8bit",
        optims=("adamw_bnb_8bit", "adamw_8bit"),
        finetune_lr=5e-5,
        pretrain_lr=3e-3,
        planned=True,
        package="bitsandbytes",
        module="bitsandbytes",
    ),
    Method(
        "galore",
        optims=(
            "galore_adamw",
            "galore_adamw_8bit",
            "galore_adafactor",
            "galore_adamw_layerwise",
            "galore_adamw_8bit_layerwise",
            "galore_adafactor_layerwise",
        ),
        ranked=True,
        finetune_lr=2e-4,
        pretrain_lr=1e-2,
        finetune_args={"optim_args": "rank=64"},  # Protocol 1's rank
        # GaLore's paper: rank 128 and scale 0.25 on LLaMA-60M
        pretrain_args={
            "optim_target_modules": PROJECTED_MODULES,
            "optim_args": "rank=128,scale=0.25",
        },
        grass_targets=True,
        planned=True,
        package="galore-torch",
        module="galore_torch",
    ),
    Method(
        "lora",
        optims=(),  # selected by --use_lora, with AdamW on the adapters
        ranked=True,
        finetune_lr=5e-4,
        planned=True,
        package="peft",
        module="peft",
        script_flags=("--optim", "adamw_torch_fused", "--use_lora", "true"),
    ),
    Method(
        "grass",
        optims=("grass",),
        ranked=True,
        finetune_lr=2e-4,
        pretrain_lr=1e-2,
        # Pretraining, from the same ablations: the dense parameters (embeddings, head, norms) at
        # the full rate and the projected matrices at a quarter of it (GaLore's split: 173 vs 226
        # perplexity against one rate for all), rows sampled without replacement (220 vs 245 for
        # top_r, better on both seeds). Finetuning keeps GrassConfig's defaults (scale 1, top_r).
        pretrain_args={"grass_scale": 0.25, "grass_selection": "multinomial_nr"},
        planned=True,
        package="hf-grass",
        module="hf_grass",
    ),
    Method(
        "apollo",
        optims=("apollo_adamw", "apollo_adamw_layerwise"),
        ranked=True,
        pretrain_lr=1e-2,
        pretrain_args={
            "optim_target_modules": PROJECTED_MODULES,
            "optim_args": "rank=128,scale=1.0",
        },
        grass_targets=True,
        package="apollo-torch",
        module="apollo_torch",
    ),
    Method(
        "muon",
        optims=("muon",),
        finetune_lr=5e-5,
        pretrain_lr=3e-3,
        pretrain_args={"optim_target_modules": PROJECTED_MODULES},
        grass_targets=True,
        build=build_muon,
        package="torch",
        module="torch",
    ),
    Method(
        "adam-mini",
        optims=("adam_mini",),
        finetune_lr=5e-5,
        pretrain_lr=3e-3,
        build=build_adam_mini,
        package="adam-mini",
        module="adam_mini",
    ),
    Method(
        "fira",
        optims=("fira_adamw",),
        ranked=True,
        finetune_lr=2e-4,
        pretrain_lr=1e-2,
        finetune_args={"optim_args": "rank=64"},
        pretrain_args={
            "optim_target_modules": PROJECTED_MODULES,
            "optim_args": "rank=128,alpha=0.25",
        },
        grass_targets=True,
        build=build_fira,
        package="fira",
        module="fira",
    ),
    Method(
        "badam",
        optims=("badam",),
        finetune_lr=5e-5,
        pretrain_lr=3e-3,
        # Finetuning: the head and final norm form a block of their own, so that a new
        # classification head trains; pretraining from scratch: the embedding too.
        finetune_args={"optim_args": "include_lm_head=true"},
        pretrain_args={"optim_args": "include_embedding=true,include_lm_head=true"},
        build=build_badam,
        package="badam",
        module="badam",
    ),
)

_BY_NAME = {m.name: m for m in REGISTRY}
_BY_OPTIM = {o: m for m in REGISTRY for o in m.optims}
# The optim names the scripts build an optimizer for (transformers does not know them).
BUILT_HERE: tuple[str, ...] = tuple(o for m in REGISTRY if m.build is not None for o in m.optims)


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def find(name: str) -> Method | None:
    """The method called ``name``, or None."""
    return _BY_NAME.get(name)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a ValueError naming the known ones."""
    method = _BY_NAME.get(name)
    if method is None:
        raise ValueError(f"Unknown method {name!r}: use one of {', '.join(_BY_NAME)}.")
    return method


def for_optim(optim: Any) -> Method | None:
    """The method an ``optim`` value (a string or transformers' OptimizerNames) selects."""
    return _BY_OPTIM.get(str(getattr(optim, "value", optim)).lower())


def planner_methods(ranked: bool | None = None) -> tuple[str, ...]:
    """The methods the memory planner models (``ranked=True``: those that take a rank)."""
    return tuple(m.name for m in REGISTRY if m.planned and (ranked is None or m.ranked == ranked))


def learning_rates(script: str) -> dict[str, float]:
    """Each method's default learning rate in ``script`` (``finetune`` or ``pretrain``)."""
    rates = ((m.name, m.learning_rate(script)) for m in REGISTRY)
    return {name: lr for name, lr in rates if lr is not None}
