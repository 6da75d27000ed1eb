"""Fisher merging (Matena & Raffel, 2022, "Merging models with Fisher-weighted averaging", NeurIPS,
arXiv:2111.09832), as in the original code (§4.3 of the spec).

θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i element-wise, with F̃_i = F_i + ε (ε = ``minimal_fisher_weight``) and
w_i = ``fisher_scaling_coefficients[i]`` (1/M each when None). With ``normalize_fisher_weight`` the models are
reweighted by their inverse global Fisher norm: n_i = sqrt(Σ_params ‖F_i‖²) (without ε), a_i = 1/(n_i + ε),
w_i ← w_i a_i / Σ_j a_j. The diagonal Fisher F_i of every non-excluded parameter of model i is a data statistic
(``fisher_weights``, collected by ``utils.merge_statistics``), so the method runs in memory only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.methods.task_arithmetic import COEFFICIENT_GRID
from model_merging_methods.registry import DataStatistic, MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_coefficient, check_count, check_flag

EXAMPLES_GRID = (256, 512, 1024, 2048)


class FisherCoefficients(list):
    """The per-model weights w_i after the optional norm normalisation."""


def _model_statistics(params: Mapping[str, Any], view) -> FisherCoefficients:
    fishers = view.data["fisher_weights"]
    num = view.num_models
    if len(fishers) != num:
        raise MergeError(f"got {len(fishers)} Fisher weight dicts for {num} models")
    eps = params["minimal_fisher_weight"]
    coefficients = params["fisher_scaling_coefficients"] or [1.0 / num] * num
    for i, fisher in enumerate(fishers):
        for plan in view.plans:
            if plan.name not in fisher:
                raise MergeError(f"parameter {plan.name}: no Fisher weight for model {i}")
            if tuple(fisher[plan.name].shape) != plan.shape:
                raise MergeError(
                    f"parameter {plan.name}: Fisher weight of model {i} has shape {tuple(fisher[plan.name].shape)}, "
                    f"the parameter {plan.shape}"
                )
    if params["normalize_fisher_weight"]:
        norms = [
            math.sqrt(sum(float(fisher[p.name].double().pow(2).sum()) for p in view.plans))
            for fisher in fishers
        ]
        inverse = [1.0 / (norm + eps) for norm in norms]
        coefficients = [c * a / sum(inverse) for c, a in zip(coefficients, inverse)]
    return FisherCoefficients(coefficients)


def _kernel(
    base: None, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    eps = params["minimal_fisher_weight"]
    cdtype = tensors[0].dtype
    numerator = torch.zeros(tensors[0].shape, dtype=cdtype, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    for x, fisher, w in zip(tensors, ctx.data["fisher_weights"], ctx.stats):
        weighted = w * (fisher.detach().to(device=x.device, dtype=cdtype) + eps)
        numerator += weighted * x
        denominator += weighted
    return numerator / denominator


METHOD = register(
    MergeMethod(
        order=40,
        name="fisher_merging",
        label="Fisher",
        formula="θ = Σ_i w_i F̃_i θ_i / Σ_i w_i F̃_i",
        reference="Matena & Raffel 2022, Merging models with Fisher-weighted averaging (NeurIPS), arXiv:2111.09832",
        params=(
            Param(
                "fisher_scaling_coefficients",
                check_coefficient,
                None,
                "w_i: one weight for every model, or one per model (default 1/M each)",
                per_model=True,
                grid=COEFFICIENT_GRID,
            ),
            Param(
                "normalize_fisher_weight",
                check_flag,
                True,
                "reweight models by their inverse global Fisher norm",
                type=bool,
            ),
            Param("minimal_fisher_weight", check_coefficient, 1e-6, "ε added to every Fisher weight"),
        ),  # fmt: skip
        kernel=_kernel,
        needs_base=False,
        scope="tensor",
        copy_from="first",
        model_statistics=_model_statistics,
        data_statistics=(
            DataStatistic(
                "fisher_weights",
                "the diagonal Fisher information of each model, one dict per model",
                params=(
                    Param(
                        "nums_fisher_examples",
                        lambda n, v: check_count(n, v, 1),
                        256,
                        "training examples the Fisher weights are estimated on",
                        type=int,
                        grid=EXAMPLES_GRID,
                    ),
                ),
            ),
        ),  # fmt: skip
        dare_prestep=True,
    )
)
