"""Model Stock against an independent NumPy transcription of its formula, hand-worked angles, properties and errors."""

import itertools

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts
from model_merging_methods.methods.model_stock import METHOD, model_stock_tensor
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

NAME = "model_stock_merging"


def model_stock_reference(pre, models):
    """cos φ = mean over pairs of clip(τ_i·τ_j / (|τ_i| |τ_j|), −1, 1) (0 for a zero vector); t = k c / (1 + (k−1) c)
    (0 when the denominator is within 1e-6 of 0); θ = t · mean θ_i + (1 − t) θ_pre."""
    out = {}
    k = len(models)
    for name in MERGED:
        taus = [(m[name] - pre[name]).ravel() for m in models]
        cosines = []
        for a, b in itertools.combinations(taus, 2):
            norm = np.linalg.norm(a) * np.linalg.norm(b)
            cosines.append(np.clip(a @ b / norm, -1, 1) if norm > 0 else 0.0)
        c = np.mean(cosines)
        den = 1 + (k - 1) * c
        t = 0.0 if abs(den) < 1e-6 else k * c / den
        out[name] = t * np.mean([m[name] for m in models], axis=0) + (1 - t) * pre[name]
    return out


@pytest.mark.parametrize("k", [2, 3, 5])
def test_against_numpy_reference(k):
    pre, models = family(k, seed=10 + k)
    # correlated task vectors (a shared direction plus noise), so that t is far from 0
    shared = family(1, seed=99)[1][0]
    models = [
        {n: (m[n] + shared[n] - pre[n] if m[n].is_floating_point() else m[n]) for n in m} for m in models
    ]
    copies = clone_all([pre, *models])
    out = merge_state_dicts(NAME, pre, models, EXCLUDE)
    assert_close(
        out, model_stock_reference(as_numpy(pre), [as_numpy(m) for m in models]), rtol=1e-5, atol=1e-5
    )
    assert_copied(out, pre)
    assert_unchanged([pre, *models], copies)
    # the interpolation ratio is a real one here
    _, t = model_stock_tensor(pre["layer.0.weight"], [m["layer.0.weight"] for m in models])
    assert 0.3 < t < 1.0


def test_declaration():
    assert get_method(NAME) is METHOD
    assert METHOD.params == () and METHOD.min_models == 2 and METHOD.needs_base and METHOD.dare_prestep
    assert METHOD.scope_for({}) == "tensor"


def test_hand_worked_angles():
    base = torch.zeros(2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # orthogonal task vectors: cos φ = 0, t = 0, θ = θ_pre
    out, t = model_stock_tensor(base + 1, [e1 + 1, e2 + 1])
    assert t == 0.0 and torch.equal(out, base + 1)
    # parallel: cos φ = 1, t = 1, the average
    out, t = model_stock_tensor(base, [e1, 3 * e1])
    assert t == pytest.approx(1.0) and torch.allclose(out, 2 * e1)
    # 60 degrees, k = 2: cos φ = 1/2, t = 2·(1/2) / (1 + 1/2) = 2/3
    out, t = model_stock_tensor(base, [e1, torch.tensor([0.5, 3**0.5 / 2])])
    assert t == pytest.approx(2 / 3) and torch.allclose(out, (2 / 3) * torch.tensor([0.75, 3**0.5 / 4]))
    # opposite (k = 2) and three at 120 degrees (k = 3): 1 + (k − 1) cos φ = 0, t = 0, θ_pre
    assert model_stock_tensor(base, [e1, -e1])[1] == 0.0
    third = [
        torch.tensor([np.cos(a), np.sin(a)], dtype=torch.float32) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)
    ]
    assert model_stock_tensor(base, third)[1] == 0.0
    # k = 3 with one cosine of -0.25 and two of 0: cos φ = -1/12, t = 3(-1/12) / (1 - 1/6) = -0.3
    assert model_stock_tensor(base, [e1, torch.tensor([-0.25, 0.968246]), e2 * 0])[1] == pytest.approx(
        -0.3, abs=1e-5
    )


def test_zero_task_vectors_and_identical_models():
    pre, models = family(2, seed=3)
    # every model equal to the pre-trained one: all cosines 0, t = 0, θ_pre exactly
    same = merge_state_dicts(NAME, pre, [pre, pre], EXCLUDE)
    assert_same_bytes(same, pre)
    # one zero task vector (k = 2): cos φ = 0, θ_pre
    out = merge_state_dicts(NAME, pre, [models[0], pre])
    assert all(torch.equal(out[n], pre[n]) for n in MERGED)
    # copies of one model merge to it (t = 1 up to rounding)
    out = merge_state_dicts(NAME, pre, [models[0]] * 3, EXCLUDE)
    assert_close(out, as_numpy(models[0]), atol=1e-6)


def test_dare_prestep_with_rate_zero_is_the_plain_merge():
    pre, models = family(3, seed=5)
    plain = merge_state_dicts(NAME, pre, models, EXCLUDE)
    assert_same_bytes(
        plain, mask_merging(pre, models, NAME, [0.0, 0.0, 0.0], exclude_param_names_regex=EXCLUDE)
    )


def test_errors():
    pre, models = family(2)
    with pytest.raises(MergeError, match="at least 2 models"):
        merge_state_dicts(NAME, pre, models[:1])
    with pytest.raises(MergeError, match="no parameter"):
        merge_state_dicts(NAME, pre, models, scaling_coefficient=1.0)
    with pytest.raises(MergeError, match="pretrained"):
        merge_state_dicts(NAME, None, models)


def test_ratio_does_not_depend_on_the_scale_of_the_task_vectors():
    """Tiny task vectors (norm products far below mergekit's 1e-6 clamp) keep their true cosine."""
    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, generator=g)
    shared = torch.randn(300, generator=g)
    taus = [shared + torch.randn(300, generator=g) for _ in range(3)]
    _, t = model_stock_tensor(base, [base + tau for tau in taus])
    _, t_tiny = model_stock_tensor(torch.zeros(300), [1e-6 * tau for tau in taus])
    assert 0.5 < t < 1 and t_tiny == pytest.approx(t, rel=1e-5)
