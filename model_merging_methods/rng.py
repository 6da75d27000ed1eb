"""Counter-based random numbers: the draw for element j of tensor ``name`` of model i depends on (seed, i, name, j)
only, so any block of any tensor can be drawn on its own, in any order, on any thread, on CPU or CUDA, with the
same bits.

Generator: Philox4x64-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3", SC'11;
the Random123 family, which passes TestU01's BigCrush), keyed per tensor by the first 16 bytes of
SHA-256(seed, model index, name). Block b of the stream is Philox(key, counter = b + 1): four 64-bit outputs, i.e.
eight 32-bit words (little-endian halves); element j uses word j, the one in block j // 8 at position j % 8.

On the CPU the blocks come from NumPy's ``numpy.random.Philox`` (C code; its bit stream is stable across NumPy
versions, NEP 19). On other devices (CUDA) the same rounds run as int64 tensor ops (:func:`philox_torch`, with the
64 × 64 → 128-bit products computed from 32-bit limbs), which the tests check bit for bit against NumPy on the CPU.

* DARE keeps element j when word_j ≥ T(p) = ceil(p · 2^32): P(drop) = T / 2^32, within 2^-32 of p; p = 0 drops
  nothing and p = 1 everything (:func:`keep_mask`; :func:`keep_bits` gives the same decisions as an all-ones /
  all-zeros integer mask, ready to be ANDed with a float's bits).
* Uniform floats keep the top 24 bits: u_j = (word_j >> 8) / 2^24, exact in float32, in [0, 1) (:func:`uniform`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

GENERATOR = "philox4x64-10"
GENERATOR_VERSION = 1
WORDS_PER_BLOCK = 8

_M0, _M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
_W0, _W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
_MASK32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1


def stream_key(seed: int, name: str, model_index: int | None = None) -> tuple[int, int]:
    """The 128-bit Philox key of one tensor's stream, from SHA-256 of ``(seed, model_index, name)``."""
    text = f"{int(seed)}\x00{'' if model_index is None else int(model_index)}\x00{name}".encode()
    digest = hashlib.sha256(text).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def _blocks_numpy(key: tuple[int, int], first: int, count: int) -> np.ndarray:
    """Blocks ``first .. first + count - 1`` as uint64 (4 per block). NumPy's Philox increments its counter before
    each block, so starting it at counter ``first`` yields Philox(key, first + 1), ... ."""
    bits = np.random.Philox(key=key[0] | (key[1] << 64), counter=first)
    return bits.random_raw(4 * count)


def _words_numpy(key: tuple[int, int], start: int, count: int) -> np.ndarray:
    """Words ``start .. start + count - 1`` of a stream, as uint32."""
    if count <= 0:
        return np.zeros(0, dtype=np.uint32)
    first, offset = divmod(start, WORDS_PER_BLOCK)
    nblocks = -(-(offset + count) // WORDS_PER_BLOCK)
    return _blocks_numpy(key, first, nblocks).view(np.uint32)[offset : offset + count]


# -- the same generator as int64 tensor ops (any device) ----------------------------------------------------------


def _i64(value: int) -> int:
    value &= _U64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 64-bit halves of the 128-bit product a · m (a: int64 bit patterns, m: an unsigned constant)."""
    a0, a1 = a & _MASK32, _shr(a, 32)
    m0, m1 = m & _MASK32, m >> 32
    p00, p01, p10, p11 = a0 * m0, a0 * m1, a1 * m0, a1 * m1  # exact 64-bit bit patterns (wrapping)
    mid = _shr(p00, 32) + (p01 & _MASK32) + (p10 & _MASK32)  # < 3 · 2^32: no overflow
    high = p11 + _shr(p01, 32) + _shr(p10, 32) + _shr(mid, 32)
    return high, a * _i64(m)


def philox_torch(key: tuple[int, int], counters: torch.Tensor) -> torch.Tensor:
    """Philox4x64-10 of the 64-bit counters ``counters`` (the high 192 counter bits are 0): shape (n, 4) int64."""
    x0 = counters.to(torch.int64)
    x1 = torch.zeros_like(x0)
    x2 = torch.zeros_like(x0)
    x3 = torch.zeros_like(x0)
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + _W0) & _U64, (k1 + _W1) & _U64
        hi0, lo0 = _mulhilo(x0, _M0)
        hi1, lo1 = _mulhilo(x2, _M1)
        x0, x1, x2, x3 = hi1 ^ x1 ^ _i64(k0), lo1, hi0 ^ x3 ^ _i64(k1), lo0
    return torch.stack([x0, x1, x2, x3], dim=1)


def _words_torch(key: tuple[int, int], start: int, count: int, device: torch.device) -> torch.Tensor:
    """Words ``start .. start + count - 1`` as int64 holding uint32 values, computed on ``device``."""
    first, offset = divmod(start, WORDS_PER_BLOCK)
    nblocks = -(-(offset + count) // WORDS_PER_BLOCK)
    counters = torch.arange(first + 1, first + 1 + nblocks, dtype=torch.int64, device=device)
    out = philox_torch(key, counters).reshape(-1)  # 4 uint64 per block, in order
    words = torch.stack([out & _MASK32, _shr(out, 32)], dim=1).reshape(-1)  # little-endian halves
    return words[offset : offset + count]


# -- public draws ---------------------------------------------------------------------------------------------------


def random_words(
    seed: int, name: str, model_index: int | None, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The 32-bit words ``start .. start + count - 1`` of tensor ``name``'s stream, as int64 on ``device``."""
    key = stream_key(seed, name, model_index)
    device = torch.device(device)
    if device.type == "cpu":
        return torch.from_numpy(_words_numpy(key, start, count).astype(np.int64))
    return _words_torch(key, start, count, device)


def drop_threshold(p: float) -> int:
    """T(p) = ceil(p · 2^32): an element whose word is below T is dropped."""
    return min(1 << 32, max(0, math.ceil(float(p) * (1 << 32))))


def keep_mask(
    seed: int,
    name: str,
    model_index: int | None,
    start: int,
    count: int,
    p: float,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """DARE's keep decisions (bool) for elements ``start .. start + count - 1`` of tensor ``name``: word ≥ T(p)."""
    key = stream_key(seed, name, model_index)
    threshold = drop_threshold(p)
    device = torch.device(device)
    if device.type == "cpu":
        words = _words_numpy(key, start, count)
        keep = words >= threshold if threshold < (1 << 32) else np.zeros(count, dtype=bool)
        return torch.from_numpy(keep)
    return _words_torch(key, start, count, device) >= threshold


def uniform(
    seed: int, name: str, model_index: int | None, start: int, count: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """u_j = (word_j >> 8) / 2^24 in [0, 1), float32, for elements ``start .. start + count - 1``."""
    key = stream_key(seed, name, model_index)
    device = torch.device(device)
    if device.type == "cpu":
        top = (_words_numpy(key, start, count) >> 8).astype(np.float32)
        return torch.from_numpy(top * np.float32(1.0 / (1 << 24)))
    return (_shr(_words_torch(key, start, count, device), 8)).to(torch.float32) * (1.0 / (1 << 24))


def keep_bits(
    seed: int,
    name: str,
    model_index: int | None,
    start: int,
    count: int,
    p: float,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """:func:`keep_mask` as an integer mask of ``dtype`` (int32 for float32 data, int64 for float64): −1 (all bits
    set) where the element is kept, 0 where it is dropped. ``mask & x.view(dtype)`` is ``torch.where(keep, x, +0.0)``
    bit for bit. On the CPU the comparison and the widening run in NumPy right after the draw (two passes)."""
    threshold = drop_threshold(p)
    device = torch.device(device)
    if threshold == 0:
        return torch.full((count,), -1, dtype=dtype, device=device)
    if threshold >= 1 << 32:
        return torch.zeros(count, dtype=dtype, device=device)
    key = stream_key(seed, name, model_index)
    if device.type == "cpu":
        drop = np.less(_words_numpy(key, start, count), threshold).view(np.uint8)  # 1 = dropped
        npdtype = np.int32 if dtype == torch.int32 else np.int64
        return torch.from_numpy(np.subtract(drop, np.uint8(1), dtype=npdtype))  # 0 - 1 = -1 where kept
    return _keep_bits_torch(key, start, count, threshold, device, dtype)


def _keep_bits_torch(
    key: tuple[int, int], start: int, count: int, threshold: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The tensor-op path of :func:`keep_bits` (every device but the CPU; the tests run it on the CPU)."""
    return (_words_torch(key, start, count, device) >= threshold).to(dtype).neg_()


@dataclass(frozen=True)
class Stream:
    """Where a tensor's (or a block's) draws come from: element j of the tensor it is applied to is element
    ``start + j`` of the stream of ``(seed, model_index, name)``. A block of rows r0.. of a tensor with rows of
    ``row_size`` elements has ``start = r0 · row_size``."""

    seed: int
    name: str
    model_index: int | None = None
    start: int = 0

    def keep_bits(
        self, offset: int, count: int, p: float, device: torch.device | str = "cpu", dtype=torch.int32
    ) -> torch.Tensor:
        """:func:`keep_bits` for elements ``offset .. offset + count - 1`` of the tensor this stream is applied to."""
        return keep_bits(self.seed, self.name, self.model_index, self.start + offset, count, p, device, dtype)

    def keep_mask(
        self, offset: int, count: int, p: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return keep_mask(self.seed, self.name, self.model_index, self.start + offset, count, p, device)


def describe() -> dict[str, object]:
    """The generator's name and version, as recorded in ``merge_manifest.json``."""
    return {"name": GENERATOR, "version": GENERATOR_VERSION}
