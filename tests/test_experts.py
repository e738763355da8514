"""MoE experts (transformers 5's 3-D expert weights) are projected expert by expert: references
are plain indexing of the dense float64 gradient from transformers' own eager experts loop, and
torch's AdamW."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_gradients_match_dense, tiny_moe

from hf_grass import GrassAdamW, grassify, projection_of, ungrassify
from hf_grass.layers import expert_weights, is_experts_module
from hf_grass.report import coverage_line

FAMILIES = ["mixtral", "qwen3_moe", "gpt_oss"]


def _batch(seed: int, tokens: int = 3) -> torch.Tensor:
    # 3 tokens, top-1 or top-2 of 8 experts: at most 6 experts of a layer get tokens.
    return torch.randint(0, 64, (1, tokens), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _experts(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if is_experts_module(m)}


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_projects_every_expert_weight_and_outputs_are_unchanged(family):
    reference = tiny_moe(family).double()
    model = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Grass cannot project" warning any more
        groups = grassify(model, rank=2)
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    expected = {
        id(m.weight)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    }
    expected |= {id(w) for m in _experts(model).values() for w in expert_weights(m).values()}
    assert projected == expected
    assert len(_experts(model)) == 2
    assert all(type(m).__name__.startswith("Grass") for m in _experts(model).values())
    ids = _batch(0, tokens=6)
    torch.testing.assert_close(
        model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=1e-12
    )
    ungrassify(model)
    assert {type(m) for m in _experts(model).values()} == {
        type(m) for m in _experts(reference).values()
    }
    assert list(model.state_dict()) == list(reference.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proj_side", ["rows", "cols"])
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_compressed_expert_gradient_is_rho_times_rows_of_each_experts_dense_gradient(
    family, proj_side, selection
):
    """Every expert's compressed gradient equals ``rho_e * G_e[rows_e]`` of the dense float64
    gradient of an untouched copy, on selection steps (0, 3) and ordinary ones (1, 2),
    including experts that no token reached (their rows are zero)."""
    reference = tiny_moe(family).double()
    model = copy.deepcopy(reference)
    opt = GrassAdamW(
        grassify(
            model, rank=3, target_modules=["experts"], update_proj_gap=3, selection=selection,
            proj_side=proj_side,
        ),
        lr=1e-2,
    )  # fmt: skip
    unreached = 0
    for step in range(4):
        reference.load_state_dict(model.state_dict())
        ids = _batch(step)
        _loss(reference, ids).backward()
        _loss(model, ids).backward()
        for p, dense in assert_gradients_match_dense(model, reference, proj_side):
            assert p.dim() == 3
            silent = dense.flatten(1).eq(0).all(1)  # experts that got no token
            unreached += int(silent.sum())
            assert projection_of(p).grad.view(p.shape[0], 3, -1)[silent].eq(0).all()
        opt.step()
        opt.zero_grad()
        reference.zero_grad()
    assert unreached > 0


@pytest.mark.parametrize(("family", "proj_side"), [("mixtral", "rows"), ("gpt_oss", "cols")])
def test_full_rank_grass_on_experts_equals_torch_adamw(family, proj_side):
    """Every row of every expert selected, scale 1: each step is AdamW's, for the experts and
    (as plain AdamW groups of the same optimizer) for everything else. With intermediate size 8
    every expert matrix has 16 rows (Mixtral: (16, 16), (16, 8)) or columns (gpt-oss,
    transposed: (16, 16), (8, 16))."""
    reference = tiny_moe(family, intermediate_size=8).double()
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    groups = grassify(
        model, rank=16, target_modules=["experts"], update_proj_gap=2, proj_side=proj_side,
        weight_decay=0.1,
    )  # fmt: skip
    opt = GrassAdamW(groups, lr=1e-2)
    for step in range(4):
        for m, o in ((reference, ref_opt), (model, opt)):
            _loss(m, _batch(step, tokens=5)).backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)


def test_target_modules_name_experts_by_module_or_weight_path():
    """``"experts"`` selects every expert weight, ``"down_proj"`` the linear layers of that name
    and the experts' own, a regex one kind of expert weight."""
    from hf_grass import grass_target_names

    model = tiny_moe("qwen3_moe", mlp_only_layers=[0])  # layer 0: a dense MLP of nn.Linear
    assert grass_target_names(model, ["experts"]) == ["model.layers.1.mlp.experts"]
    assert grass_target_names(model, ["down_proj"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    assert grass_target_names(model, r".*experts\.gate_up_proj") == [
        "model.layers.1.mlp.experts.gate_up_proj"
    ]
    groups = grassify(model, rank=2, target_modules=["down_proj"])
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    experts = model.model.layers[1].mlp.experts
    assert projected == {id(model.model.layers[0].mlp.down_proj.weight), id(experts.down_proj)}
    # The experts module runs Grass's forward; its unprojected gate_up_proj gets a full .grad.
    opt = GrassAdamW(groups, lr=1e-2)
    _loss(model, _batch(0, tokens=6)).backward()
    assert experts.gate_up_proj.grad is not None and experts.down_proj.grad is None
    assert projection_of(experts.down_proj).grad.shape == (8 * 2, 12)  # E * r x min(16, 12)
    opt.step()


def test_coverage_of_a_hand_counted_mixtral():
    """Projected: attention and experts; dense: embedding, head, routers, norms (counted from
    the config by hand)."""
    model = tiny_moe("mixtral")
    h, inter, experts, vocab, layers = 16, 24, 8, 64, 2
    attention = h * h + 2 * (h * 8) + h * h  # q, k, v (1 KV head of 8), o
    expert_weights_ = experts * (2 * inter * h + h * inter)
    dense = 2 * vocab * h + h + layers * (experts * h + 2 * h)  # embed, head, norms, routers
    projected = layers * (attention + expert_weights_)
    assert sum(p.numel() for p in model.parameters()) == projected + dense
    groups = grassify(model, rank=4)
    line = coverage_line(model, groups)
    share = 100 * projected / (projected + dense)
    # 16 matrices: 4 attention and 2 expert weights per layer, embedding, head, 2 routers.
    assert f"Grass: 12 of 16 weight matrices projected at rank 4 ({share:.1f}% " in line
    # Moments (float32, 2 each): r x min(m, n) per attention matrix, per expert r x min(m, n).
    grass_rows = layers * (4 * 16 + 4 * 8 + 4 * 8 + 4 * 16 + experts * (4 * 16 + 4 * 16))
    moments = 2 * 4 * (grass_rows + dense)
    assert f"Adam moments {moments / 1024:.1f} KiB vs " in line
    assert line.endswith("dense: embed_tokens (embedding), lm_head (head), 5 norms, 2 MoE routers.")
    # The README quotes this line.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert line in readme


def test_optimizer_state_of_experts_resumes_exactly():
    """A state dict saved after 3 steps (one re-selection) and loaded into a fresh model and
    optimizer continues exactly as the original."""
    model = tiny_moe("mixtral").double()
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=2, selection="multinomial"), lr=1e-2)

    def step(m, o, seed):
        _loss(m, _batch(seed)).backward()
        o.step()
        o.zero_grad()

    for seed in range(3):
        step(model, opt, seed)
    resumed = tiny_moe("mixtral").double()
    resumed.load_state_dict(model.state_dict())
    resumed_opt = GrassAdamW(
        grassify(resumed, rank=3, update_proj_gap=2, selection="multinomial"), lr=1e-2
    )
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for seed in range(3, 6):
        step(model, opt, seed)
        step(resumed, resumed_opt, seed)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_layerwise_updates_of_experts_equal_stepping_after_backward():
    """Layer-wise mode (each weight updated in the backward once its gradient is complete,
    here with 2 micro-batches a window) matches ordinary steps on a MoE model."""
    from hf_grass import enable_layerwise

    reference = tiny_moe("gpt_oss").double()
    model = copy.deepcopy(reference)
    ref_opt = GrassAdamW(grassify(reference, rank=3, update_proj_gap=2), lr=1e-2)
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=2), lr=1e-2)
    enable_layerwise(opt, model, gradient_accumulation_steps=2)
    for step in range(3):
        for micro in range(2):
            ids = _batch(10 * step + micro, tokens=4)
            _loss(reference, ids).backward()
            _loss(model, ids).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
        for p, q in zip(reference.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "impl",
    [dict(foreach=False), dict(foreach=True, batched=False), dict(foreach=True, batched=True)],
    ids=["reference", "foreach", "grouped"],
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_stack_of_experts_steps_as_each_expert_alone(impl, weight_decay, dtype):
    """The functional core on an (E, m, k) stack with flat rows (repeats included, as
    ``multinomial`` draws them) gives each expert what the reference gives its matrix alone."""
    from hf_grass.functional import grass_adamw

    g = torch.Generator().manual_seed(0)
    experts, m, k, r = 3, 5, 4, 3
    local_rows = torch.tensor([[0, 0, 3], [1, 2, 4], [2, 2, 2]])
    flat_rows = (local_rows + m * torch.arange(experts)[:, None]).reshape(-1)
    weight = torch.randn(experts, m, k, generator=g).to(dtype)
    rho = torch.rand(experts * r, generator=g) + 0.5
    hp = dict(beta1=0.9, beta2=0.99, lr=0.1, weight_decay=weight_decay, eps=1e-8, scale=0.5)
    stacked = dict(
        param=weight.clone(), m=torch.zeros(experts * r, k, dtype=dtype),
        v=torch.zeros(experts * r, k, dtype=dtype), t=torch.zeros(experts * r),
    )  # fmt: skip
    alone = [
        dict(param=weight[e].clone(), m=torch.zeros(r, k, dtype=dtype),
             v=torch.zeros(r, k, dtype=dtype), t=torch.zeros(r))
        for e in range(experts)
    ]  # fmt: skip
    for _ in range(2):
        grad = torch.randn(experts * r, k, generator=g).to(dtype)
        s = stacked
        grass_adamw([s["param"]], [grad], [s["m"]], [s["v"]], [s["t"]], [flat_rows], [rho],
                    [None], **hp, **impl)  # fmt: skip
        for e, a in enumerate(alone):
            part = slice(e * r, (e + 1) * r)
            grass_adamw([a["param"]], [grad[part]], [a["m"]], [a["v"]], [a["t"]],
                        [local_rows[e]], [rho[part]], [None], **hp, foreach=False)  # fmt: skip
    expected = torch.stack([a["param"] for a in alone])
    assert not torch.equal(expected, weight)
    torch.testing.assert_close(stacked["param"], expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(stacked["m"], torch.cat([a["m"] for a in alone]), rtol=0, atol=0)
