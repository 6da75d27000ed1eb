"""Average merging: θ = (1/M) Σ_i θ_i, element-wise (Wortsman et al., 2022, "Model soups", ICML).

Summed in order in float32 (float64 stays float64). No pre-trained model needed; excluded and non-float tensors come
from the first model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_merging_methods.mask_weights_utils import compute_dtype
from model_merging_methods.registry import MergeMethod, register


def average_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/M) Σ_i x_i, summed in order in float32; result in the first tensor's dtype."""
    cdtype = compute_dtype(tensors[0].dtype)
    total = tensors[0].detach().to(cdtype).clone()
    for t in tensors[1:]:
        total += t.detach().to(cdtype)
    return (total / len(tensors)).to(tensors[0].dtype)


METHOD = register(
    MergeMethod(
        order=10,
        name="average_merging",
        label="average",
        formula="θ = (1/M) Σ_i θ_i",
        reference="Wortsman et al. 2022, Model soups (ICML), arXiv:2203.05482",
        params=(),
        kernel=lambda base, tensors, params, ctx: average_tensor(tensors),
        needs_base=False,
        copy_from="first",
    )
)
