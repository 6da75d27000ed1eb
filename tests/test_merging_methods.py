"""The five merging methods and DARE + X against independent NumPy references and hand-worked values."""

import numpy as np
import pytest
import torch
from torch import nn

from model_merging_methods.mask_weights_utils import mask_model_weights
from model_merging_methods.merging_methods import (
    average_merging,
    fisher_merging,
    kth_smallest_abs,
    mask_merging,
    regmean_merging,
    task_arithmetic,
    ties_merging,
)
from model_merging_methods.task_vector import MergingMethod, TaskVector, copy_params_to_model

SHAPES = {"a.weight": (5, 4), "a.bias": (5,), "b.weight": (3, 5), "head.weight": (2, 3)}


def _model(seed: int, scale: float = 1.0, base: dict | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in SHAPES.items():
        noise = scale * torch.randn(s, generator=g)
        out[n] = noise if base is None else base[n] + noise
    return out


def _np(d):
    return {n: t.double().numpy() for n, t in d.items()}


# --------------------------------------------------------------------------- independent NumPy references


def ties_reference(pre, models, rate, lam, scope):
    """Literal transcription of spec §4.5 (global: M x P matrix of sorted names; tensor: the same per tensor)."""
    names = sorted(pre)

    def one_scope(names_in_scope):
        flat_pre = np.concatenate([pre[n].ravel() for n in names_in_scope])
        tv = np.stack([np.concatenate([m[n].ravel() for n in names_in_scope]) - flat_pre for m in models])
        k = int(tv.shape[1] * rate)
        if k > 0:
            thresholds = np.sort(np.abs(tv), axis=1)[:, k - 1 : k]
            tv = np.where(np.abs(tv) >= thresholds, tv, 0.0)
        sign = np.sign(tv.sum(0))
        majority = np.sign(sign.sum())
        sign[sign == 0] = majority
        agree = ((sign > 0) & (tv > 0)) | ((sign < 0) & (tv < 0))
        kept = np.where(agree, tv, 0.0)
        merged = kept.sum(0) / np.maximum(1, (kept != 0).sum(0))
        out, offset = {}, 0
        for n in names_in_scope:
            size = pre[n].size
            out[n] = pre[n] + lam * merged[offset : offset + size].reshape(pre[n].shape)
            offset += size
        return out

    if scope == "global":
        return one_scope(names)
    result = {}
    for n in names:
        result.update(one_scope([n]))
    return result


def _close(result, ref, atol=1e-5):
    for n in ref:
        np.testing.assert_allclose(result[n].double().numpy(), ref[n], rtol=1e-5, atol=atol, err_msg=n)


# --------------------------------------------------------------------------- average and task arithmetic


def test_average_and_task_arithmetic_against_numpy():
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2, 3)]
    npm = [_np(m) for m in models]
    _close(average_merging(models), {n: np.mean([m[n] for m in npm], axis=0) for n in SHAPES})
    npre = _np(pre)
    ref = {n: npre[n] + 0.3 * sum(m[n] - npre[n] for m in npm) for n in SHAPES}
    _close(task_arithmetic(pre, models, 0.3), ref)


def test_one_model_merges_to_itself():
    pre = _model(0)
    m = _model(1, 0.1, pre)
    for merged in (
        average_merging([m]),
        task_arithmetic(pre, [m], 1.0),
        ties_merging(pre, [m], param_value_mask_rate=0.0, scaling_coefficient=1.0),
        ties_merging(pre, [m], param_value_mask_rate=0.0, trim_scope="tensor"),
    ):
        _close(merged, _np(m), atol=1e-6)
    assert all(torch.equal(average_merging([m, m])[n], m[n]) for n in SHAPES)


def test_exclusion_takes_pretrained_or_first_model_and_inputs_unchanged():
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2)]
    copies = [{n: t.clone() for n, t in m.items()} for m in models]
    out = task_arithmetic(pre, models, 1.0, exclude_param_names_regex=[".*head.*"])
    assert torch.equal(out["head.weight"], pre["head.weight"])
    out = average_merging(models, exclude_param_names_regex=["head"])
    assert torch.equal(out["head.weight"], models[0]["head.weight"])
    out = ties_merging(pre, models, 0.5, 1.0, exclude_param_names_regex=[".*head.*"])
    assert torch.equal(out["head.weight"], pre["head.weight"])
    assert all(torch.equal(m[n], c[n]) for m, c in zip(models, copies) for n in SHAPES)


def test_dtype_preserved_bfloat16():
    pre = {n: t.to(torch.bfloat16) for n, t in _model(0).items()}
    models = [{n: t.to(torch.bfloat16) for n, t in _model(i, 0.1, _model(0)).items()} for i in (1, 2)]
    for merged in (average_merging(models), task_arithmetic(pre, models, 0.5), ties_merging(pre, models)):
        assert all(t.dtype == torch.bfloat16 for t in merged.values())
    ref = {
        n: (pre[n].float() + 0.5 * sum(m[n].float() - pre[n].float() for m in models)).to(torch.bfloat16)
        for n in SHAPES
    }
    assert all(torch.equal(task_arithmetic(pre, models, 0.5)[n], ref[n]) for n in SHAPES)


# --------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("rate", [0.0, 0.5, 0.8])
def test_ties_against_numpy_reference(scope, rate):
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2, 3)]
    ref = ties_reference(_np(pre), [_np(m) for m in models], rate, 0.7, scope)
    _close(ties_merging(pre, models, rate, 0.7, trim_scope=scope), ref)


def test_ties_global_and_tensor_scopes_differ():
    pre = {"small": torch.zeros(4), "large": torch.zeros(4)}
    m1 = {"small": torch.tensor([0.01, 0.02, 0.03, 0.04]), "large": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    # global trim at 0.5 (k = 4 of 8): threshold 0.04 is the 4th smallest, so "small" keeps only 0.04
    out = ties_merging(pre, [m1], 0.5, 1.0, trim_scope="global")
    assert torch.allclose(out["small"], torch.tensor([0.0, 0.0, 0.0, 0.04]))
    assert torch.allclose(out["large"], m1["large"])
    # per tensor (k = 2 of 4): threshold = 2nd smallest |τ| of each tensor, kept when |τ| >= threshold
    out = ties_merging(pre, [m1], 0.5, 1.0, trim_scope="tensor")
    assert torch.allclose(out["small"], torch.tensor([0.0, 0.02, 0.03, 0.04]))
    assert torch.allclose(out["large"], torch.tensor([0.0, 2.0, 3.0, 4.0]))


def test_ties_sign_election_hand_worked_with_tie_and_majority_fallback():
    pre = {"w": torch.zeros(4)}
    # coordinate 0: +3 and -1 -> sign +, keep +3 only -> 3
    # coordinate 1: +1 and -1 -> sum 0 -> majority sign of the whole vector
    # coordinate 2: +2 and +4 -> mean of agreeing = 3
    # coordinate 3: -5 and +1 -> sign -, keep -5
    m1 = {"w": torch.tensor([3.0, 1.0, 2.0, -5.0])}
    m2 = {"w": torch.tensor([-1.0, -1.0, 4.0, 1.0])}
    # elected signs: +, 0, +, -  -> sum = +1 -> majority +: coordinate 1 keeps the +1 of model 1
    out = ties_merging(pre, [m1, m2], 0.0, 1.0)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0, 3.0, -5.0]))
    # with a negative majority the tied coordinate keeps the -1 of model 2
    m3 = {"w": torch.tensor([-3.0, 1.0, -2.0, -5.0])}
    m4 = {"w": torch.tensor([1.0, -1.0, -4.0, 1.0])}
    out = ties_merging(pre, [m3, m4], 0.0, 1.0)
    assert torch.equal(out["w"], torch.tensor([-3.0, -1.0, -3.0, -5.0]))
    # majority sign 0 (signs +, 0, -): the tied coordinate stays zero
    m5 = {"w": torch.tensor([1.0, 1.0, -1.0])}
    m6 = {"w": torch.tensor([0.0, -1.0, 0.0])}
    out = ties_merging({"w": torch.zeros(3)}, [m5, m6], 0.0, 1.0)
    assert torch.equal(out["w"], torch.tensor([1.0, 0.0, -1.0]))


def test_ties_keeps_trim_ties_and_scales():
    pre = {"w": torch.zeros(5)}
    m = {"w": torch.tensor([0.1, -0.1, 0.1, 0.5, 0.05])}
    # k = int(5 * 0.4) = 2; 2nd smallest |τ| = 0.1; |τ| >= 0.1 kept (all three ties at 0.1)
    out = ties_merging(pre, [m], 0.4, 2.0)
    torch.testing.assert_close(out["w"], torch.tensor([0.2, -0.2, 0.2, 1.0, 0.0]))


def test_kth_smallest_abs_streams_exactly():
    g = torch.Generator().manual_seed(0)
    chunks = [
        torch.randn(1000, generator=g),
        torch.randn(30, 20, generator=g) * 1e-3,
        torch.zeros(7),
        -torch.ones(3),
    ]
    flat = torch.cat([c.flatten() for c in chunks]).abs()
    for k in (1, 7, 8, 500, 1606, flat.numel()):
        assert kth_smallest_abs(lambda: iter(chunks), k) == flat.kthvalue(k).values.item()
    with pytest.raises(ValueError):
        kth_smallest_abs(lambda: iter(chunks), flat.numel() + 1)


# --------------------------------------------------------------------------- Fisher and RegMean


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_against_numpy(normalize):
    models = [_model(i) for i in (1, 2)]
    fishers = [
        {n: torch.rand(s, generator=torch.Generator().manual_seed(10 + i)) for n, s in SHAPES.items()}
        for i in (0, 1)
    ]
    coeffs = [0.3, 0.7]
    eps = 1e-6
    w = np.array(coeffs)
    if normalize:
        norms = np.array([np.sqrt(sum((f[n].double().numpy() ** 2).sum() for n in SHAPES)) for f in fishers])
        a = 1 / (norms + eps)
        w = w * a / a.sum()
    ref = {}
    for n in SHAPES:
        num = sum(
            w[i] * (fishers[i][n].double().numpy() + eps) * models[i][n].double().numpy() for i in range(2)
        )
        den = sum(w[i] * (fishers[i][n].double().numpy() + eps) for i in range(2))
        ref[n] = num / den
    _close(fisher_merging(models, fishers, coeffs, normalize, eps), ref)


def test_fisher_equal_weights_is_average_and_missing_fisher_errors():
    models = [_model(i) for i in (1, 2)]
    ones = [{n: torch.ones(s) for n, s in SHAPES.items()}] * 2
    _close(fisher_merging(models, ones, normalize_fisher_weight=False), _np(average_merging(models)))
    with pytest.raises(ValueError, match="Fisher"):
        fisher_merging(models, [ones[0], {}])


def test_regmean_against_numpy_and_reduce_ratio():
    models = [_model(i) for i in (1, 2)]
    grams = []
    for i in (0, 1):
        x = torch.randn(50, 4, generator=torch.Generator().manual_seed(20 + i))
        y = torch.randn(50, 5, generator=torch.Generator().manual_seed(30 + i))
        grams.append({"a.weight": x.T @ x / 50, "b.weight": y.T @ y / 50})
    alpha = 0.8
    out = regmean_merging(models, grams, alpha)
    for n in ("a.weight", "b.weight"):
        gs = []
        for g in grams:
            gm = g[n].double().numpy().copy()
            off = ~np.eye(gm.shape[0], dtype=bool)
            gm[off] *= alpha
            gs.append(gm)
        ref = (np.linalg.inv(sum(gs)) @ sum(g @ m[n].double().numpy().T for g, m in zip(gs, models))).T
        np.testing.assert_allclose(out[n].double().numpy(), ref, rtol=1e-4, atol=1e-5)
    for n in ("a.bias", "head.weight"):  # no Gram: plain average
        np.testing.assert_allclose(out[n].numpy(), ((models[0][n] + models[1][n]) / 2).numpy(), rtol=1e-6)
    # identical Grams and identical models -> the model itself
    same = regmean_merging([models[0], models[0]], [grams[0], grams[0]], 1.0)
    _close(same, _np(models[0]), atol=1e-4)


def test_regmean_singular_names_layer():
    models = [_model(i) for i in (1, 2)]
    grams = [{"a.weight": torch.zeros(4, 4)}] * 2
    with pytest.raises(ValueError, match="a.weight"):
        regmean_merging(models, grams)


# --------------------------------------------------------------------------- DARE + X


def test_mask_merging_equals_masking_then_method():
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2)]
    masked = [
        mask_model_weights(m, pre, weight_mask_rate=0.5, seed=3, model_index=i) for i, m in enumerate(models)
    ]
    for method, kwargs, ref in (
        ("average_merging", {}, average_merging(masked)),
        ("task_arithmetic", {"scaling_coefficient": 0.5}, task_arithmetic(pre, masked, 0.5)),
        ("ties_merging", {"param_value_mask_rate": 0.5}, ties_merging(pre, masked, 0.5)),
    ):
        out = mask_merging(pre, models, method, [0.5, 0.5], seed=3, **kwargs)
        assert all(torch.equal(out[n], ref[n]) for n in SHAPES), method
    # the two models draw different masks
    assert not torch.equal(
        masked[0]["a.weight"] - pre["a.weight"] == 0, masked[1]["a.weight"] - pre["a.weight"] == 0
    )
    # rate 0 + average = average
    out = mask_merging(pre, models, "average_merging", 0.0)
    assert all(torch.equal(out[n], average_merging(models)[n]) for n in SHAPES)


def test_mask_merging_with_fisher_and_regmean_kwargs():
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2)]
    ones = [{n: torch.ones(s) for n, s in SHAPES.items()}] * 2
    out = mask_merging(pre, models, "fisher_merging", 0.3, fisher_weights=ones, normalize_fisher_weight=False)
    assert set(out) == set(SHAPES)
    eye = [{"a.weight": torch.eye(4)}] * 2
    out = mask_merging(pre, models, "regmean_merging", 0.3, gram_matrices=eye)
    assert set(out) == set(SHAPES)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs():
    pre = _model(0)
    models = [_model(i, 0.1, pre) for i in (1, 2)]
    with pytest.raises(ValueError, match="empty"):
        average_merging([])
    with pytest.raises(ValueError, match="empty"):
        task_arithmetic(pre, [])
    bad = dict(models[1], **{"b.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="b.weight"):
        task_arithmetic(pre, [models[0], bad])
    with pytest.raises(ValueError, match="a.bias"):
        average_merging([models[0], {n: t for n, t in models[1].items() if n != "a.bias"}])
    for lam in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            task_arithmetic(pre, models, lam)
        with pytest.raises(ValueError, match="finite"):
            ties_merging(pre, models, 0.5, lam)
    for rate in (-0.1, 1.1):
        with pytest.raises(ValueError, match="param_value_mask_rate"):
            ties_merging(pre, models, rate)
        with pytest.raises(ValueError, match="weight_mask_rate"):
            mask_merging(pre, models, "average_merging", rate)
    with pytest.raises(ValueError, match="trim_scope"):
        ties_merging(pre, models, 0.5, trim_scope="row")
    with pytest.raises(ValueError, match="unknown merging method"):
        mask_merging(pre, models, "latent_merging", 0.5)


# --------------------------------------------------------------------------- task vectors and the dispatcher


def test_task_vector_arithmetic():
    pre = _model(0)
    a, b = _model(1, 0.1, pre), _model(2, 0.1, pre)
    tv = TaskVector(pre, a) + TaskVector(pre, b)
    _close(tv.combine_with_pretrained_model(pre, 0.5), _np(task_arithmetic(pre, [a, b], 0.5)))
    _close(
        (0.5 * sum([TaskVector(pre, a), TaskVector(pre, b)])).combine_with_pretrained_model(pre),
        _np(task_arithmetic(pre, [a, b], 0.5)),
    )
    assert "head.weight" not in TaskVector(pre, a, exclude_param_names_regex=["head"]).task_vector_param_dict


def test_merging_method_dispatcher_with_modules():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    models = []
    for i in range(2):
        m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * (i + 1))
        models.append(m)
    params = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = MergingMethod("task_arithmetic").get_merged_model(
        base, models, exclude_param_names_regex=["1\\."], scaling_coefficient=1.0
    )
    sd = dict(merged.named_parameters())
    torch.testing.assert_close(sd["0.weight"], params["0.weight"] + 0.03)
    torch.testing.assert_close(sd["1.weight"], params["1.weight"])  # excluded: pretrained value
    out = MergingMethod("mask_merging").merging_models(
        params, models, mask_apply_method="average_merging", weight_mask_rates=[0.0, 0.0]
    )
    torch.testing.assert_close(out["0.bias"], params["0.bias"] + 0.015)
    with pytest.raises(ValueError, match="unknown merging method"):
        MergingMethod("slerp")
    with pytest.raises(ValueError, match="not in the model"):
        copy_params_to_model({"nope": torch.zeros(1)}, base)
