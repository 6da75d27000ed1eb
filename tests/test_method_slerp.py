"""SLERP against an independent NumPy transcription of its formula, endpoints, geometry, properties and errors."""

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts
from model_merging_methods.methods.slerp import METHOD, slerp_tensor
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

NAME = "slerp_merging"


def slerp_reference(first, second, t):
    """cos Ω from the normalised flattened tensors (norm ≤ 1e-8 → 1), clipped; linear if |cos Ω| > 0.9995, else
    sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b."""
    out = {}
    for name in MERGED:
        a, b = first[name], second[name]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
        d = np.clip(np.sum((a / na) * (b / nb)), -1, 1)
        if abs(d) > 0.9995:
            out[name] = (1 - t) * a + t * b
        else:
            omega = np.arccos(d)
            out[name] = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return out


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_against_numpy_reference(t):
    _, models = family(2, seed=20, delta=1.0)  # far apart: the spherical branch
    copies = clone_all(models)
    out = merge_state_dicts(NAME, None, models, EXCLUDE, slerp_t=t)
    assert_close(out, slerp_reference(as_numpy(models[0]), as_numpy(models[1]), t), atol=1e-5)
    assert_copied(out, models[0])  # excluded and non-float tensors from the first model
    assert_unchanged(models, copies)


def test_declaration():
    assert get_method(NAME) is METHOD
    assert METHOD.defaults() == {"slerp_t": 0.5}
    assert (METHOD.min_models, METHOD.max_models, METHOD.needs_base, METHOD.copy_from) == (
        2,
        2,
        False,
        "first",
    )
    assert METHOD.scope_for(METHOD.defaults()) == "tensor"


def test_endpoints_are_the_models_bit_for_bit():
    pre, models = family(2, seed=21, delta=1.0)
    assert_same_bytes(merge_state_dicts(NAME, pre, models, EXCLUDE, slerp_t=0.0), models[0])
    one = merge_state_dicts(NAME, None, models, EXCLUDE, slerp_t=1.0)
    assert all(torch.equal(one[n], models[1][n]) for n in MERGED)
    # the pre-trained model, when given, plays no part
    assert_same_bytes(
        merge_state_dicts(NAME, pre, models, slerp_t=0.3), merge_state_dicts(NAME, None, models, slerp_t=0.3)
    )


def test_geometry():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    a, b = a / a.norm(), b / b.norm()
    omega = torch.acos(a @ b)
    for t in (0.1, 0.5, 0.8):
        m = slerp_tensor(a, b, t)
        assert float(m.norm()) == pytest.approx(1.0, abs=1e-5)  # stays on the sphere
        assert float(torch.acos((m @ a).clamp(-1, 1))) == pytest.approx(t * float(omega), abs=1e-4)
        torch.testing.assert_close(m, slerp_tensor(b, a, 1 - t))  # symmetric
    # collinear and antipodal: linear interpolation
    torch.testing.assert_close(slerp_tensor(a, 3 * a, 0.25), 1.5 * a)
    torch.testing.assert_close(slerp_tensor(a, -a, 0.25), 0.5 * a)
    # a zero tensor: cos Ω = 0, Ω = π/2, sin(tπ/2) · b
    torch.testing.assert_close(slerp_tensor(torch.zeros(50), b, 1 / 3), 0.5 * b)
    # the same model twice is itself
    torch.testing.assert_close(slerp_tensor(a, a.clone(), 0.7), a)


def test_dare_prestep_with_rate_zero_is_the_plain_merge():
    pre, models = family(2, seed=22, delta=1.0)
    plain = merge_state_dicts(NAME, None, models, EXCLUDE, slerp_t=0.4)
    dare = mask_merging(pre, models, NAME, 0.0, exclude_param_names_regex=EXCLUDE, slerp_t=0.4)
    assert_same_bytes(plain, dare)


@pytest.mark.parametrize(
    ("count", "kwargs", "match"),
    [
        (1, {}, "at least 2 models"),
        (3, {}, "at most 2 models"),
        (2, {"slerp_t": 1.5}, "slerp_t"),
        (2, {"slerp_t": -0.1}, "slerp_t"),
        (2, {"slerp_t": float("nan")}, "slerp_t"),
        (2, {"scaling_coefficient": 1.0}, "no parameter"),
    ],
)
def test_errors(count, kwargs, match):
    pre, models = family(count)
    with pytest.raises(MergeError, match=match):
        merge_state_dicts(NAME, pre, models, **kwargs)
