"""The ``settings`` object every results file carries: what was run, with which flags, by which code.

Settings travel as data, not in file names: every results JSON of the GLUE, LLM, merge and quickstart scripts holds
a ``settings`` object built by :func:`run_settings`, and ``make_report.py`` reads it before falling back to parsing
names (older files). Layout (schema :data:`SETTINGS_SCHEMA`)::

    {"schema": ..., "script": "merge_llms_instruct_math_code.py",
     "kind": "merge" | "dare" | "model" | "train" | "quickstart",
     "model": <model or merged group>, "dare": {weight_mask_rate, use_weight_rescale, mask_strategy, weight_format,
     seed} or null, "merge": {"method": <name>, "params": {...}, "models": [...]} or null,
     "flags": {every command-line flag}, "versions": {...}, "git_commit": <sha or null>, "created": <ISO time>}
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import math
import platform
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SETTINGS_SCHEMA = "dare-toolkit/settings/v1"
TOOLKIT_VERSION = "0.2.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "transformers", "safetensors", "peft", "tokenizers", "numpy", "vllm")


def jsonable(value: Any) -> Any:
    """``value`` with paths, tuples, sets and non-finite floats turned into JSON values (strings for the rest)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    return str(value)


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Python, the toolkit and the installed versions of the libraries that change results."""
    out = {"python": platform.python_version(), "dare-toolkit": TOOLKIT_VERSION}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` when it has uncommitted changes), or None outside a git checkout."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) if sha else None


def dare_settings(
    weight_mask_rate: float | Sequence[float],
    use_weight_rescale: bool,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = 0,
) -> dict[str, Any]:
    """The DARE part of a settings object."""
    return {
        "weight_mask_rate": jsonable(weight_mask_rate),
        "use_weight_rescale": bool(use_weight_rescale),
        "mask_strategy": mask_strategy,
        "weight_format": weight_format,
        "seed": int(seed),
    }


def run_settings(
    flags: argparse.Namespace | Mapping[str, Any] | None,
    *,
    script: str,
    kind: str,
    model: str | None = None,
    dare: Mapping[str, Any] | None = None,
    merge: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The settings object of one result: every flag value, the run's kind and model, its DARE and merge settings
    (when it has them), versions, the git commit and the time."""
    values = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    out = {
        "schema": SETTINGS_SCHEMA,
        "script": script,
        "kind": kind,
        "model": model,
        "dare": jsonable(dare) if dare else None,
        "merge": jsonable(merge) if merge else None,
        "flags": jsonable({k: v for k, v in values.items() if not callable(v)}),
        "versions": versions(),
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.update(jsonable(extra))
    return out
