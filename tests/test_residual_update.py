"""residual_update="sign" (every row moving): the selected rows take the rule's step, every other
row a sign-descent step from its full gradient; checked against plain indexing of the dense
gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from hf_grass import GrassAdamW, GrassConfig, grass_param_groups, grassify


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_rows_outside_the_selection_take_a_sign_step_the_selected_ones_adams(side, selection):
    gen = torch.Generator().manual_seed(11)
    m, n, r = 10, 7, 3
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    hyper = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)

    def step(residual_update):
        w = nn.Parameter(w0.clone())
        group = dict(
            params=[w], rank=r, selection=selection, scale=0.5, proj_side=side,
            residual_update=residual_update,
        )  # fmt: skip
        opt = GrassAdamW([group], **hyper)
        w.grad = g.clone()
        opt.step()
        return w.detach(), opt.state[w]["rows"]

    plain, rows = step("none")
    moved, same_rows = step("sign")
    assert torch.equal(rows, same_rows)
    orient = (lambda t: t) if side == "rows" else (lambda t: t.t())
    selected = torch.zeros(orient(w0).shape[0], dtype=torch.bool)
    selected[rows] = True
    # the selected rows: exactly what Grass alone does
    torch.testing.assert_close(orient(moved)[selected], orient(plain)[selected], rtol=0, atol=0)
    # every other row: decayed and moved by lr * scale * sign of its own gradient
    rest = orient(w0)[~selected] * (1 - 1e-2 * 0.1) - 1e-2 * 0.5 * orient(g)[~selected].sign()
    torch.testing.assert_close(orient(moved)[~selected], rest, rtol=0, atol=1e-15)
    assert (orient(plain)[~selected] == orient(w0)[~selected]).all()  # Grass alone leaves them


def test_every_row_of_every_projected_weight_moves_in_a_model():
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = grass_param_groups(model, rank=4, residual_update="sign")
    opt = GrassAdamW(groups, lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in projected]
    assert names  # the attention and MLP matrices
    for name in names:
        changed = (dict(model.named_parameters())[name].detach() != before[name]).any(dim=1)
        assert changed.all(), name  # rows and columns alike: no row left behind


def test_without_the_full_gradient_it_stops_with_one_line():
    model = tiny_llama(num_hidden_layers=1)
    opt = GrassAdamW(grassify(model, rank=4, residual_update="sign"), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="needs the full gradient"):
        opt.step()
    with pytest.raises(ValueError, match="compressed_backward=False"):
        GrassConfig(residual_update="sign")
    assert GrassConfig(residual_update="sign", compressed_backward=False).residual_update == "sign"


def test_the_trainer_arguments_refuse_it_with_the_compressed_backward(tmp_path):
    from hf_grass.trainer import GrassTrainingArguments

    with pytest.raises(ValueError, match="--grass_compressed_backward false"):
        GrassTrainingArguments(
            output_dir=str(tmp_path), optim="grass", grass_residual_update="sign"
        )
    args = GrassTrainingArguments(
        output_dir=str(tmp_path), optim="grass", grass_residual_update="sign",
        grass_compressed_backward=False,
    )  # fmt: skip
    assert args.grass_config().group_options()["residual_update"] == "sign"
