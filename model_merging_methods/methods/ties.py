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

mergekit's ``ties`` (``docs/mergekit.md``) is ``trim_scope="tensor"`` with these options: ``trim_rule="exact_k"``
(keep exactly k = max(1, int(d·n)) entries of largest |τ_i|, d = ``densities[i]``, else 1 − r), ``zero_sign="plus"``
(a zero sign sum elects +1), ``model_weights`` (w_i·τ̂_i before the sign election; the mean divides by Σ w_i over
the agreeing models), ``no_normalize`` (the disjoint sum instead of the mean) and ``sparsify_rescale="l1"`` (each
trimmed τ̂_i rescaled to ‖τ_i‖₁). ``densities`` (per model) replaces r by 1 − d_i in either trim rule. The per-model and
per-tensor options need ``trim_scope="tensor"``; ``zero_sign`` and ``no_normalize`` work in both scopes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import compute_dtype, keep_where
from model_merging_methods.methods.task_arithmetic import (
    DENSITIES,
    MODEL_WEIGHTS,
    NO_NORMALIZE,
    SCALING_COEFFICIENT,
    ZERO_SIGN,
)
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.sparsify import combine, l1_rescale, top_k_mask, weight_column
from model_merging_methods.validators import check_rate

TRIM_SCOPES = ("global", "tensor")
TRIM_RULES = ("threshold", "exact_k")
SPARSIFY_RESCALES = ("none", "l1")
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


def mergekit_options(params: Mapping[str, Any]) -> list[str]:
    """The names of the mergekit options set to something other than the paper's default."""
    out = [n for n in ("model_weights", "densities") if params.get(n) is not None]
    out += [n for n in ("no_normalize",) if params.get(n)]
    out += [n for n, d in (("zero_sign", "majority"), ("trim_rule", "threshold"), ("sparsify_rescale", "none"))
            if params.get(n, d) != d]  # fmt: skip
    return out


def _check(params: Mapping[str, Any], num_models: int) -> None:
    if params["trim_scope"] == "global":
        tensor_only = [n for n in mergekit_options(params) if n not in ("zero_sign", "no_normalize")]
        if tensor_only:
            raise MergeError(
                f"ties_merging: {tensor_only[0]} needs trim_scope='tensor' (the global trim has one threshold and one "
                "majority sign per model)"
            )


def trim_task_vector(tau: torch.Tensor, params: Mapping[str, Any], i: int) -> torch.Tensor:
    """Model i's trimmed task-vector tensor τ̂_i under ``trim_rule``, ``densities`` and ``sparsify_rescale``."""
    density = params.get("densities")
    if params.get("trim_rule", "threshold") == "exact_k":
        keep = top_k_mask(tau, density[i] if density is not None else 1.0 - params["param_value_mask_rate"])
    else:
        rate = 1.0 - density[i] if density is not None else params["param_value_mask_rate"]
        keep = tau.abs() >= ties_trim_threshold(tau.numel(), rate, lambda: [tau])
    trimmed = keep_where(keep, tau)
    return l1_rescale(tau, trimmed) if params.get("sparsify_rescale", "none") == "l1" else trimmed


def elect_and_combine(
    base: torch.Tensor, trimmed: torch.Tensor, params: Mapping[str, Any], majority: float | None
) -> torch.Tensor:
    """Sign election and (weighted) disjoint mean or sum of the stacked trimmed task vectors; ``majority`` is the
    sign a zero sum elects under ``zero_sign="majority"`` (None: this tensor's weighted majority sign)."""
    weights = params.get("model_weights")
    if params.get("zero_sign", "majority") == "plus":
        zero = 1.0
    elif majority is not None:
        zero = majority
    else:
        weighted = trimmed if weights is None else trimmed * weight_column(weights, trimmed)
        zero = majority_sign(int(torch.sign(weighted.sum(0)).sum().item()))
    return combine(
        base, trimmed, weights, elect_sign=True, zero_sign=zero, normalize=not params.get("no_normalize"),
        scaling_coefficient=params["scaling_coefficient"],
    )  # fmt: skip


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    lam = params["scaling_coefficient"]
    plus = params.get("zero_sign", "majority") == "plus"
    if ctx.stats is not None:
        majority = 1.0 if plus else ctx.stats.majority_sign
        if not params.get("no_normalize"):
            return ties_merge_tensor(base, tensors, ctx.stats.thresholds, lam, majority)
        trimmed = torch.stack(_trimmed_task_vectors(base, tensors, ctx.stats.thresholds))
        return elect_and_combine(base, trimmed, params, majority)
    if not mergekit_options(params):
        thresholds = tensor_thresholds(base, tensors, params["param_value_mask_rate"])
        majority = majority_sign(ties_sign_sum(base, tensors, thresholds))
        return ties_merge_tensor(base, tensors, thresholds, lam, majority)
    trimmed = torch.stack([trim_task_vector(x - base, params, i) for i, x in enumerate(tensors)])
    return elect_and_combine(base, trimmed, params, None)


def _stream_pass(executor, method, params, fts, dare=None, **kwargs) -> dict[str, Any]:
    if mergekit_options(params):  # the streamed fast path knows the paper's rules only: the generic executor
        from model_merging_methods.engine import execute

        return execute(executor, method, params, fts, dare, **kwargs)
    from model_merging_methods.ties_streaming import ties_stream_pass

    return ties_stream_pass(executor, method, params, fts, dare, **kwargs)


TRIM_RULE = Param(
    "trim_rule",
    lambda name, v: v,
    "threshold",
    "TIES trim: keep every |τ| ≥ the k-th smallest, k = int(n·r) (threshold, the original's) or exactly "
    "max(1, int(d·n)) entries of largest |τ| (exact_k, mergekit's)",
    type=str,
    choices=TRIM_RULES,
    flag=False,
)

SPARSIFY_RESCALE = Param(
    "sparsify_rescale",
    lambda name, v: v,
    "none",
    "mergekit's rescale: true for TIES and Breadcrumbs: each sparsified τ̂_i multiplied by ‖τ_i‖₁ / ‖τ̂_i‖₁ (l1)",
    type=str,
    choices=SPARSIFY_RESCALES,
    flag=False,
)

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
            MODEL_WEIGHTS,
            DENSITIES,
            NO_NORMALIZE,
            ZERO_SIGN,
            TRIM_RULE,
            SPARSIFY_RESCALE,
        ),  # fmt: skip
        kernel=_kernel,
        scope=lambda params: "model" if params["trim_scope"] == "global" else "tensor",
        model_statistics=_model_statistics,
        stream_pass=_stream_pass,
        check=_check,
        name_order=("param_value_mask_rate", "scaling_coefficient", "trim_scope"),
    )
)
