"""Model Breadcrumbs: drop the smallest and the largest magnitudes of every task vector, then add them up (Davari &
Belilovsky, 2023, "Model Breadcrumbs: Scaling multi-task model merging with sparse masks", arXiv:2312.06795).

Per tensor (n elements) and model: rank |τ_i| ascending, ties broken by flat index (the earlier element ranks
lower; a stable sort); m_i drops the k_lo = int(r·n) lowest ranks and the k_hi = int(β·n) highest ranks and keeps
the n − k_lo − k_hi others, exactly (r = ``param_value_mask_rate``, β = ``outlier_mask_rate``; r + β > 1 is an
error). Then θ = θ_pre + λ Σ_i m_i ⊙ τ_i (λ = ``scaling_coefficient``), summed in model order in float32.

mergekit's ``breadcrumbs`` (density = 1 − r − β, gamma = β, ``normalize: false``) also keeps an exact count, but
int((1 − r − β)·n) entries starting after n − int(β·n) − that count, with an unstable sort: the kept sets agree
except where int((1 − r − β)·n) ≠ n − int(r·n) − int(β·n) (floating-point rounding of 1 − r − β) or |τ| has ties.
That rule is the option ``breadcrumbs_rule="keep_count"`` (with d = ``densities[i]``, else (1 − r) − β); with the
other mergekit options (``model_weights``, ``normalize``: divide by Σ w_i, ``sparsify_rescale="l1"``, and
``breadcrumbs_elect_sign`` with ``zero_sign`` for mergekit's ``breadcrumbs_ties``) a configuration means what it
means in mergekit (``docs/mergekit.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import keep_where
from model_merging_methods.methods.task_arithmetic import (
    DENSITIES,
    MODEL_WEIGHTS,
    NORMALIZE,
    SCALING_COEFFICIENT,
    ZERO_SIGN,
)
from model_merging_methods.methods.ties import METHOD as TIES
from model_merging_methods.methods.ties import SPARSIFY_RESCALE, majority_sign
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.sparsify import (
    combine,
    elected_sign_sum,
    keep_count_mask,
    l1_rescale,
    weight_column,
)
from model_merging_methods.validators import check_flag, check_rate

PARAM_VALUE_MASK_RATE = TIES.param("param_value_mask_rate")  # the same flag as TIES's trim rate

OUTLIER_MASK_RATE = Param(
    "outlier_mask_rate",
    check_rate,
    0.01,
    "Breadcrumbs β: the fraction of largest |τ| dropped (outliers), per tensor and model",
)

BREADCRUMBS_RULES = ("drop_counts", "keep_count")

BREADCRUMBS_RULE = Param(
    "breadcrumbs_rule",
    lambda name, v: v,
    "drop_counts",
    "Breadcrumbs counts: drop int(r·n) smallest and int(β·n) largest |τ| (drop_counts) or keep int(d·n) entries "
    "below the int(β·n) largest (keep_count, mergekit's)",
    type=str,
    choices=BREADCRUMBS_RULES,
    flag=False,
)

BREADCRUMBS_ELECT_SIGN = Param(
    "breadcrumbs_elect_sign",
    check_flag,
    False,
    "TIES sign election after the Breadcrumbs masks (mergekit's breadcrumbs_ties)",
    type=bool,
    flag=False,
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


def _check(params: Mapping[str, Any], num_models: int) -> None:
    density = params.get("densities")
    if density is None:
        _check_rates(params["param_value_mask_rate"], params["outlier_mask_rate"])
    elif params.get("breadcrumbs_rule", "drop_counts") == "drop_counts":
        for d in density:
            if d + params["outlier_mask_rate"] > 1.0:
                raise MergeError(
                    f"density + outlier_mask_rate must be at most 1, got {d} + {params['outlier_mask_rate']}"
                )


def mergekit_options(params: Mapping[str, Any]) -> list[str]:
    """The names of the mergekit options set to something other than the paper's default."""
    out = [n for n in ("model_weights", "densities") if params.get(n) is not None]
    out += [n for n in ("normalize", "breadcrumbs_elect_sign") if params.get(n)]
    defaults = (("zero_sign", "majority"), ("breadcrumbs_rule", "drop_counts"), ("sparsify_rescale", "none"))
    return out + [n for n, d in defaults if params.get(n, d) != d]


def breadcrumbs_task_vector(tau: torch.Tensor, params: Mapping[str, Any], i: int) -> torch.Tensor:
    """Model i's masked task-vector tensor under ``breadcrumbs_rule``, ``densities`` and ``sparsify_rescale``."""
    beta, density = params["outlier_mask_rate"], params.get("densities")
    if params.get("breadcrumbs_rule", "drop_counts") == "keep_count":
        d = density[i] if density is not None else (1.0 - params["param_value_mask_rate"]) - beta
        keep = keep_count_mask(tau, d, beta)
    else:
        r = max(0.0, (1.0 - density[i]) - beta) if density is not None else params["param_value_mask_rate"]
        keep = breadcrumbs_mask(tau, r, beta)
    masked = keep_where(keep, tau)
    return l1_rescale(tau, masked) if params.get("sparsify_rescale", "none") == "l1" else masked


def breadcrumbs_mergekit_tensor(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any]
) -> torch.Tensor:
    """Breadcrumbs with the mergekit options (inputs in the compute dtype, unchanged)."""
    taus = torch.stack([breadcrumbs_task_vector(x - base, params, i) for i, x in enumerate(tensors)])
    weights = params.get("model_weights")
    elect = bool(params.get("breadcrumbs_elect_sign"))
    zero = 1.0
    if elect and params.get("zero_sign", "majority") == "majority":
        weighted = taus if weights is None else taus * weight_column(weights, taus)
        zero = majority_sign(elected_sign_sum(weighted))
    return combine(
        base, taus, weights, elect_sign=elect, zero_sign=zero, normalize=bool(params.get("normalize")),
        scaling_coefficient=params["scaling_coefficient"],
    )  # fmt: skip


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
    if mergekit_options(params):
        return breadcrumbs_mergekit_tensor(base, tensors, params)
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
        params=(
            SCALING_COEFFICIENT,
            PARAM_VALUE_MASK_RATE,
            OUTLIER_MASK_RATE,
            MODEL_WEIGHTS,
            DENSITIES,
            NORMALIZE,
            BREADCRUMBS_RULE,
            BREADCRUMBS_ELECT_SIGN,
            ZERO_SIGN,
            SPARSIFY_RESCALE,
        ),  # fmt: skip
        kernel=_kernel,
        check=_check,
        scope="tensor",
        name_order=("scaling_coefficient", "param_value_mask_rate", "outlier_mask_rate"),
    )
)
