"""DELLA-Merging: MAGPRUNE (magnitude-ranked random drop with per-entry rescaling), then TIES's sign election and
disjoint mean (Deep, Bhardwaj & Ngo, 2024, "DELLA-Merging: Reducing interference in model merging through
magnitude-based sampling", arXiv:2406.11617).

Per model i (p = ``weight_mask_rate``, one value or one per model; ε = ``della_epsilon``), within each row of τ_i
(the last dimension; a 1-D tensor is one row, a 0-D one a row of one): rank |τ_i| ascending (0 .. n − 1, ties broken
by position, the earlier entry ranking lower: a stable sort), rank_norm = rank / (n − 1) (n = 1: rank_norm = 1/2,
so the lone entry gets DARE's 1 − p), keep probability q = (1 − p) − ε + 2ε·rank_norm. An entry is kept when its
uniform draw u < q (u from :func:`model_merging_methods.rng.uniform`, seeded by (seed, model index, tensor name), so
the result does not depend on how or in which order tensors are processed); a kept entry becomes τ/q (its own keep
probability), a dropped one 0. Every q must lie in (0, 1], i.e. ε ≤ p < 1 − ε (1 − p in (0, 1] when ε = 0), else
:class:`MergeError`. Then, as TIES without trim: s = sign(Σ_i τ̂_i), s = the tensor's majority sign where it is 0;
τ = Σ_i τ̂_i [sign τ̂_i = s] / max(1, #agreeing); θ = θ_pre + λ τ (λ = ``scaling_coefficient``).

DELLA is itself a random drop, so it does not take DARE as a pre-step. mergekit's ``della`` differs: it rescales a
tensor by ‖τ‖₁ / ‖m⊙τ‖₁ rather than each entry by 1/q, requires 1 − p ± ε strictly inside (0, 1), breaks rank ties
with an unstable sort, draws from the global torch generator, and elects a zero sign sum as +1. Those rules are
options here (``docs/mergekit.md``): ``della_rescale`` ("probability": τ/q per entry, the paper's; "l1": m⊙τ·‖τ‖₁ /
‖m⊙τ‖₁, mergekit's ``rescale: true``; "none"), ``zero_sign="plus"``, ``densities`` (the keep probability's centre d
per model, used exactly; d ≥ 1 keeps the tensor, d ≤ 0 drops it, as mergekit), ``model_weights`` (w_i·τ̂_i before the
sign election; the mean divides by Σ w_i over the agreeing models), ``no_normalize`` (sum instead of mean) and
``della_linear`` (no sign election: mergekit's ``della_linear``). The draws stay ours (seeded, per tensor).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods import rng
from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import keep_where
from model_merging_methods.methods.task_arithmetic import (
    DENSITIES,
    MODEL_WEIGHTS,
    NO_NORMALIZE,
    SCALING_COEFFICIENT,
    ZERO_SIGN,
)
from model_merging_methods.methods.ties import _ties_disjoint_merge, majority_sign
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.sparsify import combine, elected_sign_sum, l1_rescale, weight_column
from model_merging_methods.validators import check_flag, check_rate

WEIGHT_MASK_RATE = Param(
    "weight_mask_rate",
    check_rate,
    0.1,
    "DELLA's mean drop rate p (one value, or one per model); the same flag as DARE's drop rate",
    grid=(0.3, 0.5, 0.7),
    per_model=True,
)

DELLA_EPSILON = Param(
    "della_epsilon",
    check_rate,
    0.1,
    "DELLA ε: keep probabilities range over (1 − p) ± ε by magnitude rank within a row",
)

DELLA_RESCALES = ("probability", "l1", "none")

DELLA_RESCALE = Param(
    "della_rescale",
    lambda name, v: v,
    "probability",
    "DELLA's rescale of a kept entry: by its keep probability (probability, the paper's), the tensor's L1 norm "
    "ratio ‖τ‖₁/‖m⊙τ‖₁ (l1, mergekit's rescale: true) or none",
    type=str,
    choices=DELLA_RESCALES,
    flag=False,
)

DELLA_LINEAR = Param(
    "della_linear",
    check_flag,
    False,
    "no sign election: τ = Σ_i w_i τ̂_i (mergekit's della_linear)",
    type=bool,
    flag=False,
)

_ROUNDING = 1e-9  # slack on q ≤ 1 for the rounding of (1 − p) + ε in binary


def check_keep_probabilities(rate: float, epsilon: float, name: str = "weight_mask_rate") -> None:
    """Raise :class:`MergeError` unless every keep probability (1 − p) − ε + 2ε·rank_norm lies in (0, 1]."""
    low, high = (1.0 - rate) - epsilon, (1.0 - rate) + epsilon
    if not (low > 0.0 and high <= 1.0 + _ROUNDING):
        raise MergeError(
            f"della_merging keeps entries with probability (1 - p) ± ε = {low:g} .. {high:g}, which must lie in "
            f"(0, 1]: with {name} p = {rate:g} and della_epsilon ε = {epsilon:g} choose ε ≤ p < 1 − ε"
        )


def check_density_epsilon(density: float, epsilon: float) -> None:
    """mergekit's rule: d ± ε strictly inside (0, 1), unless d ≥ 1 (nothing dropped) or d ≤ 0 (everything)."""
    if 0.0 < density < 1.0 and not (density - epsilon > 0.0 and density + epsilon < 1.0):
        raise MergeError(
            f"della_merging keeps entries with probability density ± ε = {density - epsilon:g} .. "
            f"{density + epsilon:g}, which must lie in (0, 1): with density {density:g} choose della_epsilon < "
            f"{min(density, 1.0 - density):g}"
        )


def _check_all_rates(params: Mapping[str, Any], num_models: int) -> None:
    if params.get("densities") is not None:
        for d in params["densities"]:
            check_density_epsilon(d, params["della_epsilon"])
        return
    for rate in params["weight_mask_rate"]:
        check_keep_probabilities(rate, params["della_epsilon"])


def keep_probabilities(
    tau: torch.Tensor, rate: float, epsilon: float, density: float | None = None
) -> torch.Tensor:
    """q = (1 − p) − ε + 2ε·rank_norm for every entry of ``tau``, ranked by |τ| within its row (last dimension);
    with ``densities`` d, q = (d − ε) + 2ε·rank_norm."""
    rows = tau.detach().reshape(-1, tau.shape[-1] if tau.dim() else 1)
    n = rows.shape[-1]
    if n == 1:
        rank_norm = torch.full(rows.shape, 0.5, dtype=tau.dtype, device=tau.device)
    else:
        order = torch.argsort(rows.abs(), dim=-1, stable=True)
        positions = torch.arange(n, device=tau.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        # a divisor on tau's device: CUDA multiplies by the reciprocal of a CPU scalar (not the CPU's bytes)
        rank_norm = rank.to(tau.dtype) / torch.tensor(float(n - 1), dtype=tau.dtype, device=tau.device)
    centre = (1.0 - rate) if density is None else density
    q = (centre - epsilon) + (2.0 * epsilon) * rank_norm
    return q.clamp_(max=1.0).reshape(tau.shape)


def magprune(
    tau: torch.Tensor,
    rate: float,
    epsilon: float,
    seed: int,
    name: str,
    model_index: int,
    *,
    density: float | None = None,
    rescale: str = "probability",
) -> torch.Tensor:
    """MAGPRUNE of one task-vector tensor: keep each entry with its probability q (u < q), divide it by q (or rescale
    the tensor by its L1 norm ratio, or not at all: ``rescale``)."""
    if density is not None and density >= 1.0:
        return tau.clone()
    if density is not None and density <= 0.0:
        return torch.zeros_like(tau)
    q = keep_probabilities(tau, rate, epsilon, density)
    u = rng.uniform(seed, name, model_index, 0, tau.numel(), device=tau.device).reshape(tau.shape)
    keep = u.to(q.dtype) < q
    if rescale == "probability":
        return keep_where(keep, tau / q)
    masked = keep_where(keep, tau)
    return l1_rescale(tau, masked) if rescale == "l1" else masked


def mergekit_options(params: Mapping[str, Any]) -> list[str]:
    """The names of the mergekit options set to something other than the paper's default."""
    out = [n for n in ("model_weights", "densities") if params.get(n) is not None]
    out += [n for n in ("no_normalize", "della_linear") if params.get(n)]
    return out + [
        n for n, d in (("zero_sign", "majority"), ("della_rescale", "probability")) if params.get(n, d) != d
    ]


def della_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    rates: Sequence[float],
    epsilon: float,
    scaling_coefficient: float,
    seed: int,
    name: str,
    model_indices: Sequence[int],
) -> torch.Tensor:
    """DELLA of one whole tensor (inputs in the compute dtype, unchanged)."""
    for rate in rates:
        check_keep_probabilities(rate, epsilon)
    pruned = torch.stack(
        [
            magprune(x - base, rate, epsilon, seed, name, i)
            for x, rate, i in zip(tensors, rates, model_indices)
        ]
    )
    elected = torch.sign(pruned.sum(0))
    majority = majority_sign(int(elected.sum().item()))
    return _ties_disjoint_merge(base, pruned, elected, scaling_coefficient, majority)


def della_mergekit_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    params: Mapping[str, Any],
    seed: int,
    name: str,
    model_indices: Sequence[int],
) -> torch.Tensor:
    """DELLA with the mergekit options (inputs in the compute dtype, unchanged)."""
    rates, epsilon, density = params["weight_mask_rate"], params["della_epsilon"], params.get("densities")
    if density is None:
        for rate in rates:
            check_keep_probabilities(rate, epsilon)
    pruned = torch.stack(
        [
            magprune(
                x - base, rates[k], epsilon, seed, name, i, density=None if density is None else density[k],
                rescale=params.get("della_rescale", "probability"),
            )
            for k, (x, i) in enumerate(zip(tensors, model_indices))
        ]
    )  # fmt: skip
    weights = params.get("model_weights")
    elect = not params.get("della_linear")
    zero = 1.0
    if elect and params.get("zero_sign", "majority") == "majority":
        weighted = pruned if weights is None else pruned * weight_column(weights, pruned)
        zero = majority_sign(elected_sign_sum(weighted))
    return combine(
        base, pruned, weights, elect_sign=elect, zero_sign=zero, normalize=not params.get("no_normalize"),
        scaling_coefficient=params["scaling_coefficient"],
    )  # fmt: skip


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    indices = ctx.model_indices or tuple(range(len(tensors)))
    if mergekit_options(params):
        return della_mergekit_tensor(base, tensors, params, ctx.seed, ctx.name, indices)
    return della_tensor(
        base, tensors, params["weight_mask_rate"], params["della_epsilon"], params["scaling_coefficient"],
        ctx.seed, ctx.name, indices,
    )  # fmt: skip


METHOD = register(
    MergeMethod(
        order=70,
        name="della_merging",
        label="DELLA",
        formula="τ̂_i = MAGPRUNE_{p,ε}(τ_i) (keep prob (1 − p) − ε + 2ε·rank_norm, kept / prob); "
        "θ = θ_pre + λ · disjoint_mean(elect_sign(τ̂_i))",
        reference="Deep et al. 2024, DELLA-Merging, arXiv:2406.11617",
        params=(
            SCALING_COEFFICIENT,
            WEIGHT_MASK_RATE,
            DELLA_EPSILON,
            MODEL_WEIGHTS,
            DENSITIES,
            NO_NORMALIZE,
            ZERO_SIGN,
            DELLA_RESCALE,
            DELLA_LINEAR,
        ),  # fmt: skip
        name_order=("scaling_coefficient", "weight_mask_rate", "della_epsilon"),
        kernel=_kernel,
        check=_check_all_rates,
        scope="tensor",
        dare_prestep=False,
        random=True,
    )
)
