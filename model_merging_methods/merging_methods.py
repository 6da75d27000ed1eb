"""The merging methods as pure functions over state dicts (``dict[str, Tensor]``), and DARE + X.

Every method is declared once in its own module under :mod:`model_merging_methods.methods` (formula, reference,
typed parameters, per-tensor kernel) and registered in :mod:`model_merging_methods.registry`; the functions here are
the stable, documented spellings of those declarations, all run by the same executor as the streaming engine
(:func:`model_merging_methods.engine.merge_in_memory`), so both give the same bytes.

Notation: θ_pre pre-trained weights, θ_1..θ_M the models to merge, τ_i = θ_i − θ_pre their task vectors.

* Average:          θ = (1/M) Σ_i θ_i
* Task Arithmetic:  θ = θ_pre + λ Σ_i τ_i
* TIES:             trim, elect sign, disjoint mean (see :mod:`model_merging_methods.methods.ties`)
* Fisher:           θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i, F̃_i = F_i + ε
* RegMean:          W = ((Σ_i Ĝ_i)⁻¹ Σ_i Ĝ_i W_iᵀ)ᵀ for linear weights (Ĝ: off-diagonal scaled by α); average elsewhere
* DARE + X:         each τ_i masked by DARE first (``mask_merging``), then X; every method whose declaration has
                    ``dare_prestep`` can follow DARE.

Every function validates names, shapes and values (:class:`~model_merging_methods.errors.MergeError`, a
``ValueError``), never mutates its inputs, computes in float32 (float64 stays float64) and casts back to the input
dtype. Parameters matched by ``exclude_param_names_regex`` (``re.match``) are taken from the pre-trained model (from
the first model for methods without one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.engine import Dare, merge_in_memory
from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import MASK_STRATEGIES, WEIGHT_FORMATS, StateDict
from model_merging_methods.methods.average import average_tensor
from model_merging_methods.methods.task_arithmetic import task_arithmetic_tensor
from model_merging_methods.methods.ties import (
    TRIM_SCOPES,
    kth_smallest_abs,
    ties_merge_tensor,
    ties_merge_tensor_both_majorities,
    ties_sign_sum,
    ties_trim_threshold,
)
from model_merging_methods.registry import get_method, method_names
from model_merging_methods.validators import check_choice, check_rate, check_seed, per_model

__all__ = [
    "MERGING_METHODS",
    "TRIM_SCOPES",
    "average_merging",
    "average_tensor",
    "fisher_merging",
    "kth_smallest_abs",
    "mask_merging",
    "merge_state_dicts",
    "regmean_merging",
    "task_arithmetic",
    "task_arithmetic_tensor",
    "ties_merge_tensor",
    "ties_merge_tensor_both_majorities",
    "ties_merging",
    "ties_sign_sum",
    "ties_trim_threshold",
]

# every registered method, in registration order (the five of the paper first)
MERGING_METHODS = tuple(method_names())


def average_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]], exclude_param_names_regex: Iterable[str] = ()
) -> StateDict:
    """Element-wise mean θ = (1/M) Σ_i θ_i; excluded parameters come from the first model."""
    return merge_in_memory("average_merging", None, models_to_merge, exclude_param_names_regex)


def task_arithmetic(
    pretrained: Mapping[str, torch.Tensor],
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    scaling_coefficient: float = 1.0,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """θ = θ_pre + λ Σ_i (θ_i − θ_pre) (one model or more); excluded parameters come from θ_pre."""
    return merge_in_memory(
        "task_arithmetic", pretrained, models_to_merge, exclude_param_names_regex,
        scaling_coefficient=scaling_coefficient,
    )  # fmt: skip


def ties_merging(
    pretrained: Mapping[str, torch.Tensor],
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    param_value_mask_rate: float = 0.8,
    scaling_coefficient: float = 1.0,
    trim_scope: str = "global",
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """TIES-Merging (trim, elect sign, disjoint mean), see :mod:`model_merging_methods.methods.ties`.

    ``trim_scope="global"`` (the paper's and the original TIES code's behaviour): one threshold per model over its
    whole task vector (all non-excluded parameters), and one majority sign for the whole model. ``"tensor"`` (as
    mergekit and PEFT do): thresholds and majority sign per tensor. Global selection is exact and works tensor by
    tensor (:func:`kth_smallest_abs`); no M × P matrix is built.
    """
    return merge_in_memory(
        "ties_merging", pretrained, models_to_merge, exclude_param_names_regex,
        param_value_mask_rate=param_value_mask_rate, scaling_coefficient=scaling_coefficient, trim_scope=trim_scope,
    )  # fmt: skip


def fisher_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    fisher_weights: Sequence[Mapping[str, torch.Tensor]],
    fisher_scaling_coefficients: Sequence[float] | None = None,
    normalize_fisher_weight: bool = True,
    minimal_fisher_weight: float = 1e-6,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """Fisher merging, see :mod:`model_merging_methods.methods.fisher`. ``fisher_weights[i]`` holds the diagonal
    Fisher of every non-excluded parameter of model i (same names and shapes). Excluded parameters come from the
    first model."""
    return merge_in_memory(
        "fisher_merging", None, models_to_merge, exclude_param_names_regex,
        data={"fisher_weights": list(fisher_weights)}, fisher_scaling_coefficients=fisher_scaling_coefficients,
        normalize_fisher_weight=normalize_fisher_weight, minimal_fisher_weight=minimal_fisher_weight,
    )  # fmt: skip


def regmean_merging(
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    gram_matrices: Sequence[Mapping[str, torch.Tensor]],
    reduce_non_diagonal_ratio: float = 1.0,
    exclude_param_names_regex: Iterable[str] = (),
) -> StateDict:
    """RegMean, see :mod:`model_merging_methods.methods.regmean`. A singular system raises ``MergeError`` naming the
    layer. Excluded parameters come from model 0."""
    return merge_in_memory(
        "regmean_merging", None, models_to_merge, exclude_param_names_regex,
        data={"gram_matrices": list(gram_matrices)}, reduce_non_diagonal_ratio=reduce_non_diagonal_ratio,
    )  # fmt: skip


def dare_prestep(
    num_models: int,
    weight_mask_rates: Sequence[float] | float,
    use_weight_rescale: bool = True,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = 0,
) -> Dare:
    """The checked DARE pre-step for ``num_models`` models (one rate for all, or one per model)."""
    rates = per_model("weight_mask_rate", weight_mask_rates, num_models, check_rate)
    check_choice("weight_format", weight_format, WEIGHT_FORMATS)
    check_choice("mask_strategy", mask_strategy, MASK_STRATEGIES)
    return Dare.for_models(
        rates, bool(use_weight_rescale), mask_strategy, weight_format, check_seed("seed", seed)
    )


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
    **method_kwargs: Any,
) -> StateDict:
    """DARE + X: mask each model (model i with rate ``weight_mask_rates[i]``, its masks drawn from
    ``(seed, parameter name, i)``), then merge the masked models with ``merging_method_name`` and ``method_kwargs``
    (its parameters, and its data statistics such as ``fisher_weights`` or ``gram_matrices``)."""
    method = get_method(merging_method_name)
    if not method.dare_prestep:
        raise MergeError(f"{merging_method_name} does not take DARE as a pre-step")
    if len(models_to_merge) == 0:
        raise MergeError("no models given (the list of models to merge is empty)")
    dare = dare_prestep(
        len(models_to_merge), weight_mask_rates, use_weight_rescale, mask_strategy, weight_format, seed
    )
    data = {s.name: method_kwargs.pop(s.name) for s in method.data_statistics if s.name in method_kwargs}
    return merge_in_memory(
        method, pretrained, models_to_merge, exclude_param_names_regex, dare=dare, seed=dare.seed, data=data,
        **method_kwargs,
    )  # fmt: skip


def merge_state_dicts(
    merging_method_name: str,
    pretrained: Mapping[str, torch.Tensor] | None,
    models_to_merge: Sequence[Mapping[str, torch.Tensor]],
    exclude_param_names_regex: Iterable[str] = (),
    **method_kwargs: Any,
) -> StateDict:
    """Merge by method name: any registered method, or ``mask_merging`` (which then needs ``mask_apply_method`` or
    ``merging_method_name`` in ``method_kwargs`` as the method applied after DARE)."""
    exclude = tuple(exclude_param_names_regex)
    if merging_method_name == "mask_merging":
        kwargs = dict(method_kwargs)
        apply = kwargs.pop("mask_apply_method", None) or kwargs.pop("merging_method_name", None)
        if apply is None:
            raise MergeError("mask_merging needs mask_apply_method (the method applied after DARE)")
        if pretrained is None:
            raise MergeError("mask_merging needs the pretrained model")
        return mask_merging(pretrained, models_to_merge, apply, exclude_param_names_regex=exclude, **kwargs)
    method = get_method(merging_method_name)
    kwargs = dict(method_kwargs)
    data = {s.name: kwargs.pop(s.name) for s in method.data_statistics if s.name in kwargs}
    seed = kwargs.pop("seed", 0) if method.random else 0
    return merge_in_memory(method, pretrained, models_to_merge, exclude, seed=seed, data=data, **kwargs)
