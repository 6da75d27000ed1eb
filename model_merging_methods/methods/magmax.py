"""MagMax: per element, the task vector entry of largest magnitude (Marczak, Twardowski, Trzciński & Cygert, 2024,
"MagMax: Leveraging model merging for seamless continual learning", ECCV, arXiv:2407.06322).

τ_max = τ_j element-wise with j = argmax_i |τ_i| (the first model wins ties: a later model replaces the running
choice only when its |τ| is strictly larger); θ = θ_pre + λ τ_max (λ = ``scaling_coefficient``). Element-wise, in
float32 (float64 stays float64). A NaN |τ| never wins a comparison, so a NaN entry is chosen only when it comes
first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.methods.task_arithmetic import SCALING_COEFFICIENT
from model_merging_methods.registry import MergeMethod, TensorContext, register


def magmax_tensor(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], scaling_coefficient: float
) -> torch.Tensor:
    """θ_pre + λ τ_max for one block (inputs in the compute dtype, unchanged)."""
    best = tensors[0] - base
    best_abs = best.abs()
    for x in tensors[1:]:
        tau = x - base
        tau_abs = tau.abs()
        larger = tau_abs > best_abs
        best = torch.where(larger, tau, best)
        best_abs = torch.where(larger, tau_abs, best_abs)
    return base + scaling_coefficient * best


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return magmax_tensor(base, tensors, params["scaling_coefficient"])


METHOD = register(
    MergeMethod(
        order=100,
        name="magmax_merging",
        label="MagMax",
        formula="θ = θ_pre + λ τ_max, τ_max = τ_j with j = argmax_i |τ_i| per element",
        reference="Marczak et al. 2024, MagMax (ECCV), arXiv:2407.06322",
        params=(SCALING_COEFFICIENT,),
        kernel=_kernel,
        scope="element",
    )
)
