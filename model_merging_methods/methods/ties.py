"""TIES-Merging: trim, elect sign, disjoint mean (Yadav et al., 2023, "TIES-Merging: Resolving interference when
merging models", NeurIPS, arXiv:2306.01708).

τ̂_i = τ_i [|τ_i| ≥ t_i] with t_i the k-th smallest |τ_i|, k = int(P·r) (r = ``param_value_mask_rate``; the
original's rule keeps every entry at the threshold, so one entry more than mergekit's "exactly k"); s = sign(Σ_i τ̂_i),
and where s = 0 the majority sign m = sign(Σ_coords s); τ = Σ_i τ̂_i [sign τ̂_i = s] / max(1, #agreeing);
θ = θ_pre + λ τ.

``trim_scope="global"`` (the paper's and the original TIES code's behaviour): one threshold per model over its whole
task vector and one majority sign for the whole model — model-wide statistics computed exactly, tensor by tensor
(selection on float32 bit patterns, :mod:`model_merging_methods.selection`: one pass over the models for every
threshold in practice, a band placed by a small sample; no M × P matrix). ``"tensor"`` (as mergekit and PEFT do):
thresholds and majority sign per tensor.

Arithmetic: float32 (float64 stays float64), element-wise only, with the sums over models taken in model order, so
the bytes are the same on every device; the sign election and the disjoint mean run on the bit patterns (an
all-ones mask where τ̂_i has the elected sign, ANDed with τ̂_i), the same bytes as the formulas.

mergekit's ``ties`` (``docs/mergekit.md``) is ``trim_scope="tensor"`` with these options: ``trim_rule="exact_k"``
(keep exactly k = max(1, int(d·n)) entries of largest |τ_i|, d = ``densities[i]``, else 1 − r), ``zero_sign="plus"``
(a zero sign sum elects +1), ``model_weights`` (w_i·τ̂_i before the sign election; the mean divides by Σ w_i over
the agreeing models), ``no_normalize`` (the disjoint sum instead of the mean) and ``sparsify_rescale="l1"`` (each
trimmed τ̂_i rescaled to ‖τ_i‖₁). ``densities`` (per model) replaces r by 1 − d_i in either trim rule. The per-model and
per-tensor options need ``trim_scope="tensor"``; ``zero_sign`` and ``no_normalize`` work in both scopes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from model_merging_methods.selection import (  # noqa: F401 - kth_smallest_abs re-exported
    BandSelection,
    abs_bits,
    band_from_sample,
    kth_smallest_abs,
    summarize,
)
from model_merging_methods.sparsify import combine, elected_sign_sum, l1_rescale, top_k_mask, weight_column
from model_merging_methods.validators import check_rate

TRIM_SCOPES = ("global", "tensor")
TRIM_RULES = ("threshold", "exact_k")
SPARSIFY_RESCALES = ("none", "l1")
SAMPLE_ELEMENTS = 1 << 18  # |τ| samples per model that place the first band of the global threshold selection
_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def ties_trim_threshold(
    numel: int, param_value_mask_rate: float, chunks_factory: Callable[[], Iterable]
) -> float:
    """t = k-th smallest |τ| with k = int(numel · r); k = 0 → 0.0 (keep everything, |τ| ≥ 0)."""
    k = int(numel * param_value_mask_rate)
    return 0.0 if k == 0 else kth_smallest_abs(chunks_factory, k)


def _threshold_bits(threshold: float, dtype: torch.dtype) -> int:
    """The bit pattern of |threshold| in ``dtype`` (float32 or float64), as a Python int."""
    if dtype == torch.float64:
        return struct.unpack("<q", struct.pack("<d", abs(threshold)))[0]
    return struct.unpack("<i", struct.pack("<f", abs(threshold)))[0]


def _trimmed_task_vectors(
    pretrained_tensor: torch.Tensor, finetuned_tensors: Sequence[torch.Tensor], thresholds: Sequence[float]
) -> list[torch.Tensor]:
    """τ̂_i = where(|τ_i| ≥ t_i, τ_i, +0.0) in the compute dtype. On the bit patterns: |τ| ≥ t ⟺ (t_bits − 1) −
    bits(|τ|) < 0, whose sign bit spread by an arithmetic shift is the keep mask (t = 0 keeps everything); a block
    holding NaN takes the comparison's path (NaN is dropped)."""
    cdtype = compute_dtype(pretrained_tensor.dtype)
    pre = pretrained_tensor.detach().to(cdtype)
    itype = _INT[cdtype]
    shift = 8 * pre.element_size() - 1
    out = []
    for t, threshold in zip(finetuned_tensors, thresholds):
        tau = t.detach().to(cdtype) - pre
        finite_sum = bool(torch.isfinite(tau.sum()))  # no NaN (nor ±inf) in the block
        if not finite_sum or not math.isfinite(threshold) or threshold < 0:
            tau = keep_where(tau.abs() >= threshold, tau)
        elif threshold != 0.0:
            bits = tau.view(itype)
            mask = bits & ((1 << shift) - 1)  # bits(|τ|)
            mask.neg_().add_(_threshold_bits(threshold, cdtype) - 1).bitwise_right_shift_(shift)
            tau = mask.bitwise_and_(bits).view(cdtype)
        out.append(tau)
    return out


def _sum_in_order(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i x_i added in model order (element-wise: the same bytes on every device)."""
    total = tensors[0].clone()
    for t in tensors[1:]:
        total += t
    return total


def _sign_sum(total: torch.Tensor) -> int:
    """Σ over coordinates of sign(total), exactly (float64 accumulation)."""
    return int(torch.sign(total).sum(dtype=torch.float64).item())


def ties_sign_sum(
    pretrained_tensor: torch.Tensor, finetuned_tensors: Sequence[torch.Tensor], thresholds: Sequence[float]
) -> int:
    """Σ over coordinates of sign(Σ_i τ̂_i) for one tensor (τ̂_i trimmed at ``thresholds[i]``); summed over a scope it
    gives the majority sign m = sign(total) used where the elected sign is 0."""
    return _sign_sum(_sum_in_order(_trimmed_task_vectors(pretrained_tensor, finetuned_tensors, thresholds)))


def majority_sign(sign_sum: int) -> float:
    """m = sign(Σ_coords s): +1, −1, or 0 when the elected signs cancel out."""
    return float(math.copysign(1.0, sign_sum)) if sign_sum != 0 else 0.0


def _disjoint_mean(
    pre: torch.Tensor,
    trimmed: Sequence[torch.Tensor],
    total: torch.Tensor,
    scaling_coefficient: float,
    majority: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ_pre + λ · Σ_i τ̂_i[τ̂_i agrees] / max(1, #agreeing), #agreeing) with the elected sign s = sign(total), or
    ``majority`` where total = 0. τ̂_i agrees where τ̂_i ≠ 0 and its sign is s: on the bit patterns, the sign bits of
    τ̂_i and s are equal, an AND with the mask that spreads NOT(τ̂_i XOR s) by an arithmetic shift (a ±0 τ̂_i keeps
    ±0 and is not counted). Where total = ±0 its sign bit is replaced by the majority's (m = −1) or nothing agrees
    (m = 0); with m = +1 a zero total's sign bit is 0, i.e. +1's, as a total of non-zero τ̂_i is never −0."""
    itype = _INT[total.dtype]
    shift = 8 * total.element_size() - 1
    magnitude = (1 << shift) - 1
    sbits = total.view(itype)
    zero = None
    if majority <= 0:
        zero = sbits & magnitude
        zero.sub_(1).bitwise_right_shift_(shift)  # all ones where total = ±0
        sbits = sbits | (zero & -(1 << shift)) if majority < 0 else sbits  # the sign bit of −1 there
    not_s = torch.bitwise_not(sbits)
    ksum = count = None
    for t in trimmed:
        tb = t.view(itype)
        k = torch.bitwise_xor(tb, not_s)
        k.bitwise_right_shift_(shift)  # all ones where the sign bits of τ̂_i and s agree
        k.bitwise_and_(tb)
        if majority == 0:
            k.bitwise_and_(torch.bitwise_not(zero))  # m = 0: nothing agrees where total = 0
        agree = k & magnitude
        agree.neg_().bitwise_right_shift_(shift)  # −1 where the kept value is not ±0
        kept = k.view(t.dtype)
        if ksum is None:
            ksum, count = kept, agree
        else:
            ksum += kept
            count += agree
    count.neg_()
    merged = ksum.div_(count.to(total.dtype).clamp_(min=1))
    return merged.mul_(scaling_coefficient).add_(pre), count


def ties_merge_tensor(
    pretrained_tensor: torch.Tensor,
    finetuned_tensors: Sequence[torch.Tensor],
    thresholds: Sequence[float],
    scaling_coefficient: float,
    majority_sign: float,
) -> torch.Tensor:
    """TIES for one tensor given the trim thresholds t_i and the scope's majority sign m.

    τ̂_i = τ_i [|τ_i| ≥ t_i]; s = sign(Σ_i τ̂_i), s = m where s = 0; keep τ̂_i where τ̂_i > 0 and s > 0, or τ̂_i < 0 and
    s < 0; τ = Σ kept / max(1, #kept); θ = θ_pre + λ τ (sums in model order).
    """
    pre = pretrained_tensor.detach().to(compute_dtype(pretrained_tensor.dtype))
    trimmed = _trimmed_task_vectors(pre, finetuned_tensors, thresholds)
    total = _sum_in_order(trimmed)
    merged, _ = _disjoint_mean(pre, trimmed, total, scaling_coefficient, majority_sign)
    return merged.to(pretrained_tensor.dtype)


def _nonzero_flat(x: torch.Tensor, width: int = 32) -> torch.Tensor:
    """Ascending flat indices of the non-zero entries of a non-negative integer tensor, for rare entries: the rows of
    ``width`` elements with a non-zero maximum first, then the entries inside those rows (4x faster than one
    ``nonzero`` over everything on the CPU)."""
    flat = x.reshape(-1)
    n = flat.numel()
    whole = n - n % width
    parts = []
    if whole:
        rows_of = flat[:whole].view(-1, width)
        rows = rows_of.amax(1).nonzero().reshape(-1)
        if rows.numel():
            r, c = rows_of[rows].nonzero(as_tuple=True)
            parts.append(rows[r] * width + c)
    if whole < n:
        parts.append(flat[whole:].nonzero().reshape(-1) + whole)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=flat.device)


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
    some τ̂_i ≠ 0 (exact cancellations: there a positive τ̂_i agrees with m = +1, so the agreeing count is non-zero),
    so the m = −1 values are computed there only (element-wise, same bytes).
    """
    pre = pretrained_tensor.detach().to(compute_dtype(pretrained_tensor.dtype))
    trimmed = _trimmed_task_vectors(pre, finetuned_tensors, thresholds)
    total = _sum_in_order(trimmed)
    plus, count = _disjoint_mean(pre, trimmed, total, scaling_coefficient, 1.0)
    itype = _INT[total.dtype]
    shift = 8 * total.element_size() - 1
    cancelled = total.view(itype) & ((1 << shift) - 1)
    cancelled.sub_(1).bitwise_right_shift_(shift).bitwise_and_(count)  # the count where total = ±0
    index = _nonzero_flat(cancelled)
    minus, _ = _disjoint_mean(
        pre.reshape(-1)[index],
        [t.reshape(-1)[index] for t in trimmed],
        total.reshape(-1)[index],
        scaling_coefficient,
        -1.0,
    )
    dtype = pretrained_tensor.dtype
    return _sign_sum(total), plus.to(dtype), index, minus.to(dtype)


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


def _sample_rows(plan, total: int, budget: int) -> list[tuple[int, int]]:
    """Up to 4 evenly spaced row ranges of ``plan`` holding about ``budget · numel / total`` elements (at least one
    row): where the sample of the global threshold selection is read."""
    rows = plan.shape[0] if plan.shape else 1
    want = max(1, min(plan.numel, round(budget * plan.numel / max(1, total))))
    take = min(rows, -(-want // max(1, plan.row_size)))
    pieces = min(4, take)
    length = -(-take // pieces)
    starts = sorted({(rows - length) * j // max(1, pieces - 1) for j in range(pieces)}) if pieces > 1 else [0]
    return [(r, min(rows, r + length)) for r in starts]


def global_thresholds(params: Mapping[str, Any], view, sample_elements: int = SAMPLE_ELEMENTS) -> list[float]:
    """Each model's trim threshold over its whole task vector (all non-excluded float tensors), exactly.

    A sample of about ``sample_elements`` |τ_i| per model (a few row ranges of every tensor, after DARE, each
    weighted by the share of its tensor it stands for) places a band of bit patterns around each k-th value; one
    pass over every model then counts the values below and above the band and histograms those inside it
    (:class:`~model_merging_methods.selection.BandSelection`). When the sample misled a band, further passes over
    the undecided models narrow it; the result is exact in every case."""
    rate = params["param_value_mask_rate"]
    n, num = view.kept_numel, view.num_models
    k = int(n * rate)
    if k == 0:
        return [0.0] * num
    total = view.kept_numel

    def sample(plan, pre, xs):
        rows = _sample_rows(plan, total, sample_elements)
        taken = sum(r1 - r0 for r0, r1 in rows) * (plan.row_size if plan.shape else 1)
        if pre.numel() == plan.numel:  # the whole tensor came (magnitude DARE ranks whole tensors)
            taken = plan.numel
        weight = plan.numel / max(1, taken)
        return weight, [abs_bits(x - pre).cpu().numpy() for x in xs]

    values: list[list[np.ndarray]] = [[] for _ in range(num)]
    weights: list[list[np.ndarray]] = [[] for _ in range(num)]
    rows_for = lambda plan: _sample_rows(plan, total, sample_elements)  # noqa: E731
    for weight, parts in view.map_blocks(sample, rows_for=rows_for)():
        for i, v in enumerate(parts):
            values[i].append(v)
            weights[i].append(np.full(v.size, weight))
    bands = [
        band_from_sample(np.concatenate(values[i]), np.concatenate(weights[i]), k, n) if values[i] else None
        for i in range(num)
    ]
    selection = BandSelection([k] * num, [n] * num, bands)
    while not selection.done:
        pending = selection.pending
        selection.start_pass()
        bands_now = {i: selection.band(i) for i in pending}

        def summaries(plan, pre, xs, pending=pending, bands_now=bands_now):
            return [(i, summarize(x - pre, bands_now[i])) for i, x in zip(pending, xs)]

        for items in view.map_blocks(summaries, models=pending)():
            for i, summary in items:
                selection.add(i, summary)
        selection.finish_pass()
    view.selection_passes = selection.passes
    return selection.results


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
        zero = majority_sign(elected_sign_sum(weighted))
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
