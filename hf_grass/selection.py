"""Row selection: which r slices of a gradient Grass keeps, and with what scale.

A selection is a pair ``(rows, rho)``: ``rows`` holds r indices into the selected dimension of a
gradient ``G`` (m x n after orienting it so that the selected dimension comes first) and ``rho``
their scales. Together they define the sparse projection ``P`` (m x r) with
``P[rows[j], j] = rho[j]``, so the compressed gradient is ``C = Pᵀ G = rho[:, None] * G[rows]``
(r x n) and an update ``U`` (r x n) maps back as ``P U``, a row-wise ``index_add``.

Strategies, from the row norms ``g_i = ||G_i||``:

- ``top_r``: the r largest norms, ``rho = 1``. Deterministic and biased.
- ``multinomial``: r draws *with* replacement, ``q_i = g_i / sum(g)``, ``rho_j = 1 / sqrt(r q_j)``.
  Then ``E[P Pᵀ] = I``, so ``P Pᵀ G`` is an unbiased estimate of ``G``. A row drawn twice appears
  twice in ``rows``; its two contributions add up on the way back.
- ``multinomial_nr``: r distinct rows drawn *without* replacement with probabilities ``q``,
  ``rho = 1``. Unbiased scales would need each row's inclusion probability, which has no closed
  form for successive sampling; since Adam's direction is invariant to a per-row scale of its input
  (up to ``eps``), we keep ``rho = 1``, as ``top_r`` does: a randomised top-r that still explores
  low-norm rows.
- ``uniform``: r distinct rows uniformly at random, ``rho = sqrt(m / r)``. Each row is kept with
  probability r/m, so ``E[P Pᵀ] = I`` exactly.

Rows are returned sorted (with repeats adjacent), so that equal selections compare equal and
moments can be carried across re-selections by index. Each rule is a :class:`Selection`
registered by name in :data:`SELECTIONS`.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import torch

from .registry import Registry


class Selection:
    """A rule choosing ``rank`` rows from a gradient's row norms (see the module docstring)."""

    name: ClassVar[str] = ""
    # False for a rule that ignores the norms (uniform): it needs no fallback when they carry
    # no signal.
    uses_norms: ClassVar[bool] = True

    def choose(
        self, norms: torch.Tensor, rank: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, rho)`` (int64 and float64, r each, any order) from ``norms`` (float64 on
        the CPU, finite with a positive sum when :attr:`uses_norms`)."""
        raise NotImplementedError

    def no_signal_scale(self, m: int, rank: int) -> float:
        """``rho`` of rows drawn uniformly when the norms carry no signal: the rule's own scale
        convention with uniform probabilities."""
        return 1.0


class TopR(Selection):
    name = "top_r"

    def choose(self, norms, rank, generator):
        return torch.topk(norms, rank, sorted=False).indices, torch.ones(rank, dtype=torch.float64)


class Multinomial(Selection):
    name = "multinomial"

    def choose(self, norms, rank, generator):
        q = norms / norms.sum()
        rows = torch.multinomial(q, rank, replacement=True, generator=generator)
        return rows, (rank * q[rows]).rsqrt()

    def no_signal_scale(self, m, rank):
        return math.sqrt(m / rank)


class MultinomialWithoutReplacement(Selection):
    name = "multinomial_nr"

    def choose(self, norms, rank, generator):
        q = norms / norms.sum()
        # multinomial without replacement needs at least `rank` non-zero weights.
        positive = int((q > 0).sum())
        if positive < rank:
            q = q + (q == 0) * (q[q > 0].min() * 1e-6)
        rows = torch.multinomial(q, rank, replacement=False, generator=generator)
        return rows, torch.ones(rank, dtype=torch.float64)


class Uniform(Selection):
    name = "uniform"
    uses_norms = False

    def choose(self, norms, rank, generator):
        m = norms.numel()
        rows = torch.randperm(m, generator=generator)[:rank]
        return rows, torch.full((rank,), math.sqrt(m / rank), dtype=torch.float64)


# The selection rules by name. A new one: a Selection subclass with a name and `choose`, given to
# register_selection; GrassConfig(selection=...) and --grass_selection then take it.
SELECTIONS: Registry[Selection] = Registry("selection")
register_selection = SELECTIONS.register
for _selection in (TopR(), Multinomial(), MultinomialWithoutReplacement(), Uniform()):
    register_selection(_selection)

_warned_fallback = False


def select_rows(
    row_norms: torch.Tensor,
    rank: int,
    selection: str = "top_r",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``rank`` rows from ``row_norms`` (shape (m,)) with the rule ``selection``.

    Returns ``rows`` (int64, shape (r,), sorted) and ``rho`` (float32, shape (r,)), both on the
    device of ``row_norms``. Sampling runs on the CPU with ``generator`` so that it is reproducible
    and device-independent. All-zero or non-finite norms fall back to rows drawn uniformly at
    random (with a warning the first time), scaled by the method's own convention: a gradient with
    no signal gives no reason to prefer any row.
    """
    rule = SELECTIONS.of(selection)
    m = row_norms.numel()
    if not 1 <= rank <= m:
        raise ValueError(f"Invalid rank {rank} for a dimension of size {m}: use 1 <= rank <= {m}.")
    device = row_norms.device
    norms = row_norms.detach().to("cpu", torch.float64)
    if rule.uses_norms and not (torch.isfinite(norms).all() and norms.sum() > 0):
        _warn_fallback(norms)
        rows = torch.randperm(m, generator=generator)[:rank].sort().values
        scale = rule.no_signal_scale(m, rank)
        return rows.to(device), torch.full((rank,), scale, device=device)
    rows, rho = rule.choose(norms, rank, generator)
    order = torch.argsort(rows, stable=True)
    rows, rho = rows[order], rho[order]
    return rows.to(device), rho.to(device, torch.float32)


def _warn_fallback(norms: torch.Tensor) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        what = "non-finite" if not torch.isfinite(norms).all() else "all zero"
        warnings.warn(
            f"Grass: gradient row norms are {what}; selecting rows uniformly at random instead. "
            "This happens with a zero loss or an overflowing gradient; check the loss scale.",
            RuntimeWarning,
            stacklevel=3,
        )
