"""Shared command-line plumbing: one readable error line and exit status 2 for bad input."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from model_merging_methods.errors import MergeError, Terminated, check_finite, check_rate, raise_terminated
from model_merging_methods.publish import HANDLED_SIGNALS, os_error_message

__all__ = [
    "UserError",
    "check_evaluation_args",
    "check_finite",
    "check_rate",
    "llm_data_inputs",
    "local_model_inputs",
    "run_main",
    "setup_logging",
]

# A problem with the user's input (bad path, bad rate, mismatched models...): the core's one error type under the
# application's name. Entry scripts let it propagate to :func:`run_main`, which prints ``error: <message>`` and
# exits with 2.
UserError = MergeError


def run_main(main: Callable[[], object]) -> None:
    """Run an entry script's ``main``.

    * ``UserError``/``ValueError`` → one ``error: ...`` line on stderr and exit 2;
    * an operating-system error (disk full, read-only file system, permission denied, name too long, ...) → one
      ``error: cannot ...`` line naming the path and exit 2;
    * Ctrl-C → exit 130; SIGTERM and SIGHUP are handled the same way (``finally`` blocks and the removal of
      partial output run) and exit with 128 + the signal number (143, 129).

    Anything else is a bug and keeps its traceback.
    """
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for s in HANDLED_SIGNALS:
            old_handlers[s] = signal.getsignal(s)
            signal.signal(s, raise_terminated)
    try:
        main()
    except (UserError, ValueError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"error: {os_error_message(exc, action='read or write')}", file=sys.stderr)
        sys.exit(2)
    except Terminated as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(128 + exc.signum)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")).strip()
    return text or type(exc).__name__


def setup_logging(verbose: bool = False) -> None:
    """Console logging at INFO (DEBUG with ``verbose``), one format for every script."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s",
    )


# ----------------------------------------------------------------------------------------------------------------
# helpers the entry scripts share for checking flags and guarding their outputs
# ----------------------------------------------------------------------------------------------------------------


def check_evaluation_args(args) -> None:
    """The numeric generation/evaluation flags, checked before any file is written (one implementation:
    :func:`utils.llm_evaluation.check_evaluation_args`); flags a parser does not have are skipped."""
    try:
        from utils.llm_evaluation import check_evaluation_args as check
    except ImportError:  # evaluation not installed: there is nothing to check (the script says so when asked)
        return
    check(args)


def local_model_inputs(named: dict[str, str | None], name_resolver=None) -> dict[str, Path]:
    """``{label: local folder}`` for models given by name or path (registry names and hub ids resolved through
    ``name_resolver`` and the HF cache, without downloading; for a cached snapshot the whole cache repository
    folder, blobs included); names with no local folder cannot be overwritten and are left out. A path that exists but is not a folder is kept: it is still the user's file."""
    from model_merging_methods.checkpoint_io import find_local_model, hub_cache_repo

    out: dict[str, Path] = {}
    for label, name in named.items():
        if not name:
            continue
        folder = find_local_model(str(name), name_resolver)
        if folder is not None:
            repo = hub_cache_repo(folder)  # a cached snapshot: its whole cache repository
            if repo is not None and not os.path.isdir(os.path.expanduser(str(name))):
                label = f"{label} {name} (in the Hugging Face cache)"
            out[label] = repo or folder
        elif os.path.lexists(os.path.expanduser(str(name))):
            out[label] = Path(os.path.expanduser(str(name)))
    return out


def llm_data_inputs(args, datasets) -> dict[str, Path]:
    """``{label: data file or folder}`` an LLM evaluation of ``datasets`` reads, for the output-path guard
    (:func:`utils.llm_evaluation.evaluation_data_inputs`); empty when evaluation is not installed."""
    try:
        from utils.llm_evaluation import evaluation_data_inputs
    except ImportError:  # no evaluation installed: nothing is read
        return {}
    return evaluation_data_inputs(datasets, args)
