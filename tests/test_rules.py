"""Update rules (hf_grass.rules): each rule against a plain float64 reference of its base
optimizer, the seam's reference step against Adam's fast ones, state carried across
re-selections, checkpoints, and a rule of one's own added in this file alone."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import functional_problem, tiny_llama
from torch import nn

from hf_grass import (
    RULES,
    GrassAdamW,
    GrassConfig,
    GrassOptimizer,
    UpdateRule,
    grass_param_groups,
    register_rule,
)
from hf_grass.functional import IMPLEMENTATIONS, grass_adamw, unique_rows
from hf_grass.rules import Adam, rule_of


def lion_reference(w, grads, lr, betas, weight_decay):
    """Lion on a dense float64 weight (Chen et al., 2023, Algorithm 2)."""
    w, m = w.clone(), torch.zeros_like(w)
    for g in grads:
        direction = (betas[0] * m + (1 - betas[0]) * g).sign()
        m = betas[1] * m + (1 - betas[1]) * g
        w = w * (1 - lr * weight_decay) - lr * direction
    return w


def sign_reference(w, grads, lr, betas, weight_decay):
    w = w.clone()
    for g in grads:
        w = w * (1 - lr * weight_decay) - lr * g.sign()
    return w


REFERENCES = {"lion": lion_reference, "sign": sign_reference}


@pytest.mark.parametrize("rule", ["lion", "sign"])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_full_rank_rule_equals_its_plain_optimizer(rule, side):
    """rank = m, top_r, scale 1, keep: every row selected every time, so Grass with the rule is
    the plain optimizer, re-selections included (the state is carried row by row)."""
    gen = torch.Generator().manual_seed(3)
    m, n = 10, 6
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    bias0 = torch.randn(m, generator=gen, dtype=torch.float64)
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(12)]
    bias_grads = [torch.randn(m, generator=gen, dtype=torch.float64) for _ in range(12)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    w, bias = nn.Parameter(w0.clone()), nn.Parameter(bias0.clone())
    rank = m if side == "rows" else n
    group = dict(params=[w], rank=rank, update_proj_gap=4, proj_side=side)
    opt = GrassOptimizer([group, {"params": [bias]}], update_rule=rule, **hyper)
    for g, gb in zip(grads, bias_grads, strict=True):
        w.grad, bias.grad = g.clone(), gb.clone()
        opt.step()
    expected = REFERENCES[rule](w0, grads, **hyper)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(bias.detach(), REFERENCES[rule](bias0, bias_grads, **hyper))
    assert set(opt.state[w]) - {"step", "selected_step", "rng", "rows", "rho", "row_step"} == set(
        rule_of(rule).state_keys
    )
    assert (w.detach() - w0).abs().max() > 0.05  # it went somewhere


@pytest.mark.parametrize("rule", ["lion", "sign"])
def test_partial_rank_moves_the_selected_rows_only_by_the_rule(rule):
    """One step at rank r < m: W[rows] = W[rows] (1 - lr wd) - lr scale rho D(rho G[rows]),
    the other rows untouched; D from the reference of the rule on the gathered dense rows."""
    gen = torch.Generator().manual_seed(4)
    m, n, r = 12, 5, 4
    w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    group = dict(params=[w], rank=r, selection="multinomial", scale=0.5, proj_side="rows")
    opt = GrassOptimizer([group], update_rule=rule, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    w.grad = g.clone()
    opt.step()
    rows, rho = opt.state[w]["rows"], opt.state[w]["rho"].double()
    compressed = rho[:, None] * g[rows]
    expected = w0.clone()
    unique, inverse = unique_rows(rows)
    # Lion's first direction is sign((1 - b1) C) = sign(C): both rules start as sign descent.
    update = torch.zeros(unique.numel(), n, dtype=torch.float64).index_add_(
        0, inverse, -1e-2 * 0.5 * rho[:, None] * compressed.sign()
    )
    expected[unique] = expected[unique] * (1 - 1e-2 * 0.1) + update
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-14)
    for key in rule_of(rule).state_keys:
        assert opt.state[w][key].shape == (r, n)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS[:4])
def test_the_seams_reference_step_for_adam_equals_adams_own_steps(implementation):
    """UpdateRule.step (the generic reference: Adam's direction, then the row scatter) and Adam's
    own step through each implementation of functional.grass_adamw give the same weights and
    moments: the seam changes nothing for Adam."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(9, 6, 4), (9, 6, 4), (7, 3, 7)]
    problem = functional_problem(torch.float64, torch.float64, True, gen, shapes)
    params, grads, ms, vs, steps, rows, rhos = problem
    group = dict(
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, scale=0.5,
        stochastic_rounding=False, implementation=implementation,
    )  # fmt: skip
    ours = copy.deepcopy((params, ms, vs, steps))
    states = [{"exp_avg": m, "exp_avg_sq": v} for m, v in zip(ours[1], ours[2], strict=True)]
    nones = [None] * len(params)
    UpdateRule.step(Adam(), ours[0], grads, states, ours[3], rows, rhos, nones, group=group)
    grass_adamw(
        params, grads, ms, vs, steps, rows, rhos, nones, beta1=0.9, beta2=0.95, lr=1e-2,
        weight_decay=0.1, eps=1e-8, scale=0.5, implementation=implementation,
    )  # fmt: skip
    expected = (*params, *ms, *vs, *steps)
    for got, want in zip((*ours[0], *ours[1], *ours[2], *ours[3]), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_lion_momentum_of_rows_selected_twice_is_carried_across_a_reselection():
    """After a re-selection, rows kept keep their momentum and new rows start from zero: the
    saved momentum of a kept row equals a plain Lion momentum over the steps it was selected."""
    gen = torch.Generator().manual_seed(6)
    m, n, r = 8, 4, 6
    w = nn.Parameter(torch.randn(m, n, generator=gen, dtype=torch.float64))
    group = dict(params=[w], rank=r, update_proj_gap=2, proj_side="rows")
    opt = GrassOptimizer([group], update_rule="lion", lr=1e-3, betas=(0.9, 0.99))
    grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    history = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        history.append(opt.state[w]["rows"].clone())
    first, second = set(history[0].tolist()), set(history[2].tolist())
    assert first != second and first & second  # a re-selection that kept some rows
    momentum = dict(zip(history[2].tolist(), opt.state[w]["exp_avg"], strict=True))
    for row in first & second:  # selected at steps 0, 1 and 2: three updates of the momentum
        expected = torch.zeros(n, dtype=torch.float64)
        for g in grads:
            expected = 0.99 * expected + 0.01 * g[row]
        torch.testing.assert_close(momentum[row], expected)
    for row in second - first:  # new at step 2: one update from zero
        torch.testing.assert_close(momentum[row], 0.01 * grads[2][row])


@pytest.mark.parametrize("rule", ["lion", "sign"])
def test_a_checkpoint_of_another_rule_resumes_exactly(rule):
    torch.manual_seed(0)
    model = tiny_llama(num_hidden_layers=1)
    data = [torch.randint(0, 128, (2, 16)) for _ in range(6)]

    def train(model, opt, batches):
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()

    def build(model):
        groups = grass_param_groups(model, rank=4, update_proj_gap=2, selection="multinomial")
        return GrassOptimizer(groups, update_rule=rule, lr=1e-3)

    resumed_model = copy.deepcopy(model)
    opt = build(model)
    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    resumed_model.load_state_dict(model.state_dict())
    buf.seek(0)
    resumed = build(resumed_model)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    train(model, opt, data[3:])
    train(resumed_model, resumed, data[3:])
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_a_checkpoint_of_one_rule_is_refused_by_another():
    w = nn.Parameter(torch.randn(6, 4))
    opt = GrassOptimizer([dict(params=[w], rank=2)], update_rule="lion")
    w.grad = torch.randn(6, 4)
    opt.step()
    other = GrassAdamW([dict(params=[w], rank=2)])
    with pytest.raises(ValueError, match="update_rule: checkpoint 'lion', now 'adam'"):
        other.load_state_dict(opt.state_dict())


# ---- a rule of one's own: this file is all it takes ------------------------------------------


class MomentumSGD(UpdateRule):
    """Heavy-ball momentum on the selected rows: one state tensor, D = b1 m + C."""

    name = "momentum_sgd_example"
    state_keys = ("momentum",)

    def direction(self, grad, state, step, group):
        return state["momentum"].mul_(group["betas"][0]).add_(grad)


def test_a_registered_rule_reaches_the_config_the_trainer_arguments_and_the_optimizer():
    register_rule(MomentumSGD())
    try:
        assert GrassConfig(update_rule="momentum_sgd_example").update_rule in RULES
        gen = torch.Generator().manual_seed(7)
        m, n, r = 9, 5, 3
        w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
        grads = [torch.randn(m, n, generator=gen, dtype=torch.float64) for _ in range(2)]
        w = nn.Parameter(w0.clone())
        group = dict(params=[w], rank=r, update_proj_gap=100, proj_side="rows")
        opt = GrassOptimizer([group], update_rule="momentum_sgd_example", lr=0.1, betas=(0.5, 0))
        for g in grads:
            w.grad = g.clone()
            opt.step()
        rows = opt.state[w]["rows"]  # top_r, chosen at step 0 and kept
        expected = w0.clone()
        expected[rows] -= 0.1 * (grads[0][rows] + (0.5 * grads[0][rows] + grads[1][rows]))
        torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-14)
    finally:
        del RULES["momentum_sgd_example"]
    with pytest.raises(ValueError, match="update_rule='momentum_sgd_example'"):
        GrassConfig(update_rule="momentum_sgd_example")


def test_the_trainer_builds_the_optimizer_of_the_chosen_rule(tmp_path):
    from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

    model = tiny_llama(num_hidden_layers=1)
    args = GrassTrainingArguments(
        output_dir=str(tmp_path), optim="grass", grass_rank=4, grass_update_rule="sign",
        use_cpu=True, report_to="none", learning_rate=1e-3,
    )  # fmt: skip
    trainer = GrassTrainer(model=model, args=args)
    trainer.create_optimizer()
    assert type(trainer.optimizer) is GrassOptimizer
    assert {g["update_rule"] for g in trainer.optimizer.param_groups} == {"sign"}
    with pytest.raises(ValueError, match="grass_update_rule='adamw'"):
        GrassTrainingArguments(output_dir=str(tmp_path), optim="grass", grass_update_rule="adamw")


@pytest.mark.parametrize("rule", ["adam", "lion", "sign"])
def test_the_coverage_line_counts_the_state_the_rule_keeps(rule):
    """The line's state bytes, from shapes before the first step, equal the bytes of the rule's
    state tensors the optimizer holds after one step."""
    from hf_grass.report import _size, coverage_line

    torch.manual_seed(1)
    model = tiny_llama(num_hidden_layers=1)
    groups = grass_param_groups(model, rank=4)
    line = coverage_line(model, groups, update_rule=rule)
    opt = GrassOptimizer(groups, update_rule=rule, lr=1e-3)
    ids = torch.randint(0, 128, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    keys = rule_of(rule).state_keys
    held = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in keys)
    label = "Adam moments" if rule == "adam" else f"{rule} state"
    assert f"{label} {_size(held)} vs" in line, line
