"""State formats (hf_grass.state): the built-in ones, and a format of one's own added in this file
alone (row-wise 8-bit codes with a per-row scale), carried across re-selections and checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from hf_grass import GrassAdamW, GrassConfig, GrassOptimizer
from hf_grass.state import STATE_FORMATS, StateFormat, register_state_format


class RowwiseInt8(StateFormat):
    """A toy format: int8 codes and a float32 absmax scale per row (rows first in both)."""

    name = "rowwise_int8_example"

    def stored_keys(self, key):
        return (key, f"{key}_scale")

    def zeros(self, key, shape, dtype, device, like=None):
        return {
            key: torch.zeros(shape, dtype=torch.int8, device=device),
            f"{key}_scale": torch.zeros(shape[:-1], dtype=torch.float32, device=device),
        }

    def load(self, state, key, dtype):
        return state[key].to(dtype) * (state[f"{key}_scale"].to(dtype)[..., None] / 127)

    def store(self, state, key, value):
        scale = value.abs().amax(dim=-1)
        state[f"{key}_scale"].copy_(scale)
        codes = (value / scale.clamp_min(1e-30)[..., None] * 127).round()
        state[key].copy_(codes.to(torch.int8))

    def saved_dtype(self, key, moments_dtype):
        return None  # as saved: int8 codes, float32 scales

    def element_bytes(self, dtype_bytes, k):
        return 1 + 4 / k


def quantized(x):
    scale = x.abs().amax(dim=-1, keepdim=True)
    return (x / scale.clamp_min(1e-30) * 127).round() * (scale / 127)


@pytest.fixture
def toy_format():
    register_state_format(RowwiseInt8())
    yield "rowwise_int8_example"
    del STATE_FORMATS["rowwise_int8_example"]


def test_a_format_of_ones_own_stores_codes_and_steps_as_its_dequantized_reference(toy_format):
    """Lion on the selected rows with its momentum kept as int8 codes: each step equals a float64
    Lion whose momentum is rounded to the same codes after every update."""
    gen = torch.Generator().manual_seed(8)
    m, n, r = 10, 6, 4
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(5)]
    w = nn.Parameter(w0.clone())
    group = dict(params=[w], rank=r, update_proj_gap=100, proj_side="rows")
    opt = GrassOptimizer(
        [group], update_rule="lion", state_format=toy_format, lr=1e-2, betas=(0.9, 0.99)
    )
    expected, momentum = w0.clone(), torch.zeros(r, n, dtype=torch.float64)
    for g in grads:
        w.grad = g.clone()
        opt.step()
        rows = opt.state[w]["rows"]  # top_r at step 0, kept (K = 100)
        c = g[rows]
        expected[rows] -= 1e-2 * (0.9 * momentum + 0.1 * c).sign()
        momentum = quantized(0.99 * momentum + 0.01 * c)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-14)
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.int8 and state["exp_avg"].shape == (r, n)
    assert state["exp_avg_scale"].shape == (r,)
    stored = state["exp_avg"].double() * state["exp_avg_scale"].double()[:, None] / 127
    torch.testing.assert_close(stored, momentum, rtol=1e-6, atol=1e-9)


def test_a_format_of_ones_own_is_carried_across_reselections_and_checkpoints(toy_format):
    gen = torch.Generator().manual_seed(9)
    m, n, r = 8, 5, 5
    w = nn.Parameter(torch.randn(m, n, generator=gen))
    settings = dict(rank=r, update_proj_gap=2, selection="multinomial_nr")
    opt = GrassAdamW([dict(settings, params=[w])], state_format=toy_format, lr=1e-2)
    grads = [torch.randn(m, n, generator=gen) for _ in range(6)]
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    before = {k: v.clone() for k, v in opt.state[w].items() if isinstance(v, torch.Tensor)}
    w.grad = grads[2].clone()
    opt.step()  # a re-selection: rows kept keep their codes and scales before this step's update
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    rows = opt.state[w]["rows"].tolist()
    kept = [row for row in rows if row in before["rows"].tolist()]
    assert kept and len(kept) < len(rows)
    assert opt.state[w]["exp_avg_sq"].dtype == torch.int8
    w2 = nn.Parameter(w.detach().clone())
    resumed = GrassAdamW([dict(settings, params=[w2])], state_format=toy_format, lr=1e-2)
    resumed.load_state_dict(saved)
    for key in ("exp_avg", "exp_avg_scale", "exp_avg_sq", "exp_avg_sq_scale"):
        assert resumed.state[w2][key].dtype == opt.state[w][key].dtype, key
    for g in grads[3:]:
        w.grad, w2.grad = g.clone(), g.clone()
        opt.step()
        resumed.step()
    torch.testing.assert_close(w2, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="state_format: checkpoint"):
        GrassAdamW([dict(settings, params=[w2])], lr=1e-2).load_state_dict(saved)


def test_stochastic_bf16_state_is_unbiased_where_round_to_nearest_loses_the_increment():
    """Adding an increment below bfloat16's resolution to a stored value: rounded to nearest it
    vanishes every time; stored stochastically it survives on average."""
    fmt = STATE_FORMATS["stochastic_bf16"]
    torch.manual_seed(0)
    base, increment, n = 1.0, 2.0**-12, 20_000  # bf16's spacing at 1.0 is 2^-7
    state = fmt.zeros("v", (n,), torch.float32, "cpu")
    state["v"].fill_(base)
    fmt.store(state, "v", fmt.load(state, "v", torch.float32) + increment)
    assert state["v"].dtype == torch.bfloat16
    mean = state["v"].double().mean().item()
    assert abs(mean - (base + increment)) < 4 * 2.0**-7 / n**0.5  # within 4 standard errors
    assert torch.tensor(base + increment).to(torch.bfloat16).item() == base  # nearest: lost


def test_adam_with_stochastic_bf16_state_tracks_float32_adamw():
    gen = torch.Generator().manual_seed(10)
    m, n = 16, 12
    w0 = torch.randn(m, n, generator=gen)
    p, q = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    grass = GrassAdamW([dict(params=[p], rank=m)], state_format="stochastic_bf16", lr=1e-2)
    adamw = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.0)
    for _ in range(30):
        g = torch.randn(m, n, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        grass.step()
        adamw.step()
    assert grass.state[p]["exp_avg"].dtype == torch.bfloat16
    moved = (q.detach() - w0).abs().mean()
    assert (p.detach() - q.detach()).abs().mean() < 0.05 * moved


def test_the_format_setting_reaches_the_trainer_arguments(tmp_path):
    from hf_grass.trainer import GrassTrainingArguments

    assert GrassConfig(state_format="stochastic_bf16").state_format == "stochastic_bf16"
    args = GrassTrainingArguments(
        output_dir=str(tmp_path), optim="grass", grass_state_format="stochastic_bf16"
    )
    assert args.grass_optimizer_kwargs()["state_format"] == "stochastic_bf16"
    with pytest.raises(ValueError, match="grass_state_format='int4'"):
        GrassTrainingArguments(output_dir=str(tmp_path), optim="grass", grass_state_format="int4")


def test_remapping_carries_every_stored_tensor_of_a_format_row_by_row(toy_format):
    from hf_grass.functional import remap_state
    from hf_grass.state import state_format_of

    fmt = state_format_of(toy_format)
    gen = torch.Generator().manual_seed(12)
    old_rows, new_rows = torch.tensor([1, 4, 6]), torch.tensor([0, 4, 6, 7])
    state = {"rows": old_rows, "row_step": torch.tensor([3.0, 5.0, 7.0])}
    state |= {
        "exp_avg": torch.randint(-127, 128, (3, 5), generator=gen, dtype=torch.int8),
        "exp_avg_scale": torch.rand(3, generator=gen),
    }
    old = {k: v.clone() for k, v in state.items()}
    remap_state(state, new_rows, ("exp_avg",), (4, 5), torch.float32, True, fmt)
    for new_pos, old_pos in ((1, 1), (2, 2)):  # rows 4 and 6, selected both times
        assert torch.equal(state["exp_avg"][new_pos], old["exp_avg"][old_pos])
        assert state["exp_avg_scale"][new_pos] == old["exp_avg_scale"][old_pos]
        assert state["row_step"][new_pos] == old["row_step"][old_pos]
    for new_pos in (0, 3):  # rows 0 and 7: new
        assert not state["exp_avg"][new_pos].any() and state["exp_avg_scale"][new_pos] == 0
    assert state["exp_avg"].dtype == torch.int8
