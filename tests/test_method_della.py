"""DELLA (MAGPRUNE + TIES election) against an independent NumPy transcription of its formula, its statistics
(keep fraction per rank decile, unbiasedness over seeds), block independence, properties and errors."""

import numpy as np
import pytest
import torch

from model_merging_methods import rng
from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts, ties_merging
from model_merging_methods.methods.della import METHOD, della_tensor, keep_probabilities, magprune
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

NAME = "della_merging"


def della_reference(pre, models, rates, eps, lam, seed):
    """Literal transcription: per model and row (last axis), ranks of |τ| ascending (stable), rank_norm = rank/(n−1)
    (1/2 for n = 1), q = (1−p) − ε + 2ε·rank_norm, keep where u < q (u: the project's counter-based uniform draws
    for (seed, model index, tensor name), the random input), kept τ/q; then sign election with the tensor's
    majority sign where the sum is 0, disjoint mean, θ_pre + λ·mean."""
    out = {}
    for name in MERGED:
        shape = pre[name].shape
        pruned = []
        for i, (m, p) in enumerate(zip(models, rates)):
            tau = m[name] - pre[name]
            rows = tau.reshape(-1, shape[-1] if len(shape) else 1)
            n = rows.shape[1]
            q = np.empty_like(rows)
            for r, row in enumerate(rows):
                rank = np.empty(n)
                rank[np.argsort(np.abs(row), kind="stable")] = np.arange(n)
                rank_norm = rank / (n - 1) if n > 1 else np.full(n, 0.5)
                q[r] = (1 - p) - eps + 2 * eps * rank_norm
            u = rng.uniform(seed, name, i, 0, tau.size).double().numpy().reshape(rows.shape)
            pruned.append(np.where(u < q, rows / q, 0.0).reshape(shape))
        pruned = np.stack(pruned)
        sign = np.sign(pruned.sum(0))
        sign[sign == 0] = np.sign(sign.sum())
        agree = ((sign > 0) & (pruned > 0)) | ((sign < 0) & (pruned < 0))
        merged = np.where(agree, pruned, 0.0).sum(0) / np.maximum(1, agree.sum(0))
        out[name] = pre[name] + lam * merged
    return out


@pytest.mark.parametrize(
    ("rates", "eps", "lam", "seed"),
    [(0.1, 0.1, 1.0, 0), (0.5, 0.3, 0.7, 3), ([0.2, 0.6, 0.4], 0.15, 1.0, 11), (0.3, 0.0, 0.5, 2)],
)
def test_against_numpy_reference(rates, eps, lam, seed):
    pre, models = family(3, seed=4)
    copies = clone_all([pre, *models])
    out = merge_state_dicts(
        NAME,
        pre,
        models,
        EXCLUDE,
        weight_mask_rate=rates,
        della_epsilon=eps,
        scaling_coefficient=lam,
        seed=seed,
    )
    per_model = rates if isinstance(rates, list) else [rates] * 3
    ref = della_reference(as_numpy(pre), [as_numpy(m) for m in models], per_model, eps, lam, seed)
    assert_close(out, ref)
    assert_copied(out, pre)
    assert_unchanged([pre, *models], copies)


def test_declaration():
    assert get_method(NAME) is METHOD
    assert METHOD.defaults() == {
        "scaling_coefficient": 1.0,
        "weight_mask_rate": 0.1,
        "della_epsilon": 0.1,
        # mergekit's options, off by default (docs/mergekit.md)
        "model_weights": None,
        "densities": None,
        "no_normalize": False,
        "zero_sign": "majority",
        "della_rescale": "probability",
        "della_linear": False,
    }
    p = METHOD.param("weight_mask_rate")
    assert p.per_model and p.type is float and p.default == 0.1
    assert not METHOD.dare_prestep and METHOD.random and METHOD.needs_base
    assert METHOD.scope_for(METHOD.defaults()) == "tensor"


def test_keep_probabilities_ranks_within_rows():
    tau = torch.tensor([[0.3, -0.1, 0.2, 0.2, -5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    q = keep_probabilities(tau, 0.5, 0.2)
    # row 0 ranks 3 0 1 2 4, row 1 (all equal) ranks by position; q = 0.3 + 0.4 · rank / 4
    expected = 0.3 + 0.1 * torch.tensor([[3.0, 0, 1, 2, 4], [0, 1, 2, 3, 4]])
    torch.testing.assert_close(q, expected)
    # a row of one (a (4, 1) tensor, a one-element 1-D tensor, a 0-D tensor) keeps with DARE's 1 − p
    for t in (torch.ones(4, 1), torch.ones(1), torch.tensor(2.0)):
        torch.testing.assert_close(keep_probabilities(t, 0.3, 0.1), torch.full(t.shape, 0.7))
    # a 1-D tensor is one row; a 3-D tensor ranks along its last dimension
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(
        keep_probabilities(x, 0.4, 0.1).reshape(6, 7), keep_probabilities(x.reshape(6, 7), 0.4, 0.1)
    )
    assert float(keep_probabilities(torch.tensor([2.0, 1.0, 3.0]), 0.1, 0.1).max()) == 1.0


def test_keep_fraction_per_rank_decile_and_rescaled_values():
    """One model, θ_pre = 0: the merged tensor is λ·τ̂, so its non-zero entries are the kept ones."""
    n_rows, n = 100, 1000
    g = torch.Generator().manual_seed(5)
    tau = torch.randn(n_rows, n, generator=g)
    pre = {"w": torch.zeros(n_rows, n)}
    p, eps = 0.5, 0.3
    out = merge_state_dicts(NAME, pre, [{"w": tau}], weight_mask_rate=p, della_epsilon=eps, seed=9)["w"]
    kept = out != 0
    rank = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).double()
    decile = (rank * 10 / n).long()  # 0..9, 100 entries per row and decile
    for d in range(10):
        fraction = float(kept[decile == d].double().mean())
        expected = float(((1 - p) - eps + 2 * eps * rank[decile == d] / (n - 1)).mean())
        assert abs(fraction - expected) < 0.015, (d, fraction, expected)  # 4.3 σ at 10⁴ draws per decile
    q = keep_probabilities(tau, p, eps)
    torch.testing.assert_close(out[kept], (tau / q)[kept])
    assert abs(float(kept.double().mean()) - (1 - p)) < 0.005


def test_unbiased_over_seeds_for_one_model():
    """E[τ̂] = τ entry by entry: the mean over 400 seeds is within 5 standard errors of the un-dropped merge."""
    g = torch.Generator().manual_seed(6)
    base, x = torch.randn(8, 40, generator=g), torch.randn(8, 40, generator=g)
    p, eps, lam, seeds = 0.4, 0.2, 0.5, 400
    results = torch.stack(
        [della_tensor(base, [x], [p], eps, lam, s, "w", [0]) - base for s in range(seeds)]
    ).double()
    tau = (x - base).double()
    q = keep_probabilities(x - base, p, eps).double()
    stderr = lam * tau.abs() * torch.sqrt((1 - q) / q) / seeds**0.5
    assert bool(((results.mean(0) - lam * tau).abs() <= 5 * stderr + 1e-6).all())


def test_no_drop_is_ties_without_trim():
    pre, models = family(3, seed=7)
    out = merge_state_dicts(NAME, pre, models, EXCLUDE, weight_mask_rate=0.0, della_epsilon=0.0, seed=1)
    assert_same_bytes(out, ties_merging(pre, models, 0.0, 1.0, "tensor", EXCLUDE))


def test_same_bytes_whatever_the_tensor_order_or_subset():
    pre, models = family(2, seed=8)
    out = merge_state_dicts(NAME, pre, models, EXCLUDE, weight_mask_rate=0.3, seed=4)
    reverse = list(reversed(list(pre)))
    out_rev = merge_state_dicts(
        NAME, {n: pre[n] for n in reverse}, [{n: m[n] for n in reverse} for m in models], EXCLUDE,
        weight_mask_rate=0.3, seed=4,
    )  # fmt: skip
    assert_same_bytes(out, {n: out_rev[n] for n in out})
    w = "layer.0.weight"
    one = merge_state_dicts(NAME, {w: pre[w]}, [{w: m[w]} for m in models], weight_mask_rate=0.3, seed=4)
    assert torch.equal(one[w], out[w])
    # the seed and the model index matter
    other_seed = merge_state_dicts(NAME, pre, models, EXCLUDE, weight_mask_rate=0.3, seed=5)
    assert not torch.equal(other_seed[w], out[w])
    tau = models[0][w] - pre[w]
    assert not torch.equal(magprune(tau, 0.3, 0.1, 4, w, 0), magprune(tau, 0.3, 0.1, 4, w, 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_mask_rate": 0.05, "della_epsilon": 0.1}, r"\(0, 1\]"),  # q up to 1.05
        ({"weight_mask_rate": 0.9, "della_epsilon": 0.1}, r"\(0, 1\]"),  # q down to 0
        ({"weight_mask_rate": 1.0, "della_epsilon": 0.0}, r"\(0, 1\]"),
        ({"weight_mask_rate": [0.3, 0.95]}, r"\(0, 1\]"),
        ({"weight_mask_rate": [0.3, 0.3, 0.3]}, "3 values of weight_mask_rate for 2 models"),
        ({"weight_mask_rate": 1.5}, "weight_mask_rate"),
        ({"della_epsilon": -0.1}, "della_epsilon"),
        ({"scaling_coefficient": float("inf")}, "scaling_coefficient"),
    ],
)
def test_errors(kwargs, match):
    pre, models = family(2)
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(NAME, pre, models, **kwargs)


def test_no_dare_prestep_and_needs_base():
    pre, models = family(2)
    with pytest.raises(MergeError, match="does not take DARE"):
        mask_merging(pre, models, NAME, 0.0)
    with pytest.raises(MergeError, match="pretrained"):
        merge_state_dicts(NAME, None, models)
