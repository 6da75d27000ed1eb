"""Shared pieces of the per-method tests (``tests/test_method_<name>.py``): a random float32 family of state dicts
with several tensors (2-D, 1-D, 3-D, one non-float buffer and one excluded tensor), NumPy views and comparisons."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

SHAPES: dict[str, tuple[int, ...]] = {
    "embed.weight": (9, 6),
    "layer.0.weight": (6, 6),
    "layer.0.bias": (6,),
    "layer.1.weight": (5, 6),
    "layer.1.conv": (2, 3, 4),
    "norm.weight": (7,),
    "head.weight": (3, 6),
}
EXCLUDE = (r"head\.",)  # re.match patterns: head.weight is excluded
EXCLUDED = ("head.weight",)
BUFFER = "layer.0.position_ids"  # a non-float tensor: copied, never merged
MERGED = tuple(n for n in SHAPES if n not in EXCLUDED)


def family(
    num_models: int, seed: int = 0, delta: float = 0.1, shapes: Mapping[str, tuple[int, ...]] = SHAPES
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A pre-trained state dict N(0, 1) and ``num_models`` fine-tuned ones = pre + N(0, delta²), float32, each with
    the same int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    pre[BUFFER] = torch.arange(5)
    models = []
    for _ in range(num_models):
        m = {
            n: t + delta * torch.randn(t.shape, generator=g) for n, t in pre.items() if t.is_floating_point()
        }
        m[BUFFER] = torch.arange(5)
        models.append(m)
    return pre, models


def as_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float64 NumPy copies of the float tensors."""
    return {n: t.double().numpy() for n, t in state.items() if t.is_floating_point()}


def assert_close(
    result: Mapping[str, torch.Tensor],
    reference: Mapping[str, np.ndarray],
    names: Sequence[str] = MERGED,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    for n in names:
        assert result[n].dtype == torch.float32, n
        np.testing.assert_allclose(result[n].double().numpy(), reference[n], rtol=rtol, atol=atol, err_msg=n)


def assert_copied(
    result: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor], names=(*EXCLUDED, BUFFER)
) -> None:
    """Excluded and non-float tensors are the source's, bit for bit."""
    for n in names:
        assert torch.equal(result[n], source[n]) and result[n].dtype == source[n].dtype, n


def clone_all(states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{n: t.clone() for n, t in s.items()} for s in states]


def assert_unchanged(states: Sequence[Mapping[str, torch.Tensor]], copies) -> None:
    """The inputs were not modified in place."""
    for s, c in zip(states, copies):
        assert all(torch.equal(s[n], c[n]) for n in c)


def assert_same_bytes(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(
            a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)
        ), n
