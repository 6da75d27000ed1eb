"""Turn results JSON files into the paper's tables and figures.

Reads any mix of files and folders (searched recursively for ``*.json``) written by ``inference_plms_glue.py``,
``merge_plms_glue.py``, ``inference_llms_instruct_math_code.py``, ``merge_llms_instruct_math_code.py`` (through
``utils.llm_evaluation``) and ``quickstart.py``, and writes to ``--output_dir``:

* ``records.csv`` / ``.md``: every number found, with its model, dataset, metric and settings;
* ``dare.csv`` / ``.md``: one row per (model, dataset): the fine-tuned score (p=0), DARE at each drop rate and the
  ablations (DropOnly, magnitude pruning, masking the weights), averaged over mask seeds;
  ``dare_retention.*``: the same as a share of the fine-tuned score, with the largest rate keeping ≥ 95%;
* ``merges.csv`` / ``.md``: merged models (rows) by dataset (columns);
* ``report.json``: all of the above plus the list of skipped files and why;
* ``plots/drop_rate_{dataset}.png`` (accuracy against drop rate, the paper's Figure 1a) and
  ``plots/merge_matrix.png``.

A file that cannot be used (not UTF-8, not JSON, a metric that is null, a list, a string or not finite, a
malformed quickstart record...) is skipped with one ``warning:`` line on stderr and listed in ``report.json``;
the report is made from the rest. ``--output_dir`` must not be or contain an input; it may lie inside an input
folder (``runs --output_dir runs/report``): files under it are not read as inputs, and an existing
``report.json`` there is only replaced when it is a report of this script.

    python make_report.py save_model_results save_llm_results quickstart_runs/results.json --output_dir report
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from model_merging_methods.paths import relation
from utils.cli import UserError, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="results JSON files and/or folders to search for *.json")
    p.add_argument("--output_dir", default="./save_report", help="where tables and plots are written")
    p.add_argument("--no_plots", action="store_true", help="tables only")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    return p


def _safe(name: str) -> str:
    return re.sub(r"[^\w.\-]+", "_", name).strip("_")[:100] or "x"


def _is_report(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"inputs", "tables", "records", "skipped"} <= set(data)


def check_output_dir(inputs: list[str], output_dir: str | Path) -> None:
    """Before anything is read: ``--output_dir`` must not be, contain or lie inside an input (symlinks and ``..``
    resolved), must be (or become) a folder, and an existing ``report.json`` in it must be one of this script's."""
    out = Path(output_dir)
    for inp in inputs:
        rel = relation(out, inp)
        if rel is not None:
            raise UserError(
                f"--output_dir {out} {rel} the input {inp}; choose an output folder outside the inputs"
            )
    for q in (out, *out.absolute().parents):
        if q.exists():
            if not q.is_dir():
                raise UserError(f"--output_dir {out}: {q} is not a folder")
            break
    report = out / "report.json"
    if (report.exists() or report.is_symlink()) and (report.is_symlink() or not _is_report(report)):
        raise UserError(f"{report} exists and is not a report of make_report.py; refusing to replace it")


def make_report(
    inputs: list[str], output_dir: str | Path, plots: bool = True, quiet: bool = False
) -> dict[str, Any]:
    from utils.results_report import (
        collect_records,
        dare_table,
        keeps_fraction_up_to,
        merge_table,
        records_table,
        retention_table,
    )

    check_output_dir(inputs, output_dir)
    try:
        records, skipped = collect_records(inputs, exclude=[output_dir])
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    for f, r in skipped:
        print(f"warning: skipped {f}: {r}", file=sys.stderr)
    if not records:
        reasons = "; ".join(f"{f}: {r}" for f, r in skipped[:5])
        raise UserError(
            f"no results found in {', '.join(inputs)}" + (f" (skipped {reasons})" if reasons else "")
        )
    out = Path(output_dir)
    tables: dict[str, list[dict[str, Any]]] = {"records": records_table(records)}
    dare_rows = dare_table(records)
    if dare_rows:
        tables["dare"] = dare_rows
        ret = retention_table(dare_rows)
        for row, r in zip(dare_rows, ret):
            r["DARE keeps >=95% up to p"] = keeps_fraction_up_to(row, 0.95)
        tables["dare_retention"] = ret
    refs = [r for r in records if r.get("kind") == "model"]
    merge_rows, merge_cols = merge_table(records, references=refs)
    if any(r.get("kind") == "merge" for r in records):
        tables["merges"] = merge_rows
    created = not out.exists()
    try:
        return _write_outputs(out, tables, merge_rows, merge_cols, records, inputs, skipped, plots, quiet)
    except OSError as exc:  # no space, read-only, permission...: every file is written atomically
        if created:
            shutil.rmtree(out, ignore_errors=True)  # this run made the folder: remove it again
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}") from exc


def _write_outputs(
    out: Path,
    tables: dict[str, list[dict[str, Any]]],
    merge_rows: list[dict[str, Any]],
    merge_cols: list[str],
    records: list[dict[str, Any]],
    inputs: list[str],
    skipped: list[tuple[str, str]],
    plots: bool,
    quiet: bool,
) -> dict[str, Any]:
    from utils.results_io import markdown_table, round_floats, write_json, write_table
    from utils.results_report import drop_rate_plot_data, printable

    for name, rows in tables.items():
        write_table(round_floats(rows, 4), out / f"{name}.csv", out / f"{name}.md")

    plot_files: list[str] = []
    if plots:
        from utils.plotting import plot_drop_rate_curves, plot_merge_matrix

        for dataset, (curves, markers) in drop_rate_plot_data(records).items():
            if curves:
                plot_files.append(
                    str(
                        plot_drop_rate_curves(
                            curves,
                            out / "plots" / f"drop_rate_{_safe(dataset)}.png",
                            markers=markers,
                            title=f"{dataset}: score against drop rate",
                            ylabel=records_metric(records, dataset),
                        )
                    )
                )
        if "merges" in tables:
            values = [[row.get(c) for c in merge_cols] for row in merge_rows]
            finite = [v for row in values for v in row if v is not None]
            vmax = 1.0 if finite and max(finite) <= 1.0 else max(finite, default=1.0)
            plot_files.append(
                str(
                    plot_merge_matrix(
                        values,
                        [row["model"] for row in merge_rows],
                        merge_cols,
                        out / "plots" / "merge_matrix.png",
                        vmin=min(0.0, min(finite, default=0.0)),
                        vmax=vmax,
                    )
                )
            )
    report = {
        "inputs": [printable(str(p)) for p in inputs],
        "tables": {k: v for k, v in tables.items() if k != "records"},
        "records": tables["records"],
        "skipped": [{"file": f, "reason": r} for f, r in skipped],
        "plots": plot_files,
    }
    write_json(out / "report.json", round_floats(report, 6))
    if not quiet:
        for name in ("dare", "dare_retention", "merges"):
            if name in tables:
                print(f"## {name}\n\n{markdown_table(round_floats(tables[name], 4))}")
        print(f"{len(records)} result(s) from {len(inputs)} input(s); {len(skipped)} file(s) skipped")
        for f, r in skipped[:10]:
            print(f"  skipped {f}: {r}")
        print(f"tables and plots in {printable(str(out))}")
    return report


def records_metric(records: list[dict[str, Any]], dataset: str) -> str:
    metrics = sorted({r["metric"] for r in records if r["dataset"] == dataset})
    return "/".join(metrics) or "score"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    return make_report(args.inputs, args.output_dir, plots=not args.no_plots, quiet=args.quiet)


if __name__ == "__main__":
    run_main(main)
