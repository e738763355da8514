"""GPT-2's ``Conv1D`` (a linear layer with its weight stored transposed) is projected like
``nn.Linear``: references are plain indexing of the dense float64 gradient and torch's AdamW."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_gradients_match_dense, tiny_gpt2
from transformers.pytorch_utils import Conv1D

from hf_grass import GrassAdamW, grass_param_groups, grassify, projection_of, ungrassify
from hf_grass.conv1d import GrassConv1D

CONV1D = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _loss(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_all_linear_projects_every_conv1d_and_leaves_the_head_out():
    model = tiny_gpt2().double()
    groups = grassify(model, rank=4)
    grassified = sorted(n for n, m in model.named_modules() if isinstance(m, GrassConv1D))
    assert grassified == sorted(f"transformer.h.{i}.{name}" for i in range(2) for name in CONV1D)
    projected = {id(p) for g in groups if "rank" in g for p in g["params"]}
    assert projected == {id(model.get_submodule(n).weight) for n in grassified}


@pytest.mark.parametrize("proj_side", ["rows", "cols"])
@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_compressed_conv1d_gradient_is_rho_times_rows_of_the_dense_gradient(proj_side, selection):
    """Each weight's compressed gradient equals ``rho * G[rows]`` of the dense float64 gradient
    of an untouched copy (``G`` in the stored (in, out) layout), on the selection step and on
    ordinary ones (where a rows-side Conv1D keeps only the selected input columns)."""
    reference = tiny_gpt2().double()
    model = copy.deepcopy(reference)
    opt = GrassAdamW(
        grassify(model, rank=5, update_proj_gap=3, selection=selection, proj_side=proj_side),
        lr=1e-2,
    )
    for step in range(4):  # selection at steps 0 and 3
        reference.load_state_dict(model.state_dict())
        ids = _batch(step)
        _loss(reference, ids).backward()
        _loss(model, ids).backward()
        assert len(assert_gradients_match_dense(model, reference, proj_side)) == 8
        opt.step()
        opt.zero_grad()
        reference.zero_grad()


def test_full_rank_top_r_grass_on_conv1d_equals_torch_adamw():
    """Every row selected, scale 1: each step is AdamW's (moments kept across re-selections).
    With ``n_inner=32`` every Conv1D weight has 32 input rows."""
    reference = tiny_gpt2(n_inner=32).double()
    model = copy.deepcopy(reference)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    groups = grassify(model, rank=32, update_proj_gap=2, proj_side="rows")
    opt = GrassAdamW(groups, lr=1e-2)
    for step in range(4):
        for m, o in ((reference, ref_opt), (model, opt)):
            _loss(m, _batch(step)).backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-10, msg=name)


def test_grassified_gpt2_trains_as_grass_adamw_on_full_gradients():
    """The compressed backward and the optimizer-side projection of full ``.grad`` agree."""
    reference = tiny_gpt2().double()
    model = copy.deepcopy(reference)
    options = dict(rank=4, update_proj_gap=2, selection="multinomial", seed=1)
    ref_opt = GrassAdamW(grass_param_groups(reference, **options), lr=1e-2)
    opt = GrassAdamW(grassify(model, **options), lr=1e-2)
    for step in range(5):
        for m, o in ((reference, ref_opt), (model, opt)):
            _loss(m, _batch(step)).backward()
            o.step()
            o.zero_grad()
    for p, q in zip(reference.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-12)


def test_ungrassify_restores_conv1d_with_the_same_parameters_and_outputs():
    model = tiny_gpt2().double()
    ids = _batch(0)
    before = model(input_ids=ids).logits
    params = dict(model.named_parameters())
    GrassAdamW(grassify(model, rank=4), lr=1e-3)
    assert torch.equal(model(input_ids=ids).logits, before)
    ungrassify(model)
    assert not any(isinstance(m, GrassConv1D) for m in model.modules())
    assert sum(type(m) is Conv1D for m in model.modules()) == 2 * len(CONV1D)
    assert all(params[n] is p for n, p in model.named_parameters())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_ordinary_steps_keep_only_the_selected_inputs_of_a_rows_side_conv1d():
    """A Conv1D weight's rows are its inputs: on ordinary steps a rows-side layer saves
    ``X[:, rows]`` (r of n columns) for its backward, a cols-side one (outputs) keeps X."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(Conv1D(40, 12), Conv1D(6, 40)).double()  # (12, 40), (40, 6)
    opt = GrassAdamW(grassify(model, rank=3, update_proj_gap=2), lr=1e-2)
    assert [projection_of(m.weight).side for m in model] == ["cols", "rows"]
    seen = {}

    def record(module, args, out):
        seen[module] = (args[0], out.grad_fn.saved_tensors[0])

    hooks = [m.register_forward_hook(record) for m in model]
    for step in range(4):  # selections at steps 0 and 2
        loss = model(torch.randn(4, 7, 12, dtype=torch.float64)).square().sum()
        for layer in model:
            x, kept = seen[layer]
            projection = projection_of(layer.weight)
            if projection.side == "rows" and step % 2 == 1:
                assert kept.shape == (4, 7, 3) and torch.equal(kept, x[..., projection.rows])
            else:
                assert kept is x
        loss.backward()
        opt.step()
        opt.zero_grad()
    for hook in hooks:
        hook.remove()
