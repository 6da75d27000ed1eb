"""Exact k-th smallest |x| over data streamed in blocks (the TIES trim thresholds), with bounded memory.

Non-negative float32 values order like their int32 bit patterns, so selection works on the bits ``a = bits(|x|)``
(31 bits; NaN is refused).

* :func:`kth_smallest_abs`: radix selection in two passes over the data (high 16 bits, then the low 16 bits inside
  the chosen bucket).
* :class:`BandSelection`: selection for several data sets at once (one per model) in as few passes as the data
  allow. Each pass counts, per data set, the values below and above a *band* [lo, hi] of bit patterns and builds a
  histogram of the values inside it (at most :data:`MAX_BUCKETS` buckets of 2^shift patterns each); the k-th value
  is then either exact (the histogram has one pattern per bucket, or a band of coarser buckets held few enough values
  to keep them all: up to :data:`KEEP_VALUES`) or known to lie in one bucket, below or above the band, which becomes
  the next band ("a histogram refined in place"). The first band comes from a small sample
  (:func:`band_from_sample`: the weighted sample quantiles around k/n, widened by ten standard errors), so in
  practice one pass decides every threshold; data that fools the sample cost one or two more passes, never an
  inexact answer. (One pass cannot be exact in bounded memory for every input: Munro & Paterson 1980, "Selection and
  sorting with limited storage", Theor. Comput. Sci. 12.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from model_merging_methods.errors import MergeError

RADIX_CHUNK = 1 << 24  # elements per slice in the two-pass radix selection (bounded memory)
MAX_BUCKETS = 1 << 20  # buckets of a band's histogram (8 MiB of int64 counts per data set)
INF_BITS = 0x7F800000  # bits of +inf; anything above is NaN
_FLUSH = 1 << 20  # values inside a band buffered before they are added to its histogram
KEEP_VALUES = 1 << 22  # a band of coarse buckets also keeps up to this many of its values (16 MiB), exactly
SAMPLE_Z = 10.0  # the first band spans the sample quantiles k/n ± SAMPLE_Z standard errors


def _nan_error() -> MergeError:
    return MergeError("NaN in the task vector: cannot select a TIES threshold")


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of float32 |x| (flattened), on x's device; NaN is a :class:`MergeError`."""
    a = x.detach().reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    if a.numel() and int(a.max()) > INF_BITS:
        raise _nan_error()
    return a


def bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


def float_to_bits(value: float) -> int:
    return int(torch.tensor([abs(value)], dtype=torch.float32).view(torch.int32).item())


def kth_smallest_abs(chunks_factory: Callable[[], Iterable[torch.Tensor]], k: int) -> float:
    """The exact k-th smallest |x| (1-based) over the concatenation of the tensors ``chunks_factory()`` yields.

    Radix selection on the bit patterns of float32 |x|: pass 1 counts the high 16 bits, pass 2 the low 16 bits
    inside the chosen bucket. ``chunks_factory`` is called once per pass, so the data can be streamed from disk;
    memory stays bounded by one slice of 2^24 elements. Equals ``torch.cat([c.flatten() for c in
    chunks]).abs().kthvalue(k)`` without building the concatenation.
    """

    def slices():
        for chunk in chunks_factory():
            flat = chunk.detach().reshape(-1)
            for start in range(0, flat.numel(), RADIX_CHUNK):
                yield abs_bits(flat[start : start + RADIX_CHUNK]).cpu().to(torch.int64)

    counts = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for bits in slices():
        counts += torch.bincount(bits >> 16, minlength=1 << 16)
        total += bits.numel()
    if not 1 <= k <= total:
        raise MergeError(f"k must be in [1, {total}], got {k}")
    cumulative = counts.cumsum(0)
    high = int(torch.searchsorted(cumulative, torch.tensor(k), right=False))
    rank = k - (int(cumulative[high - 1]) if high > 0 else 0)
    low_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for bits in slices():
        inside = bits[(bits >> 16) == high]
        if inside.numel():
            low_counts += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
    low = int(torch.searchsorted(low_counts.cumsum(0), torch.tensor(rank), right=False))
    return bits_to_float((high << 16) | low)


# ----------------------------------------------------------------------------------------------------------------
# banded selection
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """Bit patterns ``lo .. hi`` (inclusive), histogrammed in buckets of ``2**shift`` patterns."""

    lo: int
    hi: int
    shift: int

    @classmethod
    def covering(cls, lo: int, hi: int) -> Band:
        width = hi - lo + 1
        shift = max(0, math.ceil(math.log2(width / MAX_BUCKETS))) if width > MAX_BUCKETS else 0
        return cls(lo, hi, shift)

    @property
    def buckets(self) -> int:
        return ((self.hi - self.lo) >> self.shift) + 1


@dataclass
class BlockSummary:
    """What one block of one data set contributes to a pass: counts below and above the band, and the values (bit
    patterns minus ``lo``, int32) inside it."""

    below: int
    above: int
    inside: np.ndarray


def summarize(x: torch.Tensor, band: Band) -> BlockSummary:
    """:class:`BlockSummary` of the |x| of one block (any device; the CPU path runs in NumPy)."""
    a = abs_bits(x)
    if a.device.type == "cpu":
        v = a.numpy()
        below = int(np.count_nonzero(v < band.lo))
        above = int(np.count_nonzero(v > band.hi))
        if below + above == v.size:
            inside = np.zeros(0, dtype=np.int64)
        else:
            inside = v[(v >= band.lo) & (v <= band.hi)] - np.int32(band.lo)
        return BlockSummary(below, above, inside)
    below = int((a < band.lo).sum())
    above = int((a > band.hi).sum())
    inside = a[(a >= band.lo) & (a <= band.hi)].cpu().numpy() - np.int32(band.lo)
    return BlockSummary(below, above, inside)


@dataclass
class _Target:
    k: int
    total: int
    band: Band
    below: int = 0
    above: int = 0
    hist: np.ndarray | None = None
    buffered: list[np.ndarray] = field(default_factory=list)
    n_buffered: int = 0
    kept: list[np.ndarray] | None = None  # every value inside a coarse band, while there are few
    n_kept: int = 0
    result: float | None = None
    passes: int = 0

    def start_pass(self) -> None:
        self.below = self.above = 0
        self.hist = np.zeros(self.band.buckets, dtype=np.int64)
        self.buffered, self.n_buffered = [], 0
        self.kept, self.n_kept = ([] if self.band.shift else None), 0
        self.passes += 1

    def add(self, s: BlockSummary) -> None:
        self.below += s.below
        self.above += s.above
        if s.inside.size:
            self.buffered.append(s.inside)
            self.n_buffered += s.inside.size
            if self.kept is not None:
                self.n_kept += s.inside.size
                if self.n_kept <= KEEP_VALUES:
                    self.kept.append(s.inside)
                else:
                    self.kept = None
            if self.n_buffered >= max(_FLUSH, self.band.buckets):
                self.flush()

    def flush(self) -> None:
        if self.buffered:
            values = np.concatenate(self.buffered) >> self.band.shift
            self.hist += np.bincount(values, minlength=self.band.buckets)
            self.buffered, self.n_buffered = [], 0

    def finish_pass(self) -> None:
        """Decide the k-th value or narrow the band for the next pass."""
        self.flush()
        band, hist = self.band, self.hist
        counted = self.below + self.above + int(hist.sum())
        if counted != self.total:
            raise MergeError(f"internal error: a selection pass saw {counted} values, expected {self.total}")
        if self.k <= self.below:  # below the band
            self.band = Band.covering(0, band.lo - 1)
        elif self.k > self.total - self.above:  # above the band
            self.band = Band.covering(band.hi + 1, INF_BITS)
        else:
            rank = self.k - self.below
            if self.kept is not None:  # a coarse band that held few values: select among them
                values = np.concatenate(self.kept) if self.kept else np.zeros(0, dtype=np.int32)
                self.result = bits_to_float(band.lo + int(np.partition(values, rank - 1)[rank - 1]))
            else:
                bucket = int(np.searchsorted(np.cumsum(hist), rank, side="left"))
                first = band.lo + (bucket << band.shift)
                if band.shift == 0:
                    self.result = bits_to_float(first)
                else:
                    self.band = Band.covering(first, min(band.hi, first + (1 << band.shift) - 1))
        self.hist, self.kept = None, None


class BandSelection:
    """The k-th smallest |x| of several data sets (``ks[i]`` of the ``totals[i]`` values of data set i) from passes
    over their blocks. Use: ``while not sel.done: sel.start_pass(); [sel.add(i, summarize(x, sel.band(i))) for each
    block x of data set i in sel.pending]; sel.finish_pass()``; then ``sel.results``."""

    def __init__(self, ks: Sequence[int], totals: Sequence[int], bands: Sequence[Band | None] | None = None):
        self.targets: list[_Target] = []
        for i, (k, total) in enumerate(zip(ks, totals)):
            if not 1 <= k <= total:
                raise MergeError(f"k must be in [1, {total}], got {k}")
            band = bands[i] if bands is not None and bands[i] is not None else Band.covering(0, INF_BITS)
            self.targets.append(_Target(int(k), int(total), band))

    @property
    def pending(self) -> list[int]:
        return [i for i, t in enumerate(self.targets) if t.result is None]

    @property
    def done(self) -> bool:
        return not self.pending

    def band(self, i: int) -> Band:
        return self.targets[i].band

    def start_pass(self) -> None:
        for i in self.pending:
            self.targets[i].start_pass()

    def add(self, i: int, summary: BlockSummary) -> None:
        self.targets[i].add(summary)

    def finish_pass(self) -> None:
        for i in self.pending:
            self.targets[i].finish_pass()

    @property
    def results(self) -> list[float]:
        if not self.done:
            raise MergeError("internal error: selection not finished")
        return [t.result for t in self.targets]

    @property
    def passes(self) -> list[int]:
        return [t.passes for t in self.targets]


def band_from_sample(values: np.ndarray, weights: np.ndarray, k: int, total: int) -> Band:
    """The first band for the k-th smallest of ``total`` values, from a weighted sample of their bit patterns
    (``weights[j]`` values represented by ``values[j]``): the weighted sample quantiles at k/n ± ``SAMPLE_Z`` standard
    errors (Kish's effective sample size), widened to the band's buckets. Any band gives the exact answer; a good
    one gives it in one pass."""
    if values.size == 0:
        return Band.covering(0, INF_BITS)
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order].astype(np.float64)
    cum = np.cumsum(w) / w.sum()
    n_eff = w.sum() ** 2 / float((w * w).sum())
    q = k / total
    delta = SAMPLE_Z * math.sqrt(max(q * (1 - q), 1.0 / n_eff) / n_eff)
    lo_q, hi_q = q - delta, q + delta
    lo = 0 if lo_q <= 0 else int(v[min(v.size - 1, int(np.searchsorted(cum, lo_q, side="left")))])
    hi = INF_BITS if hi_q >= 1 else int(v[min(v.size - 1, int(np.searchsorted(cum, hi_q, side="left")))])
    return Band.covering(lo, max(lo, hi))
