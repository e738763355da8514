"""State formats: how an update rule's per-row state tensors are stored.

An update rule (:mod:`hf_grass.rules`) names its state tensors (Adam: ``exp_avg``,
``exp_avg_sq``), each shaped like the compressed gradient (r x k). A format decides how one such
tensor is kept in memory: under which keys of the parameter's state, in which dtypes, and how it
is read into the compute dtype and written back. Every stored tensor has the rows first, so a
re-selection carries any format row by row (:func:`hf_grass.functional.remap_state`) and
checkpoints hold plain tensors.

- ``plain`` (default): one tensor in ``state_dtype`` (or the parameter's dtype); Adam's fast
  implementations (grouped, compiled, Triton) read it directly.
- ``stochastic_bf16``: one bfloat16 tensor, written back with stochastic rounding (unbiased:
  ``E[stored] = value``), so that the second moment's small increments do not vanish as they do
  when rounded to nearest; half the bytes of float32 state.

A new format (row-wise 8-bit codes with a per-row scale, say) is a subclass of
:class:`StateFormat` given to :func:`register_state_format`; ``GrassConfig(state_format=...)``,
``--grass_state_format`` and ``GrassOptimizer(state_format=...)`` then take its name. Other
formats run the rule's reference step, which loads each tensor, updates it and stores it back
(``tests/test_state_formats.py`` adds one in that file alone).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .registry import Registry


def round_to(
    x: Tensor, dtype: torch.dtype, stochastic: bool, share: Tensor | None = None
) -> Tensor:
    """Cast float32 ``x`` to ``dtype``; to bfloat16 stochastically if asked.

    Stochastic rounding adds uniform noise below bf16's last bit to the float32 bit pattern and
    truncates, so a value rounds up with probability equal to its distance from the lower
    neighbour: ``E[round(x)] = x``, and small updates survive on average. ``share`` (G x r, for
    a G x r x k batch): row j of batch g takes the noise of row ``share[g, j]`` (equal rows
    round alike).
    """
    if not stochastic or dtype != torch.bfloat16 or x.dtype != torch.float32:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    if share is not None:
        noise = noise.gather(1, share[..., None].expand_as(noise))
    return ((bits + noise) & -65536).view(torch.float32).to(dtype)


class StateFormat:
    """How one per-row state tensor of logical shape (rows, k) is stored (see the module doc)."""

    name: ClassVar[str] = ""

    def stored_keys(self, key: str) -> tuple[str, ...]:
        """The keys under which the tensor ``key`` is stored in a parameter's state (the first
        is ``key`` itself, shaped (rows, k); the others have the rows first too)."""
        return (key,)

    def zeros(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device,
        like: Tensor | None = None,
    ) -> dict:
        """Stored tensors of a zero state ``key`` of ``shape``; ``dtype``: the group's
        ``state_dtype`` or the parameter's dtype. ``like``: a dense parameter the state is for
        (its layout and, for a DTensor, its sharding, as ``torch.zeros_like`` keeps them)."""
        if like is not None:
            return {key: torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)}
        return {key: torch.zeros(shape, dtype=dtype, device=device)}

    def load(self, state: dict, key: str, dtype: torch.dtype) -> Tensor:
        """The tensor ``key`` in ``dtype`` (the stored tensor itself when it is in ``dtype``)."""
        return state[key].to(dtype)

    def store(self, state: dict, key: str, value: Tensor) -> None:
        """Write ``value`` (as returned by :meth:`load`, updated) back into ``state``."""
        if value is not state[key]:
            state[key].copy_(value)

    def saved_dtype(self, key: str, moments_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a resumed run gives the stored tensor ``key`` (``None``: as saved)."""
        return moments_dtype

    def element_bytes(self, dtype_bytes: int, k: int) -> float:
        """Bytes per element of a (rows, k) state tensor (per-row parts spread over k)."""
        return dtype_bytes


class Plain(StateFormat):
    """One tensor in the state dtype."""

    name = "plain"


class StochasticBF16(StateFormat):
    """One bfloat16 tensor, stored with stochastic rounding."""

    name = "stochastic_bf16"

    def zeros(self, key, shape, dtype, device, like=None):
        return super().zeros(key, shape, torch.bfloat16, device, like)

    def load(self, state, key, dtype):
        return state[key].to(torch.promote_types(dtype, torch.float32))

    def store(self, state, key, value):
        state[key].copy_(round_to(value.float(), torch.bfloat16, stochastic=True))

    def saved_dtype(self, key, moments_dtype):
        return torch.bfloat16

    def element_bytes(self, dtype_bytes, k):
        return 2


STATE_FORMATS: Registry[StateFormat] = Registry("state format")
register_state_format = STATE_FORMATS.register  # then state_format="<its name>" works
state_format_of = STATE_FORMATS.of  # the registered format of a name (ValueError otherwise)


def stored_keys(state_format: StateFormat, keys: tuple[str, ...]) -> tuple[str, ...]:
    """Every stored key of the logical state ``keys``."""
    return tuple(k for key in keys for k in state_format.stored_keys(key))


for _format in (Plain(), StochasticBF16()):
    register_state_format(_format)
