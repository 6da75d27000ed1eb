"""The counter-based generator (Philox4x64-10): known answers, NumPy and torch implementations bit for bit, block
independence, and the statistics DARE relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model_merging_methods import rng


def test_known_answer_of_random123():
    # Random123's kat_vectors: philox4x64-10, counter 0, key 0
    out = rng.philox_torch((0, 0), torch.tensor([0]))[0]
    expected = [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B]
    assert [int(v) & ((1 << 64) - 1) for v in out] == expected


@pytest.mark.parametrize("start,count", [(0, 1), (0, 37), (5, 100), (8, 8), (13, 1000), (123457, 777)])
def test_numpy_and_torch_implementations_agree(start, count):
    key = rng.stream_key(3, "layer.weight", 1)
    a = torch.from_numpy(rng._words_numpy(key, start, count).astype(np.int64))
    b = rng._words_torch(key, start, count, torch.device("cpu"))
    assert torch.equal(a, b)


def test_any_block_split_gives_the_same_draws():
    whole = rng.random_words(7, "x", 2, 0, 5000)
    for cuts in ([0, 1, 17, 500, 5000], [0, 4999, 5000], [0, 8, 16, 24, 5000]):
        parts = torch.cat([rng.random_words(7, "x", 2, a, b - a) for a, b in zip(cuts, cuts[1:])])
        assert torch.equal(whole, parts)
    assert torch.equal(
        rng.keep_mask(7, "x", 2, 100, 50, 0.3), rng.keep_mask(7, "x", 2, 0, 5000, 0.3)[100:150]
    )
    assert torch.equal(rng.uniform(7, "x", 2, 100, 50), rng.uniform(7, "x", 2, 0, 5000)[100:150])


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99, 0.999])
def test_drop_fraction_is_binomial(p):
    n = 1 << 20
    for name in ("a", "b.weight", "model.layers.3.mlp.down_proj.weight"):
        dropped = n - int(rng.keep_mask(11, name, 0, 0, n, p).sum())
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(dropped - n * p) <= 5 * sigma, (name, dropped)


def test_rates_zero_and_one():
    assert bool(rng.keep_mask(0, "w", 0, 0, 10000, 0.0).all())
    assert not bool(rng.keep_mask(0, "w", 0, 0, 10000, 1.0).any())
    u = rng.uniform(0, "w", 0, 0, 100000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / math.sqrt(float((a * a).sum() * (b * b).sum())))


def test_no_correlation_between_neighbours_rows_tensors_seeds_and_models():
    n = 1 << 18
    bound = 5 / math.sqrt(n)
    u = rng.uniform(1, "w", 0, 0, n + 512)
    assert abs(_corr(u[:n], u[1 : n + 1])) < bound  # neighbouring elements
    assert abs(_corr(u[:n], u[512 : n + 512])) < bound  # neighbouring rows of a (rows, 512) tensor
    assert abs(_corr(u[:n], rng.uniform(1, "v", 0, 0, n))) < bound  # another tensor
    assert abs(_corr(u[:n], rng.uniform(2, "w", 0, 0, n))) < bound  # another seed
    assert abs(_corr(u[:n], rng.uniform(1, "w", 1, 0, n))) < bound  # another model
    # masks of different seeds or models agree as often as independent ones: p² + (1 - p)² at p = 0.5
    a = rng.keep_mask(1, "w", 0, 0, n, 0.5)
    for other in (rng.keep_mask(2, "w", 0, 0, n, 0.5), rng.keep_mask(1, "w", 1, 0, n, 0.5)):
        agree = int((a == other).sum())
        assert abs(agree - n / 2) <= 5 * math.sqrt(n / 4)


def test_stream_keys_differ_for_every_component():
    keys = {rng.stream_key(s, nm, i) for s in (0, 1) for nm in ("a", "b") for i in (None, 0, 1)}
    assert len(keys) == 12
