"""Merging of GLUE fine-tuned classifiers (any HF backbone) with hyper-parameter search (spec §2.3), pairwise or
all tasks at once.

``--merge_mode pairs`` (default, the original): for every ordered pair (source, target) of ``--dataset_names``
(default: the 8 tasks, 56 pairs) the two fine-tuned backbones are merged with ``--merging_method_name`` (or DARE +
``--mask_apply_method`` for ``mask_merging``), the target keeps its own head, and the target task is evaluated.

``--merge_mode all`` (N-task, FusionBench's protocol): the backbones of every task are merged into one, and every
task is evaluated on it with its own head. One setting is chosen for all tasks, on the mean score. Reported: each
task's score, the mean, the fine-tuned models' scores and the mean normalised by them (merged / fine-tuned per task,
averaged), and a table across every method run so far (JSON, CSV, Markdown, bar plot).

Heads are never merged or masked: what the model class puts under its ``base_model_prefix`` is merged, the rest
(BERT's ``classifier``, GPT-2's ``score``, DeBERTa's ``pooler`` + ``classifier``, ...) stays each task's own.
Hyper-parameters are searched over the spec's grids (each overridable: give one or more values to the flag).
Selection uses ``--selection_split`` (default ``validation``, the 10% held out of GLUE train) and the best
candidate is reported on GLUE dev ("test"); ``--selection_split test`` is the original protocol.

DARE + X takes the plain method's best hyper-parameters from its result file (same settings), and when that file
does not exist it runs the plain search first (which writes it).

Outputs: ``{results_dir}/{src}_{tgt}/{method}[/{apply}]/{lm}{suffix}.json`` per pair and
``{results_dir}/summary/{method}[_{apply}]/{lm}{suffix}.csv`` / ``.md`` across pairs; for ``all``,
``{results_dir}/all_{tasks}/{method}[/{apply}]/{lm}{suffix}.json``, the fine-tuned scores in
``{results_dir}/all_{tasks}/finetuned/`` and the table across methods in ``{results_dir}/summary/all_{tasks}/``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import logging
import math
from pathlib import Path

import torch

from utils.cli import UserError, check_rate, run_main, setup_logging
from utils.customized_trainers import GlueEvaluator
from utils.glue_data_loader import MAX_SEQ_LENGTH, TASK_NAMES, check_task_names, load_glue_task
from utils.glue_merging import (
    DARE_METHODS,
    DATA_METHODS,
    DEFAULT_GRIDS,
    INTEGER_GRID_KEYS,
    MERGE_MODES,
    METHOD_OPTION_KEYS,
    METHOD_OPTIONS,
    METHOD_RESULT_KEYS,
    METHODS,
    SCORE_METRICS,
    MergeSettings,
    StatsCache,
    TaskMerger,
    all_tasks_paths,
    all_tasks_table,
    check_architectures,
    check_num_models,
    common_suffix,
    grid_points,
    group_folder,
    kept_parameters,
    load_parameters_,
    mean_or_none,
    method_label,
    normalized_scores,
    plot_all_tasks_table,
    result_path,
    score_key,
    search,
    search_pair,
    summary_path,
)
from utils.glue_paths import (
    DEFAULT_MODELS_DIR,
    check_model_configs,
    check_model_template,
    check_outputs,
    head_parameter_names,
    learning_rates,
    load_sequence_classifier,
    load_tokenizer,
    local_inputs,
    model_short_name,
    require_finetuned_model,
    write_output,
)
from utils.merge_statistics import FISHER_VARIANTS
from utils.method_cli import add_dare_arguments
from utils.results_io import read_json, round_floats, write_json, write_table

logger = logging.getLogger("merge_plms_glue")

GRID_HELP = {
    "scaling_coefficient": "λ of task arithmetic and TIES",
    "fisher_scaling_coefficients": "the same value for every model",
    "param_value_mask_rate": "TIES trim rate",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--language_model_name", default="roberta-base", help="model name or local folder")
    p.add_argument("--merging_method_name", default="average_merging", choices=METHODS)
    p.add_argument(
        "--mask_apply_method",
        default="average_merging",
        choices=DARE_METHODS,
        help="the method applied after DARE in mask_merging",
    )
    p.add_argument(
        "--merge_mode",
        default="pairs",
        choices=MERGE_MODES,
        help="pairs: every ordered pair, target evaluated (the original); all: every task at once",
    )
    # one flag per grid key and per setting of the registered methods (a new method gets its flags without code)
    from model_merging_methods.registry import shared_params

    declared = shared_params()
    for key, default in DEFAULT_GRIDS.items():
        if key == "weight_mask_rate":  # a DARE flag: declared with the others (add_dare_arguments)
            continue
        p.add_argument(
            f"--{key}",
            type=int if key in INTEGER_GRID_KEYS else float,
            nargs="+",
            default=None,
            help=f"grid values (default: {default}, or the method's declared grid)"
            + (f"; {GRID_HELP[key]}" if key in GRID_HELP else ""),
        )
    legacy = {k for options in METHOD_OPTIONS.values() for k in options}
    for key in dict.fromkeys(k for keys in METHOD_OPTION_KEYS.values() for k in keys):
        if key in legacy or key in DEFAULT_GRIDS or key in declared and not declared[key].flag:
            continue
        param = declared[key]
        p.add_argument(
            f"--{key}",
            type=param.type if param.type in (int, float, str) else str,
            default=None,
            choices=param.choices,
            help=f"{param.help} (default {param.default})",
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
        "--regmean_exclude_padding",
        action="store_true",
        help="leave padded positions out of the RegMean Gram matrices",
    )
    p.add_argument("--ties_trim_scope", default="global", choices=["global", "tensor"])
    add_dare_arguments(
        p, rate="grid", grid_default=DEFAULT_GRIDS["weight_mask_rate"],
        seed_also="the data order of the Fisher / RegMean statistics and the draws of random methods",
    )  # fmt: skip
    p.add_argument("--batch_size", type=int, default=16, help="statistics and evaluation batch size")
    p.add_argument(
        "--gpu", type=int, default=0, help="accepted for compatibility; the Trainer picks the device"
    )
    p.add_argument(
        "--dataset_names", nargs="+", default=list(TASK_NAMES), help="tasks (ordered pairs among them)"
    )
    p.add_argument("--selection_split", default="validation", choices=["validation", "test"])
    p.add_argument(
        "--metric",
        default="main",
        choices=SCORE_METRICS,
        help="score: each task's GLUE main metric, or accuracy on every task (FusionBench)",
    )
    p.add_argument("--glue_data_dir", default=None, help="local GLUE folder (TSV layout); default: the hub")
    p.add_argument("--max_train_samples", type=int, default=None, help="first N training rows (statistics)")
    p.add_argument("--max_eval_samples", type=int, default=None, help="first N validation and test rows")
    p.add_argument(
        "--max_selection_samples",
        type=int,
        default=None,
        help="select on the first N validation rows only (the test split keeps --max_eval_samples): "
        "a cheaper, noisier search",
    )
    p.add_argument("--max_seq_length", type=int, default=MAX_SEQ_LENGTH, help="truncation length in tokens")
    p.add_argument(
        "--learning_rate",
        type=learning_rates,
        default=None,
        help="learning rate in the model folder names: one (5e-4) or one per task (sst2=5e-4,qnli=1e-4)",
    )
    p.add_argument("--models_dir", default=DEFAULT_MODELS_DIR)
    p.add_argument(
        "--finetuned_model_template",
        default=None,
        help="each task's fine-tuned model as a hub id or folder with {task}, e.g. tanganke/gpt2_{task} "
        "(instead of --models_dir/{task}/{lm}_lr{lr})",
    )
    p.add_argument("--results_dir", default="./save_merge_results")
    return p.parse_args(argv)  # fmt: skip


def settings_from_args(args: argparse.Namespace) -> MergeSettings:
    from model_merging_methods.registry import shared_params

    declared = shared_params()
    grids = {key: list(getattr(args, key)) for key in DEFAULT_GRIDS if getattr(args, key, None) is not None}
    for key, values in grids.items():
        for value in values:
            if key == "weight_mask_rate" or key not in declared:
                check_rate(f"--{key}", value)
            else:
                declared[key].validate(value, 1)
            if not math.isfinite(float(value)):
                raise UserError(f"--{key} values must be finite numbers")
    options = {}
    for keys in METHOD_OPTION_KEYS.values():
        for key in keys:
            if getattr(args, key, None) is not None and key in declared:
                options[key] = declared[key].validate(getattr(args, key), 1)
    if args.batch_size < 1:
        raise UserError("--batch_size must be at least 1")
    for key in ("max_train_samples", "max_eval_samples", "max_selection_samples"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    if args.max_selection_samples is not None and args.selection_split != "validation":
        raise UserError(
            "--max_selection_samples limits the validation split; it needs --selection_split validation"
        )
    if args.max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2")
    if not args.minimal_fisher_weight >= 0 or args.minimal_fisher_weight == float("inf"):
        raise UserError("--minimal_fisher_weight must be a finite non-negative number")
    if args.finetuned_model_template is not None:
        check_model_template(args.finetuned_model_template)
    return MergeSettings(
        merging_method_name=args.merging_method_name, language_model_name=args.language_model_name,
        mask_apply_method=args.mask_apply_method, selection_split=args.selection_split, seed=args.seed,
        batch_size=args.batch_size, max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples, max_selection_samples=args.max_selection_samples,
        fisher_variant=args.fisher_variant,
        normalize_fisher_weight=args.normalize_fisher_weight, minimal_fisher_weight=args.minimal_fisher_weight,
        regmean_exclude_padding=args.regmean_exclude_padding, ties_trim_scope=args.ties_trim_scope,
        weight_format=args.weight_format, use_weight_rescale=args.use_weight_rescale,
        mask_strategy=args.mask_strategy, grids=grids, metric=args.metric, max_seq_length=args.max_seq_length,
        finetuned_model_template=args.finetuned_model_template, method_options=options,
    )  # fmt: skip


def planned_outputs(args: argparse.Namespace, settings: MergeSettings, tasks: list[str]) -> list[tuple]:
    """Every file this invocation may write (DARE + X may also write the plain method's result)."""
    variants = [settings] + ([settings.plain()] if settings.is_dare else [])
    outputs: list[tuple] = []
    if args.merge_mode == "all":
        paths = all_tasks_paths(args.results_dir, tasks, settings)
        outputs += [
            ("--results_dir", result_path(args.results_dir, tasks, settings=s), False) for s in variants
        ]
        outputs += [("--results_dir", paths["finetuned"], False)]
        outputs += [
            ("--results_dir", f"{paths['table']}{ext}", False) for ext in (".json", ".csv", ".md", ".png")
        ]
    else:
        for s in variants:
            outputs += [("--results_dir", result_path(args.results_dir, a, b, s), False)
                        for a, b in itertools.permutations(tasks, 2)]  # fmt: skip
        summary = summary_path(args.results_dir, settings)
        outputs += [("--results_dir", f"{summary}{ext}", False) for ext in (".csv", ".md")]
    return outputs


def result_flags(args: argparse.Namespace, settings: MergeSettings, merge_mode: str) -> dict:
    """Every flag of a result as it was run: the command line's, with the values of ``settings`` (a run object
    runs several settings, e.g. DARE + X's plain X, or every method of the offline story)."""
    flags = dict(vars(args))
    for f in dataclasses.fields(settings):
        if f.name not in ("grids", "method_options"):
            flags[f.name] = getattr(settings, f.name)
    for key in DEFAULT_GRIDS:
        flags[key] = settings.grids.get(key)
    flags.update(settings.method_options)
    flags["merge_mode"] = merge_mode
    return flags


def result_settings(
    args: argparse.Namespace,
    settings: MergeSettings,
    tasks: list[str],
    hyperparameters: dict,
    merge_mode: str,
) -> dict:
    """The ``settings`` object of one merge result (:func:`utils.run_settings.run_settings`): the method and the
    hyper-parameters the search selected (with the method's fixed options), the DARE settings of DARE + X (the
    selected rate), every flag."""
    from utils.run_settings import dare_settings, run_settings

    hp = dict(hyperparameters)
    rate = hp.pop("weight_mask_rate", None) if settings.is_dare else None
    params = {
        kw: getattr(settings, attr) for kw, attr in METHOD_OPTIONS.get(settings.base_method, {}).items()
    }
    params.update(
        {
            k: settings.method_options[k]
            for k in METHOD_OPTION_KEYS.get(settings.base_method, ())
            if k in settings.method_options
        }
    )
    params.update(hp)
    model = "+".join(tasks) if merge_mode == "pairs" else group_folder(tasks, "all")
    dare = None
    if settings.is_dare:
        dare = dare_settings(rate, settings.use_weight_rescale, settings.mask_strategy, settings.weight_format,
                             settings.seed)  # fmt: skip
    return run_settings(
        result_flags(args, settings, merge_mode), script="merge_plms_glue.py", kind="merge", model=model,
        merge={"method": settings.base_method, "params": params, "models": list(tasks)}, dare=dare,
    )  # fmt: skip


class GlueMergeRun:
    """State shared by the merges of one invocation: tokenizer, data, models, statistics cache."""

    def __init__(
        self,
        args: argparse.Namespace,
        settings: MergeSettings,
        tasks: list[str],
        load_train: bool | None = None,
    ):
        """``load_train``: load the training splits (default: when ``settings``' method needs statistics); a
        caller that runs several methods on one instance (the offline story) passes True."""
        self.args, self.settings, self.tasks = args, settings, tasks
        self._evaluators: dict[str, GlueEvaluator] = {}
        self._sorted: dict[tuple, object] = {}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model_dirs = {
            t: require_finetuned_model(
                args.models_dir,
                t,
                args.language_model_name,
                args.learning_rate,
                args.finetuned_model_template,
            )
            for t in tasks
        }
        # before anything heavy is loaded or anything written: configs, then the output paths
        check_model_configs(
            {"--language_model_name": args.language_model_name,
             **{f"the {t} model {self.model_dirs[t]}": d for t, d in self.model_dirs.items()}}
        )  # fmt: skip
        check_outputs(
            planned_outputs(args, settings, tasks),
            local_inputs(**{"--language_model_name": args.language_model_name, "--glue_data_dir": args.glue_data_dir,
                            **{f"the {t} model": d for t, d in self.model_dirs.items()}}),
        )  # fmt: skip
        self.tokenizer = load_tokenizer(args.language_model_name)
        splits = ["test"] + (["validation"] if settings.selection_split == "validation" else [])
        if load_train or (load_train is None and settings.base_method in DATA_METHODS):
            splits.append("train")
        self.data = {
            t: load_glue_task(t, self.tokenizer, args.glue_data_dir, splits, max_seq_length=settings.max_seq_length,
                              max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples)
            for t in tasks
        }  # fmt: skip
        pad = self.tokenizer.pad_token_id
        self.models = {
            t: load_sequence_classifier(self.model_dirs[t], pad_token_id=pad).to(self.device) for t in tasks
        }
        pretrained_model = load_sequence_classifier(args.language_model_name, pad_token_id=pad)
        check_architectures(
            pretrained_model, {f"{t} ({self.model_dirs[t]})": m for t, m in self.models.items()}
        )
        self.pretrained = {n: p.to(self.device) for n, p in kept_parameters(pretrained_model).items()}
        del pretrained_model
        self.heads = {t: head_parameter_names(m) for t, m in self.models.items()}
        self.cache = StatsCache()

    # ------------------------------------------------------------------------------------------- shared
    def _candidates(
        self, settings: MergeSettings, num_models: int, plain_path: Path, run_plain
    ) -> list[dict]:
        """The grid of the base method, or for DARE + X the plain method's best hyper-parameters × the DARE
        rates (running the plain search first when its result file does not exist)."""
        if not settings.is_dare:
            return grid_points(settings, num_models)
        if plain_path.is_file():
            plain = read_json(plain_path)
            logger.info("plain %s hyper-parameters from %s", settings.base_method, plain_path)
        else:
            logger.info("no %s; searching the plain %s first", plain_path, settings.base_method)
            plain = run_plain()
        source = plain.get("hyperparameters", plain) if isinstance(plain, dict) else {}
        missing = [k for k in METHOD_RESULT_KEYS[settings.base_method] if k not in source]
        if missing:
            raise UserError(f"{plain_path} lacks the hyper-parameter(s) {missing}")
        base_hp = {k: source[k] for k in METHOD_RESULT_KEYS[settings.base_method]}
        return [{**base_hp, "weight_mask_rate": r} for r in settings.grids["weight_mask_rate"]]

    def _merger(self, settings: MergeSettings, tasks: list[str]) -> TaskMerger:
        return TaskMerger(
            settings, self.pretrained, [self.models[t] for t in tasks], tasks,
            {t: self.data[t]["train"] for t in tasks if "train" in self.data[t]}, self.tokenizer, self.cache,
        )  # fmt: skip

    def _evaluator(self, task: str, settings: MergeSettings) -> GlueEvaluator:
        """One evaluator per task, kept for the whole run: a copy of the task's fine-tuned model whose backbone
        every evaluation overwrites with the merged one (its head stays the task's own)."""
        if task not in self._evaluators:
            model = copy.deepcopy(self.models[task])
            self._evaluators[task] = GlueEvaluator(
                model, self.tokenizer, self.args.batch_size, seed=settings.seed
            )
        return self._evaluators[task]

    def _split(self, task: str, split: str, settings: MergeSettings):
        """The rows of ``split`` an evaluation reads: the validation split cut to ``max_selection_samples``, then
        ordered by length (batches padded to their longest row waste less; the metrics do not depend on the
        order)."""
        n = settings.max_selection_samples if split == "validation" else None
        key = (task, split, n)
        if key not in self._sorted:
            data = self.data[task][split]
            if n is not None and n < len(data):
                data = data.select(range(n))
            lengths = [len(ids) for ids in data["input_ids"]]
            self._sorted[key] = data.select(sorted(range(len(data)), key=lengths.__getitem__))
        return self._sorted[key]

    def close(self) -> None:
        for evaluator in self._evaluators.values():
            evaluator.close()
        self._evaluators.clear()

    def _check_heads(self, task: str, evaluator: GlueEvaluator) -> None:
        own = dict(self.models[task].named_parameters())
        for name, p in evaluator.model.named_parameters():
            if name in self.heads[task] and not torch.equal(p.detach(), own[name].detach()):
                raise RuntimeError(f"{task}: head parameter {name} changed")  # pragma: no cover - a bug

    # ------------------------------------------------------------------------------------------- pairs
    def run_pair(self, source: str, target: str, settings: MergeSettings) -> dict:
        """Search (or read) the result of one pair for ``settings``; DARE + X first makes sure the plain
        method's result exists."""
        path = result_path(self.args.results_dir, source, target, settings)
        plain_path = result_path(self.args.results_dir, source, target, settings.plain())
        candidates = self._candidates(
            settings, 2, plain_path, lambda: self.run_pair(source, target, settings.plain())
        )
        merger = self._merger(settings, [source, target])
        evaluator = self._evaluator(target, settings)

        def evaluate(params, split):
            load_parameters_(evaluator.model, params)
            return evaluator.evaluate(self._split(target, split, settings), target)

        found = search_pair(merger, candidates, evaluate, target, settings.selection_split, settings.metric)
        self._check_heads(target, evaluator)
        result = {
            **found["test_metrics"],
            **found["hyperparameters"],
            "source_dataset": source,
            "target_dataset": target,
            "merging_method_name": settings.merging_method_name,
            **({"mask_apply_method": settings.mask_apply_method} if settings.is_dare else {}),
            "selection_split": settings.selection_split,
            "selection_metrics": found["selection_metrics"],
            "excluded_parameters": self.heads[target],
            "search": found["search"],
        }
        result = round_floats(result)
        # after rounding (flags keep their exact values); a cached result is found by its path, never compared whole
        result["settings"] = result_settings(
            self.args, settings, [source, target], found["hyperparameters"], "pairs"
        )
        write_output(path, lambda p: write_json(p, result))
        key = score_key(target, settings.metric)
        logger.info("%s -> %s %s: best %s, test %s = %s -> %s", source, target, settings.merging_method_name,
                    found["hyperparameters"], key, result.get(key), path)  # fmt: skip
        return result

    # ------------------------------------------------------------------------------------------- all tasks
    def finetuned_scores(self, settings: MergeSettings) -> dict:
        """Each fine-tuned model on its own task's test split (cached in a file per protocol)."""
        path = all_tasks_paths(self.args.results_dir, self.tasks, settings)["finetuned"]
        fingerprint = {t: _fingerprint(d) for t, d in self.model_dirs.items()}
        if path.is_file():
            data = read_json(path)
            if (
                isinstance(data, dict)
                and list(data.get("tasks", [])) == self.tasks
                and data.get("fingerprint") == fingerprint
                and "test_scores" in data
            ):
                return data
        from utils.run_settings import run_settings

        metrics, scores = {}, {}
        for task in self.tasks:
            evaluator = GlueEvaluator(
                self.models[task], self.tokenizer, self.args.batch_size, seed=settings.seed
            )
            try:
                metrics[task] = round_floats(evaluator.evaluate(self._split(task, "test", settings), task))
            finally:
                evaluator.close()
            scores[task] = metrics[task].get(score_key(task, settings.metric))
        data = {
            "merge_mode": "all", "method": "fine-tuned (individual)", "tasks": self.tasks,
            "model": model_short_name(settings.language_model_name), "common_suffix": common_suffix(settings),
            "metric": settings.metric, "score_keys": {t: score_key(t, settings.metric) for t in self.tasks},
            "models": {t: str(d) for t, d in self.model_dirs.items()}, "fingerprint": fingerprint, "test_scores": scores,
            "mean": mean_or_none(list(scores.values())), "test_metrics": metrics,
        }  # fmt: skip
        data = round_floats(data)
        data["settings"] = run_settings(
            result_flags(self.args, settings, "all"), script="merge_plms_glue.py", kind="model",
            model="fine-tuned (individual)",
        )  # fmt: skip
        write_output(path, lambda p: write_json(p, data))
        return data

    def run_all(self, settings: MergeSettings) -> dict:
        """Merge every task's backbone at once, evaluate every task with its own head, select on the mean."""
        tasks = self.tasks
        path = result_path(self.args.results_dir, tasks, settings=settings)
        plain_path = result_path(self.args.results_dir, tasks, settings=settings.plain())
        candidates = self._candidates(
            settings, len(tasks), plain_path, lambda: self.run_all(settings.plain())
        )
        reference = self.finetuned_scores(settings)
        merger = self._merger(settings, tasks)
        evaluators = {t: self._evaluator(t, settings) for t in tasks}
        keys = {t: score_key(t, settings.metric) for t in tasks}

        def evaluate(params, split):
            out = {}
            for t in tasks:
                load_parameters_(evaluators[t].model, params)
                out[t] = evaluators[t].evaluate(self._split(t, split, settings), t)
            return out

        def score(metrics):
            return mean_or_none([metrics[t].get(keys[t]) for t in tasks])

        found = search(merger, candidates, evaluate, score, settings.selection_split, "all tasks")
        for t in tasks:
            self._check_heads(t, evaluators[t])
        test_scores = {t: found["test_metrics"][t].get(keys[t]) for t in tasks}
        normalized = normalized_scores(test_scores, reference["test_scores"])
        result = {
            "merge_mode": "all",
            "tasks": tasks,
            "model": model_short_name(settings.language_model_name),
            "language_model_name": settings.language_model_name,
            "merging_method_name": settings.merging_method_name,
            **({"mask_apply_method": settings.mask_apply_method} if settings.is_dare else {}),
            "use_weight_rescale": settings.use_weight_rescale,
            "mask_strategy": settings.mask_strategy,
            "weight_format": settings.weight_format,
            "method": method_label(settings),
            "metric": settings.metric,
            "score_keys": keys,
            "common_suffix": common_suffix(settings),
            "hyperparameters": found["hyperparameters"],
            "test_scores": test_scores,
            "mean": mean_or_none(list(test_scores.values())),
            "finetuned_scores": reference["test_scores"],
            "finetuned_mean": reference["mean"],
            "normalized_scores": normalized,
            "normalized_mean": mean_or_none(list(normalized.values())),
            "selection_split": settings.selection_split,
            "selection_scores": {t: found["selection_metrics"][t].get(keys[t]) for t in tasks},
            "selection_mean": found["selection_score"],
            "test_metrics": found["test_metrics"],
            "excluded_parameters": self.heads,
            "search": found["search"],
        }
        result = round_floats(result)
        result["settings"] = result_settings(self.args, settings, tasks, found["hyperparameters"], "all")
        write_output(path, lambda p: write_json(p, result))
        logger.info("all tasks %s: best %s, test mean %s (normalised %s) -> %s", method_label(settings),
                    found["hyperparameters"], result["mean"], result["normalized_mean"], path)  # fmt: skip
        return result

    def write_all_tasks_table(self, settings: MergeSettings) -> Path:
        stem = all_tasks_paths(self.args.results_dir, self.tasks, settings)["table"]
        rows = round_floats(all_tasks_table(self.args.results_dir, self.tasks, settings))
        write_output(f"{stem}.json", lambda p: write_json(p, {"tasks": self.tasks, "rows": rows}))
        write_output(f"{stem}.csv", lambda p: write_table(rows, f"{stem}.csv", f"{stem}.md"))
        title = f"{model_short_name(settings.language_model_name)}: all-task merges ({settings.metric} metric, test)"
        write_output(f"{stem}.png", lambda p: plot_all_tasks_table(rows, self.tasks, p, title))
        return stem


def _fingerprint(model: str | Path) -> str:
    """Name, size and modification time of a local model's weights (a retrained model invalidates the cached
    fine-tuned scores); a hub id stands for itself."""
    folder = Path(model)
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) if folder.is_dir() else []
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files) or str(model)


def summary_row(result: dict, settings: MergeSettings) -> dict:
    target = result["target_dataset"]
    key = score_key(target, settings.metric)
    row = {"source": result["source_dataset"], "target": target, "method": settings.merging_method_name}
    if settings.is_dare:
        row["mask_apply_method"] = settings.mask_apply_method
    for k in (
        *METHOD_RESULT_KEYS[settings.base_method],
        *(("weight_mask_rate",) if settings.is_dare else ()),
    ):
        value = result.get(k)
        row[k] = value[0] if isinstance(value, list) else value
    row["main_metric"] = key[5:]
    row[f"{settings.selection_split}_score"] = result["selection_metrics"].get(key)
    row["test_score"] = result.get(key)
    return row


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setup_logging()
    tasks = check_task_names(args.dataset_names)
    if len(tasks) < 2:
        raise UserError("--dataset_names needs at least two tasks (merging needs two models or more)")
    settings = settings_from_args(args)
    for task in tasks:
        score_key(task, settings.metric)
    check_num_models(settings.base_method, len(tasks) if args.merge_mode == "all" else 2)
    run = GlueMergeRun(args, settings, tasks)  # validates models, data and outputs before anything is written
    try:
        if args.merge_mode == "all":
            result = run.run_all(settings)
            stem = run.write_all_tasks_table(settings)
            logger.info("table across methods -> %s.csv / .md / .json / .png", stem)
            return [result]
        results = [run.run_pair(s, t, settings) for s, t in itertools.permutations(tasks, 2)]
    finally:
        run.close()
    summary = summary_path(args.results_dir, settings)
    rows = [summary_row(r, settings) for r in results]
    write_output(f"{summary}.csv", lambda p: write_table(rows, f"{summary}.csv", f"{summary}.md"))
    logger.info("summary -> %s.csv / .md", summary)
    return results


if __name__ == "__main__":
    run_main(main)
