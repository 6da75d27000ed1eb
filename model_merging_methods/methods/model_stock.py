"""Model Stock: interpolate between the models' average and the pre-trained model by the angle between the task
vectors (Jang, Yun & Han, 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV, arXiv:2403.19522).

Per tensor, with the k ≥ 2 flattened task vectors τ_i: cos φ = the mean over the k(k − 1)/2 pairs i < j of
τ_i·τ_j / (‖τ_i‖ ‖τ_j‖), each clamped to [−1, 1] (a pair with a zero τ has cosine 0: the angle is undefined, and 0
is what mergekit gives it); t = k·cos φ / (1 + (k − 1)·cos φ), and t = 0 (the pre-trained tensor) where
|1 + (k − 1)·cos φ| < 1e-6, as mergekit does; θ = t·mean(θ_i) + (1 − t)·θ_pre. Identical models (cos φ = 1) give
t = 1, their average; all-zero task vectors give t = 0, θ_pre. No hyper-parameters.

Arithmetic: dot products and norms in float32 (float64 stays float64), t in double precision. Differences from
mergekit's ``model_stock`` (per tensor, ``filter_wise: false``): mergekit needs three models or more (base + 2),
divides by max(‖τ_i‖‖τ_j‖, 1e-6) (so a pair whose norm product is below 1e-6 gets a cosine scaled towards 0, not
the true one), and computes t in float32; its per-row variant (``filter_wise``) is not offered here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.registry import MergeMethod, TensorContext, register

SINGULAR = 1e-6  # |1 + (k − 1) cos φ| below this: t = 0


def mean_pairwise_cosine(taus: Sequence[torch.Tensor]) -> float:
    """The mean over pairs i < j of the clamped cosine of the flattened ``taus`` (0 for a pair with a zero vector)."""
    flat = [t.reshape(-1) for t in taus]
    norms = [float(torch.linalg.vector_norm(t)) for t in flat]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            product = norms[i] * norms[j]
            c = float(torch.dot(flat[i], flat[j])) / product if product > 0.0 else 0.0
            cosines.append(min(1.0, max(-1.0, c)))
    return sum(cosines) / len(cosines)


def interpolation_ratio(cos_phi: float, k: int) -> float:
    """t = k cos φ / (1 + (k − 1) cos φ); 0 where the denominator (nearly) vanishes."""
    denominator = 1.0 + (k - 1) * cos_phi
    return 0.0 if abs(denominator) < SINGULAR or math.isnan(denominator) else k * cos_phi / denominator


def model_stock_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(θ, t) for one whole tensor (inputs in the compute dtype, unchanged)."""
    k = len(tensors)
    t = interpolation_ratio(mean_pairwise_cosine([x - base for x in tensors]), k)
    average = tensors[0].clone()
    for x in tensors[1:]:
        average += x
    average /= k
    return t * average + (1.0 - t) * base, t


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return model_stock_tensor(base, tensors)[0]


METHOD = register(
    MergeMethod(
        order=80,
        name="model_stock_merging",
        label="Model Stock",
        formula="t = k cos φ / (1 + (k − 1) cos φ), cos φ = mean pairwise cos(τ_i, τ_j); θ = t·mean θ_i + (1 − t) θ_pre",
        reference="Jang et al. 2024, Model Stock (ECCV), arXiv:2403.19522",
        params=(),
        kernel=_kernel,
        scope="tensor",
        min_models=2,
    )
)
