"""Row selection (hf_grass.selection): which rows each strategy picks, and its unbiasedness."""

import math
import warnings

import pytest
import torch

from hf_grass import SELECTIONS, select_rows
from hf_grass.selection import Selection, register_selection

SAMPLED = ("multinomial", "multinomial_nr", "uniform")


def _projected(g: torch.Tensor, rows: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """P Pᵀ G for the sparse projection P[rows[j], j] = rho[j] (a row drawn twice adds twice)."""
    rho = rho.to(g.dtype)
    return torch.zeros_like(g).index_add_(0, rows, rho[:, None] ** 2 * g[rows])


@pytest.mark.parametrize("selection", SELECTIONS)
def test_selection_returns_sorted_int64_rows_and_float32_scales(selection):
    gen = torch.Generator().manual_seed(1)
    norms = torch.rand(50, generator=gen, dtype=torch.float64) + 0.1
    rows, rho = select_rows(norms, 7, selection, torch.Generator().manual_seed(2))
    assert rows.dtype == torch.int64 and rows.shape == (7,)
    assert rho.dtype == torch.float32 and rho.shape == (7,)
    assert torch.equal(rows, rows.sort().values)
    assert int(rows.min()) >= 0 and int(rows.max()) < 50
    assert bool((rho > 0).all())


def test_top_r_picks_the_largest_norm_rows():
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        m = int(torch.randint(5, 200, (), generator=gen))
        r = int(torch.randint(1, m + 1, (), generator=gen))
        norms = torch.rand(m, generator=gen, dtype=torch.float64)  # distinct with probability 1
        rows, rho = select_rows(norms, r, "top_r")
        expected = torch.topk(norms, r).indices.sort().values
        assert torch.equal(rows, expected)
        assert torch.equal(rho, torch.ones(r))
        # every selected norm is at least every rejected norm
        rejected = torch.ones(m, dtype=torch.bool)
        rejected[rows] = False
        if rejected.any():
            assert norms[rows].min() >= norms[rejected].max()


def test_top_r_with_full_rank_selects_every_row_once():
    norms = torch.rand(13, generator=torch.Generator().manual_seed(4))
    rows, rho = select_rows(norms, 13, "top_r")
    assert torch.equal(rows, torch.arange(13))
    assert torch.equal(rho, torch.ones(13))


def test_uniform_has_distinct_rows_and_scale_sqrt_m_over_r():
    gen = torch.Generator().manual_seed(5)
    norms = torch.rand(40, dtype=torch.float64)
    for _ in range(50):
        rows, rho = select_rows(norms, 9, "uniform", gen)
        assert rows.unique().numel() == 9
        torch.testing.assert_close(rho, torch.full((9,), math.sqrt(40 / 9), dtype=torch.float32))


def test_multinomial_scale_is_one_over_sqrt_r_q():
    gen = torch.Generator().manual_seed(6)
    norms = torch.rand(30, generator=gen, dtype=torch.float64) + 0.05
    q = norms / norms.sum()
    rows, rho = select_rows(norms, 8, "multinomial", gen)
    torch.testing.assert_close(rho.double(), (8 * q[rows]).rsqrt(), rtol=1e-6, atol=0)


def test_multinomial_nr_draws_distinct_rows_with_scale_one():
    gen = torch.Generator().manual_seed(7)
    for _ in range(100):
        m = int(torch.randint(2, 60, (), generator=gen))
        r = int(torch.randint(1, m + 1, (), generator=gen))
        norms = torch.rand(m, generator=gen, dtype=torch.float64) ** 4  # skewed
        rows, rho = select_rows(norms, r, "multinomial_nr", gen)
        assert rows.unique().numel() == r
        assert torch.equal(rho, torch.ones(r))


def test_multinomial_nr_with_fewer_nonzero_rows_than_rank_still_draws_distinct_rows():
    norms = torch.zeros(10, dtype=torch.float64)
    norms[[2, 7]] = torch.tensor([1.0, 3.0], dtype=torch.float64)
    rows, _ = select_rows(norms, 6, "multinomial_nr", torch.Generator().manual_seed(8))
    assert rows.unique().numel() == 6
    assert {2, 7} <= set(rows.tolist())  # the rows with signal are always taken first


def test_multinomial_nr_prefers_large_norm_rows():
    gen = torch.Generator().manual_seed(9)
    norms = torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    hits = sum(0 in select_rows(norms, 2, "multinomial_nr", gen)[0].tolist() for _ in range(200))
    assert hits >= 190  # P(row 0 left out) = P(neither draw) < 0.01


def test_multinomial_repeats_a_dominant_row():
    norms = torch.tensor([1e6, 1e-6, 1e-6, 1e-6], dtype=torch.float64)
    rows, rho = select_rows(norms, 3, "multinomial", torch.Generator().manual_seed(10))
    assert rows.tolist() == [0, 0, 0]
    torch.testing.assert_close(
        rho.double(), torch.full((3,), float(3 * 1e6 / norms.sum()) ** -0.5, dtype=torch.float64)
    )


@pytest.mark.parametrize("selection", ["multinomial", "uniform"])
def test_sampled_selection_is_unbiased(selection):
    """Monte Carlo mean of P Pᵀ G over N draws is within 5 standard errors of G, entrywise.

    The standard error of each entry is estimated from the samples (std / sqrt(N)); with a fixed
    seed and 5 SE per entry a false failure has probability well below 1e-4 over all entries.
    """
    gen = torch.Generator().manual_seed(11)
    m, n, r, draws = 12, 5, 4, 2500
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g[3] *= 5.0  # uneven row norms so that multinomial probabilities differ
    g[7] *= 0.1
    norms = g.norm(dim=1)
    samples = torch.stack(
        [_projected(g, *select_rows(norms, r, selection, gen)) for _ in range(draws)]
    )
    mean = samples.mean(0)
    standard_error = samples.std(0) / math.sqrt(draws)
    assert bool((standard_error > 0).all())  # every row is sometimes left out: the test has power
    assert bool(((mean - g).abs() <= 5 * standard_error + 1e-12).all()), (mean - g).abs().max()


@pytest.mark.parametrize("selection", ["multinomial", "uniform"])
def test_sampled_selection_inclusion_weights_average_to_one(selection):
    """E[sum_j rho_j² 1{rows_j = i}] = 1 for every row i: E[P Pᵀ] = I (chi-square over rows)."""
    gen = torch.Generator().manual_seed(12)
    m, r, draws = 20, 5, 2500
    norms = torch.rand(m, generator=gen, dtype=torch.float64) + 0.2
    weights = torch.zeros(draws, m, dtype=torch.float64)
    for d in range(draws):
        rows, rho = select_rows(norms, r, selection, gen)
        weights[d].index_add_(0, rows, rho.double() ** 2)
    mean, var = weights.mean(0), weights.var(0)
    chi2 = float(((mean - 1) ** 2 / (var / draws)).sum())
    # chi-square with m = 20 degrees of freedom: P(chi2 > 50) < 2e-4
    assert chi2 < 50, chi2


def test_sampling_is_reproducible_from_the_generator_seed():
    norms = torch.rand(64, dtype=torch.float64)
    for selection in SAMPLED:
        a = select_rows(norms, 10, selection, torch.Generator().manual_seed(13))
        b = select_rows(norms, 10, selection, torch.Generator().manual_seed(13))
        c = select_rows(norms, 10, selection, torch.Generator().manual_seed(14))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("bad", [torch.zeros(16), torch.full((16,), float("nan"))])
@pytest.mark.parametrize("selection", SELECTIONS)
def test_zero_or_nonfinite_norms_fall_back_to_uniform_rows_with_a_warning(
    bad, selection, fresh_warning
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows, rho = select_rows(bad, 4, selection, torch.Generator().manual_seed(15))
    if selection != "uniform":
        assert any(issubclass(w.category, RuntimeWarning) for w in caught)
    assert rows.unique().numel() == 4  # uniform: distinct rows
    # The method keeps its own scale convention: 1 for top_r / multinomial_nr, sqrt(m / r) else.
    expected = 1.0 if selection in ("top_r", "multinomial_nr") else 2.0  # sqrt(16 / 4)
    torch.testing.assert_close(rho, torch.full((4,), expected))


def test_a_single_infinite_norm_falls_back_to_uniform(fresh_warning):
    norms = torch.rand(16)
    norms[5] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        rows, _ = select_rows(norms, 4, "top_r", torch.Generator().manual_seed(16))
    assert rows.unique().numel() == 4


def test_unknown_selection_raises_naming_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'topr'.*top_r, multinomial, multinomial_nr, uniform"):
        select_rows(torch.rand(8), 2, "topr")


@pytest.mark.parametrize("rank", [0, -1, 9])
def test_rank_outside_one_to_m_raises(rank):
    with pytest.raises(ValueError, match=rf"rank {rank}.*1 <= rank <= 8"):
        select_rows(torch.rand(8), rank, "top_r")


# ---- a selection rule of one's own: this file is all it takes -----------------------------------


class BottomR(Selection):
    """The r smallest row norms (an example, not a good idea), rho = 1."""

    name = "bottom_r_example"

    def choose(self, norms, rank, generator):
        return torch.topk(norms, rank, largest=False).indices, torch.ones(rank, dtype=torch.float64)


def test_a_registered_selection_reaches_the_config_and_the_optimizer():
    from torch import nn

    from hf_grass import GrassAdamW, GrassConfig

    register_selection(BottomR())
    try:
        assert GrassConfig(selection="bottom_r_example").selection == "bottom_r_example"
        g = torch.randn(9, 4, generator=torch.Generator().manual_seed(3))
        w = nn.Parameter(torch.zeros(9, 4))
        opt = GrassAdamW([dict(params=[w], rank=3, selection="bottom_r_example", proj_side="rows")])
        w.grad = g.clone()
        opt.step()
        expected = g.norm(dim=1).argsort()[:3].sort().values  # plain indexing of the gradient
        assert torch.equal(opt.state[w]["rows"], expected)
        assert w.detach()[expected].abs().sum() > 0 and (w.detach().abs().sum(1) > 0).sum() == 3
    finally:
        del SELECTIONS["bottom_r_example"]
    with pytest.raises(ValueError, match="selection='bottom_r_example': use one of top_r"):
        GrassConfig(selection="bottom_r_example")
