"""mergekit's sparsification and combination rules, as options of our methods (mergekit 0.1.5,
``mergekit/sparsify.py`` and ``merge_methods/generalized_task_arithmetic.py``; re-derived from their documented
behaviour and measured side by side, see ``docs/mergekit.md``).

Notation: τ one task-vector tensor (n entries), d the density (the kept fraction), γ the outlier fraction.

* :func:`top_k_mask` (TIES ``trim_rule="exact_k"``): keep exactly k = max(1, int(d·n)) entries of largest |τ|
  (d ≥ 1 keeps all, d ≤ 0 none). The paper's rule keeps every |τ| ≥ the k-th smallest, so one entry more.
* :func:`keep_count_mask` (Breadcrumbs ``breadcrumbs_rule="keep_count"``): keep the int(d·n) entries that follow the
  n_bot = max(0, n − int(d·n) − int(γ·n)) smallest |τ| (d ≥ 1 keeps all).
* :func:`l1_rescale`: m⊙τ · ‖τ‖₁ / ‖m⊙τ‖₁ (no rescale when either norm is below 1e-7): mergekit's ``rescale``.
* :func:`combine`: Σ_i w_i τ̂_i with optional sign election (the sign of Σ_i w_i τ̂_i, a zero sum elected as +1 or as
  the tensor's majority sign) and optional normalisation by Σ_i w_i (Σ over the agreeing models with sign election).

Ties between equal magnitudes are broken by position (a stable sort); mergekit's sort is not stable, so it may keep
another of several equal entries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model_merging_methods.mask_weights_utils import keep_where

L1_EPS = 1e-7  # mergekit's tolerance: no rescale when ‖τ‖₁ or ‖m⊙τ‖₁ is below it
LINEAR_DIVISOR_EPS = 1e-8  # without sign election, |Σ w| below this divides by 1 (as mergekit)


def _order_of_magnitudes(tau: torch.Tensor, descending: bool) -> torch.Tensor:
    return torch.argsort(tau.detach().abs().reshape(-1).to(torch.float32), descending=descending, stable=True)


def top_k_mask(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = max(1, int(density · n)) entries of largest |τ| (density ≥ 1: all; ≤ 0 or empty: none)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    if density > 0 and n > 0:
        k = max(1, int(density * n))
        keep[_order_of_magnitudes(tau, descending=True)[:k]] = True
    return keep.reshape(tau.shape)


def keep_count_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's Breadcrumbs count rule: drop the int(γ·n) largest |τ| (fewer when needed to keep int(d·n)), then
    keep the int(d·n) largest of the rest (density ≥ 1: all)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones(tau.shape, dtype=torch.bool, device=tau.device)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
    keep[_order_of_magnitudes(tau, descending=False)[bottom : bottom + target]] = True
    return keep.reshape(tau.shape)


def l1_rescale(original: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """``masked`` · ‖original‖₁ / ‖masked‖₁ (unchanged when either norm is below 1e-7), in ``masked``'s dtype. The
    norms are summed on the CPU (torch's CPU reduction, as mergekit on the CPU), so the bytes do not depend on the
    device the rest runs on."""
    before = original.detach().abs().cpu().sum()
    after = masked.detach().abs().cpu().sum()
    if before < L1_EPS or after < L1_EPS:
        return masked
    return masked * (before / after).to(masked.device)


def elected_sign_sum(weighted: torch.Tensor) -> int:
    """Σ over coordinates of sign(Σ_i weighted_i) for stacked (M, ...) task vectors, counted exactly in int64: its
    sign is the tensor's majority sign."""
    return int(torch.sign(weighted.sum(0)).to(torch.int64).sum().item())


def weight_column(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """The weights as a (M, 1, ..., 1) tensor in ``like``'s dtype (``like`` is the stacked (M, ...) task vectors)."""
    w = torch.tensor(list(weights), dtype=like.dtype, device=like.device)
    return w.reshape((len(weights),) + (1,) * (like.dim() - 1))


def combine(
    base: torch.Tensor,
    taus: torch.Tensor,
    weights: Sequence[float] | None,
    *,
    elect_sign: bool,
    zero_sign: float,
    normalize: bool,
    scaling_coefficient: float,
) -> torch.Tensor:
    """θ_pre + λ·τ from the stacked (M, ...) sparsified task vectors ``taus`` (compute dtype), as mergekit's generalized
    task arithmetic: weighted = w_i·τ̂_i (``weights`` None: all 1, no multiplication); with ``elect_sign``, s = sign(Σ_i
    weighted_i) (``zero_sign`` where the sum is 0), keep the weighted entries whose sign is s, divisor = Σ_i w_i over
    them (0 → 1); without, keep all, divisor = Σ_i w_i (|·| < 1e-8 → 1); τ = Σ kept (/ divisor with ``normalize``)."""
    w = None if weights is None else weight_column(weights, taus)
    weighted = taus if w is None else taus * w
    ones = torch.ones((), dtype=taus.dtype, device=taus.device)
    if elect_sign:
        elected = torch.sign(weighted.sum(0))
        sign = torch.where(elected == 0, torch.tensor(float(zero_sign), dtype=taus.dtype), elected)
        agree = weighted * sign > 0
        mixed = keep_where(agree, weighted).sum(0)
        if normalize:
            divisor = agree.sum(0).to(taus.dtype) if w is None else (w * agree).sum(0)
            mixed = mixed / torch.where(divisor == 0, ones, divisor)
    else:
        mixed = weighted.sum(0)
        if normalize:
            divisor = (
                torch.tensor(float(taus.shape[0]), dtype=taus.dtype, device=taus.device)
                if w is None
                else w.sum(0)
            )
            mixed = mixed / torch.where(divisor.abs() < LINEAR_DIVISOR_EPS, ones, divisor)
    return base + scaling_coefficient * mixed
