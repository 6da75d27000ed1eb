"""The one error type of the core library.

Every problem with the caller's input (a bad rate, a missing tensor, a corrupt checkpoint, an output path that would
overwrite an input) raises :class:`MergeError` with one readable sentence. It subclasses ``ValueError`` so callers
that catch ``ValueError`` keep working. The entry scripts turn it into one ``error: ...`` line and exit status 2
(``utils.cli.run_main``); ``utils.cli.UserError`` is this same class under the application's name.
"""

from __future__ import annotations


class MergeError(ValueError):
    """A problem with the caller's input, described in one sentence (no traceback is needed to understand it)."""
