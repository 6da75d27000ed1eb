"""Evaluate GLUE fine-tuned classifiers (any HF backbone), optionally after DARE or one of its ablations (spec §2.2).

For each task, the model at ``{models_dir}/{task}/{lm}_lr{lr}`` (the authors' learning rate of §5.5 for
bert-base-uncased / roberta-base, else ``--learning_rate``), or ``--finetuned_model_template`` filled with the
task, is masked with the core's ``mask_model_weights`` (the backbone only: what the model class puts under its
``base_model_prefix``; the head is never masked) and evaluated on the GLUE dev set ("test").

* DARE: ``--weight_mask_rate 0.9 --use_weight_rescale`` (random drop of the delta, rescale by 1/(1-p));
* DropOnly: no ``--use_weight_rescale``; magnitude pruning: ``--mask_strategy magnitude``;
* masking the fine-tuned weights: ``--weight_format finetuned_weight --use_weight_rescale``.
The default drop rate is 0 (plain evaluation); the original's default of 0.1 silently masked.

Outputs: ``{results_dir}/{task}/{name}/{name}.json`` per task, and the summary table across the tasks
``{results_dir}/summary/{name}.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from model_merging_methods.mask_weights_utils import mask_model_weights
from utils.cli import UserError, check_rate, run_main, setup_logging
from utils.customized_trainers import GlueEvaluator
from utils.glue_data_loader import MAX_SEQ_LENGTH, TASK_NAMES, check_task_names, get_task, load_glue_task
from utils.glue_merging import (
    SCORE_METRICS,
    check_architectures,
    kept_parameters,
    load_parameters_,
    score_key,
)
from utils.glue_paths import (
    DEFAULT_MODELS_DIR,
    check_model_configs,
    check_model_template,
    check_outputs,
    chosen_learning_rate,
    head_parameter_names,
    learning_rates,
    load_sequence_classifier,
    load_tokenizer,
    local_inputs,
    model_short_name,
    require_finetuned_model,
    save_model_name,
    write_output,
)
from utils.method_cli import add_dare_arguments
from utils.results_io import round_floats, write_json, write_table
from utils.run_names import dare_name, glue_eval_suffix, glue_summary_name

logger = logging.getLogger("inference_plms_glue")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--language_model_name", default="roberta-base", help="model name or local folder")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument(
        "--gpu", type=int, default=0, help="accepted for compatibility; the Trainer picks the device"
    )
    add_dare_arguments(p, rate="single", seed_also="the evaluation Trainer's seed")
    p.add_argument(
        "--dataset_names", nargs="+", default=list(TASK_NAMES), help="tasks to evaluate (default: all 8)"
    )
    p.add_argument("--glue_data_dir", default=None, help="local GLUE folder (TSV layout); default: the hub")
    p.add_argument("--max_eval_samples", type=int, default=None, help="keep the first N test rows")
    p.add_argument(
        "--learning_rate",
        type=learning_rates,
        default=None,
        help="learning rate in the model folder names: one (5e-4) or one per task (sst2=5e-4,qnli=1e-4)",
    )
    p.add_argument("--max_seq_length", type=int, default=MAX_SEQ_LENGTH, help="truncation length in tokens")
    p.add_argument(
        "--metric", default="main", choices=SCORE_METRICS,
        help="summary score: each task's GLUE main metric, or accuracy on every task (FusionBench)",
    )  # fmt: skip
    p.add_argument("--models_dir", default=DEFAULT_MODELS_DIR)
    p.add_argument(
        "--finetuned_model_template", default=None,
        help="the fine-tuned model of each task as a hub id or folder with {task}, e.g. tanganke/gpt2_{task} "
        "(instead of --models_dir/{task}/{lm}_lr{lr})",
    )  # fmt: skip
    p.add_argument("--results_dir", default="./save_model_results")
    return p.parse_args(argv)


def _model_label(args: argparse.Namespace, task: str) -> str:
    """The fine-tuned model's short name (its folder's, or the template's)."""
    if args.finetuned_model_template is not None:
        return model_short_name(args.finetuned_model_template.format(task=task))
    return model_short_name(args.language_model_name)


def variant_suffix(args: argparse.Namespace) -> str:
    """The original's name after ``{lm}_lr{lr}`` (§2.2 step 4), plus ``_seed{s}`` / ``_maxeval{n}`` / ``_len{n}``
    when those differ from a full run with the default seed (:mod:`utils.run_names`)."""
    name = dare_name(
        "", args.weight_mask_rate, args.use_weight_rescale, args.mask_strategy, args.weight_format, args.seed,
        glue=True,
    )  # fmt: skip
    return name + glue_eval_suffix(args.max_eval_samples, args.max_seq_length, MAX_SEQ_LENGTH)


def result_name(args: argparse.Namespace, task: str) -> str:
    if args.finetuned_model_template is not None:
        return _model_label(args, task) + variant_suffix(args)
    lr = chosen_learning_rate(task, args.language_model_name, args.learning_rate)
    return save_model_name(args.language_model_name, lr) + variant_suffix(args)


def summary_name(args: argparse.Namespace) -> str:
    """The summary spans tasks (whose learning rates may differ): the lr appears only when given explicitly."""
    return glue_summary_name(
        model_short_name(args.language_model_name), args.learning_rate, variant_suffix(args)
    )


def result_settings(args: argparse.Namespace, task: str) -> dict:
    """The ``settings`` object of one task's result (:func:`utils.run_settings.run_settings`)."""
    from utils.run_settings import dare_settings, run_settings

    return run_settings(
        args, script="inference_plms_glue.py", kind="dare" if args.weight_mask_rate > 0 else "model",
        model=_model_label(args, task), task=task,
        dare=dare_settings(args.weight_mask_rate, args.use_weight_rescale, args.mask_strategy, args.weight_format,
                           args.seed),
    )  # fmt: skip


def _masked_parameters(
    finetuned, pretrained, args: argparse.Namespace, where: str
) -> dict[str, torch.Tensor]:
    """The backbone of ``finetuned`` after DARE / its ablation (the head is not part of it)."""
    ft = kept_parameters(finetuned)
    pre = None if pretrained is None else kept_parameters(pretrained)
    try:
        return mask_model_weights(
            ft, pre, weight_format=args.weight_format, weight_mask_rate=args.weight_mask_rate,
            use_weight_rescale=args.use_weight_rescale, mask_strategy=args.mask_strategy, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _check_args(args: argparse.Namespace) -> list[str]:
    tasks = check_task_names(args.dataset_names)
    check_rate("--weight_mask_rate", args.weight_mask_rate)
    if args.batch_size < 1 or (args.max_eval_samples is not None and args.max_eval_samples < 1):
        raise UserError("--batch_size and --max_eval_samples must be at least 1")
    if args.max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2")
    if args.finetuned_model_template is not None:
        check_model_template(args.finetuned_model_template)
    for task in tasks:
        score_key(task, args.metric)
    return tasks


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setup_logging()
    tasks = _check_args(args)
    # fail before writing anything: every model folder must exist, no output may touch an input, and every
    # task's data must load
    model_dirs = {
        t: require_finetuned_model(
            args.models_dir, t, args.language_model_name, args.learning_rate, args.finetuned_model_template
        )
        for t in tasks
    }
    labels = {f"the {t} model": d for t, d in model_dirs.items()}
    if args.weight_mask_rate != 0.0 and args.weight_format == "delta_weight":
        check_model_configs({"--language_model_name": args.language_model_name, **labels})
    else:
        for label, d in labels.items():
            check_model_configs({label: d})
    result_paths = {
        t: Path(args.results_dir) / t / result_name(args, t) / f"{result_name(args, t)}.json" for t in tasks
    }
    summary = Path(args.results_dir) / "summary" / summary_name(args)
    check_outputs(
        [*(("--results_dir", p, False) for p in result_paths.values()),
         ("--results_dir", f"{summary}.csv", False), ("--results_dir", f"{summary}.md", False)],
        local_inputs(**{"--language_model_name": args.language_model_name, "--glue_data_dir": args.glue_data_dir,
                        **{f"the {t} model": d for t, d in model_dirs.items()}}),
    )  # fmt: skip
    tokenizer = load_tokenizer(args.language_model_name)
    datasets = {
        t: load_glue_task(
            t, tokenizer, args.glue_data_dir, ("test",), max_seq_length=args.max_seq_length,
            max_eval_samples=args.max_eval_samples,
        )["test"]
        for t in tasks
    }  # fmt: skip
    rows, all_metrics = [], []
    for task in tasks:
        finetuned = load_sequence_classifier(model_dirs[task], pad_token_id=tokenizer.pad_token_id)
        head_before = {
            n: p.detach().clone()
            for n, p in finetuned.named_parameters()
            if n in head_parameter_names(finetuned)
        }
        if args.weight_mask_rate != 0.0:
            pretrained = None
            if args.weight_format == "delta_weight":
                pretrained = load_sequence_classifier(args.language_model_name, get_task(task).num_labels)
                check_architectures(pretrained, {f"{task} ({model_dirs[task]})": finetuned})
            masked = _masked_parameters(finetuned, pretrained, args, f"{task} ({model_dirs[task]})")
            load_parameters_(finetuned, masked)
            del pretrained
        for n, p in finetuned.named_parameters():  # the head is the fine-tuned one, bit for bit
            if n in head_before and not torch.equal(p.detach(), head_before[n]):
                raise RuntimeError(f"head parameter {n} changed")  # pragma: no cover - a bug, not an input
        evaluator = GlueEvaluator(finetuned, tokenizer, args.batch_size, seed=args.seed)
        try:
            metrics = round_floats(evaluator.evaluate(datasets[task], task))
        finally:
            evaluator.close()
        metrics["settings"] = result_settings(args, task)  # after rounding: flags keep their exact values
        result_path = result_paths[task]
        write_output(result_path, lambda p, m=metrics: write_json(p, m))
        key = score_key(task, args.metric)
        logger.info("%s: %s = %s -> %s", task, key, metrics.get(key), result_path)
        rows.append({"task": task, "main_metric": key[5:], "score": metrics.get(key),
                     **{k: v for k, v in metrics.items() if k.startswith("eval_") and k != "eval_loss"
                        and "runtime" not in k and "per_second" not in k and "preparation_time" not in k}})  # fmt: skip
        all_metrics.append(metrics)
    write_output(f"{summary}.csv", lambda p: write_table(rows, f"{summary}.csv", f"{summary}.md"))
    logger.info("summary -> %s.csv / .md", summary)
    return all_metrics


if __name__ == "__main__":
    run_main(main)
