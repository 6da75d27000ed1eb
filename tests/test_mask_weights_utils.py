"""DARE masking: exact values, statistical properties, determinism and bad input."""

import numpy as np
import pytest
import torch

from model_merging_methods import rng
from model_merging_methods.mask_weights_utils import (
    mask_input_with_mask_rate,
    mask_model_weights,
    mask_tensor,
    stable_seed,
)


def _model(seed: int, shapes=None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {
        "embed.weight": (11, 4),
        "layer.0.w": (6, 5),
        "layer.0.b": (6,),
        "head.weight": (3, 6),
    }
    return {n: scale * torch.randn(s, generator=g) for n, s in shapes.items()}


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9, 0.99])
def test_random_drop_fraction_is_binomial_and_survivors_are_exact(rate):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))
    out = mask_input_with_mask_rate(x, rate, True, "random", rng.Stream(3, "w"))
    kept = (out != 0).numpy()
    n = x.numel()
    dropped = n - kept.sum()
    # within 5 standard deviations of Binomial(n, p)
    assert abs(dropped - n * rate) < 5 * np.sqrt(n * rate * (1 - rate))
    # survivors are x / (1 - p), computed independently in float32 by NumPy, bit for bit
    ref = x.numpy()[kept] / np.float32(1.0 - rate)
    np.testing.assert_array_equal(out.numpy()[kept], ref)


def test_drop_only_keeps_survivors_unchanged():
    x = torch.randn(1000)
    out = mask_input_with_mask_rate(x, 0.7, False, "random", rng.Stream(0, "w"))
    kept = out != 0
    assert torch.equal(out[kept], x[kept])


def test_expectation_of_dare_is_identity():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    draws = torch.stack(
        [mask_input_with_mask_rate(x, 0.6, True, "random", rng.Stream(s, "w")) for s in range(4000)]
    )
    # E[DARE(x)] = x; the standard error of the mean is |x| sqrt(p/(1-p)) / sqrt(n)
    stderr = x.abs() * np.sqrt(0.6 / 0.4) / np.sqrt(4000)
    assert torch.all((draws.mean(0) - x).abs() < 5 * stderr + 1e-6)


def test_rate_bounds_and_edge_rates():
    x = torch.randn(10, 10)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="mask_rate"):
            mask_input_with_mask_rate(x, bad, True, "random")
    with pytest.raises(ValueError, match="mask_strategy"):
        mask_input_with_mask_rate(x, 0.5, True, "banana")
    assert torch.equal(mask_input_with_mask_rate(x, 0.0, True, "random", rng.Stream(0, "a")), x)
    assert torch.equal(
        mask_input_with_mask_rate(x, 1.0, True, "random", rng.Stream(0, "a")), torch.zeros(10, 10)
    )
    assert torch.equal(mask_input_with_mask_rate(x, 1.0, True, "magnitude"), torch.zeros(10, 10))


def test_magnitude_hand_worked_with_ties_and_k_zero():
    x = torch.tensor([0.5, -0.1, 0.1, 2.0, -3.0, 0.1])
    # k = int(6 * 0.5) = 3, t = 3rd smallest |x| = 0.1 (|x| sorted: 0.1, 0.1, 0.1, 0.5, 2, 3);
    # every |x| <= 0.1 is dropped (ties dropped too), so only 3 survive
    out = mask_input_with_mask_rate(x, 0.5, False, "magnitude")
    assert torch.equal(out, torch.tensor([0.5, 0.0, 0.0, 2.0, -3.0, 0.0]))
    # k = int(6 * 0.3) = 1: t = 0.1, still drops all three ties (faithful rule)
    out = mask_input_with_mask_rate(x, 0.3, True, "magnitude")
    torch.testing.assert_close(out, torch.tensor([0.5, 0.0, 0.0, 2.0, -3.0, 0.0]) / 0.7)
    # k = int(6 * 0.1) = 0 drops nothing instead of crashing
    assert torch.equal(mask_input_with_mask_rate(x, 0.1, False, "magnitude"), x)


def test_mask_model_weights_delta_and_finetuned_formats():
    pre, ft = _model(0), _model(1)
    out = mask_model_weights(ft, pre, "delta_weight", 0.5, True, "random", seed=7)
    for n in pre:
        keep = rng.keep_mask(7, n, None, 0, pre[n].numel(), 0.5).reshape(pre[n].shape)
        delta = ft[n] - pre[n]
        ref = pre[n] + torch.where(keep, delta, torch.zeros(())) / torch.tensor(0.5)
        torch.testing.assert_close(out[n], ref, rtol=0, atol=1e-6)
    out = mask_model_weights(ft, None, "finetuned_weight", 0.5, True, "random", seed=7)
    for n in ft:
        dropped = out[n] == 0
        assert torch.equal(out[n][~dropped], ft[n][~dropped] / torch.tensor(0.5))
    # rate 1: delta format gives the pretrained weights, finetuned format gives zeros
    out = mask_model_weights(ft, pre, "delta_weight", 1.0, True, "random")
    assert all(torch.equal(out[n], pre[n]) for n in pre)
    out = mask_model_weights(ft, pre, "finetuned_weight", 1.0, True, "random")
    assert all(torch.count_nonzero(out[n]) == 0 for n in pre)


def test_rate_zero_is_identity_and_exclusion_and_no_mutation():
    pre, ft = _model(0), _model(1)
    ft_copy = {n: t.clone() for n, t in ft.items()}
    for strategy in ("random", "magnitude"):
        out = mask_model_weights(ft, pre, "delta_weight", 0.0, True, strategy)
        assert all(torch.equal(out[n], ft[n]) for n in ft)
    out = mask_model_weights(
        ft, pre, "delta_weight", 0.9, True, "random", exclude_param_names_regex=[".*head.*"]
    )
    assert torch.equal(out["head.weight"], ft["head.weight"])
    assert not torch.equal(out["layer.0.w"], ft["layer.0.w"])
    assert all(torch.equal(ft[n], ft_copy[n]) for n in ft)


def test_determinism_order_subset_and_seed():
    pre, ft = _model(0), _model(1)
    a = mask_model_weights(ft, pre, weight_mask_rate=0.9, seed=5)
    b = mask_model_weights(ft, pre, weight_mask_rate=0.9, seed=5)
    rev_ft = dict(reversed(list(ft.items())))
    rev_pre = dict(reversed(list(pre.items())))
    c = mask_model_weights(rev_ft, rev_pre, weight_mask_rate=0.9, seed=5)
    subset = mask_model_weights(
        {"layer.0.w": ft["layer.0.w"]}, {"layer.0.w": pre["layer.0.w"]}, weight_mask_rate=0.9, seed=5
    )
    d = mask_model_weights(ft, pre, weight_mask_rate=0.9, seed=6)
    torch.set_num_threads(1)
    try:
        e = mask_model_weights(ft, pre, weight_mask_rate=0.9, seed=5)
    finally:
        torch.set_num_threads(2)
    for n in ft:
        assert (
            a[n].numpy().tobytes()
            == b[n].numpy().tobytes()
            == c[n].numpy().tobytes()
            == e[n].numpy().tobytes()
        )
    assert subset["layer.0.w"].numpy().tobytes() == a["layer.0.w"].numpy().tobytes()
    assert any(not torch.equal(a[n], d[n]) for n in ft)
    assert stable_seed(0, "w") == stable_seed(0, "w") != stable_seed(0, "w", 1)


def test_bfloat16_in_bfloat16_out_with_float32_math():
    pre = {n: t.to(torch.bfloat16) for n, t in _model(0).items()}
    ft = {n: (t + 0.01 * torch.randn_like(t)).to(torch.bfloat16) for n, t in _model(0).items()}
    out = mask_tensor("layer.0.w", ft["layer.0.w"], pre["layer.0.w"], weight_mask_rate=0.5, seed=1)
    assert out.dtype == torch.bfloat16
    shape = pre["layer.0.w"].shape
    keep = rng.keep_mask(1, "layer.0.w", None, 0, shape.numel(), 0.5).reshape(shape)
    delta = ft["layer.0.w"].float() - pre["layer.0.w"].float()
    ref = (pre["layer.0.w"].float() + torch.where(keep, delta, torch.zeros(())) / 0.5).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_bad_model_inputs():
    pre, ft = _model(0), _model(1)
    ft_bad = dict(ft, **{"layer.0.w": torch.zeros(5, 5)})
    with pytest.raises(ValueError, match="layer.0.w"):
        mask_model_weights(ft_bad, pre, weight_mask_rate=0.5)
    missing = {n: t for n, t in ft.items() if n != "head.weight"}
    with pytest.raises(ValueError, match="head.weight"):
        mask_model_weights(missing, pre, weight_mask_rate=0.5)
    with pytest.raises(ValueError, match="weight_mask_rate"):
        mask_model_weights(ft, pre, weight_mask_rate=2.0)
    with pytest.raises(ValueError, match="weight_format"):
        mask_model_weights(ft, pre, weight_format="bogus", weight_mask_rate=0.5)
