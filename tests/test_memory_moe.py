"""The memory planner on Mixture-of-Experts models (Mixtral, Qwen3-MoE): parameter counts, the
state of every method against real CPU steps and against counts made here from the real
model's shapes, and what a MoE block saves for the backward."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import method_optimizer
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig
from transformers.models.mixtral import modeling_mixtral

from hf_grass import GrassAdamW, grassify
from hf_grass import memory as memory_module
from hf_grass.config import GrassConfig
from hf_grass.memory import (
    PRECISIONS,
    RNG_STATE_BYTES,
    architecture,
    moe_activation_bytes,
    plan_memory,
)
from hf_grass.report import gradient_bytes, optimizer_state_bytes, tensor_bytes

RANK = 4
LORA_TARGETS = ["q_proj", "v_proj"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHT_BYTES = {"fp32": 4, "bf16": 2}
# hidden 32, experts' intermediate 40 (2f = 80), E = 4, k = 2: shapes that tell the terms apart;
# every stack has 4096 elements or more (8-bit AdamW quantizes it)
FAMILIES = {
    "mixtral": lambda **o: MixtralConfig(
        **{
            **dict(
                hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                num_experts_per_tok=2, vocab_size=128,
            ),
            **o,
        }
    ),
    # layer 1 is a dense MLP (mlp_only_layers): the plan mixes both kinds of layer
    "qwen3_moe": lambda **o: Qwen3MoeConfig(
        **{
            **dict(
                hidden_size=32, intermediate_size=56, moe_intermediate_size=40,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_experts=4, num_experts_per_tok=2, vocab_size=128, mlp_only_layers=[1],
                norm_topk_prob=True,
            ),
            **o,
        }
    ),
}  # fmt: skip


def _model(family: str, dtype: str = "fp32", seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(FAMILIES[family](**overrides)).to(DTYPES[dtype])


def _is_stack(name: str, p: torch.Tensor) -> bool:
    """A stack of experts' matrices (E, m, n)."""
    return p.dim() == 3 and name.rsplit(".", 2)[-2] == "experts"


def _projected_2d(model: nn.Module) -> set[str]:
    """Parameter names of the 2-D weights Grass's "all-linear" projects: every nn.Linear but
    the output head (the routers of both families are not nn.Linear)."""
    return {
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"
    }


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("mixtral", {}),
        ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1)),
        ("qwen3_moe", {}),
        ("qwen3_moe", dict(tie_word_embeddings=True, mlp_only_layers=[])),
    ],
)
def test_parameter_count_equals_the_real_model(family, overrides):
    model = _model(family, **overrides)
    real = sum(p.numel() for p in model.parameters())  # a tied weight once
    plan = plan_memory(FAMILIES[family](**overrides), "adamw", dtype="fp32")
    assert plan.num_parameters == real
    assert plan.parts["weights"] == 4 * real


def test_architecture_finds_the_experts_and_their_routing():
    arch = architecture(FAMILIES["qwen3_moe"](), False, False)
    assert (arch.experts, arch.top_k, arch.moe_intermediate) == (4, 2, 40)
    assert (arch.layers, arch.moe_layers, arch.intermediate, arch.qk_norm) == (3, 2, 56, True)
    stacks = [p for p in arch.params if p.experts]
    assert {p.shape for p in stacks} == {(4, 80, 32), (4, 32, 40)} and len(stacks) == 4
    assert all(p.projected for p in stacks)
    assert not any(p.projected for p in arch.params if p.name.endswith("mlp.gate.weight"))


def _grass_reference(model: nn.Module, dtype: str, rank: int) -> dict[str, int]:
    """Grass's state, selection and gradients counted from the real model's parameters: each
    expert's matrix of a stack (E, m, n) projected with r rows, 2-D linears projected, the rest
    (router, norms, embedding, head) dense AdamW."""
    w = WEIGHT_BYTES[dtype]
    linear = _projected_2d(model)
    state = indices = grads = 0
    for name, p in model.named_parameters():
        if _is_stack(name, p) or name in linear:
            matrices = p.shape[0] if p.dim() == 3 else 1
            rows, k = matrices * rank, min(p.shape[-2:])
            # moments, per-row steps (float32), step + selected_step; the RNG state of a
            # matrix (experts draw from generators seeded per expert and step)
            state += 2 * rows * k * w + 4 * rows + 2 * 4 + (0 if p.dim() == 3 else RNG_STATE_BYTES)
            indices += rows * (8 + 4)  # int64 rows, float32 rho
            grads += rows * k * w
        else:
            state += 2 * p.numel() * w + 4
            grads += p.numel() * w
    return {"optimizer_state": state, "indices": indices, "gradients": grads}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_grass_state_equals_a_count_from_the_shapes(family, dtype):
    model = _model(family, dtype)
    parts = plan_memory(FAMILIES[family](), "grass", RANK, dtype).parts
    assert {k: parts[k] for k in ("optimizer_state", "indices", "gradients")} == (
        _grass_reference(model, dtype, RANK)
    )


def _bnb_state(numel: int) -> int:
    """bitsandbytes' AdamW8bit state of one tensor: float32 moments under 4096 elements, else
    uint8 moments and one float32 absmax per 256-element block and moment."""
    return 8 * numel if numel < 4096 else 2 * numel + 8 * math.ceil(numel / 256)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_baselines_on_experts_follow_their_rules(family):
    """AdamW: full moments on the stacks; 8-bit: every tensor quantized, 3-D stacks too; GaLore:
    2-D linears projected, experts dense; LoRA: adapters on q/v only, experts frozen."""
    config, dtype, w = FAMILIES[family](), "bf16", 2
    model = _model(family, dtype)
    params = dict(model.named_parameters())
    stacks = {n for n, p in params.items() if _is_stack(n, p)}
    assert stacks and all(params[n].numel() >= 4096 for n in stacks)  # 8-bit on the stacks

    def plan(method: str) -> dict[str, int]:
        return plan_memory(config, method, RANK, dtype).parts

    assert plan("adamw")["optimizer_state"] == sum(2 * p.numel() * w + 4 for p in params.values())
    assert (
        plan("adamw-8bit")["optimizer_state"]
        == sum(_bnb_state(p.numel()) for p in params.values()) + 2 * 256 * 4
    )  # the two shared quantization maps

    linear = _projected_2d(model)
    galore = 0
    for name, p in params.items():
        if name in linear:  # moments r x max(m, n), projection r x min(m, n)
            galore += (2 * max(p.shape) + min(p.shape)) * RANK * w
        else:  # dense, step as a Python int
            galore += 2 * p.numel() * w
    assert plan("galore")["optimizer_state"] == galore
    assert (
        plan("galore")["gradients"]
        == plan("adamw")["gradients"]
        == sum(p.numel() * w for p in params.values())
    )

    # A (r x n) and B (m x r) per adapted linear, float32
    adapted = [m for n, m in model.named_modules() if n.split(".")[-1] in LORA_TARGETS]
    adapters = [RANK * m.in_features for m in adapted] + [RANK * m.out_features for m in adapted]
    lora = plan("lora")
    assert lora["optimizer_state"] == sum(2 * 4 * n + 4 for n in adapters)
    assert lora["gradients"] == 4 * sum(adapters)
    assert lora["weights"] == plan("adamw")["weights"] + 4 * sum(adapters)


class _LinearRouter(nn.Linear):
    """Mixtral's router as an nn.Linear named ``gate`` (E x h weight), as some MoE families
    build it: same outputs as transformers' MixtralTopKRouter."""

    def __init__(self, config):
        super().__init__(config.hidden_size, config.num_local_experts, bias=False)
        self.top_k = config.num_experts_per_tok

    def forward(self, hidden_states):
        logits = super().forward(hidden_states.reshape(-1, self.in_features))
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, self.top_k, dim=-1)
        return logits, top / top.sum(dim=-1, keepdim=True), index


def test_a_linear_router_stays_dense(monkeypatch):
    """A router that is an nn.Linear has E rows only: the planner leaves it dense (AdamW), as
    for the families whose router is not an nn.Linear."""
    config = FAMILIES["mixtral"]()
    plain = plan_memory(config, "grass", RANK, "fp32").parts
    monkeypatch.setattr(modeling_mixtral, "MixtralTopKRouter", _LinearRouter)
    monkeypatch.setattr(memory_module, "_ARCHITECTURES", {})
    model = _model("mixtral")
    assert isinstance(model.model.layers[0].mlp.gate, nn.Linear)
    arch = architecture(config, False, False)
    routers = [p for p in arch.params if p.name.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and not any(p.projected for p in routers)
    assert all(p.linear for p in routers)  # autocast copies it like any linear
    assert plan_memory(config, "grass", RANK, "fp32").parts == plain


def _optimizer(model: nn.Module, method: str):
    return method_optimizer(model, method, RANK)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["adamw", "adamw-8bit", "galore", "lora", "grass"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tensor_bytes_equal_a_real_step(family, method, dtype):
    """Weights, gradients before ``step()`` and optimizer state (with Grass's selection) of one
    real CPU step equal the plan, to the byte."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _model(family, dtype)
        if method == "lora":
            peft = pytest.importorskip("peft")
            lora = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=LORA_TARGETS)
            model = peft.get_peft_model(model, lora)
        optimizer = _optimizer(model, method)
        params = list(model.parameters())
        ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads = gradient_bytes(params)
        optimizer.step()
    parts = plan_memory(FAMILIES[family](), method, RANK, dtype).parts
    real = (tensor_bytes(params), grads, optimizer_state_bytes(optimizer))
    assert real == (
        parts["weights"],
        parts["gradients"],
        parts["optimizer_state"] + parts["indices"],
    )


def _saved_bytes(block: nn.Module, x: torch.Tensor, params: set[int]) -> int:
    """Bytes of the distinct non-parameter storages ``block(x)`` keeps for the backward."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()  # alive until the backward: no reuse
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    return sum(kept.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["adamw", "grass", "lora"])
@pytest.mark.parametrize(
    "family, overrides",
    [("mixtral", {}), ("qwen3_moe", {}), ("qwen3_moe", dict(norm_topk_prob=False))],
)
def test_moe_block_saves_what_the_plan_says(family, overrides, method, dtype):
    """One MoE block's saved tensors against :func:`moe_activation_bytes`: transformers'
    grouped_mm experts (AdamW), Grass's experts forward, frozen router and experts (LoRA).

    Exact in fp32; in bf16 the plan counts each pair's gathered routing weight as float32 (as
    Mixtral's grouped_mm keeps it), where Qwen3 and Grass's forward keep it in bf16."""
    model = _model(family, dtype, **overrides)
    if method == "grass":
        GrassAdamW(grassify(model, rank=RANK), lr=1e-3)
    if method == "lora":
        model.requires_grad_(False)
    block = model.model.layers[0].mlp
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    tokens = 32
    x = torch.randn(2, tokens // 2, 32, dtype=DTYPES[dtype], requires_grad=True)
    measured = _saved_bytes(block, x, params)
    prec = PRECISIONS[dtype]
    arch = architecture(FAMILIES[family](**overrides), False, False)
    planned = moe_activation_bytes(arch, method, prec, tokens)
    pairs = tokens * arch.top_k
    assert 0 <= planned - measured <= (4 - prec.compute) * pairs


def test_grass_transient_is_one_expert_stacks_full_gradient():
    """At a selection step the full (E, m, n) gradient of one expert weight exists: with a
    tiny batch it is the largest transient buffer."""
    model = _model("mixtral")
    largest = max(p.numel() for n, p in model.named_parameters() if _is_stack(n, p))
    parts = plan_memory(FAMILIES["mixtral"](), "grass", RANK, "fp32", seq_len=2).parts
    assert parts["temporaries"] == 4 * largest


def test_default_rank_is_grass_configs():
    config = FAMILIES["mixtral"](hidden_size=128, intermediate_size=96)  # room for the rank
    rank = GrassConfig().rank
    plan = plan_memory(config, "grass")
    assert plan.inputs["rank"] == rank
    assert plan.parts == plan_memory(config, "grass", rank).parts
    assert plan.parts != plan_memory(config, "grass", rank + 1).parts
