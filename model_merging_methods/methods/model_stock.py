"""Model Stock: interpolate between the models' average and the pre-trained model by the angle between the task
vectors (Jang, Yun & Han, 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV, arXiv:2403.19522).

Per tensor, with the k ≥ 2 flattened task vectors τ_i: cos φ = the mean over the k(k − 1)/2 pairs i < j of
τ_i·τ_j / (‖τ_i‖ ‖τ_j‖), each clamped to [−1, 1] (a pair with a zero τ has cosine 0: the angle is undefined, and 0
is what mergekit gives it); t = k·cos φ / (1 + (k − 1)·cos φ), and t = 0 (the pre-trained tensor) where
|1 + (k − 1)·cos φ| < 1e-6, as mergekit does; θ = t·mean(θ_i) + (1 − t)·θ_pre. Identical models (cos φ = 1) give
t = 1, their average; all-zero task vectors give t = 0, θ_pre. No hyper-parameters.

Arithmetic: as mergekit 0.1.5's ``model_stock`` (per tensor, ``filter_wise: false``) step by step, in float32 (float64
stays float64): each cosine (τ_i·τ_j).sum() / (‖τ_i‖‖τ_j‖), their mean, t and 1 − t as float32 scalars, the average
summed in model order, so our bytes equal mergekit's. The one deliberate difference: mergekit divides by
max(‖τ_i‖‖τ_j‖, 1e-6), so a pair whose norm product is below 1e-6 (e.g. a barely changed norm vector) gets a cosine
shrunk towards 0 and t towards 0; ours uses the true cosine down to a product of 0. mergekit also needs three models
or more (base + 2); its per-row variant (``filter_wise``) is not offered here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.registry import MergeMethod, TensorContext, register

SINGULAR = 1e-6  # |1 + (k − 1) cos φ| below this: t = 0


def mean_pairwise_cosine(taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over pairs i < j of the clamped cosine of the flattened ``taus``, a 0-D tensor in their dtype (0 for
    a pair with a zero vector)."""
    flat = [t.reshape(-1) for t in taus]
    norms = [torch.norm(t, dim=-1) for t in flat]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            product = norms[i] * norms[j]
            c = (flat[i] * flat[j]).sum(dim=-1) / torch.where(product > 0, product, 1.0)
            cosines.append(torch.where(product > 0, c, 0.0).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def interpolation_ratio(cos_phi: torch.Tensor, k: int) -> torch.Tensor:
    """t = k cos φ / (1 + (k − 1) cos φ) (0-D, cos φ's dtype); 0 where the denominator (nearly) vanishes."""
    denominator = 1 + (k - 1) * cos_phi
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, (k * cos_phi) / torch.where(singular, 1.0, denominator))


def model_stock_tensor(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(θ, t) for one whole tensor (inputs in the compute dtype, unchanged)."""
    k = len(tensors)
    t = interpolation_ratio(mean_pairwise_cosine([x - base for x in tensors]), k)
    average = tensors[0].clone()
    for x in tensors[1:]:
        average += x
    average /= k
    return t * average + (1 - t) * base, float(t)


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
