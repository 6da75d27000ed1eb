"""MagMax against an independent NumPy transcription of its formula, tie rule, properties and errors."""

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts, task_arithmetic
from model_merging_methods.methods.magmax import METHOD, magmax_tensor
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

NAME = "magmax_merging"


def magmax_reference(pre, models, lam):
    """Stack the τ_i, take per element the one with the largest |τ| (np.argmax: the first on ties), θ_pre + λ·it."""
    out = {}
    for name in MERGED:
        taus = np.stack([m[name] - pre[name] for m in models])
        pick = np.argmax(np.abs(taus), axis=0)
        out[name] = pre[name] + lam * np.take_along_axis(taus, pick[None], axis=0)[0]
    return out


@pytest.mark.parametrize(("k", "lam"), [(1, 1.0), (2, 0.5), (4, 1.3)])
def test_against_numpy_reference(k, lam):
    pre, models = family(k, seed=30 + k)
    copies = clone_all([pre, *models])
    out = merge_state_dicts(NAME, pre, models, EXCLUDE, scaling_coefficient=lam)
    assert_close(out, magmax_reference(as_numpy(pre), [as_numpy(m) for m in models], lam))
    assert_copied(out, pre)
    assert_unchanged([pre, *models], copies)


def test_declaration():
    assert get_method(NAME) is METHOD
    assert METHOD.defaults() == {"scaling_coefficient": 1.0}
    assert METHOD.param("scaling_coefficient") is get_method("task_arithmetic").param("scaling_coefficient")
    assert METHOD.needs_base and METHOD.dare_prestep and METHOD.min_models == 1
    assert METHOD.scope_for(METHOD.defaults()) == "element"


def test_hand_worked_and_ties():
    base = torch.zeros(5)
    t1 = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.0])
    t2 = torch.tensor([-2.0, 1.0, -2.0, 2.0, -0.0])
    t3 = torch.tensor([0.5, 2.9, 2.0, -4.0, 0.0])
    # |t| ties (2 vs -2; 0 vs -0) keep the earlier model's entry, sign included
    out = magmax_tensor(base, [t1, t2, t3], 1.0)
    assert out.tolist() == [-2.0, -3.0, 2.0, -4.0, 0.0]
    assert not torch.signbit(out[4])
    assert magmax_tensor(base, [t2, t1], 1.0)[2] == -2.0


def test_one_model_with_lambda_one_is_task_arithmetic_and_itself():
    pre, models = family(1, seed=33)
    out = merge_state_dicts(NAME, pre, models, EXCLUDE)
    assert_same_bytes(out, task_arithmetic(pre, models, 1.0, EXCLUDE))
    assert_close(out, as_numpy(models[0]))
    # copies of one model: the same
    assert_same_bytes(merge_state_dicts(NAME, pre, models * 3, EXCLUDE), out)


def test_dare_prestep_with_rate_zero_is_the_plain_merge():
    pre, models = family(3, seed=34)
    plain = merge_state_dicts(NAME, pre, models, EXCLUDE, scaling_coefficient=0.7)
    dare = mask_merging(pre, models, NAME, 0.0, exclude_param_names_regex=EXCLUDE, scaling_coefficient=0.7)
    assert_same_bytes(plain, dare)


def test_errors():
    pre, models = family(2)
    for lam in (-0.5, float("nan"), "x"):
        with pytest.raises(MergeError, match="scaling_coefficient"):
            merge_state_dicts(NAME, pre, models, scaling_coefficient=lam)
    with pytest.raises(MergeError, match="no models"):
        merge_state_dicts(NAME, pre, [])
    with pytest.raises(MergeError, match="pretrained"):
        merge_state_dicts(NAME, None, models)
    with pytest.raises(MergeError, match="no parameter"):
        merge_state_dicts(NAME, pre, models, slerp_t=0.5)
