"""The five merging methods and DARE + X, as pure functions over state dicts (``dict[str, Tensor]``).

Notation: θ_pre pre-trained weights, θ_1..θ_M the models to merge, τ_i = θ_i − θ_pre their task vectors.

* Average:          θ = (1/M) Σ_i θ_i
* Task Arithmetic:  θ = θ_pre + λ Σ_i τ_i
* TIES:             trim each τ_i (keep |τ_i| ≥ t_i, t_i = k-th smallest |τ_i|, k = int(P·r)), elect
                    s = sign(Σ_i τ̂_i) (0 → the majority sign m = sign(Σ_coords s)), disjoint mean
                    τ = Σ_i τ̂_i [sign τ̂_i = s] / max(1, #agreeing), θ = θ_pre + λ τ
* Fisher:           θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i, F̃_i = F_i + ε
* RegMean:          W = ((Σ_i Ĝ_i)⁻¹ Σ_i Ĝ_i W_iᵀ)ᵀ for linear weights (Ĝ: off-diagonal scaled by α); average elsewhere
* DARE + X:         each τ_i masked by DARE first, then X.

Every function validates names and shapes, never mutates its inputs, computes in float32 (float64 stays float64) and
casts back to the input dtype. Parameters matched by ``exclude_param_names_regex`` (``re.match``) are taken from the
pre-trained model (from the first model for methods without one). The per-tensor functions (``*_tensor``,
:func:`kth_smallest_abs`, :func:`ties_sign_sum`) are the building blocks the streaming engine uses, so both give the
same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from model_merging_methods.mask_weights_utils import (
    StateDict,
    check_mask_rate,
    check_same_parameters,
    compute_dtype,
    is_excluded,
    keep_where,
    mask_tensor,
)

MERGING_METHODS = ("average_merging", "task_arithmetic", "fisher_merging", "regmean_merging", "ties_merging")
TRIM_SCOPES = ("global", "tensor")
_RADIX_CHUNK = 1 << 24  # elements per slice in the streaming k-th value selection (bounded memory)


def _check_coefficient(value: float, what: str = "scaling_coefficient") -> float:
    try:
        coefficient = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(coefficient):
        raise ValueError(f"{what} must be finite, got {value}")
    return coefficient


def _kept_names(names: Iterable[str], exclude_param_names_regex: Iterable[str]) -> list[str]:
    exclude = tuple(exclude_param_names_regex)
    return [n for n in names if not is_excluded(n, exclude)]


def _with_pretrained(
    pretrained: Mapping[str, torch.Tensor], models_to_merge: Sequence[Mapping[str, torch.Tensor]]
) -> list[str]:
    labels = ["the pretrained model"] + [f"model {i}" for i in range(len(models_to_merge))]
    if len(models_to_merge) == 0:
        raise ValueError("no models given (the list of models to merge is empty)")
    return check_same_parameters([pretrained, *models_to_merge], labels)


# ----------------------------------------------------------------------------------------------------------------
# Average and task arithmetic
# ----------------------------------------------------------------------------------------------------------------


def average_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/M) Σ_i x_i, summed in order in float32; result in the first tensor's dtype."""
    cdtype = compute_dtype(tensors[0].dtype)
    total = tensors[0].detach().to(cdtype).clone()
    for t in tensors[1:]:
        total += t.detach().to(cdtype)
    return (total / len(tensors)).to(tensors[0].dtype)


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


def average_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]], exclude_param_names_regex: Iterable[str] = ()
) -> StateDict:
    """Element-wise mean θ = (1/M) Σ_i θ_i; excluded parameters come from the first model."""
    names = check_same_parameters(models_to_merge)
    kept = set(_kept_names(names, exclude_param_names_regex))
    return {
        n: average_tensor([m[n] for m in models_to_merge]) if n in kept else models_to_merge[0][n]
        for n in names
    }


def task_arithmetic(
    pretrained: Mapping[str, torch.Tensor],
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    scaling_coefficient: float = 1.0,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """θ = θ_pre + λ Σ_i (θ_i − θ_pre) (one model or more); excluded parameters come from θ_pre."""
    lam = _check_coefficient(scaling_coefficient)
    names = _with_pretrained(pretrained, models_to_merge)
    kept = set(_kept_names(names, exclude_param_names_regex))
    return {
        n: task_arithmetic_tensor(pretrained[n], [m[n] for m in models_to_merge], lam)
        if n in kept
        else pretrained[n]
        for n in names
    }


# ----------------------------------------------------------------------------------------------------------------
# TIES
# ----------------------------------------------------------------------------------------------------------------


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
                    raise ValueError("NaN in the task vector: cannot select a TIES threshold")
                yield part.view(torch.int32).to(torch.int64)

    counts = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for bits in slices():
        counts += torch.bincount(bits >> 16, minlength=1 << 16)
        total += bits.numel()
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
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


def ties_merging(
    pretrained: Mapping[str, torch.Tensor],
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    param_value_mask_rate: float = 0.8,
    scaling_coefficient: float = 1.0,
    trim_scope: str = "global",
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """TIES-Merging (trim, elect sign, disjoint mean), see the module docstring.

    ``trim_scope="global"`` (the paper's and the original TIES code's behaviour): one threshold per model over its
    whole task vector (all non-excluded parameters), and one majority sign for the whole model. ``"tensor"`` (as
    mergekit and PEFT do): thresholds and majority sign per tensor. Global selection is exact and works tensor by
    tensor (:func:`kth_smallest_abs`); no M × P matrix is built.
    """
    rate = check_mask_rate(param_value_mask_rate, "param_value_mask_rate")
    lam = _check_coefficient(scaling_coefficient)
    if trim_scope not in TRIM_SCOPES:
        raise ValueError(f"trim_scope must be one of {TRIM_SCOPES}, got {trim_scope!r}")
    names = _with_pretrained(pretrained, models_to_merge)
    kept = _kept_names(names, exclude_param_names_regex)
    cdtype = {n: compute_dtype(pretrained[n].dtype) for n in kept}

    def task_vector_chunks(model: Mapping[str, torch.Tensor], scope: list[str]):
        return lambda: (model[n].detach().to(cdtype[n]) - pretrained[n].detach().to(cdtype[n]) for n in scope)

    result: StateDict = {n: pretrained[n] for n in names}
    if trim_scope == "global":
        numel = sum(pretrained[n].numel() for n in kept)
        thresholds = [ties_trim_threshold(numel, rate, task_vector_chunks(m, kept)) for m in models_to_merge]
        sign_total = sum(
            ties_sign_sum(pretrained[n], [m[n] for m in models_to_merge], thresholds) for n in kept
        )
        majority = float(math.copysign(1.0, sign_total)) if sign_total != 0 else 0.0
        for n in kept:
            result[n] = ties_merge_tensor(
                pretrained[n], [m[n] for m in models_to_merge], thresholds, lam, majority
            )
    else:
        for n in kept:
            tensors = [m[n] for m in models_to_merge]
            thresholds = [
                ties_trim_threshold(pretrained[n].numel(), rate, task_vector_chunks(m, [n]))
                for m in models_to_merge
            ]
            sign_total = ties_sign_sum(pretrained[n], tensors, thresholds)
            majority = float(math.copysign(1.0, sign_total)) if sign_total != 0 else 0.0
            result[n] = ties_merge_tensor(pretrained[n], tensors, thresholds, lam, majority)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Fisher and RegMean
# ----------------------------------------------------------------------------------------------------------------


def fisher_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    fisher_weights: Sequence[Mapping[str, torch.Tensor]],
    fisher_scaling_coefficients: Sequence[float] | None = None,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """Fisher merging (§4.3): θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i element-wise, with F̃_i = F_i + ε.

    w_i = ``fisher_scaling_coefficients[i]`` (1/M each when None). With ``normalize_fisher_weight`` the models are
    reweighted by their inverse global Fisher norm: n_i = sqrt(Σ_params ‖F_i‖²) (without ε), a_i = 1/(n_i + ε),
    w_i ← w_i a_i / Σ_j a_j. ``fisher_weights[i]`` holds the diagonal Fisher of every non-excluded parameter of model
    i (same names and shapes). Excluded parameters come from the first model.
    """
    names = check_same_parameters(models_to_merge)
    num = len(models_to_merge)
    if len(fisher_weights) != num:
        raise ValueError(f"got {len(fisher_weights)} Fisher weight dicts for {num} models")
    eps = _check_coefficient(minimal_fisher_weight, "minimal_fisher_weight")
    if fisher_scaling_coefficients is None:
        coefficients = [1.0 / num] * num
    else:
        if len(fisher_scaling_coefficients) != num:
            raise ValueError(
                f"got {len(fisher_scaling_coefficients)} fisher_scaling_coefficients for {num} models"
            )
        coefficients = [
            _check_coefficient(c, "fisher_scaling_coefficient") for c in fisher_scaling_coefficients
        ]
    kept = _kept_names(names, exclude_param_names_regex)
    for i, fisher in enumerate(fisher_weights):
        for n in kept:
            if n not in fisher:
                raise ValueError(f"parameter {n}: no Fisher weight for model {i}")
            if fisher[n].shape != models_to_merge[i][n].shape:
                raise ValueError(
                    f"parameter {n}: Fisher weight of model {i} has shape {tuple(fisher[n].shape)}, "
                    f"the parameter {tuple(models_to_merge[i][n].shape)}"
                )
    if normalize_fisher_weight:
        norms = [
            math.sqrt(sum(float(fisher[n].double().pow(2).sum()) for n in kept)) for fisher in fisher_weights
        ]
        inverse = [1.0 / (norm + eps) for norm in norms]
        coefficients = [c * a / sum(inverse) for c, a in zip(coefficients, inverse)]
    result: StateDict = {n: models_to_merge[0][n] for n in names}
    for n in kept:
        cdtype = compute_dtype(models_to_merge[0][n].dtype)
        numerator = torch.zeros(models_to_merge[0][n].shape, dtype=cdtype)
        denominator = torch.zeros_like(numerator)
        for model, fisher, w in zip(models_to_merge, fisher_weights, coefficients):
            weighted = w * (fisher[n].detach().to(cdtype).cpu() + eps)
            numerator += weighted * model[n].detach().to(cdtype).cpu()
            denominator += weighted
        result[n] = (numerator / denominator).to(
            device=models_to_merge[0][n].device, dtype=models_to_merge[0][n].dtype
        )
    return result


def regmean_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    gram_matrices: Sequence[Mapping[str, torch.Tensor]],
    reduce_non_diagonal_ratio: float = 1.0,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """RegMean (§4.4). For every weight ``name`` (shape out × in) with a Gram matrix ``gram_matrices[i][name]``
    (in × in, the inputs' XᵀX/N of that linear layer): Ĝ_i = G_i with off-diagonal entries times α, and
    W = ((Σ_i Ĝ_i)⁻¹ Σ_i Ĝ_i W_iᵀ)ᵀ, solved with ``torch.linalg.solve`` (no explicit inverse). Every other parameter
    is averaged. A singular system raises ``ValueError`` naming the layer. Excluded parameters come from model 0.
    """
    names = check_same_parameters(models_to_merge)
    num = len(models_to_merge)
    if len(gram_matrices) != num:
        raise ValueError(f"got {len(gram_matrices)} Gram matrix dicts for {num} models")
    alpha = check_mask_rate(reduce_non_diagonal_ratio, "reduce_non_diagonal_ratio")
    kept = _kept_names(names, exclude_param_names_regex)
    result: StateDict = {n: models_to_merge[0][n] for n in names}
    for n in kept:
        if n not in gram_matrices[0]:
            result[n] = average_tensor([m[n] for m in models_to_merge])
            continue
        weight0 = models_to_merge[0][n]
        if weight0.dim() != 2:
            raise ValueError(f"parameter {n}: a Gram matrix is given but the parameter is not a 2-D weight")
        in_features = weight0.shape[1]
        cdtype = compute_dtype(weight0.dtype)
        gram_sum = torch.zeros(in_features, in_features, dtype=cdtype)
        rhs = torch.zeros(in_features, weight0.shape[0], dtype=cdtype)
        scale = torch.full((in_features, in_features), alpha, dtype=cdtype)
        scale.fill_diagonal_(1.0)
        for i, (model, grams) in enumerate(zip(models_to_merge, gram_matrices)):
            if n not in grams:
                raise ValueError(f"parameter {n}: Gram matrix missing for model {i}")
            gram = grams[n].detach().to(cdtype).cpu()
            if gram.shape != (in_features, in_features):
                raise ValueError(
                    f"parameter {n}: Gram matrix of model {i} has shape {tuple(gram.shape)}, "
                    f"expected {(in_features, in_features)}"
                )
            gram = gram * scale
            gram_sum += gram
            rhs += gram @ model[n].detach().to(cdtype).cpu().T
        try:
            solution = torch.linalg.solve(gram_sum, rhs)
        except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
            raise ValueError(f"RegMean: the summed Gram matrix of layer {n} is singular ({exc})") from exc
        if not torch.isfinite(solution).all():
            raise ValueError(
                f"RegMean: the summed Gram matrix of layer {n} is singular (non-finite solution)"
            )
        result[n] = solution.T.contiguous().to(device=weight0.device, dtype=weight0.dtype)
    return result


# ----------------------------------------------------------------------------------------------------------------
# DARE + X
# ----------------------------------------------------------------------------------------------------------------


def mask_merging(
    pretrained: Mapping[str, torch.Tensor],
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    merging_method_name: str,
    weight_mask_rates: Sequence[float] | float,
    use_weight_rescale: bool = True,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = 0,
    exclude_param_names_regex: Iterable[str] = (),
    **method_kwargs,
) -> StateDict:
    """DARE + X: mask each model (model i with rate ``weight_mask_rates[i]``, its masks drawn from
    ``(seed, parameter name, i)``), then merge the masked models with ``merging_method_name`` (one of
    :data:`MERGING_METHODS`) and ``method_kwargs`` (e.g. ``scaling_coefficient``, ``param_value_mask_rate``,
    ``trim_scope``, ``fisher_weights``, ``gram_matrices``)."""
    if merging_method_name not in MERGING_METHODS:
        raise ValueError(f"unknown merging method {merging_method_name!r}; expected one of {MERGING_METHODS}")
    names = _with_pretrained(pretrained, models_to_merge)
    if isinstance(weight_mask_rates, int | float):
        weight_mask_rates = [weight_mask_rates] * len(models_to_merge)
    if len(weight_mask_rates) != len(models_to_merge):
        raise ValueError(f"got {len(weight_mask_rates)} weight_mask_rates for {len(models_to_merge)} models")
    rates = [check_mask_rate(r, "weight_mask_rate") for r in weight_mask_rates]
    exclude = tuple(exclude_param_names_regex)
    kept = set(_kept_names(names, exclude))
    masked = [
        {
            n: mask_tensor(
                n,
                model[n],
                pretrained[n],
                weight_format=weight_format,
                weight_mask_rate=rate,
                use_weight_rescale=use_weight_rescale,
                mask_strategy=mask_strategy,
                seed=seed,
                model_index=i,
            )
            if n in kept
            else model[n]
            for n in names
        }
        for i, (model, rate) in enumerate(zip(models_to_merge, rates))
    ]
    return merge_state_dicts(merging_method_name, pretrained, masked, exclude, **method_kwargs)


def merge_state_dicts(
    merging_method_name: str,
    pretrained: Mapping[str, torch.Tensor] | None,
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    exclude_param_names_regex: Iterable[str] = (),
    **method_kwargs,
) -> StateDict:
    """Dispatch by name to one of the five methods or ``mask_merging`` (which then needs ``mask_apply_method``
    or ``merging_method_name`` in ``method_kwargs`` as the method applied after DARE)."""
    exclude = tuple(exclude_param_names_regex)
    if merging_method_name == "average_merging":
        return average_merging(models_to_merge, exclude)
    if merging_method_name == "fisher_merging":
        return fisher_merging(models_to_merge, exclude_param_names_regex=exclude, **method_kwargs)
    if merging_method_name == "regmean_merging":
        return regmean_merging(models_to_merge, exclude_param_names_regex=exclude, **method_kwargs)
    if pretrained is None:
        raise ValueError(f"{merging_method_name} needs the pretrained model")
    if merging_method_name == "task_arithmetic":
        return task_arithmetic(
            pretrained, models_to_merge, exclude_param_names_regex=exclude, **method_kwargs
        )
    if merging_method_name == "ties_merging":
        return ties_merging(pretrained, models_to_merge, exclude_param_names_regex=exclude, **method_kwargs)
    if merging_method_name == "mask_merging":
        kwargs = dict(method_kwargs)
        apply = kwargs.pop("mask_apply_method", None) or kwargs.pop("merging_method_name", None)
        if apply is None:
            raise ValueError("mask_merging needs mask_apply_method (the method applied after DARE)")
        return mask_merging(pretrained, models_to_merge, apply, exclude_param_names_regex=exclude, **kwargs)
    raise ValueError(
        f"unknown merging method {merging_method_name!r}; expected one of {MERGING_METHODS + ('mask_merging',)}"
    )
