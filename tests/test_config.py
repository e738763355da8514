"""GrassConfig is the one home of the settings; the functional core's two paths agree."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from conftest import functional_problem
from torch import nn

from hf_grass import GrassAdamW, GrassConfig, grass_param_groups
from hf_grass.config import FIXED_ON_RESUME, group_defaults
from hf_grass.functional import grass_adamw, remap_state, unique_rows
from hf_grass.optim import validate_param_groups
from hf_grass.trainer import GrassArguments, GrassTrainingArguments

# ---- GrassConfig and what derives from it --------------------------------------------------------


def test_every_setting_has_a_grass_argument_with_its_default_and_help():
    arguments = {f.name: f for f in dataclasses.fields(GrassArguments)}
    for f in dataclasses.fields(GrassConfig):
        arg = arguments[f"grass_{f.name}"]
        # the argument repeats the setting's help whole; seed and target_modules add how an
        # unset value resolves
        assert arg.metadata["help"].startswith(f.metadata["help"]), f.name
        if f.name not in ("target_modules", "seed"):  # unset: resolved from other flags
            assert arg.default == f.default, f.name
    seed = arguments["grass_seed"]
    assert seed.default is None and seed.metadata["help"].endswith("Unset: --seed.")


def test_arguments_give_the_config_and_the_optimizer_groups(tmp_path):
    args = GrassTrainingArguments(
        str(tmp_path), optim="grass", grass_rank=3, grass_update_proj_gap=7, seed=11,
        grass_selection="uniform", grass_target_modules="q_proj,v_proj", use_cpu=True,
    )  # fmt: skip
    config = args.grass_config()
    assert config == GrassConfig(
        rank=3, update_proj_gap=7, selection="uniform", seed=11, target_modules=["q_proj", "v_proj"]
    )
    assert config.group_options() == {**group_defaults(), "rank": 3, "update_proj_gap": 7,
                                      "selection": "uniform", "seed": 11}  # fmt: skip
    assert set(config.fingerprint()) == set(FIXED_ON_RESUME)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("rank", 0, r"Invalid rank=0: use an integer rank >= 1"),
        ("update_proj_gap", 1.5, r"Invalid update_proj_gap=1.5"),
        ("scale", -1.0, r"Invalid scale=-1.0: use a positive number"),
        ("selection", "best", r"Invalid selection='best': use one of top_r"),
        ("state_dtype", "int8", r"Invalid state_dtype='int8'"),
        ("target_modules", [], r"Invalid target_modules: empty"),
    ],
)
def test_config_rejects_bad_values_naming_the_fix(field, value, match):
    with pytest.raises(ValueError, match=match):
        GrassConfig(**{field: value})


def test_the_same_check_guards_the_arguments_and_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match=r"Invalid grass_update_proj_gap=0: use an integer >= 1"):
        GrassTrainingArguments(str(tmp_path), optim="grass", grass_update_proj_gap=0)
    p = nn.Parameter(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"Invalid update_proj_gap=0: use an integer >= 1"):
        GrassAdamW([{"params": [p], "rank": 2, "update_proj_gap": 0}])
    with pytest.raises(ValueError, match=r"rank 5 is larger"):
        validate_param_groups([{"params": [p], "rank": 5}])


def test_building_an_optimizer_leaves_parameters_untouched():
    model = nn.Linear(6, 8)
    before = {n: dict(vars(p)) for n, p in model.named_parameters()}
    opt = GrassAdamW(grass_param_groups(model, rank=2, target_modules="all-linear"))
    assert opt.projection(model.weight) is not None
    assert {n: dict(vars(p)) for n, p in model.named_parameters()} == before


# ---- torch.optim hygiene ----------------------------------------------------------------------------


def test_load_hooks_see_the_real_state_and_old_groups_get_new_defaults():
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(8, 4, generator=gen))
    opt = GrassAdamW([{"params": [p], "rank": 2}])
    p.grad = torch.randn(8, 4, generator=gen)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:  # a checkpoint from before these keys existed
        del group["implementation"], group["reselect_state"]
    seen = []
    fresh = GrassAdamW([{"params": [nn.Parameter(p.detach().clone())], "rank": 2}])
    fresh.register_load_state_dict_pre_hook(lambda o, sd: seen.append(len(sd["state"])))
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert seen == [1]
    group = fresh.param_groups[0]
    assert group["implementation"] == "grouped" and group["reselect_state"] == "keep"


# ---- the functional core: reference and batched paths agree ---------------------------------------


def _problem(dtype, state_dtype, repeats, gen):
    """Three weights (one dense), their compressed gradients, moments and selections."""
    return functional_problem(dtype, state_dtype, repeats, gen, shapes=((10, 6, 4), (7, 9, 3)))


@pytest.mark.parametrize("repeats", [False, True])
@pytest.mark.parametrize(
    "dtype,state_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                          (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_single_tensor_and_foreach_paths_agree(dtype, state_dtype, repeats, weight_decay):
    results = []
    for foreach in (False, True):
        gen = torch.Generator().manual_seed(5)
        params, grads, ms, vs, steps, rows, rhos = _problem(dtype, state_dtype, repeats, gen)
        uniques = [None if r is None else unique_rows(r) for r in rows]
        grass_adamw(
            params, grads, ms, vs, steps, rows, rhos, uniques, beta1=0.9, beta2=0.99, lr=1e-2,
            weight_decay=weight_decay, eps=1e-8, scale=0.7, foreach=foreach,
        )  # fmt: skip
        results.append(params + ms + vs + steps)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_core_step_matches_the_formula_in_float64():
    gen = torch.Generator().manual_seed(6)
    params, grads, ms, vs, steps, rows, rhos = _problem(torch.float64, torch.float64, True, gen)
    w0, m0, v0, t0 = params[0].clone(), ms[0].clone(), vs[0].clone(), steps[0].clone()
    grass_adamw(
        params, grads, ms, vs, steps, rows, rhos, [None] * 3, beta1=0.9, beta2=0.99, lr=1e-2,
        weight_decay=0.0, eps=1e-8, scale=0.7,
    )  # fmt: skip
    m = 0.9 * m0 + 0.1 * grads[0]
    v = 0.99 * v0 + 0.01 * grads[0] ** 2
    t = (t0.double() + 1)[:, None]
    direction = (m / (1 - 0.9**t)) / ((v / (1 - 0.99**t)).sqrt() + 1e-8)
    expected = w0.clone()
    for j, row in enumerate(rows[0].tolist()):  # a row drawn twice gets both updates
        expected[row] -= rhos[0][j].double() * (-1e-2 * 0.7) * -direction[j]
    torch.testing.assert_close(params[0], expected, rtol=0, atol=1e-14)


def test_remap_state_keeps_rows_selected_twice():
    state = {
        "rows": torch.tensor([1, 3, 5]),
        "exp_avg": torch.tensor([[1.0], [3.0], [5.0]]),
        "exp_avg_sq": torch.tensor([[10.0], [30.0], [50.0]]),
        "row_step": torch.tensor([4.0, 4.0, 2.0]),
    }
    moments = ("exp_avg", "exp_avg_sq")
    remap_state(state, torch.tensor([0, 3, 5]), moments, (3, 1), torch.float32, keep=True)
    assert state["exp_avg"].flatten().tolist() == [0.0, 3.0, 5.0]
    assert state["exp_avg_sq"].flatten().tolist() == [0.0, 30.0, 50.0]
    assert state["row_step"].tolist() == [0.0, 4.0, 2.0]
    remap_state(state, torch.tensor([0, 3, 5]), moments, (3, 1), torch.float32, keep=False)
    assert state["exp_avg"].abs().sum() == 0 and state["row_step"].sum() == 0


@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_optimizer_reference_and_foreach_paths_train_identically(selection):
    results = []
    for foreach in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()
        groups = grass_param_groups(model, rank=3, target_modules=["0", "2"], update_proj_gap=2,
                                    selection=selection, weight_decay=0.1)  # fmt: skip
        opt = GrassAdamW(groups, lr=1e-2, weight_decay=0.1, foreach=foreach)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
