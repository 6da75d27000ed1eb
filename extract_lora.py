"""Extract a LoRA adapter (PEFT format) from a full fine-tune: a truncated SVD of δ = θ_fine-tuned − θ_pre-trained per
linear module, streamed module by module; changed embeddings, norms and other non-linear tensors are saved whole
(``modules_to_save``). Prints the relative Frobenius error ‖δ − B·A‖ / ‖δ‖ of every module and writes it, with the
whole report, to ``lora_report.json`` in the adapter folder. Load the result with ``PeftModel.from_pretrained``.

    python extract_lora.py --pretrained_model_name ./base --finetuned_model_name ./finetuned --lora_rank 16 \
        --output_path ./finetuned_lora_r16
"""

from __future__ import annotations

import argparse

from utils.cli import run_main, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--pretrained_model_name", required=True, help="base model: folder, short name or hub id")
    p.add_argument(
        "--finetuned_model_name", required=True,
        help="fine-tuned model (folder, short name or hub id), or a LoRA adapter folder to re-factorise",
    )  # fmt: skip
    p.add_argument(
        "--lora_rank", type=int, required=True, help="rank r of every LoRA module (at most min(out, in))"
    )
    p.add_argument("--output_path", required=True, help="the adapter folder to create")
    p.add_argument(
        "--svd", default="auto", choices=["auto", "full", "randomized"],
        help="full: exact truncated SVD; randomized: seeded range finder (fast for small r); auto picks",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD's test matrices")
    p.add_argument(
        "--full_modules", nargs="*", default=[], metavar="REGEX",
        help="modules saved whole (modules_to_save) instead of factorised, e.g. 'lm_head'",
    )  # fmt: skip
    p.add_argument(
        "--adapter_dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="dtype of the saved LoRA factors",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an adapter folder this toolkit wrote")
    p.add_argument("--quiet", action="store_true", help="do not print the per-module table")
    return p


def error_table(report: dict) -> str:
    """The per-module table: module, kind, shape, rank, relative Frobenius error."""
    lines = [f"{'module':60s} {'kind':16s} {'shape':>13s} {'rank':>5s} {'rel. error':>11s}"]
    for module, row in report["modules"].items():
        shape = "x".join(str(s) for s in row.get("shape", [])) or "-"
        err = row.get("relative_error")
        lines.append(
            f"{module:60s} {row['kind']:16s} {shape:>13s} {row.get('rank', '-')!s:>5s} "
            f"{'-' if err is None else f'{err:.3e}':>11s}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    from model_merging_methods.lora import REPORT_FILE, extract_lora
    from utils.llm_registry import hub_id

    report = extract_lora(
        args.pretrained_model_name, args.finetuned_model_name, args.output_path, args.lora_rank, svd=args.svd,
        seed=args.seed, full_modules=args.full_modules, adapter_dtype=args.adapter_dtype, overwrite=args.overwrite,
        name_resolver=hub_id,
    )  # fmt: skip
    if not args.quiet:
        print(error_table(report))
    errors = [r["relative_error"] for r in report["modules"].values() if r["kind"] == "lora"]
    worst = max(errors) if errors else 0.0
    print(
        f"LoRA rank {report['rank']}: {report['lora_modules']} factorised modules (worst relative error "
        f"{worst:.3e}), {len(report['modules_to_save'])} saved whole -> {report['output_path']} "
        f"(report: {REPORT_FILE})"
    )
    return report


if __name__ == "__main__":
    run_main(main)
