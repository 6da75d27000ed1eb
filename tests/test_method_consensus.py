"""Consensus merging (TALL masks) against an independent NumPy transcription of its formula, properties, errors."""

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts, task_arithmetic
from model_merging_methods.methods.consensus import METHOD, consensus_tensor
from model_merging_methods.registry import get_method
from tests.method_helpers import (
    EXCLUDE,
    MERGED,
    as_numpy,
    assert_close,
    assert_copied,
    assert_same_bytes,
    assert_unchanged,
    clone_all,
    family,
)

NAME = "consensus_merging"


def consensus_reference(pre, models, lam_t, k, lam):
    """τ_MTL = Σ τ_t; TALL mask of task t: |τ_t| ≥ λ_t |τ_MTL − τ_t|; consensus: #masks ≥ k; θ_pre + λ·mask·τ_MTL."""
    out = {}
    for name in MERGED:
        taus = np.stack([m[name] - pre[name] for m in models])
        mtl = taus.sum(0)
        masks = np.abs(taus) >= lam_t * np.abs(mtl[None] - taus)
        out[name] = pre[name] + lam * np.where(masks.sum(0) >= k, mtl, 0.0)
    return out


@pytest.mark.parametrize(("m", "lam_t", "k", "lam"), [(3, 0.4, 2, 1.0), (4, 0.2, 3, 0.6), (4, 1.0, 1, 1.0)])
def test_against_numpy_reference(m, lam_t, k, lam):
    pre, models = family(m, seed=40 + m)
    copies = clone_all([pre, *models])
    out = merge_state_dicts(
        NAME, pre, models, EXCLUDE, tall_mask_lambda=lam_t, consensus_k=k, scaling_coefficient=lam
    )
    ref = consensus_reference(as_numpy(pre), [as_numpy(x) for x in models], lam_t, k, lam)
    assert_close(out, ref)
    assert_copied(out, pre)
    assert_unchanged([pre, *models], copies)
    # the mask does something here: neither everything nor nothing is kept
    kept = (out["embed.weight"] - pre["embed.weight"]) != 0
    assert 0 < int(kept.sum()) < kept.numel()


def test_declaration():
    assert get_method(NAME) is METHOD
    assert METHOD.defaults() == {"scaling_coefficient": 1.0, "tall_mask_lambda": 0.4, "consensus_k": 2}
    assert METHOD.param("consensus_k").type is int
    assert METHOD.needs_base and METHOD.dare_prestep and METHOD.scope_for(METHOD.defaults()) == "element"


def test_hand_worked():
    base = torch.zeros(4)
    t1 = torch.tensor([1.0, 1.0, 0.1, 3.0])
    t2 = torch.tensor([1.0, -0.5, 0.1, -3.0])
    t3 = torch.tensor([0.0, 0.2, 5.0, 0.1])
    # τ = [2, 0.7, 5.2, 0.1]; |τ − τ_i|: t1 [1, 0.3, 5.1, 2.9], t2 [1, 1.2, 5.1, 3.1], t3 [2, 0.5, 0.2, 0]
    # λ_t = 0.5: m1 = [1, 1, 0, 1], m2 = [1, 0, 0, 1], m3 = [0, 0, 1, 1] → votes [2, 1, 1, 3]
    ts = [t1, t2, t3]
    torch.testing.assert_close(consensus_tensor(base, ts, 0.5, 2, 1.0), torch.tensor([2.0, 0.0, 0.0, 0.1]))
    torch.testing.assert_close(consensus_tensor(base, ts, 0.5, 3, 2.0), torch.tensor([0.0, 0.0, 0.0, 0.2]))
    torch.testing.assert_close(consensus_tensor(base, ts, 0.5, 1, 1.0), torch.tensor([2.0, 0.7, 5.2, 0.1]))
    # λ_t = 0.1: m2 (0.5 ≥ 0.12) and m3 (0.2 ≥ 0.05) join at index 1: votes [2, 3, 1, 3]
    torch.testing.assert_close(consensus_tensor(base, ts, 0.1, 3, 1.0), torch.tensor([0.0, 0.7, 0.0, 0.1]))


def test_k_zero_is_task_arithmetic_and_one_model_is_itself():
    pre, models = family(3, seed=44)
    out = merge_state_dicts(NAME, pre, models, EXCLUDE, consensus_k=0, scaling_coefficient=0.3)
    assert_same_bytes(out, task_arithmetic(pre, models, 0.3, EXCLUDE))
    # one model: |τ − τ_1| = 0, so its mask is everywhere 1
    one = merge_state_dicts(NAME, pre, models[:1], EXCLUDE, consensus_k=1)
    assert_same_bytes(one, task_arithmetic(pre, models[:1], 1.0, EXCLUDE))
    assert_close(one, as_numpy(models[0]))


def test_dare_prestep_with_rate_zero_is_the_plain_merge():
    pre, models = family(3, seed=45)
    plain = merge_state_dicts(NAME, pre, models, EXCLUDE)
    assert_same_bytes(plain, mask_merging(pre, models, NAME, 0.0, exclude_param_names_regex=EXCLUDE))


@pytest.mark.parametrize(
    ("count", "kwargs", "match"),
    [
        (2, {"tall_mask_lambda": -0.1}, "tall_mask_lambda"),
        (2, {"tall_mask_lambda": float("inf")}, "tall_mask_lambda"),
        (2, {"consensus_k": -1}, "consensus_k"),
        (2, {"consensus_k": 1.5}, "consensus_k"),
        (2, {"consensus_k": 3}, "more than the 2 models"),
        (1, {}, "more than the 1 models"),
        (2, {"scaling_coefficient": -1}, "scaling_coefficient"),
    ],
)
def test_errors(count, kwargs, match):
    pre, models = family(count)
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(NAME, pre, models, **kwargs)
