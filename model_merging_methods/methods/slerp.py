"""SLERP: spherical linear interpolation between two models, tensor by tensor (Shoemake, 1985, "Animating rotation
with quaternion curves", SIGGRAPH; for model weights as in mergekit's ``slerp``).

Per tensor, with a = θ_1 and b = θ_2 flattened and t = ``slerp_t`` ∈ [0, 1] (t = 0 gives the first model, t = 1 the
second): â = a / ‖a‖, b̂ = b / ‖b‖ (a norm ≤ 1e-8 is replaced by 1), d = clamp(â·b̂, −1, 1); when |d| > 0.9995
(nearly collinear or antipodal) θ = (1 − t)·a + t·b; otherwise Ω = arccos d and
θ = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b. The interpolation applies to the raw tensors; only the angle comes
from the normalised copies. A zero tensor has d = 0, so Ω = π/2 and θ = cos(tπ/2)·a + sin(tπ/2)·b.

The arithmetic follows mergekit 0.1.5's ``slerp`` step by step in float32 (float64 stays float64): the same
normalised dot product, the coefficients computed as float32 scalars, then coef_a·a + coef_b·b. No pre-trained model
is needed; excluded and non-float tensors come from the first model (mergekit: from its ``base_model``, the t = 0
end). mergekit computes each norm as the norm of the norms of 2^20-element chunks, which for larger tensors can
differ from the direct norm in the last bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_rate

DOT_THRESHOLD = 0.9995  # |cos| above this: linear interpolation
NORM_EPS = 1e-8  # a norm at most this is treated as 1

SLERP_T = Param(
    "slerp_t",
    check_rate,
    0.5,
    "SLERP t in [0, 1]: 0 gives the first model, 1 the second",
    grid=(0.3, 0.5, 0.7),
)


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two scalar coefficients (0-D tensors in a's dtype) of the spherical interpolation of a and b at t."""
    dtype = a.dtype
    a, b = a.reshape(-1), b.reshape(-1)
    norm_a, norm_b = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    one = torch.ones((), dtype=dtype, device=a.device)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, one)
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, one)
    dot = ((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1)
    tt = torch.tensor(t, dtype=dtype, device=a.device)
    if bool(dot.abs() > DOT_THRESHOLD):
        return 1 - tt, tt
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta


def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP of one whole tensor pair (inputs in the compute dtype, unchanged)."""
    if a.numel() == 0:
        return a.clone()
    coef_a, coef_b = slerp_coefficients(a, b, t)
    return coef_a * a + coef_b * b


def _kernel(
    base: None, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return slerp_tensor(tensors[0], tensors[1], params["slerp_t"])


METHOD = register(
    MergeMethod(
        order=90,
        name="slerp_merging",
        label="SLERP",
        formula="θ = sin((1 − t)Ω)/sin Ω · θ_1 + sin(tΩ)/sin Ω · θ_2, cos Ω = θ̂_1·θ̂_2 (linear when |cos Ω| > 0.9995)",
        reference="Shoemake 1985 (SIGGRAPH); mergekit's slerp",
        params=(SLERP_T,),
        kernel=_kernel,
        needs_base=False,
        min_models=2,
        max_models=2,
        copy_from="first",
        scope="tensor",
    )
)
