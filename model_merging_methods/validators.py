"""One validator per kind of value. Each takes the value's name (as the user knows it: a flag or keyword) and the
value, returns the normalised value, and raises :class:`MergeError` with one sentence otherwise. The in-memory
functions, the streamed ones and the command line all use these, so a value is accepted or refused the same way
everywhere."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from model_merging_methods.errors import MergeError


def _number(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise MergeError(f"{name} must be {what}, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be {what}, got {value!r}") from exc


def check_rate(name: str, value: Any) -> float:
    """A rate: a finite number in [0, 1]."""
    rate = _number(name, value, "a number in [0, 1]")
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise MergeError(f"{name} must be in [0, 1], got {value}")
    return rate


def check_coefficient(name: str, value: Any) -> float:
    """A scaling coefficient: a finite, non-negative number."""
    v = _number(name, value, "a number")
    if not math.isfinite(v) or v < 0:
        raise MergeError(f"{name} must be finite and non-negative, got {value}")
    return v


def check_positive_number(name: str, value: Any) -> float:
    """A finite number > 0 (e.g. a minimal Fisher weight)."""
    v = _number(name, value, "a number")
    if not math.isfinite(v) or v <= 0:
        raise MergeError(f"{name} must be finite and positive, got {value}")
    return v


def check_nonnegative_number(name: str, value: Any) -> float:
    """A finite number ≥ 0."""
    v = _number(name, value, "a number")
    if not math.isfinite(v) or v < 0:
        raise MergeError(f"{name} must be finite and non-negative, got {value}")
    return v


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer ≥ ``minimum`` (floats with an integral value are accepted, booleans are not)."""
    if isinstance(value, bool):
        raise MergeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        as_float = float(value)
        count = int(as_float)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be an integer >= {minimum}, got {value!r}") from exc
    if count != as_float or count < minimum:
        raise MergeError(f"{name} must be an integer >= {minimum}, got {value}")
    return count


def check_flag(name: str, value: Any) -> bool:
    """A boolean (``True``/``False``, or the strings ``true``/``false``/``1``/``0``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise MergeError(f"{name} must be true or false, got {value!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise MergeError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """A seed: any integer (negative ones included)."""
    if isinstance(value, bool):
        raise MergeError(f"{name} must be an integer, got {value!r}")
    try:
        as_float = float(value) if not isinstance(value, int) else value
        seed = int(as_float)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be an integer, got {value!r}") from exc
    if seed != as_float:
        raise MergeError(f"{name} must be an integer, got {value}")
    return seed


def per_model(name: str, value: Any, num_models: int, check) -> list:
    """A value given once for every model, or once per model: returns one checked value per model."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if len(values) == 1:
        values = values * num_models
    if len(values) != num_models:
        raise MergeError(f"got {len(values)} values of {name} for {num_models} models")
    return [check(name, v) for v in values]
