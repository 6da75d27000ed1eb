"""Pairwise merging of GLUE fine-tuned encoders with hyper-parameter search (spec §2.3).

For every ordered pair (source, target) of ``--dataset_names`` (default: the 8 tasks, 56 pairs) the two
fine-tuned models are merged with ``--merging_method_name`` (or DARE + ``--mask_apply_method`` for
``mask_merging``), the target's classifier head is put on the merged encoder, and the target task is evaluated.
Hyper-parameters are searched over the spec's grids (each overridable: give one or more values to the flag).
Selection uses ``--selection_split`` (default ``validation``, the 10% held out of GLUE train) and the best
candidate is reported on GLUE dev ("test"); ``--selection_split test`` is the original protocol.

DARE + X takes the plain method's best hyper-parameters from its result file (same settings), and when that file
does not exist it runs the plain search first (which writes it).

Outputs: ``{results_dir}/{src}_{tgt}/{method}[/{apply}]/{lm}{suffix}.json`` per pair, where the suffix names every
non-default setting, and ``{results_dir}/summary/{method}[_{apply}]/{lm}{suffix}.csv`` / ``.md`` across pairs.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import logging

import torch

from utils.cli import UserError, check_rate, run_main, setup_logging
from utils.customized_trainers import GlueEvaluator
from utils.glue_data_loader import TASK_NAMES, check_task_names, get_task, load_glue_task
from utils.glue_merging import (
    DATA_METHODS,
    DEFAULT_GRIDS,
    EXCLUDE_PARAM_NAMES_REGEX,
    METHOD_RESULT_KEYS,
    METHODS,
    MergeSettings,
    PairMerger,
    StatsCache,
    check_architectures,
    grid_points,
    kept_parameters,
    load_parameters_,
    result_path,
    search_pair,
    summary_path,
)
from utils.glue_paths import (
    DEFAULT_MODELS_DIR,
    load_sequence_classifier,
    load_tokenizer,
    require_finetuned_model,
)
from utils.merge_statistics import FISHER_VARIANTS
from utils.results_io import read_json, round_floats, write_json, write_table

logger = logging.getLogger("merge_plms_glue")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--language_model_name", default="roberta-base", help="model name or local folder")
    p.add_argument("--merging_method_name", default="average_merging", choices=METHODS)
    p.add_argument("--mask_apply_method", default="average_merging", choices=METHODS[:-1])
    grid = "grid values (default: the spec's grid %s)"
    p.add_argument(
        "--scaling_coefficient",
        type=float,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["scaling_coefficient"] + "; task_arithmetic and ties_merging",
    )
    p.add_argument(
        "--fisher_scaling_coefficients",
        type=float,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["fisher_scaling_coefficients"] + "; the same value for both models",
    )
    p.add_argument(
        "--nums_fisher_examples",
        type=int,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["nums_fisher_examples"],
    )
    p.add_argument(
        "--normalize_fisher_weight",
        action="store_true",
        help="reweight models by their inverse global Fisher norm",
    )
    p.add_argument("--minimal_fisher_weight", type=float, default=1e-6)
    p.add_argument(
        "--fisher_variant",
        default="faithful",
        choices=FISHER_VARIANTS,
        help="faithful: the original's batch estimator; per_example: per-example Fisher",
    )
    p.add_argument(
        "--nums_regmean_examples",
        type=int,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["nums_regmean_examples"],
    )
    p.add_argument(
        "--reduce_non_diagonal_ratio",
        type=float,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["reduce_non_diagonal_ratio"],
    )
    p.add_argument(
        "--regmean_exclude_padding",
        action="store_true",
        help="leave padded positions out of the RegMean Gram matrices",
    )
    p.add_argument(
        "--param_value_mask_rate",
        type=float,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["param_value_mask_rate"] + " (TIES trim rate)",
    )
    p.add_argument("--ties_trim_scope", default="global", choices=["global", "tensor"])
    p.add_argument("--weight_format", default="delta_weight", choices=["finetuned_weight", "delta_weight"])
    p.add_argument(
        "--weight_mask_rate",
        type=float,
        nargs="+",
        default=None,
        help=grid % DEFAULT_GRIDS["weight_mask_rate"] + " (DARE drop rates)",
    )
    p.add_argument("--use_weight_rescale", action="store_true")
    p.add_argument("--mask_strategy", default="random", choices=["random", "magnitude"])
    p.add_argument("--batch_size", type=int, default=16, help="statistics and evaluation batch size")
    p.add_argument(
        "--gpu", type=int, default=0, help="accepted for compatibility; the Trainer picks the device"
    )
    p.add_argument(
        "--dataset_names", nargs="+", default=list(TASK_NAMES), help="tasks (ordered pairs among them)"
    )
    p.add_argument("--selection_split", default="validation", choices=["validation", "test"])
    p.add_argument("--seed", type=int, default=0, help="DARE masks and the data order of the statistics")
    p.add_argument("--glue_data_dir", default=None, help="local GLUE folder (TSV layout); default: the hub")
    p.add_argument("--max_train_samples", type=int, default=None, help="first N training rows (statistics)")
    p.add_argument("--max_eval_samples", type=int, default=None, help="first N validation and test rows")
    p.add_argument(
        "--learning_rate", type=float, default=None, help="learning rate in the model folder names"
    )
    p.add_argument("--models_dir", default=DEFAULT_MODELS_DIR)
    p.add_argument("--results_dir", default="./save_merge_results")
    return p.parse_args(argv)  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> MergeSettings:
    grids = copy.deepcopy(DEFAULT_GRIDS)
    for key in grids:
        if getattr(args, key) is not None:
            grids[key] = list(getattr(args, key))
    for key in ("param_value_mask_rate", "weight_mask_rate", "reduce_non_diagonal_ratio"):
        for value in grids[key]:
            check_rate(f"--{key}", value)
    for key in ("nums_fisher_examples", "nums_regmean_examples"):
        if any(n < 1 for n in grids[key]):
            raise UserError(f"--{key} values must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    for key in ("max_train_samples", "max_eval_samples"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if not args.minimal_fisher_weight >= 0:
        raise UserError("--minimal_fisher_weight must be non-negative")
    return MergeSettings(
        merging_method_name=args.merging_method_name, language_model_name=args.language_model_name,
        mask_apply_method=args.mask_apply_method, selection_split=args.selection_split, seed=args.seed,
        batch_size=args.batch_size, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, fisher_variant=args.fisher_variant,
        normalize_fisher_weight=args.normalize_fisher_weight, minimal_fisher_weight=args.minimal_fisher_weight,
        regmean_exclude_padding=args.regmean_exclude_padding, ties_trim_scope=args.ties_trim_scope,
        weight_format=args.weight_format, use_weight_rescale=args.use_weight_rescale,
        mask_strategy=args.mask_strategy, grids=grids,
    )  # fmt: skip


class GlueMergeRun:
    """State shared by the pairs of one invocation: tokenizer, data, models, statistics cache."""

    def __init__(self, args: argparse.Namespace, settings: MergeSettings, tasks: list[str]):
        self.args, self.settings, self.tasks = args, settings, tasks
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model_dirs = {
            t: require_finetuned_model(args.models_dir, t, args.language_model_name, args.learning_rate)
            for t in tasks
        }
        self.tokenizer = load_tokenizer(args.language_model_name)
        splits = ["test"] + (["validation"] if settings.selection_split == "validation" else [])
        if settings.base_method in DATA_METHODS:
            splits.append("train")
        self.data = {
            t: load_glue_task(t, self.tokenizer, args.glue_data_dir, splits,
                              max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
            for t in tasks
        }  # fmt: skip
        self.models = {t: load_sequence_classifier(self.model_dirs[t]).to(self.device) for t in tasks}
        pretrained_model = load_sequence_classifier(args.language_model_name)
        check_architectures(
            pretrained_model, {f"{t} ({self.model_dirs[t]})": m for t, m in self.models.items()}
        )
        self.pretrained = {n: p.to(self.device) for n, p in kept_parameters(pretrained_model).items()}
        del pretrained_model
        self.cache = StatsCache()

    def run_pair(self, source: str, target: str, settings: MergeSettings) -> dict:
        """Search (or read) the result of one pair for ``settings``; DARE + X first makes sure the plain
        method's result exists."""
        path = result_path(self.args.results_dir, source, target, settings)
        if settings.is_dare:
            plain_path = result_path(self.args.results_dir, source, target, settings.plain())
            if plain_path.is_file():
                plain = read_json(plain_path)
                logger.info("%s -> %s: plain %s hyper-parameters from %s", source, target,
                            settings.base_method, plain_path)  # fmt: skip
            else:
                logger.info("%s -> %s: no %s; searching the plain %s first", source, target, plain_path,
                            settings.base_method)  # fmt: skip
                plain = self.run_pair(source, target, settings.plain())
            missing = [k for k in METHOD_RESULT_KEYS[settings.base_method] if k not in plain]
            if missing:
                raise UserError(f"{plain_path} lacks the hyper-parameter(s) {missing}")
            base_hp = {k: plain[k] for k in METHOD_RESULT_KEYS[settings.base_method]}
            candidates = [{**base_hp, "weight_mask_rate": r} for r in settings.grids["weight_mask_rate"]]
        else:
            candidates = grid_points(settings)

        tasks = [source, target]
        merger = PairMerger(
            settings, self.pretrained, [self.models[t] for t in tasks], tasks,
            {t: self.data[t]["train"] for t in tasks if "train" in self.data[t]}, self.tokenizer, self.cache,
        )  # fmt: skip
        eval_model = copy.deepcopy(self.models[target])  # the target's head stays; the encoder is replaced
        evaluator = GlueEvaluator(eval_model, self.tokenizer, self.args.batch_size, seed=settings.seed)

        def evaluate(params, split):
            load_parameters_(evaluator.model, params)
            return evaluator.evaluate(self.data[target][split], target)

        try:
            found = search_pair(merger, candidates, evaluate, target, settings.selection_split)
        finally:
            evaluator.close()
        result = {
            **found["test_metrics"],
            **found["hyperparameters"],
            "source_dataset": source,
            "target_dataset": target,
            "merging_method_name": settings.merging_method_name,
            **({"mask_apply_method": settings.mask_apply_method} if settings.is_dare else {}),
            "selection_split": settings.selection_split,
            "selection_metrics": found["selection_metrics"],
            "excluded_parameters": list(EXCLUDE_PARAM_NAMES_REGEX),
            "search": found["search"],
        }
        result = round_floats(result)
        write_json(path, result)
        main = get_task(target).main_metric
        logger.info("%s -> %s %s: best %s, test %s = %s -> %s", source, target, settings.merging_method_name,
                    found["hyperparameters"], main, result.get(f"eval_{main}"), path)  # fmt: skip
        return result


def summary_row(result: dict, settings: MergeSettings) -> dict:
    target = result["target_dataset"]
    main = get_task(target).main_metric
    row = {"source": result["source_dataset"], "target": target, "method": settings.merging_method_name}
    if settings.is_dare:
        row["mask_apply_method"] = settings.mask_apply_method
    for key in (
        *METHOD_RESULT_KEYS[settings.base_method],
        *(("weight_mask_rate",) if settings.is_dare else ()),
    ):
        value = result.get(key)
        row[key] = value[0] if isinstance(value, list) else value
    row["main_metric"] = main
    row[f"{settings.selection_split}_score"] = result["selection_metrics"].get(f"eval_{main}")
    row["test_score"] = result.get(f"eval_{main}")
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setup_logging()
    tasks = check_task_names(args.dataset_names)
    if len(tasks) < 2:
        raise UserError("--dataset_names needs at least two tasks (merging works on ordered pairs)")
    settings = settings_from_args(args)
    run = GlueMergeRun(args, settings, tasks)  # validates models and data before anything is written
    results = [run.run_pair(s, t, settings) for s, t in itertools.permutations(tasks, 2)]
    summary = summary_path(args.results_dir, settings)
    write_table([summary_row(r, settings) for r in results], f"{summary}.csv", f"{summary}.md")
    logger.info("summary -> %s.csv / .md", summary)
    return results


if __name__ == "__main__":
    run_main(main)
