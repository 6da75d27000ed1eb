"""Output-path safety: no output ever equals, contains or lies inside an input, and only folders this toolkit
wrote are ever deleted or replaced.

* :func:`guard_outputs` compares canonical paths (``~`` expanded, made absolute, symlinks and ``..`` resolved, even
  for paths that do not exist yet) and raises :class:`MergeError` before anything is read or written.
* A folder the toolkit writes carries :data:`OWNER_MARKER` (or, for merged models, ``merge_manifest.json`` written
  by the streaming engine); :func:`is_toolkit_output` recognises both, and :func:`remove_toolkit_output` refuses to
  delete anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from model_merging_methods.errors import MergeError

OWNER_MARKER = ".dare_toolkit_output.json"
TOOL_NAME = "dare-merging-toolkit"
MANIFEST = "merge_manifest.json"

PathLike = str | os.PathLike


def canonical(path: PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute, with ``..`` and every symlink resolved (also for the part of
    the path that does not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path)))))


def relation(output: PathLike, input_path: PathLike) -> str | None:
    """How ``output`` relates to ``input_path`` after :func:`canonical`: ``"is"``, ``"contains"``, ``"lies
    inside"`` or None when they are disjoint."""
    out, inp = canonical(output), canonical(input_path)
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "lies inside"
    return None


def guard_outputs(
    outputs: Mapping[str, PathLike | None] | Iterable[PathLike | None],
    inputs: Mapping[str, PathLike | None] | Iterable[PathLike | None],
) -> None:
    """Raise :class:`MergeError` when any output path equals, contains or lies inside any input path.

    Both arguments are either ``{label: path}`` mappings (the labels name the flag or role in the message) or plain
    iterables of paths; ``None`` entries are skipped. Inputs that do not exist locally (hub ids) cannot overlap a
    local path and are harmless, but are compared all the same.
    """
    outs = outputs.items() if isinstance(outputs, Mapping) else ((None, p) for p in outputs)
    ins = list(inputs.items() if isinstance(inputs, Mapping) else ((None, p) for p in inputs))
    for out_label, out in outs:
        if out is None:
            continue
        for in_label, inp in ins:
            if inp is None:
                continue
            rel = relation(out, inp)
            if rel is not None:
                what = f"output {out_label} {_shown(out)}" if out_label else f"output path {_shown(out)}"
                target = _describe_input(in_label, inp)
                raise MergeError(f"{what} {rel} {target}; choose an output path outside every input")


def _describe_input(label: str | None, path: PathLike) -> str:
    """``input <label> <path>``, without repeating the path when the label already ends with it."""
    if label is None:
        return f"input {_shown(path)}"
    head, _, last = label.rpartition(" ")
    if head and last and canonical(last) == canonical(path):
        return f"input {head} {_shown(last)}"
    return f"input {label} {_shown(path)}"


def _shown(path: PathLike) -> str:
    """``path`` as given, with its canonical form when that differs (``.``, ``..``, symbolic links)."""
    real = str(canonical(path))
    given = os.fspath(path)
    return given if given == real else f"{given} (= {real})"


def write_owner_marker(folder: PathLike, kind: str, **details) -> Path:
    """Mark ``folder`` as written by this toolkit (``kind``: what it holds), so a later ``--overwrite`` may replace
    it."""
    path = Path(folder) / OWNER_MARKER
    path.write_text(
        json.dumps({"tool": TOOL_NAME, "kind": kind, **details}, indent=2) + "\n", encoding="utf-8"
    )
    return path


def is_toolkit_output(folder: PathLike) -> bool:
    """True when ``folder`` is a real folder (not a symlink) that this toolkit wrote: it holds
    :data:`OWNER_MARKER` or a ``merge_manifest.json`` whose ``tool`` is this toolkit."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    for name in (OWNER_MARKER, MANIFEST):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and str(data.get("tool", "")).startswith(TOOL_NAME):
            return True
    return False


def remove_toolkit_output(folder: PathLike) -> None:
    """Delete ``folder`` only when :func:`is_toolkit_output`; anything else raises :class:`MergeError` untouched."""
    folder = Path(folder)
    if not is_toolkit_output(folder):
        raise MergeError(
            f"refusing to delete {folder}: it was not written by this toolkit (no {OWNER_MARKER} or {MANIFEST})"
        )
    shutil.rmtree(folder)
