"""Task arithmetic: θ = θ_pre + λ Σ_i (θ_i − θ_pre), element-wise (Ilharco et al., 2023, "Editing models with task
arithmetic", ICLR). λ = ``scaling_coefficient``; float32 arithmetic, result in θ_pre's dtype.

mergekit's options (``docs/mergekit.md``): ``model_weights`` w_i gives θ_pre + λ Σ_i w_i τ_i, and ``normalize``
divides the sum by Σ_i w_i (by M without weights; |Σ w| < 1e-8 divides by 1), both in mergekit's order of operations
(the task vectors stacked, multiplied by their weights, summed). Without them the bytes are the paper's form above.

This module also declares the mergekit options several methods share: ``model_weights``, ``normalize`` (methods whose
paper form is a sum), ``no_normalize`` (methods whose paper form is a mean), ``densities`` and ``zero_sign``. They are
keywords of the API and keys of a mergekit configuration (``--config``), not command-line flags, so the flags, their
defaults and the run names stay the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import compute_dtype
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.sparsify import combine
from model_merging_methods.validators import check_coefficient, check_flag, check_rate

COEFFICIENT_GRID = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)

SCALING_COEFFICIENT = Param(
    "scaling_coefficient",
    check_coefficient,
    1.0,
    "λ: the scaling of the merged task vector",
    grid=COEFFICIENT_GRID,
)


def check_weight(name: str, value: Any) -> float:
    """A model weight: any finite number (negative weights subtract a task vector, as in mergekit)."""
    if isinstance(value, bool):
        raise MergeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(v):
        raise MergeError(f"{name} must be finite, got {value}")
    return v


MODEL_WEIGHTS = Param(
    "model_weights",
    check_weight,
    None,
    "mergekit's weight w_i: τ_i (θ_i for the average) multiplied by w_i before anything else, sign election "
    "included (default: none, every model counts once)",
    per_model=True,
    flag=False,
)

NORMALIZE = Param(
    "normalize",
    check_flag,
    False,
    "mergekit's normalize: true: divide the (weighted) sum of task vectors by the sum of the weights",
    type=bool,
    flag=False,
)

NO_NORMALIZE = Param(
    "no_normalize",
    check_flag,
    False,
    "mergekit's normalize: false: sum the (agreeing, weighted) task vectors instead of taking their mean",
    type=bool,
    flag=False,
)

DENSITIES = Param(
    "densities",
    check_rate,
    None,
    "mergekit's density d: the kept fraction per model, used exactly by the count rules (replaces the drop rate: "
    "r = 1 − d for TIES, r = 1 − d − β for Breadcrumbs, p = 1 − d for DELLA)",
    per_model=True,
    flag=False,
)

ZERO_SIGNS = ("majority", "plus")

ZERO_SIGN = Param(
    "zero_sign",
    lambda name, v: v,
    "majority",
    "the sign elected where Σ_i τ̂_i = 0: the tensor's (or model's) majority sign (the original's) or +1 (mergekit's)",
    type=str,
    choices=ZERO_SIGNS,
    flag=False,
)


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


def weighted_task_arithmetic_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float] | None,
    normalize: bool,
    scaling_coefficient: float,
) -> torch.Tensor:
    """θ_pre + λ (Σ_i w_i τ_i) [/ Σ_i w_i], mergekit's order of operations (inputs in the compute dtype)."""
    taus = torch.stack([x - base for x in tensors])
    return combine(
        base, taus, weights, elect_sign=False, zero_sign=1.0, normalize=normalize,
        scaling_coefficient=scaling_coefficient,
    )  # fmt: skip


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    lam = params["scaling_coefficient"]
    if params.get("model_weights") is None and not params.get("normalize"):
        return task_arithmetic_tensor(base, tensors, lam)
    return weighted_task_arithmetic_tensor(base, tensors, params["model_weights"], params["normalize"], lam)


METHOD = register(
    MergeMethod(
        order=20,
        name="task_arithmetic",
        label="task arithmetic",
        formula="θ = θ_pre + λ Σ_i τ_i",
        reference="Ilharco et al. 2023, Editing models with task arithmetic (ICLR), arXiv:2212.04089",
        params=(SCALING_COEFFICIENT, MODEL_WEIGHTS, NORMALIZE),
        kernel=_kernel,
    )
)
