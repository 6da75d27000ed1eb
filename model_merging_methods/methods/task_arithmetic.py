"""Task arithmetic: θ = θ_pre + λ Σ_i (θ_i − θ_pre), element-wise (Ilharco et al., 2023, "Editing models with task
arithmetic", ICLR). λ = ``scaling_coefficient``; float32 arithmetic, result in θ_pre's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_merging_methods.mask_weights_utils import compute_dtype
from model_merging_methods.registry import MergeMethod, Param, register
from model_merging_methods.validators import check_coefficient

COEFFICIENT_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)

SCALING_COEFFICIENT = Param(
    "scaling_coefficient",
    check_coefficient,
    1.0,
    "λ: the scaling of the merged task vector",
    grid=COEFFICIENT_GRID,
)


def task_arithmetic_tensor(
    pretrained_tensor: torch.Tensor, finetuned_tensors: Sequence[torch.Tensor], scaling_coefficient: float
) -> torch.Tensor:
    """θ_pre + λ Σ_i (θ_i − θ_pre), in float32; result in θ_pre's dtype."""
    cdtype = compute_dtype(pretrained_tensor.dtype)
    pre = pretrained_tensor.detach().to(cdtype)
    total = torch.zeros_like(pre)
    for t in finetuned_tensors:
        total += t.detach().to(cdtype) - pre
    return (pre + scaling_coefficient * total).to(pretrained_tensor.dtype)


METHOD = register(
    MergeMethod(
        order=20,
        name="task_arithmetic",
        label="task arithmetic",
        formula="θ = θ_pre + λ Σ_i τ_i",
        reference="Ilharco et al. 2023, Editing models with task arithmetic (ICLR), arXiv:2212.04089",
        params=(SCALING_COEFFICIENT,),
        kernel=lambda base, tensors, params, ctx: task_arithmetic_tensor(
            base, tensors, params["scaling_coefficient"]
        ),
    )
)
