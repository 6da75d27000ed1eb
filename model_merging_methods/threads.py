"""Thread counts: how many worker threads a merge uses, and torch's intra-op thread count for a block of code."""

from __future__ import annotations

import contextlib
import os

import torch


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with ``torch.set_num_threads(n)``, restoring the previous count afterwards."""
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def default_workers() -> int:
    """Worker threads when none are asked for: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))
