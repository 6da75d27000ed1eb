"""Shared command-line plumbing: one readable error line and exit status 2 for bad input."""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable

from model_merging_methods.errors import MergeError

# A problem with the user's input (bad path, bad rate, mismatched models...): the core's one error type under the
# application's name. Entry scripts let it propagate to :func:`run_main`, which prints ``error: <message>`` and
# exits with 2.
UserError = MergeError


def run_main(main: Callable[[], object]) -> None:
    """Run an entry script's ``main``: ``UserError``/``ValueError`` → one line on stderr and exit 2;
    Ctrl-C → exit 130. Anything else is a bug and keeps its traceback."""
    try:
        main()
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def check_rate(name: str, value: float) -> float:
    """A rate must be a finite number in [0, 1]; anything else is a ``UserError``."""
    try:
        rate = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}") from exc
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise UserError(f"{name} must be in [0, 1], got {value}")
    return rate


def setup_logging(verbose: bool = False) -> None:
    """Console logging at INFO (DEBUG with ``verbose``), one format for every script."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s",
    )
