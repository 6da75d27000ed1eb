"""RegMean (Jin et al., 2023, "Dataless knowledge fusion by merging weights of language models", ICLR,
arXiv:2212.09849), as in the original code (§4.4 of the spec).

For every linear weight W (out × in) with Gram matrices G_i = X_iᵀX_i / N of its inputs: Ĝ_i = G_i with the
off-diagonal entries times α (``reduce_non_diagonal_ratio``), W = ((Σ_i Ĝ_i)⁻¹ Σ_i Ĝ_i W_iᵀ)ᵀ, solved with
``torch.linalg.solve`` (no explicit inverse). Every other parameter is averaged. The Gram matrices are a data
statistic (``gram_matrices``, collected by ``utils.merge_statistics``), so the method runs in memory only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.methods.average import average_tensor
from model_merging_methods.methods.fisher import EXAMPLES_GRID
from model_merging_methods.registry import DataStatistic, MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_count, check_rate


def _model_statistics(params: Mapping[str, Any], view) -> None:
    grams = view.data["gram_matrices"]
    if len(grams) != view.num_models:
        raise MergeError(f"got {len(grams)} Gram matrix dicts for {view.num_models} models")
    return None


def _kernel(
    base: None, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    grams = ctx.data["gram_matrices"]
    n = ctx.name
    if grams[0] is None:
        return average_tensor(tensors)
    weight0 = tensors[0]
    if weight0.dim() != 2:
        raise MergeError(f"parameter {n}: a Gram matrix is given but the parameter is not a 2-D weight")
    in_features = weight0.shape[1]
    cdtype = weight0.dtype
    gram_sum = torch.zeros(in_features, in_features, dtype=cdtype)
    rhs = torch.zeros(in_features, weight0.shape[0], dtype=cdtype)
    scale = torch.full((in_features, in_features), params["reduce_non_diagonal_ratio"], dtype=cdtype)
    scale.fill_diagonal_(1.0)
    for i, (weight, gram) in enumerate(zip(tensors, grams)):
        if gram is None:
            raise MergeError(f"parameter {n}: Gram matrix missing for model {i}")
        gram = gram.detach().to(cdtype).cpu()
        if gram.shape != (in_features, in_features):
            raise MergeError(
                f"parameter {n}: Gram matrix of model {i} has shape {tuple(gram.shape)}, "
                f"expected {(in_features, in_features)}"
            )
        gram = gram * scale
        gram_sum += gram
        rhs += gram @ weight.cpu().T
    try:
        solution = torch.linalg.solve(gram_sum, rhs)
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise MergeError(f"RegMean: the summed Gram matrix of layer {n} is singular ({exc})") from exc
    if not torch.isfinite(solution).all():
        raise MergeError(f"RegMean: the summed Gram matrix of layer {n} is singular (non-finite solution)")
    return solution.T.contiguous().to(weight0.device)


METHOD = register(
    MergeMethod(
        order=50,
        name="regmean_merging",
        label="RegMean",
        formula="W = ((Σ_i Ĝ_i)⁻¹ Σ_i Ĝ_i W_iᵀ)ᵀ for linear weights; average elsewhere",
        reference="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models (ICLR), "
        "arXiv:2212.09849",
        params=(
            Param(
                "reduce_non_diagonal_ratio",
                check_rate,
                1.0,
                "α: the scaling of the Gram matrices' off-diagonal",
                grid=(0.7, 0.8, 0.9, 1.0),
            ),
        ),  # fmt: skip
        kernel=_kernel,
        needs_base=False,
        scope="tensor",
        copy_from="first",
        model_statistics=_model_statistics,
        data_statistics=(
            DataStatistic(
                "gram_matrices",
                "the Gram matrices of each linear layer's inputs, one dict per model",
                params=(
                    Param(
                        "nums_regmean_examples",
                        lambda n, v: check_count(n, v, 1),
                        256,
                        "training examples the Gram matrices are computed on",
                        type=int,
                        grid=EXAMPLES_GRID,
                    ),
                ),
            ),
        ),  # fmt: skip
    )
)
