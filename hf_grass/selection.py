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
moments can be carried across re-selections by index.
"""

from __future__ import annotations

import math
import warnings

import torch

SELECTIONS = ("top_r", "multinomial", "multinomial_nr", "uniform")

_warned_fallback = False


def select_rows(
    row_norms: torch.Tensor,
    rank: int,
    selection: str = "top_r",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``rank`` rows from ``row_norms`` (shape (m,)).

    Returns ``rows`` (int64, shape (r,), sorted) and ``rho`` (float32, shape (r,)), both on the
    device of ``row_norms``. Sampling runs on the CPU with ``generator`` so that it is reproducible
    and device-independent. All-zero or non-finite norms fall back to rows drawn uniformly at
    random (with a warning the first time), scaled by the method's own convention: a gradient with
    no signal gives no reason to prefer any row.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"Unknown selection {selection!r}: use one of {', '.join(SELECTIONS)}.")
    m = row_norms.numel()
    if not 1 <= rank <= m:
        raise ValueError(f"Invalid rank {rank} for a dimension of size {m}: use 1 <= rank <= {m}.")
    device = row_norms.device
    norms = row_norms.detach().to("cpu", torch.float64)
    if selection != "uniform" and not (torch.isfinite(norms).all() and norms.sum() > 0):
        _warn_fallback(norms)
        rows = torch.randperm(m, generator=generator)[:rank].sort().values
        # Keep the method's own scale convention: rho = 1 for top_r and multinomial_nr, and
        # multinomial's 1/sqrt(r q) with q uniform.
        scale = math.sqrt(m / rank) if selection == "multinomial" else 1.0
        return rows.to(device), torch.full((rank,), scale, device=device)

    if selection == "top_r":
        rows = torch.topk(norms, rank, sorted=False).indices
        rho = torch.ones(rank, dtype=torch.float64)
    elif selection == "multinomial":
        q = norms / norms.sum()
        rows = torch.multinomial(q, rank, replacement=True, generator=generator)
        rho = (rank * q[rows]).rsqrt()
    elif selection == "multinomial_nr":
        q = norms / norms.sum()
        # multinomial without replacement needs at least `rank` non-zero weights.
        positive = int((q > 0).sum())
        if positive < rank:
            q = q + (q == 0) * (q[q > 0].min() * 1e-6)
        rows = torch.multinomial(q, rank, replacement=False, generator=generator)
        rho = torch.ones(rank, dtype=torch.float64)
    else:
        rows = torch.randperm(m, generator=generator)[:rank]
        rho = torch.full((rank,), math.sqrt(m / rank), dtype=torch.float64)

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
