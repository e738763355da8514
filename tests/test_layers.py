"""A new layer type, added from this file alone through ``hf_grass.register_layer``: target
matching, grassify, the compressed gradient (plain indexing of a dense float64 gradient), the
update (torch's AdamW at full rank), the coverage count and ungrassify all find it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_gradients_match_dense
from torch import nn

from hf_grass import (
    LAYER_TYPES,
    GrassAdamW,
    LayerType,
    grass_linear,
    grassify,
    match_target_modules,
    projection_of,
    register_layer,
    ungrassify,
)
from hf_grass.layers import layer_type_of, replaces
from hf_grass.targets import unprojectable_problem


class ScaledProjection(nn.Module):
    """``y = 2 x Wᵀ``: a layer that is not an ``nn.Linear`` (a user's own module)."""

    def __init__(self, n: int, m: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(m, n) / n**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x @ self.weight.T


class GrassScaledProjection(ScaledProjection):
    """Its Grass form: the same product through ``grass_linear``, whose backward delivers the
    compressed weight gradient."""

    grass_base = ScaledProjection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grass_linear(2 * x, self.weight, None)


@pytest.fixture
def scaled_layer_type():
    layer_type = register_layer(
        LayerType(
            "scaled_projection",
            kind=lambda module: isinstance(module, ScaledProjection),
            grass_class=replaces(GrassScaledProjection),
            description="ScaledProjection",
        )
    )
    yield layer_type
    del LAYER_TYPES[layer_type.name]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = ScaledProjection(6, 10)
        self.down = ScaledProjection(10, 6)
        self.score = nn.Linear(6, 3)  # a head: left dense by "all-linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(torch.tanh(self.down(torch.tanh(self.up(x)))))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    return model(x).square().mean()


def test_an_unregistered_layer_is_not_projected_and_is_counted_as_such():
    torch.manual_seed(0)
    model = Net()
    assert layer_type_of(model.up) is None
    with pytest.raises(ValueError, match="matches no module"):
        match_target_modules(model, "all-linear")  # only the head is a linear layer
    assert "ScaledProjection" in unprojectable_problem(model)


def test_a_registered_layer_type_is_matched_grassified_and_undone(scaled_layer_type):
    torch.manual_seed(0)
    model = Net()
    assert layer_type_of(model.up) is scaled_layer_type
    assert match_target_modules(model, "all-linear") == ["up", "down"]
    assert unprojectable_problem(model) is None
    groups = grassify(model, rank=3)
    assert type(model.up) is GrassScaledProjection and type(model.down) is GrassScaledProjection
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    assert projected == {id(model.up.weight), id(model.down.weight)}
    ungrassify(model)
    assert type(model.up) is ScaledProjection and type(model.score) is nn.Linear


@pytest.mark.parametrize("proj_side", ["rows", "cols"])
def test_its_compressed_gradient_is_rho_times_rows_of_the_dense_gradient(
    scaled_layer_type, proj_side
):
    torch.manual_seed(0)
    reference = Net().double()
    model = copy.deepcopy(reference)
    groups = grassify(
        model, rank=3, update_proj_gap=2, selection="multinomial", proj_side=proj_side
    )
    opt = GrassAdamW(groups, lr=1e-2)
    for step in range(3):  # selections at steps 0 and 2
        reference.load_state_dict(model.state_dict())
        _loss(reference, step).backward()
        _loss(model, step).backward()
        assert len(assert_gradients_match_dense(model, reference, proj_side)) == 2
        assert projection_of(model.up.weight) is not None
        opt.step()
        opt.zero_grad()
        reference.zero_grad()


def test_at_full_rank_it_trains_as_torch_adamw(scaled_layer_type):
    torch.manual_seed(0)
    reference = Net().double()
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    opt = GrassAdamW(grassify(model, rank=10, update_proj_gap=2), lr=1e-2)  # every row
    for step in range(4):
        for m, o in ((reference, ref_opt), (model, opt)):
            _loss(m, step).backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10, msg=name)
