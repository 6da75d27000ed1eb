"""Model Breadcrumbs against an independent NumPy transcription of its formula, properties and errors."""

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts, task_arithmetic
from model_merging_methods.methods.breadcrumbs import METHOD, breadcrumbs_mask
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

NAME = "breadcrumbs_merging"


def breadcrumbs_reference(pre, models, r, beta, lam):
    """Per tensor and model: sort |τ| ascending (stable: equal magnitudes in index order), zero the int(r·n) first
    and the int(β·n) last, add the kept τ of all models, θ_pre + λ · sum."""
    out = {}
    for name in MERGED:
        total = np.zeros_like(pre[name])
        for m in models:
            tau = (m[name] - pre[name]).ravel()
            n = tau.size
            order = np.argsort(np.abs(tau), kind="stable")
            dropped = np.concatenate([order[: int(r * n)], order[n - int(beta * n) :]])
            kept = tau.copy()
            kept[dropped] = 0.0
            total += kept.reshape(pre[name].shape)
        out[name] = pre[name] + lam * total
    return out


@pytest.mark.parametrize(
    ("r", "beta", "lam"), [(0.3, 0.1, 0.7), (0.8, 0.01, 1.0), (0.0, 0.25, 0.5), (0.5, 0.5, 1)]
)
def test_against_numpy_reference(r, beta, lam):
    pre, models = family(3, seed=1)
    copies = clone_all([pre, *models])
    out = merge_state_dicts(
        NAME, pre, models, EXCLUDE, param_value_mask_rate=r, outlier_mask_rate=beta, scaling_coefficient=lam
    )
    np_models = [as_numpy(m) for m in models]
    assert_close(out, breadcrumbs_reference(as_numpy(pre), np_models, r, beta, lam))
    assert_copied(out, pre)
    assert_unchanged([pre, *models], copies)


def test_declaration_shares_params_and_defaults():
    assert get_method(NAME) is METHOD
    assert METHOD.defaults() == {
        "scaling_coefficient": 1.0,
        "param_value_mask_rate": 0.8,
        "outlier_mask_rate": 0.01,
        # mergekit's options, off by default (docs/mergekit.md)
        "model_weights": None,
        "densities": None,
        "normalize": False,
        "breadcrumbs_rule": "drop_counts",
        "breadcrumbs_elect_sign": False,
        "zero_sign": "majority",
        "sparsify_rescale": "none",
    }
    # the same Param objects as task arithmetic's and TIES's (one flag each)
    assert METHOD.param("scaling_coefficient") is get_method("task_arithmetic").param("scaling_coefficient")
    assert METHOD.param("param_value_mask_rate") is get_method("ties_merging").param("param_value_mask_rate")
    assert METHOD.needs_base and METHOD.dare_prestep and METHOD.scope_for(METHOD.defaults()) == "tensor"


def test_exact_counts_and_tie_rule_hand_worked():
    tau = torch.tensor([1.0, -1.0, 1.0, 2.0, -2.0, 0.5])
    # n = 6: int(0.34·6) = 2 smallest dropped (0.5 at 5, then the first 1 at 0), int(0.17·6) = 1 largest (the
    # later 2, at 4)
    assert breadcrumbs_mask(tau, 0.34, 0.17).tolist() == [False, True, True, True, False, False]
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 100, 1001):
        x = torch.randn(n, generator=g)
        for r, beta in ((0.8, 0.01), (0.1, 0.1), (0.0, 0.0), (0.99, 0.01), (0.0, 1.0)):
            assert int(breadcrumbs_mask(x, r, beta).sum()) == n - int(r * n) - int(beta * n)
    # all-equal magnitudes: the earliest entries are the "smallest", the last ones the "largest"
    assert breadcrumbs_mask(torch.ones(10), 0.2, 0.3).tolist() == [False] * 2 + [True] * 5 + [False] * 3


def test_no_drop_is_task_arithmetic_and_one_model_is_itself():
    pre, models = family(2, seed=2)
    out = merge_state_dicts(NAME, pre, models, EXCLUDE, param_value_mask_rate=0.0, outlier_mask_rate=0.0)
    assert_same_bytes(out, task_arithmetic(pre, models, 1.0, EXCLUDE))
    out = merge_state_dicts(NAME, pre, models[:1], param_value_mask_rate=0.0, outlier_mask_rate=0.0)
    assert_close(out, as_numpy(models[0]))


def test_dare_prestep_with_rate_zero_is_the_plain_merge():
    pre, models = family(3, seed=3)
    params = dict(param_value_mask_rate=0.4, outlier_mask_rate=0.05, scaling_coefficient=0.8)
    plain = merge_state_dicts(NAME, pre, models, EXCLUDE, **params)
    dare = mask_merging(pre, models, NAME, 0.0, exclude_param_names_regex=EXCLUDE, **params)
    assert_same_bytes(plain, dare)
    via_dispatcher = merge_state_dicts("mask_merging", pre, models, EXCLUDE, mask_apply_method=NAME,
                                       weight_mask_rates=0.0, **params)  # fmt: skip
    assert_same_bytes(plain, via_dispatcher)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"param_value_mask_rate": 1.2}, "param_value_mask_rate"),
        ({"outlier_mask_rate": -0.1}, "outlier_mask_rate"),
        ({"outlier_mask_rate": float("nan")}, "outlier_mask_rate"),
        ({"param_value_mask_rate": 0.9, "outlier_mask_rate": 0.2}, "at most 1"),
        ({"scaling_coefficient": -1.0}, "scaling_coefficient"),
        ({"density": 0.5}, "no parameter"),
    ],
)
def test_errors(kwargs, match):
    pre, models = family(2)
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(NAME, pre, models, **kwargs)


def test_needs_models_and_base():
    pre, models = family(1)
    with pytest.raises(MergeError, match="no models"):
        merge_state_dicts(NAME, pre, [])
    with pytest.raises(MergeError, match="pretrained"):
        merge_state_dicts(NAME, None, models)
