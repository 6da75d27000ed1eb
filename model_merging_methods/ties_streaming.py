"""TIES's streamed fast path (the method-specific part of streaming): one merge pass that also elects the majority
sign, instead of a separate sign pass.

The majority sign m = sign(Σ_coords sign(Σ_i τ̂_i)) is known only after every coordinate is seen, but it changes the
result only at exact cancellations (Σ_i τ̂_i = 0 with some τ̂_i ≠ 0). So the merge pass writes the result for m = +1
and records where the result for m = −1 differs (:class:`MinusPatches`); when the majority turns out to be −1 those
few values are patched in place, and m = 0 (every elected sign cancels out) redoes the merge. The bytes are the ones
the generic executor gives (the contract test checks it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.engine import Dare, Executor, StatisticsView, progress
from model_merging_methods.methods.ties import (
    global_thresholds,
    majority_sign,
    ties_merge_tensor,
    ties_merge_tensor_both_majorities,
    ties_trim_threshold,
)
from model_merging_methods.planning import TensorPlan

TENSOR_CACHE_ELEMENTS = 1 << 22  # per-tensor TIES keeps tensors up to this size in memory across its passes


class MinusPatches:
    """Where the TIES result under majority sign −1 differs (bitwise) from the one written under +1. Records go to a
    file when ``path`` is given (global scope), else memory."""

    def __init__(self, path: Path | None = None):
        self.path, self.lock, self.records = path, threading.Lock(), []
        self.fh = open(path, "w+b") if path is not None else None  # noqa: SIM115 - closed in close()

    def add(self, name: str, byte_offset: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Record the m = −1 ``values`` at flat positions ``idx`` of the block written at ``byte_offset``."""
        if idx.numel() == 0:
            return
        values = values.contiguous()
        with self.lock:
            if self.fh is None:
                self.records.append((name, byte_offset, idx, values))
            else:
                pos = self.fh.seek(0, 2)
                self.fh.write(idx.to(torch.int64).numpy().tobytes())
                self.fh.write(values.view(torch.uint8).numpy().tobytes())
                self.records.append((name, byte_offset, pos, idx.numel(), values.dtype))

    def __len__(self) -> int:
        return sum(r[2].numel() if self.fh is None else r[3] for r in self.records)

    def apply(self, writer) -> None:
        """Write the recorded m = −1 values over the m = +1 results."""
        for rec in self.records:
            if self.fh is None:
                name, byte_offset, idx, values = rec
            else:
                name, byte_offset, pos, n, dtype = rec
                self.fh.seek(pos)
                idx = torch.frombuffer(bytearray(self.fh.read(8 * n)), dtype=torch.int64)
                item = torch.empty((), dtype=dtype).element_size()
                values = torch.frombuffer(bytearray(self.fh.read(item * n)), dtype=dtype)
            span = int(idx.max()) + 1
            item = values.element_size()
            current = torch.frombuffer(writer.read_at(name, byte_offset, span * item), dtype=values.dtype)
            current[idx] = values
            writer.overwrite_at(name, byte_offset, current)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.path.unlink(missing_ok=True)
            self.fh = None


def _merge_optimistic(
    executor: Executor, plan: TensorPlan, blocks, thresholds: list[float], lam: float, patches: MinusPatches
) -> int:
    """Write the TIES result of one tensor for majority sign +1, record where −1 differs; return Σ sign(Σ τ̂)."""
    total, offset = 0, 0
    for _, _, (pre, *xs) in blocks:
        sign_sum, plus, idx, minus = ties_merge_tensor_both_majorities(pre, xs, thresholds, lam)
        total += sign_sum
        plus = executor.to_sink(plus.to(plan.out_dtype))
        executor.sink.write_at(plan.name, offset, plus)
        patches.add(plan.name, offset, idx.cpu(), minus.to(plan.out_dtype).cpu())
        offset += plus.numel() * plus.element_size()
    return total


def _rewrite(executor: Executor, plan: TensorPlan, blocks, thresholds, lam: float, majority: float) -> None:
    offset = 0
    for _, _, (pre, *xs) in blocks:
        out = executor.to_sink(ties_merge_tensor(pre, xs, thresholds, lam, majority).to(plan.out_dtype))
        executor.sink.overwrite_at(plan.name, offset, out)
        offset += out.numel() * out.element_size()


def ties_stream_pass(
    executor: Executor,
    method,
    params: Mapping[str, Any],
    fts: Sequence[int],
    dare: Dare | None = None,
    *,
    seed: int = 0,
    data=None,
) -> dict[str, Any]:
    """TIES over the stream: thresholds (global or per tensor), then one merge pass that also elects the majority
    sign. Returns the thresholds and sign statistics for the manifest."""
    lam, rate, scope = params["scaling_coefficient"], params["param_value_mask_rate"], params["trim_scope"]
    base, fts = executor.base, list(fts)
    plans = executor.plans
    models = [base, *fts]
    info: dict[str, Any] = {"trim_scope": scope}

    if scope == "global":
        view = StatisticsView(executor, fts, dare, None)
        with progress(len(fts), "TIES thresholds (models)", executor.show_progress) as bar:
            thresholds = global_thresholds(params, view)  # one pass over every model in practice
            bar.update(len(fts))
        info["threshold_passes"] = getattr(view, "selection_passes", [0] * len(fts))
        patches = MinusPatches(Path(executor.sink.out_dir) / ".ties_majority_patches.tmp")
        try:

            def one(plan: TensorPlan) -> int:
                if plan.excluded or not plan.is_float:
                    executor.copy(plan, base)
                    return 0
                blocks = executor.blocks_for(plan, models, dare)
                return _merge_optimistic(executor, plan, blocks, thresholds, lam, patches)

            total = sum(executor.map_tensors(plans, one, "TIES merge"))
            majority = majority_sign(total)
            info.update(
                thresholds=thresholds, sign_sum=total, majority_sign=majority, cancellations=len(patches)
            )
            if majority < 0:
                patches.apply(executor.sink)
            elif majority == 0:  # every elected sign cancels out: redo the merge with m = 0 (rare)
                kept = [p for p in plans if p.is_float and not p.excluded]
                executor.map_tensors(
                    kept,
                    lambda plan: _rewrite(
                        executor, plan, executor.blocks_for(plan, models, dare), thresholds, lam, 0.0
                    ),
                    "TIES merge (majority sign 0)",
                )
        finally:
            patches.close()
        return info

    def one(plan: TensorPlan) -> None:
        if plan.excluded or not plan.is_float:
            executor.copy(plan, base)
            return
        if plan.numel <= TENSOR_CACHE_ELEMENTS:  # keep the (masked) inputs in memory for every pass
            cached = list(executor.blocks_for(plan, models, dare))

            def passes() -> Iterator:
                return iter(cached)
        else:

            def passes() -> Iterator:
                return executor.blocks_for(plan, models, dare)

        thresholds = [_tensor_threshold(plan, passes, i, rate) for i in range(len(fts))]
        patches = MinusPatches()
        majority = majority_sign(_merge_optimistic(executor, plan, passes(), thresholds, lam, patches))
        if majority < 0:
            patches.apply(executor.sink)
        elif majority == 0:
            _rewrite(executor, plan, passes(), thresholds, lam, 0.0)

    executor.map_tensors(plans, one, "TIES (per-tensor trim)")
    return info


def _tensor_threshold(plan: TensorPlan, passes, i: int, rate: float) -> float:
    """Model i's per-tensor threshold (the in-memory kernel's ``tensor_thresholds`` on the same blocks)."""
    return ties_trim_threshold(plan.numel, rate, lambda: (xs[i + 1] - xs[0] for _, _, xs in passes()))
