"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., 2023, "TIES-Merging: Resolving interference when
merging models", NeurIPS, arXiv:2306.01708).

τ̂_i = τ_i [|τ_i| ≥ t_i] with t_i the k-th smallest |τ_i|, k = int(P·r) (r = ``param_value_mask_rate``; the
original's rule keeps every entry at the threshold, so one entry more than mergekit's "exactly k"); s = sign(Σ_i τ̂_i),
and where s = 0 the majority sign m = sign(Σ_coords s); τ = Σ_i τ̂_i [sign τ̂_i = s] / max(1, #agreeing);
θ = θ_pre + λ τ.

``trim_scope="global"`` (the paper's and the original TIES code's behaviour): one threshold per model over its whole
task vector and one majority sign for the whole model — model-wide statistics computed exactly, tensor by tensor
(radix selection on float32 bit patterns, :func:`kth_smallest_abs`; no M × P matrix). ``"tensor"`` (as mergekit and
PEFT do): thresholds and majority sign per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import compute_dtype, keep_where
from model_merging_methods.methods.task_arithmetic import SCALING_COEFFICIENT
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_rate

TRIM_SCOPES = ("global", "tensor")
_RADIX_CHUNK = 1 << 24  # elements per slice in the streaming k-th value selection (bounded memory)


def kth_smallest_abs(chunks_factory: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The exact k-th smallest |x| (1-based) over the concatenation of the tensors ``chunks_factory()`` yields.

    Radix selection on the bit patterns of float32 |x| (non-negative floats order like their int32 bits): pass 1
    counts the high 16 bits, pass 2 the low 16 bits inside the chosen bucket. ``chunks_factory`` is called once per
    pass, so the data can be streamed from disk; memory stays bounded by one slice of 2^24 elements. Equals
    ``torch.cat([c.flatten() for c in chunks]).abs().kthvalue(k)`` without building the concatenation.
    """

    def slices():
        for chunk in chunks_factory():
            flat = chunk.detach().reshape(-1)
            for start in range(0, flat.numel(), _RADIX_CHUNK):
                part = flat[start : start + _RADIX_CHUNK].to(torch.float32).abs()
                if torch.isnan(part).any():
                    raise MergeError("NaN in the task vector: cannot select a TIES threshold")
                yield part.view(torch.int32).to(torch.int64)

    counts = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for bits in slices():
        counts += torch.bincount(bits >> 16, minlength=1 << 16)
        total += bits.numel()
    if not 1 <= k <= total:
        raise MergeError(f"k must be in [1, {total}], got {k}")
    cumulative = counts.cumsum(0)
    high = int(torch.searchsorted(cumulative, torch.tensor(k), right=False))
    rank = k - (int(cumulative[high - 1]) if high > 0 else 0)
    low_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for bits in slices():
        inside = bits[(bits >> 16) == high]
        if inside.numel():
            low_counts += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    low = int(torch.searchsorted(low_counts.cumsum(0), torch.tensor(rank), right=False))
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32).item())


def ties_trim_threshold(
    numel: int, param_value_mask_rate: float, chunks_factory: Callable[[], Iterable]
) -> float:
    """t = k-th smallest |τ| with k = int(numel · r); k = 0 → 0.0 (keep everything, |τ| ≥ 0)."""
    k = int(numel * param_value_mask_rate)
    return 0.0 if k == 0 else kth_smallest_abs(chunks_factory, k)


def _trimmed_task_vectors(
    pretrained_tensor: torch.Tensor, finetuned_tensors: Sequence[torch.Tensor], thresholds: Sequence[float]
) -> list[torch.Tensor]:
    cdtype = compute_dtype(pretrained_tensor.dtype)
    pre = pretrained_tensor.detach().to(cdtype)
    out = []
    for t, threshold in zip(finetuned_tensors, thresholds):
        tau = t.detach().to(cdtype) - pre
        out.append(keep_where(tau.abs() >= threshold, tau))
    return out


def ties_sign_sum(
    pretrained_tensor: torch.Tensor, finetuned_tensors: Sequence[torch.Tensor], thresholds: Sequence[float]
) -> int:
    """Σ over coordinates of sign(Σ_i τ̂_i) for one tensor (τ̂_i trimmed at ``thresholds[i]``); summed over a scope it
    gives the majority sign m = sign(total) used where the elected sign is 0."""
    trimmed = _trimmed_task_vectors(pretrained_tensor, finetuned_tensors, thresholds)
    return int(torch.sign(torch.stack(trimmed).sum(0)).sum().item())


def majority_sign(sign_sum: int) -> float:
    """m = sign(Σ_coords s): +1, −1, or 0 when the elected signs cancel out."""
    return float(math.copysign(1.0, sign_sum)) if sign_sum != 0 else 0.0


def ties_merge_tensor(
    pretrained_tensor: torch.Tensor,
    finetuned_tensors: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    scaling_coefficient: float,
    majority_sign: float,
) -> torch.Tensor:
    """TIES for one tensor given the trim thresholds t_i and the scope's majority sign m.

    τ̂_i = τ_i [|τ_i| ≥ t_i]; s = sign(Σ_i τ̂_i), s = m where s = 0; keep τ̂_i where τ̂_i > 0 and s > 0, or τ̂_i < 0 and
    s < 0; τ = Σ kept / max(1, #kept); θ = θ_pre + λ τ.
    """
    trimmed = torch.stack(_trimmed_task_vectors(pretrained_tensor, finetuned_tensors, thresholds))
    elected = torch.sign(trimmed.sum(0))
    return _ties_disjoint_merge(pretrained_tensor, trimmed, elected, scaling_coefficient, majority_sign)


def ties_merge_tensor_both_majorities(
    pretrained_tensor: torch.Tensor,
    finetuned_tensors: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    scaling_coefficient: float,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TIES of one tensor for a majority sign that is not known yet (a streamed merge learns it at the end).

    Returns ``(sign_sum, merged_plus, index, minus_values)``: ``sign_sum = ties_sign_sum(...)``, ``merged_plus =
    ties_merge_tensor(..., majority_sign=+1)``, and ``merged_plus`` with ``flatten()[index] = minus_values`` is
    ``ties_merge_tensor(..., majority_sign=-1)``. The majority sign matters only where the elected sign is 0 while
    some τ̂_i ≠ 0 (exact cancellations), so the m = −1 values are computed there only (element-wise, same bytes).
    """
    trimmed = torch.stack(_trimmed_task_vectors(pretrained_tensor, finetuned_tensors, thresholds))
    elected = torch.sign(trimmed.sum(0))
    plus = _ties_disjoint_merge(pretrained_tensor, trimmed, elected, scaling_coefficient, 1.0)
    flat = trimmed.reshape(trimmed.shape[0], -1)
    index = ((elected.reshape(-1) == 0) & (flat != 0).any(0)).nonzero().reshape(-1)
    minus = _ties_disjoint_merge(
        pretrained_tensor.reshape(-1)[index],
        flat[:, index],
        elected.reshape(-1)[index],
        scaling_coefficient,
        -1.0,
    )
    return int(elected.sum().item()), plus, index, minus


def _ties_disjoint_merge(
    pretrained_tensor: torch.Tensor,
    trimmed: torch.Tensor,
    elected: torch.Tensor,
    scaling_coefficient: float,
    majority_sign: float,
) -> torch.Tensor:
    sign = torch.where(elected == 0, torch.tensor(float(majority_sign), dtype=elected.dtype), elected)
    # the entries whose sign agrees with the elected one: ((s > 0) & (τ̂ > 0)) | ((s < 0) & (τ̂ < 0)), in one op
    agree = trimmed * sign > 0
    kept = keep_where(agree, trimmed)
    merged = kept.sum(0) / agree.sum(0).clamp(min=1).to(trimmed.dtype)
    pre = pretrained_tensor.detach().to(trimmed.dtype)
    return (pre + scaling_coefficient * merged).to(pretrained_tensor.dtype)


@dataclass
class TiesStatistics:
    """The global scope's statistics: one trim threshold per model and the model-wide majority sign."""

    thresholds: list[float]
    sign_sum: int

    @property
    def majority_sign(self) -> float:
        return majority_sign(self.sign_sum)

    def as_dict(self) -> dict[str, Any]:
        return {
            "trim_scope": "global",
            "thresholds": self.thresholds,
            "sign_sum": self.sign_sum,
            "majority_sign": self.majority_sign,
        }


def global_thresholds(params: Mapping[str, Any], view) -> list[float]:
    """Each model's trim threshold over its whole task vector (all non-excluded float tensors), exactly."""
    rate = params["param_value_mask_rate"]
    return [ties_trim_threshold(view.kept_numel, rate, view.task_vectors(i)) for i in range(view.num_models)]


def _model_statistics(params: Mapping[str, Any], view) -> TiesStatistics | None:
    if params["trim_scope"] != "global":
        return None
    thresholds = global_thresholds(params, view)
    total = sum(ties_sign_sum(pre, xs, thresholds) for _, pre, xs in view.blocks()())
    return TiesStatistics(thresholds, total)


def tensor_thresholds(base: torch.Tensor, tensors: Sequence[torch.Tensor], rate: float) -> list[float]:
    """The per-tensor trim thresholds (``trim_scope="tensor"``)."""
    return [ties_trim_threshold(base.numel(), rate, lambda t=t: [t - base]) for t in tensors]


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    lam = params["scaling_coefficient"]
    if ctx.stats is not None:
        return ties_merge_tensor(base, tensors, ctx.stats.thresholds, lam, ctx.stats.majority_sign)
    thresholds = tensor_thresholds(base, tensors, params["param_value_mask_rate"])
    majority = majority_sign(ties_sign_sum(base, tensors, thresholds))
    return ties_merge_tensor(base, tensors, thresholds, lam, majority)


def _stream_pass(*args, **kwargs) -> dict[str, Any]:
    from model_merging_methods.ties_streaming import ties_stream_pass

    return ties_stream_pass(*args, **kwargs)


METHOD = register(
    MergeMethod(
        order=30,
        name="ties_merging",
        label="TIES",
        formula="θ = θ_pre + λ · disjoint_mean(elect_sign(trim_r(τ_i)))",
        reference="Yadav et al. 2023, TIES-Merging (NeurIPS), arXiv:2306.01708",
        params=(
            SCALING_COEFFICIENT,
            Param(
                "param_value_mask_rate",
                check_rate,
                0.8,
                "TIES trim rate r: the fraction of smallest |τ| dropped",
                grid=(0.7, 0.8, 0.9),
            ),
            Param(
                "trim_scope",
                lambda name, v: v,
                "global",
                "TIES trim scope: one threshold and majority sign per model (global, the paper's) or per tensor",
                type=str,
                choices=TRIM_SCOPES,
                short="trim",
            ),
        ),  # fmt: skip
        kernel=_kernel,
        scope=lambda params: "model" if params["trim_scope"] == "global" else "tensor",
        model_statistics=_model_statistics,
        stream_pass=_stream_pass,
        name_order=("param_value_mask_rate", "scaling_coefficient", "trim_scope"),
    )
)
