"""How large are the delta parameters of a fine-tuned model, and is it in DARE's regime?

Streams δ = θ_fine-tuned − θ_pre-trained tensor by tensor (never a whole model in memory) for one pre-trained
model and one or more fine-tuned models (local folders, registry short names or hub ids in the HF cache), and
writes per model: |δ| quantiles, max, mean and RMS overall and per module type (JSON, CSV, Markdown), a
histogram PNG of |δ| with the paper's reference values, and a verdict line (paper: DARE works for |δ| within
~0.005 and breaks around ~0.03).

    python analyze_delta_parameters.py --pretrained_model_name Llama-2-13b-hf \
        --finetuned_model_names WizardMath-13B-V1.0 WizardLM-13B-V1.2 --output_dir ./save_delta_analysis
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from utils.cli import UserError, run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--pretrained_model_name", required=True, help="pre-trained model: folder, short name or hub id"
    )
    p.add_argument(
        "--finetuned_model_names",
        "--finetuned_model_name",
        nargs="+",
        required=True,
        help="one or more fine-tuned models of the same family",
    )
    p.add_argument("--output_dir", default="./save_delta_analysis", help="where the results go")
    p.add_argument(
        "--exclude_param_names_regex",
        nargs="*",
        default=[],
        help="skip parameters whose name matches (re.match), e.g. '.*classifier.*'",
    )
    p.add_argument("--no_plot", action="store_true", help="do not write the histogram PNG")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def _safe_name(name: str) -> str:
    """A file-name-safe label: a local folder's base name, or the hub id with '/' replaced."""
    label = Path(name).resolve().name if Path(name).exists() else name
    return re.sub(r"[^\w.\-]+", "_", label).strip("_") or "model"


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    from utils.delta_analysis import (
        DARE_BREAKS_ABOVE,
        DARE_WORKS_BELOW,
        stream_delta_statistics,
        summary_rows,
    )
    from utils.results_io import markdown_table, round_floats, write_json, write_table

    for pattern in args.exclude_param_names_regex:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise UserError(f"bad --exclude_param_names_regex {pattern!r}: {exc}") from exc
    out_dir = Path(args.output_dir)
    results: dict[str, dict] = {}
    histograms = {}
    for ft in args.finetuned_model_names:
        report, only = stream_delta_statistics(
            args.pretrained_model_name, ft, args.exclude_param_names_regex, progress=not args.no_progress
        )
        name = _safe_name(ft)
        d = report.to_dict()
        d["pretrained_model"] = args.pretrained_model_name
        d["finetuned_model"] = ft
        d["names_in_only_one_model"] = only
        rows = summary_rows(report)
        write_json(out_dir / f"{name}_delta_stats.json", round_floats(d, 8))
        write_table(
            round_floats(rows, 8),
            out_dir / f"{name}_delta_by_module.csv",
            out_dir / f"{name}_delta_by_module.md",
        )
        results[ft] = d
        histograms[name] = report.overall.bins()
        print(f"\n== {ft} vs {args.pretrained_model_name} ==")
        print(
            markdown_table(
                rows, ["module_type", "numel", "max_abs", "mean_abs", "q50_abs", "q99_abs", "q99.9_abs"]
            )
        )
        for note in report.notes:
            print(f"note: {note}")
        if only:
            print(f"note: {len(only)} parameter(s) exist in only one model and were skipped (e.g. {only[0]})")
        print(f"verdict: {d['verdict']}")
    if not args.no_plot:
        from utils.plotting import plot_delta_histograms

        png = out_dir / (
            f"{next(iter(histograms))}_delta_hist.png" if len(histograms) == 1 else "delta_hist.png"
        )
        plot_delta_histograms(
            histograms,
            png,
            title=f"|δ| against {_safe_name(args.pretrained_model_name)}",
            vlines={
                f"~{DARE_WORKS_BELOW} works": DARE_WORKS_BELOW,
                f"~{DARE_BREAKS_ABOVE} breaks": DARE_BREAKS_ABOVE,
            },
        )
        print(f"histogram: {png}")
    print(f"results in {out_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
