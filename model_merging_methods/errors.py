"""The one error type of the core library.

Every problem with the caller's input (a bad rate, a missing tensor, a corrupt checkpoint, an output path that would
overwrite an input) raises :class:`MergeError` with one readable sentence. It subclasses ``ValueError`` so callers
that catch ``ValueError`` keep working. The entry scripts turn it into one ``error: ...`` line and exit status 2
(``utils.cli.run_main``); ``utils.cli.UserError`` is this same class under the application's name.

:func:`check_rate` and :func:`check_finite` validate user-given numbers; :class:`Terminated` is SIGTERM/SIGHUP as an
exception (see :func:`model_merging_methods.publish.atomic_output_dir`).
"""

from __future__ import annotations

import math
import signal


class MergeError(ValueError):
    """A problem with the caller's input, described in one sentence (no traceback is needed to understand it)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP turned into an exception (like Ctrl-C), so that partial output is removed on the way out.
    ``signum`` is the signal; an entry script exits with ``128 + signum``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        try:
            name = signal.Signals(self.signum).name
        except ValueError:  # pragma: no cover - not a known signal number
            name = f"signal {self.signum}"
        super().__init__(f"terminated by {name}")


def raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """A signal handler that raises :class:`Terminated`."""
    raise Terminated(signum)


def check_rate(name: str, value: object) -> float:
    """A rate must be a finite number in [0, 1]; anything else is a :class:`MergeError` naming ``name``."""
    try:
        rate = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be a number in [0, 1], got {value!r}") from exc
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise MergeError(f"{name} must be in [0, 1], got {value}")
    return rate


def check_finite(name: str, value: object, *, minimum: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float (``>= minimum``, or ``> minimum`` when ``strict``); else a :class:`MergeError`."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:
        raise MergeError(f"{name} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise MergeError(f"{name} must be a finite number, got {value}")
    if minimum is not None and (number <= minimum if strict else number < minimum):
        raise MergeError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    return number
