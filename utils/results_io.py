"""Writing result files atomically (never a half-written JSON; the writers live in the core,
:mod:`model_merging_methods.publish`), and the original's 4-decimal rounding."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# the core's atomic writers (temporary file + rename, umask permissions, one-line errors), re-exported
from model_merging_methods.publish import atomic_write_text, write_json

__all__ = ["atomic_write_text", "markdown_table", "read_json", "round_floats", "write_json", "write_table"]


def round_floats(obj: Any, ndigits: int = 4) -> Any:
    """Round every float in a (nested) dict/list to ``ndigits`` decimals, as the original does (§1.5)."""
    if isinstance(obj, float):
        return obj if not math.isfinite(obj) else float(f"{obj:.{ndigits}f}")
    if isinstance(obj, dict):
        return {k: round_floats(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, ndigits) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_table(
    rows: Sequence[dict[str, Any]], csv_path: str | Path, md_path: str | Path | None = None
) -> None:
    """Write a list of flat dicts as CSV (and optionally a Markdown table); columns = union of keys in order."""
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    atomic_write_text(csv_path, buf.getvalue())
    if md_path is not None:
        atomic_write_text(md_path, markdown_table(rows, columns))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render flat dicts as a GitHub Markdown table (floats with 4 decimals)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
