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
        "--pretrained_model_name", default=None,
        help="pre-trained model: folder, short name or hub id (default: the base_model_name_or_path of LoRA "
        "adapters among the fine-tuned models)",
    )  # fmt: skip
    p.add_argument(
        "--finetuned_model_names",
        "--finetuned_model_name",
        nargs="+",
        required=True,
        help="one or more fine-tuned models of the same family (PEFT LoRA adapter folders too: δ = s·B·A)",
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
    return (re.sub(r"[^\w.\-]+", "_", label).strip("_") or "model")[:100]


def unique_names(models: list[str]) -> list[str]:
    """File-name labels of the models, made unique (``model``, ``model_2``...) so that no model's files overwrite
    another's."""
    out: list[str] = []
    for m in models:
        base = _safe_name(m)
        name, i = base, 2
        while name in out:
            name, i = f"{base}_{i}", i + 1
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    from model_merging_methods.paths import guard_outputs
    from model_merging_methods.publish import check_output_folder, staged_files
    from utils.cli import local_model_inputs
    from utils.delta_analysis import (
        DARE_BREAKS_ABOVE,
        DARE_WORKS_BELOW,
        stream_delta_statistics,
        summary_rows,
    )
    from utils.llm_registry import hub_id
    from utils.results_io import markdown_table, round_floats, write_json, write_table

    for pattern in args.exclude_param_names_regex:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as exc:
            raise UserError(f"bad --exclude_param_names_regex {pattern!r}: {exc}") from exc
    if args.pretrained_model_name is None:  # LoRA adapters name their base model
        from model_merging_methods.lora import resolve_base_model

        args.pretrained_model_name = resolve_base_model(None, args.finetuned_model_names, hub_id)
    out_dir = Path(args.output_dir)
    # the output folder may not equal, contain or lie inside a model; checked before anything is read or written
    models = {"--pretrained_model_name": args.pretrained_model_name}
    models.update({f"--finetuned_model_names {ft}": ft for ft in args.finetuned_model_names})
    guard_outputs({"--output_dir": out_dir}, local_model_inputs(models, hub_id))
    check_output_folder(out_dir)
    # every model is analysed before any file is written: a failure on the second model leaves nothing behind
    analyses = []
    for ft, name in zip(args.finetuned_model_names, unique_names(args.finetuned_model_names)):
        report, only = stream_delta_statistics(
            args.pretrained_model_name, ft, args.exclude_param_names_regex, progress=not args.no_progress
        )
        analyses.append((ft, name, report, only))
    results: dict[str, dict] = {}
    histograms = {}
    with staged_files(out_dir) as stage:
        for ft, name, report, only in analyses:
            d = report.to_dict()
            d["pretrained_model"] = args.pretrained_model_name
            d["finetuned_model"] = ft
            d["names_in_only_one_model"] = only
            rows = summary_rows(report)
            write_json(stage / f"{name}_delta_stats.json", round_floats(d, 8))
            write_table(
                round_floats(rows, 8),
                stage / f"{name}_delta_by_module.csv",
                stage / f"{name}_delta_by_module.md",
            )
            results[ft] = d
            histograms[name] = report.overall.bins()
        png_name = None
        if not args.no_plot:
            from utils.plotting import plot_delta_histograms

            png_name = (
                f"{next(iter(histograms))}_delta_hist.png" if len(histograms) == 1 else "delta_hist.png"
            )
            plot_delta_histograms(
                histograms,
                stage / png_name,
                title=f"|δ| against {_safe_name(args.pretrained_model_name)}",
                vlines={
                    f"~{DARE_WORKS_BELOW} works": DARE_WORKS_BELOW,
                    f"~{DARE_BREAKS_ABOVE} breaks": DARE_BREAKS_ABOVE,
                },
            )
    for ft, _name, report, only in analyses:
        d = results[ft]
        print(f"\n== {ft} vs {args.pretrained_model_name} ==")
        print(
            markdown_table(
                summary_rows(report),
                ["module_type", "numel", "max_abs", "mean_abs", "q50_abs", "q99_abs", "q99.9_abs"],
            )
        )
        for note in report.notes:
            print(f"note: {note}")
        if only:
            print(f"note: {len(only)} parameter(s) exist in only one model and were skipped (e.g. {only[0]})")
        print(f"verdict: {d['verdict']}")
    if png_name is not None:
        print(f"histogram: {out_dir / png_name}")
    print(f"results in {out_dir}")
    return results


if __name__ == "__main__":
    run_main(main)
