"""Average merging: θ = (1/M) Σ_i θ_i, element-wise (Wortsman et al., 2022, "Model soups", ICML).

Summed in order in float32 (float64 stays float64). No pre-trained model needed; excluded and non-float tensors come
from the first model.

mergekit's ``linear`` (``docs/mergekit.md``): with ``model_weights`` w_i, θ = Σ_i w_i θ_i / Σ_i w_i, accumulated as
mergekit does (a zero tensor, then ``addcmul`` of each θ_i with w_i in model order, then the division);
``no_normalize`` leaves out the division (θ = Σ_i w_i θ_i; all weights 1 without ``model_weights``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.mask_weights_utils import compute_dtype
from model_merging_methods.methods.task_arithmetic import MODEL_WEIGHTS, NO_NORMALIZE
from model_merging_methods.registry import MergeMethod, TensorContext, register


def average_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1/M) Σ_i x_i, summed in order in float32; result in the first tensor's dtype."""
    cdtype = compute_dtype(tensors[0].dtype)
    total = tensors[0].detach().to(cdtype).clone()
    for t in tensors[1:]:
        total += t.detach().to(cdtype)
    # a divisor on the tensors' device: CUDA multiplies by the reciprocal of a CPU scalar (not the CPU's bytes)
    count = torch.tensor(float(len(tensors)), dtype=total.dtype, device=total.device)
    return (total / count).to(tensors[0].dtype)


def linear_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool) -> torch.Tensor:
    """Σ_i w_i x_i [/ Σ_i w_i] as mergekit's ``linear`` computes it (inputs in the compute dtype)."""
    first = tensors[0]
    w = torch.tensor(list(weights), dtype=first.dtype, device=first.device)
    result = torch.zeros_like(first)
    for x, coefficient in zip(tensors, w.unbind(0)):
        result.addcmul_(x, coefficient)
    if normalize:
        result.div_(w.sum(dim=0))
    return result


def _kernel(
    base: None, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    weights, unnormalized = params.get("model_weights"), params.get("no_normalize")
    if weights is None and not unnormalized:
        return average_tensor(tensors)
    return linear_tensor(tensors, weights if weights is not None else [1.0] * len(tensors), not unnormalized)


METHOD = register(
    MergeMethod(
        order=10,
        name="average_merging",
        label="average",
        formula="θ = (1/M) Σ_i θ_i",
        reference="Wortsman et al. 2022, Model soups (ICML), arXiv:2203.05482",
        params=(MODEL_WEIGHTS, NO_NORMALIZE),
        kernel=_kernel,
        needs_base=False,
        copy_from="first",
    )
)
