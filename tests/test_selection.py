"""Exact k-th smallest |x| (the TIES trim thresholds): the two-pass radix selection and the banded selection, against
torch.kthvalue on adversarial inputs, with good, bad and no bands; the global TIES thresholds in one pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, ties_merging
from model_merging_methods.selection import (
    INF_BITS,
    Band,
    BandSelection,
    band_from_sample,
    float_to_bits,
    kth_smallest_abs,
    summarize,
)


def _adversarial(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    n = 20_000
    if name == "gaussian":
        return torch.randn(n, generator=g) * 0.01
    if name == "ties":  # three values, many equal magnitudes of both signs
        return torch.tensor([0.0, 1e-3, -1e-3, 2e-3])[torch.randint(0, 4, (n,), generator=g)]
    if name == "zeros":  # 90 % exact zeros (DARE at p = 0.9), signed zeros included
        x = torch.randn(n, generator=g) * 0.01
        x[torch.rand(n, generator=g) < 0.9] = 0.0
        x[::97] = -0.0
        return x
    if name == "denormals":
        return torch.randn(n, generator=g) * 1e-42
    if name == "huge":  # a single huge value among small ones
        x = torch.randn(n, generator=g) * 1e-3
        x[1234] = -3e38
        return x
    if name == "wide":  # magnitudes spread over 60 binades
        return torch.randn(n, generator=g) * torch.exp2(torch.randint(-60, 0, (n,), generator=g).float())
    raise ValueError(name)


CASES = ["gaussian", "ties", "zeros", "denormals", "huge", "wide"]


def _ks(n: int) -> list[int]:
    return [1, 2, n // 10, n // 2, int(0.8 * n), n - 1, n]


def _chunks(x: torch.Tensor, size: int = 3001) -> list[torch.Tensor]:
    return list(x.split(size))


def _run(selection: BandSelection, datasets: list[torch.Tensor]) -> list[float]:
    while not selection.done:
        selection.start_pass()
        for i in selection.pending:
            for c in _chunks(datasets[i]):
                selection.add(i, summarize(c, selection.band(i)))
        selection.finish_pass()
    return selection.results


@pytest.mark.parametrize("case", CASES)
def test_radix_selection_equals_kthvalue(case):
    x = _adversarial(case)
    for k in _ks(x.numel()):
        assert kth_smallest_abs(lambda: iter(_chunks(x)), k) == x.abs().kthvalue(k).values.item()


@pytest.mark.parametrize("case", CASES)
def test_band_selection_without_a_band_equals_kthvalue(case):
    x = _adversarial(case)
    ks = _ks(x.numel())
    selection = BandSelection(ks, [x.numel()] * len(ks))  # every data set starts from the whole range
    results = _run(selection, [x] * len(ks))
    assert results == [x.abs().kthvalue(k).values.item() for k in ks]
    assert max(selection.passes) <= 3  # 31 bits, at most 2^20 buckets per pass


@pytest.mark.parametrize("case", CASES)
def test_band_selection_from_a_sample_decides_in_one_pass_and_bad_bands_stay_exact(case):
    x = _adversarial(case)
    n = x.numel()
    bits = x.abs().view(torch.int32).numpy()
    sample = bits[::7].astype(np.int64)
    for k in _ks(n):
        expected = x.abs().kthvalue(k).values.item()
        band = band_from_sample(sample, np.full(sample.size, n / sample.size), k, n)
        selection = BandSelection([k], [n], [band])
        assert _run(selection, [x]) == [expected]
        t = float_to_bits(expected)
        bad = [
            Band.covering(0, 0),  # only zeros
            Band.covering(INF_BITS, INF_BITS),  # only +inf
            Band.covering(t + 1, t + 1),  # just above the answer
            Band.covering(max(0, t - 1), max(0, t - 1)),  # just below it
            Band.covering(0, INF_BITS),  # everything, coarse buckets
        ]
        for b in bad:
            assert _run(BandSelection([k], [n], [b]), [x]) == [expected], (case, k, b)
    # a sample of the data itself places the band well: one pass
    k = int(0.8 * n)
    band = band_from_sample(bits.astype(np.int64), np.ones(n), k, n)
    selection = BandSelection([k], [n], [band])
    _run(selection, [x])
    assert selection.passes == [1]


def test_selection_refuses_nan_and_bad_k():
    x = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(MergeError, match="NaN"):
        kth_smallest_abs(lambda: iter([x]), 1)
    with pytest.raises(MergeError, match="NaN"):
        summarize(x, Band.covering(0, INF_BITS))
    with pytest.raises(MergeError, match="k must be"):
        BandSelection([4], [3])
    with pytest.raises(MergeError, match="k must be"):
        kth_smallest_abs(lambda: iter([torch.ones(3)]), 0)


def _family(kind: str, num: int = 3):
    g = torch.Generator().manual_seed(11)
    shapes = {"emb": (50, 8), "w": (8, 8), "b": (8,), "norm": (8,)}
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    models = []
    for _ in range(num):
        if kind == "ties":  # deltas in {-2, -1, 0, 1, 2} / 64: many equal magnitudes and exact zeros
            m = {n: t + torch.randint(-2, 3, t.shape, generator=g).float() / 64 for n, t in pre.items()}
        else:
            m = {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in pre.items()}
        models.append(m)
    return pre, models


@pytest.mark.parametrize("kind", ["gaussian", "ties"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.8, 0.999, 1.0])
def test_global_ties_thresholds_are_the_kth_smallest_over_each_model(kind, rate):
    from model_merging_methods.engine import DictSink, DictSource, Executor, StatisticsView
    from model_merging_methods.methods.ties import global_thresholds

    pre, models = _family(kind)
    source = DictSource([pre, *models], ["pre", "a", "b", "c"])
    executor = Executor(source, DictSink(source, 0), base=0, show_progress=False)
    view = StatisticsView(executor, [1, 2, 3], None, None)
    thresholds = global_thresholds({"param_value_mask_rate": rate}, view)
    n = view.kept_numel
    k = int(n * rate)
    for i, m in enumerate(models):
        tau = torch.cat([(m[name] - pre[name]).reshape(-1) for name in pre])
        assert thresholds[i] == (0.0 if k == 0 else tau.abs().kthvalue(k).values.item())
    if k:
        assert view.selection_passes and max(view.selection_passes) <= 3
    # a tiny sample (one element per tensor) still gives the exact thresholds
    thresholds_small = global_thresholds({"param_value_mask_rate": rate}, view, sample_elements=1)
    assert thresholds_small == thresholds


def test_global_ties_merge_uses_one_pass_on_regular_deltas(tmp_path):
    """The paper's global trim reads every model once for its thresholds (a sample places the band)."""
    from model_merging_methods.engine import DictSink, DictSource, Executor, StatisticsView
    from model_merging_methods.methods.ties import global_thresholds

    pre, models = _family("gaussian")
    big = {n: torch.randn(400, 64, generator=torch.Generator().manual_seed(i)) for i, n in enumerate("xyz")}
    pre = {**pre, **big}
    models = [{**m, **{n: t + 0.01 * torch.randn(t.shape) for n, t in big.items()}} for m in models]
    source = DictSource([pre, *models], ["pre", "a", "b", "c"])
    view = StatisticsView(
        Executor(source, DictSink(source, 0), base=0, show_progress=False), [1, 2, 3], None, None
    )
    global_thresholds({"param_value_mask_rate": 0.8}, view)
    assert view.selection_passes == [1, 1, 1]
    # and the merges built on them agree with DARE in front too
    a = mask_merging(pre, models, "ties_merging", 0.5, seed=3, param_value_mask_rate=0.8)
    b = mask_merging(pre, models, "ties_merging", 0.5, seed=3, param_value_mask_rate=0.8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert set(ties_merging(pre, models, 0.8)) == set(pre)


@pytest.mark.parametrize("strategy", ["random", "magnitude"])
def test_global_thresholds_after_dare_are_the_kth_smallest_of_the_masked_task_vectors(strategy):
    from model_merging_methods.engine import Dare, DictSink, DictSource, Executor, StatisticsView
    from model_merging_methods.methods.ties import global_thresholds

    g = torch.Generator().manual_seed(0)
    pre = {n: torch.randn(s, generator=g) for n, s in {"a": (300, 20), "b": (50,), "c": ()}.items()}
    fts = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in pre.items()} for _ in range(3)]
    dare = Dare.for_models([0.5, 0.7, 0.9], True, strategy, "delta_weight", 1)
    source = DictSource([pre, *fts], ["pre", "a", "b", "c"])
    executor = Executor(source, DictSink(source, 0), base=0, show_progress=False)
    view = StatisticsView(executor, [1, 2, 3], dare, None)
    thresholds = global_thresholds({"param_value_mask_rate": 0.8}, view)
    for i in range(3):
        taus = torch.cat(
            [
                (xs[1] - xs[0]).reshape(-1)
                for p in view.plans
                for _, _, xs in executor.blocks_for(p, [0, i + 1], dare)
            ]
        )
        assert thresholds[i] == taus.abs().kthvalue(int(taus.numel() * 0.8)).values.item()
