"""Consensus merging with TALL masks: keep the entries of the summed task vector that at least k tasks need (Wang,
Dimitriadis, Ortiz-Jiménez, Fleuret & Frossard, 2024, "Localizing task information for improved model merging and
compression", ICML, arXiv:2405.07813).

Element-wise: τ = Σ_i τ_i (summed in model order); task i's TALL mask m_i = 1{|τ_i| ≥ λ_t·|τ − τ_i|} (λ_t =
``tall_mask_lambda``; τ − τ_i is computed as the sum minus τ_i); the consensus mask keeps the entries where
Σ_i m_i ≥ k (k = ``consensus_k``); θ = θ_pre + λ·(mask ⊙ τ) (λ = ``scaling_coefficient``). k = 0 keeps everything
(task arithmetic); k larger than the number of models would keep nothing and is an error. Float32 arithmetic
(float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import keep_where
from model_merging_methods.methods.task_arithmetic import SCALING_COEFFICIENT
from model_merging_methods.registry import MergeMethod, Param, TensorContext, register
from model_merging_methods.validators import check_count, check_nonnegative_number

TALL_MASK_LAMBDA = Param(
    "tall_mask_lambda",
    check_nonnegative_number,
    0.4,
    "TALL-mask λ_t: task i keeps the entries where |τ_i| ≥ λ_t·|τ − τ_i|",
    grid=(0.2, 0.4, 0.6),
)

CONSENSUS_K = Param(
    "consensus_k",
    check_count,
    2,
    "consensus k: keep the entries of Σ τ_i where at least k TALL masks agree",
    type=int,
)


def _check_k(consensus_k: int, num_models: int) -> None:
    if consensus_k > num_models:
        raise MergeError(f"consensus_k = {consensus_k} is more than the {num_models} models merged")


def consensus_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    tall_mask_lambda: float,
    consensus_k: int,
    scaling_coefficient: float,
) -> torch.Tensor:
    """θ_pre + λ·(mask ⊙ Σ τ_i) for one block (inputs in the compute dtype, unchanged)."""
    _check_k(consensus_k, len(tensors))
    taus = [x - base for x in tensors]
    total = torch.zeros_like(base)
    for tau in taus:
        total += tau
    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for tau in taus:
        votes += tau.abs() >= tall_mask_lambda * (total - tau).abs()
    return base + scaling_coefficient * keep_where(votes >= consensus_k, total)


def _kernel(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], params: Mapping[str, Any], ctx: TensorContext
) -> torch.Tensor:
    return consensus_tensor(
        base, tensors, params["tall_mask_lambda"], params["consensus_k"], params["scaling_coefficient"]
    )


METHOD = register(
    MergeMethod(
        order=110,
        name="consensus_merging",
        label="Consensus (TALL masks)",
        formula="τ = Σ τ_i, m_i = 1{|τ_i| ≥ λ_t |τ − τ_i|}; θ = θ_pre + λ·1{Σ m_i ≥ k} ⊙ τ",
        reference="Wang et al. 2024, Localizing task information for improved model merging and compression "
        "(ICML), arXiv:2405.07813",
        params=(SCALING_COEFFICIENT, TALL_MASK_LAMBDA, CONSENSUS_K),
        kernel=_kernel,
        check=lambda params, num_models: _check_k(params["consensus_k"], num_models),
        scope="element",
    )
)
