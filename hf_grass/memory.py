"""Memory planner: the bytes a training run needs, by part, without building the model.

``plan_memory`` counts the parameters of a model config exactly (the model is built on the meta
device, so a 30B plan takes well under a second) and models what each training method keeps.
LLaMA-style dense models and transformers' Mixture-of-Experts families whose experts are stacks
of matrices, ``mlp.experts.gate_up_proj`` (E, 2f, h) and ``mlp.experts.down_proj`` (E, h, f),
beside a router ``mlp.gate`` with an (E, h) weight (Mixtral, Qwen3-MoE)::

    plan = plan_memory("13b", method="grass", rank=256, dtype="bf16", layerwise=True)
    plan.parts        # {"weights": ..., "gradients": ..., "optimizer_state": ..., ...}
    plan.total_bytes
    fit_budget(parse_size("40GiB"), model="1b", method="adamw", batch_size=8)

Parts (bytes):

- ``weights``: every parameter in the weight dtype (``fp32`` and ``bf16-mixed``: 4 bytes, the
  fp32 master weights; pure ``bf16``: 2). LoRA adds its adapters in float32 (peft upcasts
  bf16 adapters to float32 by default).
- ``gradients``: what is alive right before ``optimizer.step()``: a dense gradient (weight
  dtype) per trainable parameter, but a compressed ``r x min(m, n)`` one per Grass-projected
  weight (``E r min(m, n)`` for a stack of E experts' matrices: every expert's, zeros for an
  expert no token reached). Layer-wise (``layerwise=True``): each parameter is updated in the
  backward and its gradient freed at once, so we assume only the largest single gradient is
  alive at a time.
- ``optimizer_state``: AdamW: 2 moments per trainable element in the parameter's dtype (as
  torch's AdamW and GrassAdamW with ``state_dtype`` unset) plus a 4-byte step scalar per
  tensor. ``adamw-8bit`` (bitsandbytes ``AdamW8bit``): 2 uint8 moments per element plus one
  float32 absmax per block of 256 elements and moment (bitsandbytes' optimizer block size;
  its 2048 is for weight quantization), tensors under 4096 elements keep two float32 moments,
  and the two 256-entry float32 quantization maps are shared. GrassAdamW per projected weight:
  moments ``2 r k`` (``k = min(m, n)``), per-row step counts (float32 r), two step scalars and
  the selection RNG state (``RNG_STATE_BYTES``: a CPU generator's state, kept as ``bytes``, so
  in host memory even on a GPU; about 5 KB per matrix); dense parameters get AdamW state.
  Experts: Grass projects each expert's matrix of a stack (E, m, n) on its own, the larger of
  (m, n) selected, r rows per expert: moments ``2 E r k``, per-row steps (float32 E r), and two
  step scalars per stack, and no RNG state (each expert's sampled rows come from a generator
  seeded by its index and the step); the router stays dense (AdamW; "all-linear" leaves
  it out even where it is an ``nn.Linear``: it has E rows only). ``adamw-8bit`` quantizes every
  tensor, 3-D stacks too. GaLore (``galore_torch``): moments ``2 r max(m, n)`` and the
  projection ``r min(m, n)`` per projected matrix, in the parameter's dtype (its step counter is
  a Python int); it projects 2-D ``nn.Linear`` weights only, so experts get AdamW state. LoRA:
  AdamW on the adapters only (q_proj, v_proj: experts and router frozen).
- ``indices``: Grass's selection per projected weight, rows (int64 r) and scales ``rho``
  (float32 r); E r of each per stack of experts. ``optimizer_state + indices`` is what
  ``report.optimizer_state_bytes`` counts (its tensors and its ``bytes`` values, the RNG states
  among them).
- ``activations``: tensors saved for the backward, LLaMA-style layer, its MLP a sparse MoE
  block in MoE layers (each token through ``num_experts_per_tok`` experts; see
  :func:`layer_activation_bytes` for the formula), times the layers; with activation
  checkpointing only each layer's input (``T h``, stream dtype) plus one layer's full set.
  Plus the final norm, the output head's input and the loss's float32 log-probabilities
  ``4 T V`` (``T = batch * seq``, ``V`` the vocabulary). Grass with ``recompute=True`` (the
  default) models :class:`~hf_grass.GrassTrainer`'s defaults (``grass_recompute_selection``,
  ``grass_recompute_norms``; ``scripts/finetune.py``, ``scripts/pretrain.py``): selection steps
  run under activation checkpointing, so the peak is an ordinary step, where a cols-side layer
  (``m < n``: ``down_proj``; ``k_proj``/``v_proj`` when ``g d < h``, ``q_proj`` when
  ``a d < h``) keeps ``X[:, cols]`` (``T r``) instead of its input and every norm keeps only its
  input (``s T h``). With activation checkpointing on, the selection step is the peak: its one
  recomputed layer keeps its whole inputs (norms still recomputed). ``recompute=False`` models
  a plain training loop without GrassTrainer: its selection steps (step 0 among them) keep
  every linear's whole input and the norms' full set.
- ``temporaries``: with ``bf16-mixed``, autocast's bf16 copies of the linear weights (2 bytes
  per element, saved from forward to backward), plus the largest transient buffer: the loss's
  (``T V`` logits in the compute dtype and two float32 ``T V`` gradients), Grass's full
  gradient of the largest projected weight at a selection step (compute dtype; a whole
  (E, m, n) stack of experts' matrices), or GaLore's SVD
  of the largest matrix (a float32 copy unless already float32, and ``U, S, Vh`` in float32;
  LAPACK/cuSOLVER workspace left out). Plain AdamW adds nothing (torch's foreach kernel's
  temporaries come after the backward, when the activations are gone).

``total_bytes`` sums the parts, an upper bound: activations and gradients do not coexist in
full. ``peak_bytes`` follows a step's phases instead: weights, optimizer state and indices live
throughout; the activations (with the loss's buffers) peak at the end of the forward pass and
are freed during the backward as the gradients appear, which peak at ``optimizer.step()``
(gradients of the previous step are freed by ``zero_grad``)::

    peak = weights + optimizer_state + indices + temporaries + max(activations, gradients)

On an H200 (LLaMA-1B, pure bf16, 8 x 256 tokens) it came within 2% of the measured
``max_memory_allocated`` for AdamW and Grass (BENCHMARKS.md; Grass as a plain loop,
``recompute=False``). Allocator fragmentation and the CUDA context (about 0.5-1 GiB, outside
``max_memory_allocated``) are left out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .config import GrassConfig, resolve_option
from .errors import MissingFileError, UsageError
from .layers import expert_weights, is_experts_module, is_linear_layer
from .layout import projection_side
from .methods import planner_methods
from .models import LLAMA_PRESETS, llama_config
from .projection import rng_bytes
from .rules import rule_of
from .state import state_format_of
from .targets import grass_target_names, match_target_modules, weights_of_target

METHODS = planner_methods()  # the registry's methods the planner models (hf_grass.methods)
RANKED_METHODS = planner_methods(ranked=True)
DTYPES = ("fp32", "bf16-mixed", "bf16")
ATTENTIONS = ("sdpa", "eager")
PARTS = ("weights", "gradients", "optimizer_state", "indices", "activations", "temporaries")

LORA_TARGETS = ("q_proj", "v_proj")  # the project's LoRA baseline (scripts/finetune.py)
LORA_DTYPE_BYTES = 4  # peft upcasts bf16/fp16 adapters to float32 (autocast_adapter_dtype)
BNB_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer state
BNB_MIN_8BIT = 4096  # smaller tensors keep float32 state
BNB_QMAPS = 2 * 256 * 4  # the signed and unsigned dynamic maps, shared by all tensors
STEP_SCALAR = 4  # torch's float32 step tensor
# GrassAdamW's per-matrix selection RNG state, measured the way the optimizer stores it (the
# length depends on torch's CPU generator, not on the model), so the plan follows torch.
RNG_STATE_BYTES = len(rng_bytes(torch.Generator().get_state()))
DEFAULT_RANK = GrassConfig().rank  # Grass's default rank, the planner's too

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


# ------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class Param:
    """One distinct parameter of the model: its name, shape and whether Grass projects it."""

    name: str
    shape: tuple[int, ...]
    projected: bool = False
    linear: bool = False  # a weight read by a matmul (linear layer, experts, router)
    shared: bool = False  # used by several modules (a tied embedding and head)
    experts: int = 0  # E for a stack of experts' matrices (E, m, n), else 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix(self) -> tuple[int, ...]:
        """The shape (m, n) of each matrix Grass projects: the last two dims."""
        return self.shape[-2:]

    @property
    def stack(self) -> int:
        """The number of matrices: E for a stack of experts' matrices, else 1."""
        return self.experts or 1


@dataclass(frozen=True)
class Architecture:
    """What the planner needs of a model: its parameters, the LLaMA shape numbers and, for a
    Mixture-of-Experts model, its sparse MLP blocks' (``moe_layers`` of the ``layers``)."""

    params: tuple[Param, ...]
    lora_shapes: tuple[tuple[int, int], ...]  # (out, in) of each LoRA-adapted linear
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    moe_layers: int = 0  # decoder layers whose MLP is a sparse MoE block
    experts: int = 0  # E, experts per MoE block
    top_k: int = 0  # experts each token goes through (num_experts_per_tok)
    moe_intermediate: int = 0  # each expert's intermediate size
    norm_topk: bool = False  # the router renormalizes its top-k weights
    qk_norm: bool = False  # RMSNorm on each head of q and k (Qwen3)

    @property
    def projected(self) -> list[Param]:
        """The weights Grass projects (stacks of experts' matrices among them)."""
        return [p for p in self.params if p.projected]

    @property
    def galore_projected(self) -> list[Param]:
        """The weights GaLore projects: Grass's but the experts (2-D ``nn.Linear`` weights)."""
        return [p for p in self.params if p.projected and not p.experts]

    @property
    def num_parameters(self) -> int:
        return sum(p.numel for p in self.params)


def resolve_config(model: str | Path | PretrainedConfig) -> PretrainedConfig:
    """A config from a preset name (``"13b"``, ``"llama-13b"``), a config JSON path or a config."""
    if isinstance(model, PretrainedConfig):
        return model
    text = str(model)
    preset = text.lower().removeprefix("llama-")
    if preset in LLAMA_PRESETS:
        return llama_config(preset)
    path = Path(text)
    if not (text.endswith(".json") or path.exists()):
        raise UsageError(
            f"Unknown model {text!r}: use a preset ({', '.join(LLAMA_PRESETS)}, optionally "
            "with a 'llama-' prefix) or the path of a config JSON file."
        )
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MissingFileError(f"No config file {path}: pass the path of a config JSON file.")
    try:
        values = json.loads(path.read_text())
        model_type = values.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError, KeyError) as err:
        raise UsageError(f"Cannot read the model config {path}: {err}") from err


_ARCHITECTURES: dict[tuple[str, bool, bool], Architecture] = {}


def architecture(config: PretrainedConfig, embeddings: bool, lm_head: bool) -> Architecture:
    """The parameters of the causal LM of ``config`` (built on the meta device), with the
    weights Grass projects marked as :func:`hf_grass.grassify` selects them."""
    key = (config.to_json_string(), embeddings, lm_head)
    if key not in _ARCHITECTURES:
        _ARCHITECTURES[key] = _walk(config, embeddings, lm_head)
    return _ARCHITECTURES[key]


def _walk(config: PretrainedConfig, embeddings: bool, lm_head: bool) -> Architecture:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    modules = dict(model.named_modules())
    try:
        targets = grass_target_names(model, "all-linear", embeddings, lm_head)
    except ValueError as err:
        raise UsageError(str(err)) from err
    _refuse_half_tied(model, embeddings, lm_head)
    moe = _moe_blocks(modules)
    routers = {f"{block}.gate" for block in moe}
    # a router has E rows only: dense even where it is an nn.Linear that "all-linear" matches
    projected = {id(w) for n in targets if n not in routers for w in weights_of_target(modules, n)}
    linear = {id(m.weight) for m in modules.values() if is_linear_layer(m)}
    stacks = {
        id(p): p.shape[0] for experts in moe.values() for p in expert_weights(experts).values()
    }
    linear |= stacks.keys() | {id(modules[n].weight) for n in routers if n in modules}
    users: dict[int, int] = {}
    for module in model.modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            users[id(p)] = users.get(id(p), 0) + 1
    params = tuple(
        Param(
            name,
            tuple(p.shape),
            id(p) in projected,
            id(p) in linear,
            users[id(p)] > 1,
            stacks.get(id(p), 0),
        )
        for name, p in model.named_parameters()  # a tied weight appears once
    )
    lora = match_target_modules(model, list(LORA_TARGETS))
    heads = config.num_attention_heads
    experts = next(iter(moe.values()), None)
    if experts is not None and not isinstance(getattr(config, "num_experts_per_tok", None), int):
        raise UsageError(
            f"{type(config).__name__} has experts but no num_experts_per_tok: set it in the config."
        )
    return Architecture(
        params=params,
        lora_shapes=tuple((modules[n].out_features, modules[n].in_features) for n in lora),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
        moe_layers=len(moe),
        experts=0 if experts is None else experts.down_proj.shape[0],
        top_k=0 if experts is None else config.num_experts_per_tok,
        moe_intermediate=0 if experts is None else experts.down_proj.shape[-1],
        norm_topk=experts is not None and getattr(config, "norm_topk_prob", True),
        qk_norm=any(n.endswith("self_attn.q_norm") for n in modules),
    )


def _moe_blocks(modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Each sparse MoE block's name -> its experts module (transformers 5: a module named
    ``experts`` holding the stacks ``gate_up_proj`` (E, 2f, h) and ``down_proj`` (E, h, f))."""
    blocks = {}
    for name, module in modules.items():
        block, _, leaf = name.rpartition(".")
        if leaf != "experts" or not is_experts_module(module):
            continue
        names = set(expert_weights(module))
        if names != {"gate_up_proj", "down_proj"}:
            raise UsageError(
                f"The experts of {block} hold {sorted(names)}; the planner models experts as "
                "transformers' gate_up_proj (E, 2f, h) and down_proj (E, h, f) only."
            )
        blocks[block] = module
    return blocks


def _refuse_half_tied(model: nn.Module, embeddings: bool, lm_head: bool) -> None:
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if tied and embeddings != lm_head:
        raise UsageError(
            "The embedding and the output head of this model are one tied weight: project both "
            "(--embeddings with --lm_head) or neither."
        )


# ---------------------------------------------------------------------------------- dtypes
@dataclass(frozen=True)
class Precision:
    """Bytes per element: weights (and their gradients and moments), compute, residual stream."""

    weight: int
    compute: int
    stream: int
    autocast: bool


PRECISIONS = {
    "fp32": Precision(weight=4, compute=4, stream=4, autocast=False),
    "bf16-mixed": Precision(weight=4, compute=2, stream=4, autocast=True),
    "bf16": Precision(weight=2, compute=2, stream=2, autocast=False),
}


# ------------------------------------------------------------------------------------ plan
@dataclass
class MemoryPlan:
    """The bytes of a training run by part (see the module docstring) and the inputs."""

    parts: dict[str, int]
    inputs: dict[str, Any] = field(default_factory=dict)
    num_parameters: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def peak_bytes(self) -> int:
        """The step's peak by phase (module docstring): activations and gradients in turn."""
        p = self.parts
        always = p["weights"] + p["optimizer_state"] + p["indices"] + p["temporaries"]
        return always + max(p["activations"], p["gradients"])

    def as_dict(self) -> dict[str, Any]:
        """``total_bytes``, ``peak_bytes``, one ``<part>_bytes`` key per part, ``num_parameters``
        and the inputs."""
        out: dict[str, Any] = {"total_bytes": self.total_bytes, "peak_bytes": self.peak_bytes}
        out.update({f"{name}_bytes": value for name, value in self.parts.items()})
        out["num_parameters"] = self.num_parameters
        out.update(self.inputs)
        return out


def plan_memory(
    model: str | Path | PretrainedConfig,
    method: str = "grass",
    rank: int = DEFAULT_RANK,
    dtype: str = "bf16",
    layerwise: bool = False,
    activation_checkpointing: bool = False,
    batch_size: int = 1,
    seq_len: int = 256,
    embeddings: bool = False,
    lm_head: bool = False,
    attention: str = "sdpa",
    recompute: bool = True,
    update_rule: str | None = None,
    state_format: str | None = None,
) -> MemoryPlan:
    """Plan the memory of training ``model`` with ``method`` (see the module docstring).

    ``model``: a preset of :data:`hf_grass.models.LLAMA_PRESETS` (``"13b"`` or ``"llama-13b"``),
    a config JSON path or a ``PretrainedConfig``. ``rank``: Grass/GaLore projection rank or LoRA
    rank (ignored by AdamW). ``dtype``: ``fp32``, ``bf16-mixed`` or ``bf16`` (pure). ``embeddings``
    and ``lm_head``: Grass also projects the input embedding / output head (``lm_head`` also for
    GaLore: Hugging Face's ``optim_target_modules="all-linear"`` projects an untied head).
    ``attention``: ``sdpa`` (flash/memory-efficient kernels, O(s) memory) or ``eager``.
    ``recompute`` (Grass only): model :class:`~hf_grass.GrassTrainer`'s defaults
    (``grass_recompute_selection``, ``grass_recompute_norms``): the peak is an ordinary step whose
    cols-side layers keep ``X[:, cols]`` and whose norms keep only their input; ``False`` models a
    plain training loop, whose selection steps (step 0 among them) keep every linear's whole input.
    ``update_rule``, ``state_format`` (Grass only; GrassConfig's defaults when unset): the rule's
    number of state tensors and the format's bytes per element (:mod:`hf_grass.rules`,
    :mod:`hf_grass.state`). Raises :class:`~hf_grass.errors.UsageError` for a bad value.
    """
    _check_inputs(method, rank, dtype, batch_size, seq_len, embeddings, lm_head, attention)
    if not isinstance(recompute, bool):
        raise UsageError(f"Invalid recompute={recompute!r}: use True or False.")
    config = resolve_config(model)
    arch = architecture(config, embeddings and method == "grass", lm_head)
    _check_rank(arch, method, rank)
    prec = PRECISIONS[dtype]
    tokens = batch_size * seq_len
    grads = gradient_sizes(arch, method, rank, prec)
    parts = {
        "weights": weight_bytes(arch, method, rank, prec),
        "gradients": layerwise_gradient_bytes(arch, method, grads) if layerwise else sum(grads),
        "optimizer_state": optimizer_state_bytes(
            arch, method, rank, prec, update_rule, state_format
        ),
        "indices": indices_bytes(arch, method, rank),
        "activations": activation_bytes(
            arch,
            method,
            rank,
            prec,
            batch_size,
            seq_len,
            activation_checkpointing,
            attention,
            recompute,
        ),
        "temporaries": temporary_bytes(arch, method, prec, tokens),
    }
    inputs = dict(
        model=_model_name(model),
        method=method,
        rank=rank if method in RANKED_METHODS else None,
        dtype=dtype,
        layerwise=layerwise,
        activation_checkpointing=activation_checkpointing,
        batch_size=batch_size,
        seq_len=seq_len,
        embeddings=embeddings,
        lm_head=lm_head,
        attention=attention,
        recompute=recompute if method == "grass" else None,
    )
    return MemoryPlan(parts, inputs, arch.num_parameters)


def _model_name(model: str | Path | PretrainedConfig) -> str:
    if isinstance(model, PretrainedConfig):
        return getattr(model, "name_or_path", "") or type(model).__name__
    return str(model)


def _check_inputs(method, rank, dtype, batch_size, seq_len, embeddings, lm_head, attention):
    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if method not in METHODS:
        raise UsageError(f"Unknown method {method!r}: use one of {', '.join(METHODS)}.")
    if dtype not in DTYPES:
        raise UsageError(f"Unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
    if attention not in ATTENTIONS:
        raise UsageError(f"Unknown attention {attention!r}: use one of {', '.join(ATTENTIONS)}.")
    for name, value in (("rank", rank), ("batch_size", batch_size), ("seq_len", seq_len)):
        if not positive(value):
            raise UsageError(f"Invalid {name}={value!r}: use an integer >= 1.")
    if embeddings and method != "grass":
        raise UsageError(f"embeddings=True projects the embedding with Grass; not with {method}.")
    if lm_head and method not in ("grass", "galore"):
        raise UsageError(f"lm_head=True projects the output head (grass, galore); not {method}.")


def max_rank(arch: Architecture, method: str) -> int | None:
    """The largest rank ``method`` allows on ``arch`` (``None``: unbounded or not ranked).

    Grass selects the larger dimension (``proj_side="auto"``) of each matrix (each expert's of a
    stack), so ``r <= max(m, n)``; GaLore's SVD has ``min(m, n)`` singular vectors.
    """
    if method == "grass":
        return min(max(p.matrix) for p in arch.projected)
    if method == "galore":
        return min(min(p.shape) for p in arch.galore_projected)
    return None


def _check_rank(arch: Architecture, method: str, rank: int) -> None:
    limit = max_rank(arch, method)
    if limit is not None and rank > limit:
        side = "larger" if method == "grass" else "smaller"
        pick = max if method == "grass" else min
        weights = arch.projected if method == "grass" else arch.galore_projected
        weight = next(p for p in weights if pick(p.matrix) == limit)
        raise UsageError(
            f"rank {rank} is larger than the {side} dimension of {weight.name} "
            f"({' x '.join(map(str, weight.shape))}), which {method} allows at most: "
            f"use rank <= {limit}."
        )


# ---------------------------------------------------------------------------------- parts
def weight_bytes(arch: Architecture, method: str, rank: int, prec: Precision) -> int:
    """Every parameter in the weight dtype, plus LoRA's float32 adapters ``r (m + n)``."""
    total = arch.num_parameters * prec.weight
    if method == "lora":
        total += sum(lora_sizes(arch, rank)) * LORA_DTYPE_BYTES
    return total


def lora_sizes(arch: Architecture, rank: int) -> list[int]:
    """Elements of each LoRA adapter matrix: A (r x n) and B (m x r) per adapted linear."""
    return [rank * d for shape in arch.lora_shapes for d in shape]


def gradient_sizes(arch: Architecture, method: str, rank: int, prec: Precision) -> list[int]:
    """Bytes of each trainable tensor's gradient: compressed ``r min(m, n)`` for Grass's
    projected weights (``E r min(m, n)`` for a stack of experts' matrices), LoRA adapters in
    float32, dense in the weight dtype otherwise."""
    if method == "lora":
        return [n * LORA_DTYPE_BYTES for n in lora_sizes(arch, rank)]
    if method == "grass":
        return [
            (p.stack * rank * min(p.matrix) if p.projected else p.numel) * prec.weight
            for p in arch.params
        ]
    return [p.numel * prec.weight for p in arch.params]


def layerwise_gradient_bytes(arch: Architecture, method: str, grads: list[int]) -> int:
    """Peak live gradients with layer-wise updates: the largest single gradient, plus the
    gradient of each shared (tied) weight, which autograd holds from its first use in the
    backward (the head) to its last (the embedding) before the update can run."""
    if method == "lora":
        return max(grads, default=0)
    shared = sum(g for g, p in zip(grads, arch.params, strict=True) if p.shared)
    single = (g for g, p in zip(grads, arch.params, strict=True) if not p.shared)
    return shared + max(single, default=0)


def optimizer_state_bytes(
    arch: Architecture,
    method: str,
    rank: int,
    prec: Precision,
    update_rule: str | None = None,
    state_format: str | None = None,
) -> int:
    """Bytes of the optimizer state (without Grass's rows and rho: :func:`indices_bytes`; with
    its selection RNG state, :data:`RNG_STATE_BYTES` per projected matrix; a stack of
    experts' matrices keeps none). Grass keeps its ``update_rule``'s state tensors (Adam: 2) in
    its ``state_format``, on the projected and the dense parameters."""
    if method == "lora":
        return sum(_adamw_state(n, LORA_DTYPE_BYTES) for n in lora_sizes(arch, rank))
    if method == "adamw":
        return sum(_adamw_state(p.numel, prec.weight) for p in arch.params)
    if method == "adamw-8bit":
        return sum(_adamw8bit_state(p.numel) for p in arch.params) + BNB_QMAPS
    rule = rule_of(resolve_option("update_rule", update_rule))
    stored = state_format_of(resolve_option("state_format", state_format))
    tensors = len(rule.state_keys)
    total = 0
    for p in arch.params:
        if method == "grass" and p.projected:
            # per matrix: the rule's state r x k, per-row steps (float32 r); per weight: the step
            # and selected_step scalars, and the RNG state of a matrix (not of experts' matrices)
            rows, k = p.stack * rank, min(p.matrix)
            total += round(tensors * rows * k * stored.element_bytes(prec.weight, k))
            total += 4 * rows + 2 * STEP_SCALAR + (0 if p.experts else RNG_STATE_BYTES)
        elif method == "grass":
            k = p.shape[-1]
            total += round(tensors * p.numel * stored.element_bytes(prec.weight, k)) + STEP_SCALAR
        elif method == "galore" and p.projected and not p.experts:
            # moments r x max(m, n), projection r x min(m, n)
            total += (2 * max(p.shape) + min(p.shape)) * rank * prec.weight
        else:  # galore_torch keeps its step as a Python int
            total += _adamw_state(p.numel, prec.weight) - (STEP_SCALAR if method == "galore" else 0)
    return total


def _adamw_state(numel: int, state_bytes: int) -> int:
    return 2 * numel * state_bytes + STEP_SCALAR


def _adamw8bit_state(numel: int) -> int:
    if numel < BNB_MIN_8BIT:
        return 2 * numel * 4
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_BLOCK)


def indices_bytes(arch: Architecture, method: str, rank: int) -> int:
    """Grass's selection: rows (int64 r) and rho (float32 r) per projected matrix (E r per
    stack of experts' matrices)."""
    if method != "grass":
        return 0
    return sum(p.stack for p in arch.projected) * rank * (8 + 4)


@dataclass(frozen=True)
class LayerLinear:
    """One linear of a decoder layer: its name, weight shape ``(m, n)`` and whether Grass
    projects it."""

    name: str
    shape: tuple[int, int]
    projected: bool

    @property
    def side(self) -> str:
        """The side Grass selects (``proj_side="auto"``): ``rows`` when ``m >= n``, else ``cols``."""
        return projection_side(self.shape)


def layer_linears(arch: Architecture, moe: bool = False) -> list[list[LayerLinear]]:
    """A LLaMA-style decoder layer's linears in forward order, grouped by the input they read:
    q/k/v (the normed hidden state, ``n = h``), o (the attention output, ``n = a d``), gate/up
    (the normed hidden state, ``n = h``) and down (the MLP's hidden state, ``n = f``). ``moe``:
    a layer whose MLP is a sparse MoE block (:func:`moe_activation_bytes`): q/k/v and o only."""
    h, f, a, g, d = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    projected = {p.name.split(".")[-2] for p in arch.projected if ".layers." in p.name}
    groups = (
        (("q_proj", (a * d, h)), ("k_proj", (g * d, h)), ("v_proj", (g * d, h))),
        (("o_proj", (h, a * d)),),
        (("gate_proj", (f, h)), ("up_proj", (f, h))),
        (("down_proj", (h, f)),),
    )[: 2 if moe else 4]
    return [[LayerLinear(name, shape, name in projected) for name, shape in g] for g in groups]


def linear_input_bytes(
    arch: Architecture,
    rank: int,
    prec: Precision,
    tokens: int,
    sliced: bool = False,
    moe: bool = False,
) -> int:
    """Bytes one decoder layer's linears keep of their inputs for the backward.

    Each input ``X`` (T x n) is kept whole (``eTn``): once when its linears share it (no
    autocast), once per linear under autocast (each casts and saves its own bf16 copy).
    ``sliced`` (a Grass ordinary step, :mod:`hf_grass.linear`): a projected cols-side linear
    keeps ``X[:, cols]`` (``eTr``) instead; without autocast it keeps nothing when an earlier
    Grass linear kept the same ``X`` whole (k/v after a rows-side q). ``moe``: the attention's
    linears only (:func:`layer_linears`).
    """
    e, t = prec.compute, tokens
    total = 0
    for group in layer_linears(arch, moe):
        whole = e * t * group[0].shape[1]
        counted = grass_whole = False  # X's storage counted; X kept whole by a Grass linear
        for linear in group:
            cols = sliced and linear.projected and linear.side == "cols"
            if prec.autocast:
                total += e * t * rank if cols else whole
            elif cols:
                total += 0 if grass_whole else e * t * rank
            else:
                total += 0 if counted else whole
                counted = True
                grass_whole = grass_whole or linear.projected
    return total


def norm_activation_bytes(
    prec: Precision, tokens: int, hidden: int, trained: bool, recomputed: bool = False
) -> int:
    """Bytes one RMSNorm keeps: float32 input ``4Th``, rsqrt ``4T`` and, for a trainable
    weight, the normalized tensor ``sTh``; recomputed (:func:`hf_grass.recompute.recompute_norms`)
    only its input ``sTh``."""
    t, h, s = tokens, hidden, prec.stream
    if recomputed:
        return s * t * h
    return 4 * t * h + 4 * t + (s * t * h if trained else 0)


def layer_activation_bytes(
    arch: Architecture,
    method: str,
    rank: int,
    prec: Precision,
    batch_size: int,
    seq_len: int,
    attention: str = "sdpa",
    recompute: bool = True,
    *,
    sliced: bool | None = None,
    moe: bool = False,
) -> int:
    """Bytes one decoder layer saves for the backward (T = batch*seq tokens; h hidden, f
    intermediate, a heads, g kv heads, d head dim, r rank; e compute bytes, s stream bytes;
    ``moe``: a layer whose MLP is a sparse MoE block)::

        norms      2 (4Th + 4T + sTh)        float32 input, rsqrt, normalized (for the weight)
                   recompute: 2 sTh          the input only, the rest redone in the backward
        linears    eTh (c_qkv + c_mlp)       inputs of q/k/v and gate/up: under autocast each
                                             linear saves its own bf16 copy (c_qkv = 3,
                                             c_mlp = 2), else one shared (1, 1)
                   + eTad + eTf              inputs of o and down
                   recompute: a projected cols-side linear (m < n: down; k/v when gd < h, q
                   when ad < h) keeps eTr, X[:, cols], instead of its input; without autocast
                   an input shared with an earlier rows-side Grass linear is kept once whole
                   (k/v after q), else the slices add up (q, k, v all cols side: 3eTr)
        attention  eT(a + 2g)d               q, k, v after RoPE
                   + eTad + 4Ta              sdpa: output and float32 logsumexp
                   or batch a seq² (4 + e)   eager: float32 softmax and its cast (4 only in fp32)
        qk norms   4T(a + g)(d + 1)          Qwen3's per-head RMSNorm of q and k: float32
                   + eT(a + g)d              input and rsqrt, normalized (for the weight; e:
                                             q and k come in the compute dtype)
                   recompute: eT(a + g)d     the input only
        mlp        3eTf                      gate, up, silu(gate)
        moe        instead of mlp and the gate/up/down inputs: see moe_activation_bytes

    ``recompute`` (Grass only) models an ordinary step under :class:`~hf_grass.GrassTrainer`'s
    defaults (see :func:`linear_input_bytes` and :func:`norm_activation_bytes`); without it, a
    selection step, where every linear keeps its whole input. LoRA's base weights are frozen, so
    the linears' inputs and the normalized tensors are not saved; each adapter (q, v) saves its
    dropout mask and input (T h (1 + 4)) and A's output (4 T r). ``sliced=False`` with
    ``recompute``: a selection step under recomputation (norms recomputed, whole inputs kept).
    """
    norms_recomputed = recompute and method == "grass"
    sliced = norms_recomputed and sliced is not False
    h, f, a, g, d = arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim
    t, e = batch_size * seq_len, prec.compute
    frozen = method == "lora"
    norms = 2 * norm_activation_bytes(prec, t, h, not frozen, norms_recomputed)
    if arch.qk_norm:
        if norms_recomputed:
            norms += e * t * (a + g) * d
        else:
            norms += 4 * t * (a + g) * (d + 1) + (0 if frozen else e * t * (a + g) * d)
    linears = 0 if frozen else linear_input_bytes(arch, rank, prec, t, sliced, moe)
    attn = e * t * (a + 2 * g) * d
    if attention == "sdpa":
        attn += e * t * a * d + 4 * t * a
    else:
        attn += batch_size * a * seq_len**2 * (4 + (e if e != 4 else 0))
    mlp = moe_activation_bytes(arch, method, prec, t) if moe else 3 * e * t * f
    adapters = len(LORA_TARGETS) * (t * h * (1 + 4) + 4 * t * rank) if frozen else 0
    return norms + linears + attn + mlp + adapters


def moe_activation_bytes(arch: Architecture, method: str, prec: Precision, tokens: int) -> int:
    """Bytes one sparse MoE block saves for the backward. Each of the T tokens goes through
    k = ``num_experts_per_tok`` of the E experts: S = T k routed (token, expert) pairs; f each
    expert's intermediate size::

        router    eTh                  its input, the normed hidden state
                  + 4TE                float32 softmax of the logits (T x E)
                  + 8S (+ 4S + 4T)     top-k indices (int64); the top-k weights normalized and
                                       their sum (Mixtral; Qwen3 with norm_topk_prob)
        experts   eS(h + f)            each pair's gathered input and down_proj's input
                  + eS(3f + h)         gate, up, silu(gate); down_proj's output (for the weight)
        routing   28S + 4E             transformers' grouped_mm experts forward (its default):
                                       each pair's gathered routing weight (float32 at most)
                                       and three int64 permutations; int32 offsets
                  or 20S               Grass's experts forward (:mod:`hf_grass.experts`): the
                                       weight and two int64 permutations

    LoRA (``method="lora"``: router and experts frozen) saves no matmul inputs (``eTh +
    eS(h + f)``). Grass keeps the experts' whole inputs (no ``X[:, cols]`` slices) on every
    step. The router's auxiliary loss (``output_router_logits=True``) is not modeled.
    """
    t, e, h, f = tokens, prec.compute, arch.hidden, arch.moe_intermediate
    pairs = t * arch.top_k
    inputs = 0 if method == "lora" else e * t * h + e * pairs * (h + f)
    router = 4 * t * arch.experts + 8 * pairs + (4 * pairs + 4 * t if arch.norm_topk else 0)
    experts = e * pairs * (3 * f + h)
    if method == "grass":
        routing = 20 * pairs
    else:
        routing = 28 * pairs + 4 * arch.experts
    return inputs + router + experts + routing


def activation_bytes(
    arch: Architecture,
    method: str,
    rank: int,
    prec: Precision,
    batch_size: int,
    seq_len: int,
    checkpointing: bool = False,
    attention: str = "sdpa",
    recompute: bool = True,
) -> int:
    """Saved activations: ``L`` layers (checkpointing: ``L`` layer inputs ``sTh`` plus one
    layer, the larger kind where dense and MoE layers mix), token ids and labels ``16T``, the
    final norm ``4Th + 4T (+ sTh)``, the head's input ``eTh`` (when trained) and the loss's
    float32 log-probabilities ``4TV``.

    ``recompute`` (Grass only, :class:`~hf_grass.GrassTrainer`'s defaults): the layers of an
    ordinary step (:func:`layer_activation_bytes`) and a final norm of ``sTh``, or a selection
    step, run under activation checkpointing (``L`` layer inputs plus one layer keeping its whole
    inputs, norms recomputed), whichever is larger: the ordinary step but for very few layers;
    with ``checkpointing``, the selection step.
    """
    t = batch_size * seq_len
    h = arch.hidden
    grass = recompute and method == "grass"
    counts = {False: arch.layers - arch.moe_layers, True: arch.moe_layers}  # moe -> layers
    kinds = [moe for moe, n in counts.items() if n]

    def layer(moe: bool, sliced: bool | None = None) -> int:
        return layer_activation_bytes(
            arch, method, rank, prec, batch_size, seq_len, attention, grass, sliced=sliced, moe=moe
        )

    inputs = arch.layers * prec.stream * t * h
    if checkpointing:
        layers = inputs + max(layer(moe) for moe in kinds)
    else:
        layers = sum(counts[moe] * layer(moe) for moe in kinds)
    if grass:
        layers = max(layers, inputs + max(layer(moe, sliced=False) for moe in kinds))
    trained = method != "lora"
    final_norm = norm_activation_bytes(prec, t, h, trained, grass)
    head_input = prec.compute * t * h if trained else 0
    return layers + 16 * t + final_norm + head_input + 4 * t * arch.vocab


def temporary_bytes(arch: Architecture, method: str, prec: Precision, tokens: int) -> int:
    """Autocast's bf16 weight copies (``bf16-mixed``; experts and router too) plus the largest
    transient buffer: the loss's ``eTV + 2 * 4TV``, Grass's full gradient of the largest
    projected weight at a selection step (a whole stack of experts' matrices, one MoE layer's),
    or GaLore's SVD of the largest projected matrix."""
    linear_elements = sum(p.numel for p in arch.params if p.linear)
    copies = 2 * linear_elements if prec.autocast else 0
    transient = [(prec.compute + 8) * tokens * arch.vocab]
    if method == "grass":
        # an embedding's full gradient comes in the residual stream's dtype
        transient += [p.numel * (prec.compute if p.linear else prec.stream) for p in arch.projected]
    if method == "galore":
        transient += [_svd_bytes(p.shape, prec.weight) for p in arch.galore_projected]
    return copies + max(transient)


def _svd_bytes(shape: tuple[int, ...], weight_bytes: int) -> int:
    m, n = shape
    k = min(m, n)
    copy = 4 * m * n if weight_bytes != 4 else 0
    return copy + 4 * (m * k + k + k * n)


# ------------------------------------------------------------------------------- budgets
def fit_budget(budget_bytes: int, **kwargs: Any) -> dict[str, Any]:
    """Whether the plan of ``kwargs`` (:func:`plan_memory`'s arguments, ``recompute`` among
    them) fits ``budget_bytes``.

    Judged by ``peak_bytes``. Returns ``fits``, ``total_bytes``, ``peak_bytes``, ``max_batch_size`` (the largest batch that fits at this
    ``seq_len``; ``None`` if 1 does not), ``min_rank`` (the smallest rank that fits, ``None``
    if none or for AdamW) and ``max_rank`` (the largest rank that fits, up to the largest the
    model allows; LoRA up to the adapted layers' smaller dimension).
    """
    plan = plan_memory(**kwargs)

    def fits(**change: Any) -> bool:
        return plan_memory(**{**kwargs, **change}).peak_bytes <= budget_bytes

    result: dict[str, Any] = {
        "budget_bytes": budget_bytes,
        "fits": plan.peak_bytes <= budget_bytes,
        "total_bytes": plan.total_bytes,
        "peak_bytes": plan.peak_bytes,
        "max_batch_size": _largest(lambda b: fits(batch_size=b), 1, 2**24),
        "min_rank": None,
        "max_rank": None,
    }
    method = kwargs.get("method", "grass")
    if method in RANKED_METHODS:
        config = resolve_config(kwargs["model"])
        arch = architecture(
            config,
            kwargs.get("embeddings", False) and method == "grass",
            kwargs.get("lm_head", False),
        )
        limit = max_rank(arch, method) or min(min(s) for s in arch.lora_shapes)
        # memory grows with the rank, so the smallest rank that fits is 1 if any does
        result["min_rank"] = 1 if fits(rank=1) else None
        result["max_rank"] = _largest(lambda r: fits(rank=r), 1, limit)
    return result


def _largest(ok, low: int, high: int) -> int | None:
    """The largest ``x`` in ``[low, high]`` with ``ok(x)``, for ``ok`` true up to a point."""
    if not ok(low):
        return None
    step = 1
    while low + step <= high and ok(low + step):  # gallop, then bisect
        low += step
        step *= 2
    high = min(high, low + step - 1)
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


def parse_size(text: str) -> int:
    """Bytes of a size such as ``"40GiB"``, ``"1.5 GB"``, ``"512MiB"`` or ``"1024"`` (bytes).

    Units (case-insensitive): B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (of 1024).
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i?)b?|(b))?\s*", str(text), re.I)
    if match is None:
        raise UsageError(
            f"Invalid size {text!r}: use a number with a unit, e.g. 40GiB, 80GB or 512MiB."
        )
    value, prefix, binary, _ = match.groups()
    prefix = (prefix or "").lower()
    if binary:
        scale = 1024 ** "bkmgt".index(prefix)
    else:
        scale = _UNITS[prefix]
    return int(round(float(value) * scale))
