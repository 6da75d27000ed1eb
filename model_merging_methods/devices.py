"""Where the merge arithmetic runs: ``--device cpu`` (the default) or an accelerator such as ``cuda``.

Inputs are always read from disk (or memory) on the CPU, a block of rows at a time, moved to the device in their
stored dtype and upcast there; the results come back to the CPU for writing. Which methods give the same bytes on
every device is listed in ``docs/performance.md``: the element-wise arithmetic (IEEE float32 add, subtract, multiply,
divide by a device tensor, comparisons, bit operations, casts) and the counter-based DARE masks are the same
everywhere; reductions over a whole tensor (norms, dot products) may round in another order on another device.
"""

from __future__ import annotations

import torch

from model_merging_methods.errors import MergeError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` (None: the CPU), or a :class:`MergeError` when it is not usable here: an
    unknown name, or CUDA without a CUDA build of PyTorch or without a visible GPU."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        resolved = device
    else:
        try:
            resolved = torch.device(str(device).strip())
        except (RuntimeError, ValueError) as exc:
            raise MergeError(f"device {device!r} is not a device name (use cpu or cuda, cuda:N)") from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this PyTorch is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver)"
            )
            raise MergeError(f"device {device!r}: CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise MergeError(f"device {device!r}: there are only {count} CUDA device(s)")
        return resolved
    backend = getattr(torch, resolved.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise MergeError(f"device {device!r} is not available here; use --device cpu or cuda")
    return resolved


def describe(device: torch.device) -> str:
    """A short description for the manifest: ``cpu`` or ``cuda:0 (NVIDIA H200)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)
