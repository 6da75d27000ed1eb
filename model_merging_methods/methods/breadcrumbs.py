"""Model Breadcrumbs: drop the smallest and the largest magnitudes of every task vector, then add them up (Davari &
Belilovsky, 2023, "Model Breadcrumbs: Scaling multi-task model merging with sparse masks", arXiv:2312.06795).

Per tensor (n elements) and model: rank |τ_i| ascending, ties broken by flat index (the earlier element ranks
lower; a stable sort); m_i drops the k_lo = int(r·n) lowest ranks and the k_hi = int(β·n) highest ranks and keeps
the n − k_lo − k_hi others, exactly (r = ``param_value_mask_rate``, β = ``outlier_mask_rate``; r + β > 1 is an
error). Then θ = θ_pre + λ Σ_i m_i ⊙ τ_i (λ = ``scaling_coefficient``), summed in model order in float32.

mergekit's ``breadcrumbs`` (density = 1 − r − β, gamma = β, ``normalize: false``) also keeps an exact count, but
int((1 − r − β)·n) entries starting after n − int(β·n) − that count, with an unstable sort: the kept sets agree
except where int((1 − r − β)·n) ≠ n − int(r·n) − int(β·n) (floating-point rounding of 1 − r − β) or |τ| has ties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import keep_where
from model_merging_methods.methods.task_arithmetic import SCALING_COEFFICIENT
from model_merging_methods.methods.ties import METHOD as TIES
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_rate

PARAM_VALUE_MASK_RATE = TIES.param("param_value_mask_rate")  # the same flag as TIES's trim rate

OUTLIER_MASK_RATE = Param(
    "outlier_mask_rate",
    check_rate,
    0.01,
    "Breadcrumbs β: the fraction of largest |τ| dropped (outliers), per tensor and model",
)


def breadcrumbs_mask(tau: torch.Tensor, small_rate: float, outlier_rate: float) -> torch.Tensor:
    """The keep mask of one task-vector tensor: drops the int(r·n) smallest and the int(β·n) largest |τ| (ranks by a
    stable ascending sort of |τ|: among equal magnitudes the earlier element ranks lower)."""
    n = tau.numel()
    k_lo, k_hi = int(small_rate * n), int(outlier_rate * n)
    if k_lo == 0 and k_hi == 0:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if k_lo + k_hi < n:
        order = torch.argsort(tau.detach().abs().reshape(-1), stable=True)
        keep[order[k_lo : n - k_hi]] = True
    return keep.reshape(tau.shape)


def _check_rates(small_rate: float, outlier_rate: float) -> None:
    if small_rate + outlier_rate > 1.0:
        raise MergeError(
            f"param_value_mask_rate + outlier_mask_rate must be at most 1, got {small_rate} + {outlier_rate}"
        )


def breadcrumbs_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    small_rate: float,
    outlier_rate: float,
    scaling_coefficient: float,
) -> torch.Tensor:
    """θ_pre + λ Σ_i m_i ⊙ τ_i for one tensor (inputs in the compute dtype, unchanged)."""
    _check_rates(small_rate, outlier_rate)
    total = torch.zeros_like(base)
    for x in tensors:
        tau = x - base
        total += keep_where(breadcrumbs_mask(tau, small_rate, outlier_rate), tau)
    return base + scaling_coefficient * total


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return breadcrumbs_tensor(
        base,
        tensors,
        params["param_value_mask_rate"],
        params["outlier_mask_rate"],
        params["scaling_coefficient"],
    )


METHOD = register(
    MergeMethod(
        order=60,
        name="breadcrumbs_merging",
        label="Breadcrumbs",
        formula="θ = θ_pre + λ Σ_i m_i ⊙ τ_i, m_i drops the int(r·n) smallest and int(β·n) largest |τ_i|",
        reference="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795",
        params=(SCALING_COEFFICIENT, PARAM_VALUE_MASK_RATE, OUTLIER_MASK_RATE),
        kernel=_kernel,
        check=lambda params, _m: _check_rates(params["param_value_mask_rate"], params["outlier_mask_rate"]),
        scope="tensor",
    )
)
