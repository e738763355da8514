"""GPT-2's ``Conv1D`` with the compressed weight gradient.

``Conv1D`` (transformers' GPT-2, GPT, ...) is a linear layer whose weight is stored transposed,
(in, out), and computes ``y = x W + b``. Its Grass form runs :func:`~hf_grass.grass_linear` with
``transposed=True``: the same backward as :class:`~hf_grass.GrassLinear`, with the weight
gradient ``Xᵀ dY`` formed (or compressed) in the weight's own (in, out) layout, so rows and
state follow the parameter as stored. Imported only once transformers is.
"""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from .linear import grass_linear


class GrassConv1D(Conv1D):
    """``Conv1D`` whose backward delivers a compressed weight gradient instead of ``weight.grad``.

    Same parameters, ``state_dict`` and outputs as ``Conv1D``; made by :func:`hf_grass.grassify`.
    """

    grass_base = Conv1D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grass_linear(x, self.weight, self.bias, transposed=True)
