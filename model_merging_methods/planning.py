"""What a merge will write, tensor by tensor: :class:`TensorPlan` (aligned shape, per-model rows and dtypes, output
dtype, whether it is excluded) and its row blocks. Both executors (in memory and streamed) walk the same plans and
the same blocks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 1 << 18  # elements per row block of one model (1 MiB in float32: stays in the CPU cache)


@dataclass
class TensorPlan:
    """One output tensor: its aligned shape, which models need padding/truncation, its output dtype."""

    name: str
    shape: tuple[int, ...]  # aligned (output) shape
    rows: dict[int, int]  # model index -> rows on disk (dim 0)
    dtypes: dict[int, torch.dtype]
    out_dtype: torch.dtype
    is_float: bool
    vocab: bool = False
    excluded: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def blocks(self, whole: bool = False) -> list[tuple[int, int]]:
        """Row ranges of at most :data:`CHUNK_ELEMENTS` elements (one range when ``whole`` or 0-dim)."""
        if not self.shape:
            return [(0, 1)]
        rows = self.shape[0]
        if whole or rows == 0:
            return [(0, rows)]
        step = max(1, CHUNK_ELEMENTS // max(1, self.row_size))
        return [(r, min(rows, r + step)) for r in range(0, rows, step)]
