"""GLUE merging with hyper-parameter search (spec §2.3), pairwise or all tasks at once, on top of the core.

Two modes:

* **pairs** (the original): for an ordered pair (source, target) the fine-tuned models are merged
  (``models = [source, target]``, the target last) and only the target task is evaluated, with its own head;
* **all** (N-task, FusionBench's protocol): the models of every task are merged into one backbone, and every task
  is evaluated on it with its own head. Grid search picks one setting for all tasks, on the mean score.

Heads are never merged or masked: the backbone is what the model class's ``base_model_prefix`` names
(:func:`utils.glue_paths.backbone_prefix`), and only backbone parameters are handed to the core. The merging math is
the core's (``merge_state_dicts``, ``mask_model_weights``); this module builds the candidates, collects Fisher /
RegMean statistics (:mod:`utils.merge_statistics`), evaluates and selects.

Methods are handled generically as "a method name + its grid of keyword settings": a candidate is a dict of the
core method's keyword arguments (one value per model for the per-model keys), completed by fixed options from the
settings and, for the data-dependent methods, by statistics. Every per-method fact lives in the tables below.

Selection: a candidate replaces the best only when its score on the selection split is **strictly** greater (ties
keep the earliest grid point). Default selection split: ``validation`` (the 10% held out of GLUE train), and the
best candidate is then evaluated on ``test`` (GLUE dev) for the report; ``selection_split="test"`` reproduces the
original protocol (select and report on GLUE dev).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model_merging_methods.mask_weights_utils import check_same_parameters, mask_model_weights
from model_merging_methods.merging_methods import merge_state_dicts
from utils.cli import UserError
from utils.glue_data_loader import MAX_SEQ_LENGTH, get_task, make_dataloader
from utils.glue_paths import backbone_prefix, model_short_name
from utils.merge_statistics import (
    collect_fisher_weights_at,
    collect_regmean_grams_at,
    transposed_weight_names,
)
from utils.run_names import glue_common_suffix, glue_group_folder, glue_merge_suffix, glue_method_folder

logger = logging.getLogger(__name__)


# =============================================================================================================
# The per-method tables: the only place that knows about individual methods, all derived from the core's method
# registry (model_merging_methods.registry): a method declared there is searched here with its declared GLUE grid,
# with no GLUE-specific code. A grid key is the name of the core method's keyword argument, except the statistics
# keys (how many examples a data statistic is collected from).
# =============================================================================================================
_ORIGINAL_GRID_ORDER = {"regmean_merging": ("nums_regmean_examples", "reduce_non_diagonal_ratio")}


def _registry_tables() -> dict:
    from model_merging_methods.registry import all_methods

    methods = all_methods()
    grid_keys, method_grids, statistics, per_model, integer, options = {}, {}, {}, set(), set(), {}
    default_grids: dict[str, list] = {}
    for m in methods:
        grid_keys[m.name] = tuple(p.name for p in m.grid_params())
        method_grids[m.name] = {p.name: list(p.grid) for p in m.grid_params()}
        for p in m.grid_params():
            default_grids.setdefault(p.name, list(p.grid))
            if p.per_model:
                per_model.add(p.name)
            if p.type is int:
                integer.add(p.name)
        for stat in m.data_statistics:
            for p in stat.params:
                statistics[p.name] = (m.name, stat.name)
                per_model.add(p.name)  # the original's result files hold one count per model
        options[m.name] = tuple(p.name for p in m.params if p.grid is None and p.flag)
    # the original's loop order where it differs from "own parameters, then the statistics'" (spec §2.3): it
    # decides which grid point wins a tie
    for name, order in _ORIGINAL_GRID_ORDER.items():
        if name in grid_keys and set(order) == set(grid_keys[name]):
            grid_keys[name] = order
    # DARE + X: the DARE drop rates searched after the plain method's best setting (the spec's grid)
    default_grids["weight_mask_rate"] = [0.1, 0.3, 0.5, 0.7, 0.9]
    return {
        "methods": tuple(m.name for m in methods),
        "dare_methods": tuple(m.name for m in methods if m.dare_prestep),
        "data_methods": tuple(m.name for m in methods if m.data_statistics),
        "random_methods": tuple(m.name for m in methods if m.random),
        "max_models": {m.name: m.max_models for m in methods},
        "min_models": {m.name: m.min_models for m in methods},
        "grid_keys": grid_keys,
        "method_grids": method_grids,
        "default_grids": default_grids,
        "statistics": statistics,
        "per_model": tuple(sorted(per_model)),
        "integer": tuple(sorted(integer)),
        "options": options,
    }


_TABLES = _registry_tables()
METHODS: tuple[str, ...] = (*_TABLES["methods"], "mask_merging")
DARE_METHODS: tuple[str, ...] = _TABLES["dare_methods"]  # what DARE + X accepts as X
DATA_METHODS: tuple[str, ...] = _TABLES["data_methods"]
RANDOM_METHODS: tuple[str, ...] = _TABLES[
    "random_methods"
]  # methods that draw random numbers (take the seed)
# the default grid of every key (the first method's declared grid; weight_mask_rate: the DARE rates)
DEFAULT_GRIDS: dict[str, list] = _TABLES["default_grids"]
# a method's own declared grids, where they differ from DEFAULT_GRIDS
METHOD_DEFAULT_GRIDS: dict[str, dict[str, list]] = _TABLES["method_grids"]
# grid keys per method, outer loop first
METHOD_GRID_KEYS: dict[str, tuple[str, ...]] = _TABLES["grid_keys"]
# hyper-parameter keys a plain result contributes to DARE + X (the original's best-dict keys): its grid keys
METHOD_RESULT_KEYS: dict[str, tuple[str, ...]] = METHOD_GRID_KEYS
# grid keys whose value is given once per model (the same value for every model, as in the original)
PER_MODEL_KEYS: tuple[str, ...] = _TABLES["per_model"]
# grid keys that choose how many examples the statistics use: key → (method, core keyword of the statistics)
STATISTICS_KEYS: dict[str, tuple[str, str]] = _TABLES["statistics"]
# the methods' settings that are not searched (exposed as flags; the registry's default unless given)
METHOD_OPTION_KEYS: dict[str, tuple[str, ...]] = _TABLES["options"]
# fixed keyword arguments with a GLUE flag of their own (the original's): method → {core keyword: settings attribute}
METHOD_OPTIONS: dict[str, dict[str, str]] = {
    "ties_merging": {"trim_scope": "ties_trim_scope"},
    "fisher_merging": {
        "normalize_fisher_weight": "normalize_fisher_weight",
        "minimal_fisher_weight": "minimal_fisher_weight",
    },
}
# integer-valued grid keys (everything else is a float)
INTEGER_GRID_KEYS: tuple[str, ...] = _TABLES["integer"]


def method_grid(settings_or_method, key: str) -> list:
    """The default grid of ``key`` for a method: its declared grid, else :data:`DEFAULT_GRIDS`."""
    method = settings_or_method if isinstance(settings_or_method, str) else settings_or_method.base_method
    return list(METHOD_DEFAULT_GRIDS.get(method, {}).get(key, DEFAULT_GRIDS[key]))


def check_num_models(method: str, num_models: int) -> None:
    """A method that cannot take ``num_models`` models (SLERP: two) is a UserError before anything is loaded."""
    low, high = _TABLES["min_models"].get(method, 1), _TABLES["max_models"].get(method)
    if num_models < low or (high is not None and num_models > high):
        span = f"exactly {low}" if high == low else f"{low} to {high}" if high else f"at least {low}"
        raise UserError(f"{method} merges {span} models, not {num_models}")


# =============================================================================================================

MERGE_MODES = ("pairs", "all")
SCORE_METRICS = ("main", "accuracy")


@dataclass
class MergeSettings:
    """Everything that changes a merge result (and therefore the result file name)."""

    merging_method_name: str
    language_model_name: str
    mask_apply_method: str = "average_merging"
    selection_split: str = "validation"
    seed: int = 0
    batch_size: int = 16
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_selection_samples: int | None = None  # the search's validation rows (test: max_eval_samples)
    fisher_variant: str = "faithful"
    normalize_fisher_weight: bool = False
    minimal_fisher_weight: float = 1e-6
    regmean_exclude_padding: bool = False
    ties_trim_scope: str = "global"
    weight_format: str = "delta_weight"
    use_weight_rescale: bool = False
    mask_strategy: str = "random"
    grids: dict[str, list] = field(default_factory=dict)  # grids given by the user; the rest: method_grid()
    metric: str = "main"  # "main": each task's GLUE main metric; "accuracy": accuracy on every task
    max_seq_length: int = MAX_SEQ_LENGTH
    finetuned_model_template: str | None = None  # e.g. "tanganke/gpt2_{task}"
    method_options: dict[str, object] = field(default_factory=dict)  # non-searched method settings given

    def grid(self, key: str) -> list:
        """The values searched for ``key``: the user's, else the method's declared grid (DARE rates for
        ``weight_mask_rate`` in DARE + X)."""
        if key in self.grids:
            return list(self.grids[key])
        if key == "weight_mask_rate" and self.is_dare:
            return list(DEFAULT_GRIDS["weight_mask_rate"])
        return method_grid(self.base_method, key)

    @property
    def base_method(self) -> str:
        """The method applied to the (possibly masked) models."""
        return (
            self.mask_apply_method if self.merging_method_name == "mask_merging" else self.merging_method_name
        )

    @property
    def is_dare(self) -> bool:
        return self.merging_method_name == "mask_merging"

    def plain(self) -> MergeSettings:
        """The settings of the plain base method (what DARE + X reads its hyper-parameters from)."""
        out = copy.deepcopy(self)
        out.merging_method_name = self.base_method
        return out


# ----------------------------------------------------------------------------------------------- scores
def score_key(task: str, metric: str = "main") -> str:
    """The ``eval_*`` key that scores ``task``: its main metric, or ``eval_accuracy`` with ``metric="accuracy"``
    (undefined for the regression task STS-B: a UserError)."""
    if metric == "accuracy":
        if get_task(task).is_regression:
            raise UserError(f"--metric accuracy: {task} is a regression task without an accuracy")
        return "eval_accuracy"
    if metric != "main":
        raise UserError(f"unknown metric {metric!r} (choose from {', '.join(SCORE_METRICS)})")
    return f"eval_{get_task(task).main_metric}"


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def mean_or_none(values: Sequence) -> float | None:
    """The mean of ``values``, or None when any is missing or not finite."""
    if not values or not all(_finite(v) for v in values):
        return None
    return float(sum(values) / len(values))


def normalized_scores(scores: dict[str, float], finetuned: dict[str, float]) -> dict[str, float | None]:
    """FusionBench's normalised score per task: merged / fine-tuned (None when the fine-tuned score is not
    positive, e.g. a Matthews correlation of 0)."""
    out: dict[str, float | None] = {}
    for task, value in scores.items():
        ref = finetuned.get(task)
        out[task] = float(value / ref) if _finite(value) and _finite(ref) and ref > 0 else None
    return out


# ----------------------------------------------------------------------------------------------- naming
# the names themselves are encoded in utils.run_names (the one module that encodes settings into names)
def default_grid(settings: MergeSettings, key: str) -> list:
    """The grid ``key`` is searched over when the user gives none (a grid equal to it adds nothing to a name)."""
    if key == "weight_mask_rate" and settings.is_dare:
        return list(DEFAULT_GRIDS["weight_mask_rate"])
    return method_grid(settings.base_method, key)


common_suffix = glue_common_suffix
settings_suffix = glue_merge_suffix
method_folder = glue_method_folder
group_folder = glue_group_folder


def method_label(settings_or_result) -> str:
    """``task_arithmetic`` or ``DARE + ties_merging`` (DropOnly / magnitude / fine-tuned-weight variants named)."""
    get = (
        settings_or_result.get
        if isinstance(settings_or_result, dict)
        else lambda k, d=None: getattr(settings_or_result, k, d)
    )
    name = get("merging_method_name")
    if name != "mask_merging":
        return str(name)
    variant = "DARE"
    if get("mask_strategy", "random") == "magnitude":
        variant = "magnitude pruning"
    elif not get("use_weight_rescale", True):
        variant = "DropOnly"
    if get("weight_format", "delta_weight") == "finetuned_weight":
        variant += " (fine-tuned weights)"
    return f"{variant} + {get('mask_apply_method')}"


def result_path(
    results_dir: str | Path, source_or_tasks, target: str | None = None, settings: MergeSettings | None = None
) -> Path:
    """``{results_dir}/{src}_{tgt}/{method}[/{apply}]/{lm}{suffix}.json`` (the original's pattern + suffix) for a
    pair (``result_path(dir, src, tgt, settings)``), or ``{results_dir}/all_{tasks}/...`` for an N-task merge
    (``result_path(dir, [tasks], settings=settings)``)."""
    if isinstance(source_or_tasks, str):
        folder = group_folder([source_or_tasks, target], "pairs")
    else:
        folder = group_folder(list(source_or_tasks), "all")
    name = model_short_name(settings.language_model_name) + settings_suffix(settings)
    return Path(results_dir) / folder / method_folder(settings) / f"{name}.json"


def summary_path(results_dir: str | Path, settings: MergeSettings) -> Path:
    name = model_short_name(settings.language_model_name) + settings_suffix(settings)
    return Path(results_dir) / "summary" / method_folder(settings).replace("/", "_") / name


def all_tasks_paths(
    results_dir: str | Path, tasks: Sequence[str], settings: MergeSettings
) -> dict[str, Path]:
    """Where an N-task run keeps the fine-tuned reference scores and the table across methods (``.json``,
    ``.csv``, ``.md``, ``.png`` are added to the ``table`` stem)."""
    folder = group_folder(tasks, "all")
    stem = model_short_name(settings.language_model_name) + common_suffix(settings)
    return {
        "finetuned": Path(results_dir) / folder / "finetuned" / f"{stem}.json",
        "table": Path(results_dir) / "summary" / folder / stem,
    }


# ----------------------------------------------------------------------------------------------- grids
def grid_points(settings: MergeSettings, num_models: int = 2) -> list[dict]:
    """Candidate hyper-parameters of the base method, in the result file's form (lists for per-model values)."""
    keys = METHOD_GRID_KEYS[settings.base_method]
    points = []
    for values in itertools.product(*(settings.grid(k) for k in keys)):
        hp: dict = {}
        for key, value in zip(keys, values):
            hp[key] = [value] * num_models if key in PER_MODEL_KEYS else value
        points.append(hp)
    return points


def is_better(candidate: dict, best: dict | None, key: str) -> bool:
    """Strictly greater (NaN never wins); ``best is None`` → True."""
    if best is None:
        return True
    value, best_value = candidate.get(key), best.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best_value is None or (isinstance(best_value, float) and math.isnan(best_value)):
        return True
    return value > best_value


# ----------------------------------------------------------------------------------------------- models
def kept_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """``name → tensor`` of the backbone (the parameters under the class's ``base_model_prefix``): what is masked
    and merged. The head is left out."""
    prefix = backbone_prefix(model) + "."
    return {n: p.detach() for n, p in model.named_parameters() if n.startswith(prefix)}


def check_architectures(pretrained: nn.Module, models: dict[str, nn.Module]) -> None:
    """Same model class and the same backbone parameter names and shapes, else a UserError."""
    ref_type = getattr(pretrained.config, "model_type", None)
    for label, model in models.items():
        model_type = getattr(model.config, "model_type", None)
        if model_type != ref_type or type(model).__name__ != type(pretrained).__name__:
            raise UserError(
                f"models of different architectures: {label} is {model_type} ({type(model).__name__}), the "
                f"pretrained model {ref_type} ({type(pretrained).__name__})"
            )
    labels = ["the pretrained model", *models]
    try:
        check_same_parameters(
            [kept_parameters(pretrained), *(kept_parameters(m) for m in models.values())], labels
        )
    except ValueError as exc:
        raise UserError(f"models of different architectures: {exc}") from None


def load_parameters_(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy ``params`` into ``model``'s parameters of the same names (in place); only backbone names are
    accepted, so a head can never be overwritten."""
    own = dict(model.named_parameters())
    prefix = backbone_prefix(model) + "."
    with torch.no_grad():
        for name, tensor in params.items():
            if not name.startswith(prefix):
                raise ValueError(
                    f"refusing to load {name}: not a backbone parameter (heads are never merged)"
                )
            own[name].copy_(tensor)


class StatsCache:
    """A small LRU of per-model statistics (``{count: {name: tensor}}``, on the CPU)."""

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._data: OrderedDict = OrderedDict()

    def get(self, key, compute):
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = compute()
        self._data[key] = value
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
        return value


class TaskMerger:
    """Merges the backbones of ``models`` (one per task, in order) for one set of settings; Fisher / RegMean
    statistics on demand."""

    def __init__(
        self,
        settings: MergeSettings,
        pretrained: dict[str, torch.Tensor],
        models: Sequence[nn.Module],
        tasks: Sequence[str],
        train_datasets: dict | None,
        tokenizer,
        cache: StatsCache | None = None,
    ):
        self.settings = settings
        self.pretrained = pretrained
        self.models = list(models)
        self.tasks = list(tasks)
        self.params = [kept_parameters(m) for m in self.models]
        self.train_datasets = train_datasets or {}
        self.tokenizer = tokenizer
        self.cache = cache if cache is not None else StatsCache()
        self.transposed = set(transposed_weight_names(self.models[0], self.params[0]))

    # statistics -------------------------------------------------------------------------------------
    def _counts(self, key: str) -> list[int]:
        return sorted(set(int(n) for n in self.settings.grid(key)))

    def _masked_params(self, index: int, rate: float) -> dict[str, torch.Tensor]:
        s = self.settings
        return mask_model_weights(
            self.params[index], self.pretrained, weight_format=s.weight_format, weight_mask_rate=rate,
            use_weight_rescale=s.use_weight_rescale, mask_strategy=s.mask_strategy, seed=s.seed,
            model_index=index,
        )  # fmt: skip

    def _masked_model(self, index: int, rate: float) -> nn.Module:
        model = copy.deepcopy(self.models[index])
        load_parameters_(model, self._masked_params(index, rate))
        return model

    def statistics(self, key: str, index: int, rate: float | None) -> dict[int, dict[str, torch.Tensor]]:
        """Statistics of model ``index`` (masked at ``rate`` for DARE + X) for every example count of the grid
        key ``key`` (a :data:`STATISTICS_KEYS` key)."""
        s, task = self.settings, self.tasks[index]
        kind = STATISTICS_KEYS[key][0]
        variant = s.fisher_variant if kind == "fisher_merging" else s.regmean_exclude_padding
        counts = self._counts(key)
        cache_key = (kind, variant, task, None if rate is None else (index, rate), tuple(counts))

        def compute():
            if task not in self.train_datasets:
                raise UserError(f"no training data loaded for {task}")
            model = self.models[index] if rate is None else self._masked_model(index, rate)
            loader = make_dataloader(
                self.train_datasets[task], self.tokenizer, s.batch_size, shuffle=True, seed=s.seed
            )
            names = list(self.params[index])
            logger.info("collecting %s statistics of %s (%s examples)", kind, task, counts)
            if kind == "fisher_merging":
                stats = collect_fisher_weights_at(
                    model,
                    loader,
                    counts,
                    param_names=names,
                    variant=s.fisher_variant,
                    batch_size=s.batch_size,
                )
            else:
                stats = collect_regmean_grams_at(
                    model, loader, counts, param_names=names, exclude_padding=s.regmean_exclude_padding
                )
            return {n: {k: v.cpu() for k, v in d.items()} for n, d in stats.items()}

        return self.cache.get(cache_key, compute)

    # merging --------------------------------------------------------------------------------------
    def method_kwargs(self, hp: dict, rate: float | None) -> dict:
        """The core method's keyword arguments for the candidate ``hp``: its grid values (the statistics keys
        replaced by the statistics they choose), plus the method's fixed options from the settings (and the seed
        for methods that draw random numbers)."""
        s, base = self.settings, self.settings.base_method
        kwargs: dict = {}
        for key, value in hp.items():
            if key == "weight_mask_rate" and s.is_dare:
                continue  # the DARE pre-step's rate, not the method's
            if key in STATISTICS_KEYS:
                keyword = STATISTICS_KEYS[key][1]
                kwargs[keyword] = [
                    self.statistics(key, i, rate)[int(value[i])] for i in range(len(self.models))
                ]
            elif isinstance(value, list):
                kwargs[key] = [float(v) for v in value]
            else:
                kwargs[key] = float(value) if isinstance(value, int | float) else value
        for keyword, attribute in METHOD_OPTIONS.get(base, {}).items():
            kwargs[keyword] = getattr(s, attribute)
        for keyword in METHOD_OPTION_KEYS.get(base, ()):
            if keyword in s.method_options:
                kwargs[keyword] = s.method_options[keyword]
        if base in RANDOM_METHODS:
            kwargs["seed"] = s.seed
        return kwargs

    def merge(self, hp: dict) -> dict[str, torch.Tensor]:
        """The merged backbone parameters for the hyper-parameters ``hp`` (DARE + X: every model masked first,
        model ``i`` with masks drawn from ``(seed, name, i)`` as in the core's ``mask_merging``)."""
        s = self.settings
        rate = float(hp["weight_mask_rate"]) if s.is_dare else None
        models = [self._masked_params(i, rate) for i in range(len(self.params))] if s.is_dare else self.params
        kwargs = self.method_kwargs(hp, rate)
        transpose = s.base_method == "regmean_merging" and self.transposed
        if transpose:  # GPT-2 Conv1D weights are stored in × out; the core's RegMean expects out × in
            models = [{n: (t.T if n in self.transposed else t) for n, t in m.items()} for m in models]
        merged = merge_state_dicts(s.base_method, self.pretrained, models, (), **kwargs)
        if transpose:
            merged = {n: (t.T.contiguous() if n in self.transposed else t) for n, t in merged.items()}
        return merged


PairMerger = TaskMerger  # the pairwise mode is the two-model case


def search(
    merger: TaskMerger,
    candidates: Sequence[dict],
    evaluate: Callable[[dict, str], dict],
    score: Callable[[dict], float | None],
    selection_split: str,
    label: str = "",
) -> dict:
    """Evaluate every candidate on ``selection_split`` (``evaluate(params, split) -> metrics``), score it
    (``score(metrics)``), keep the first strictly best, and (when selecting on validation) evaluate it on test.

    Returns ``{"hyperparameters", "selection_metrics", "selection_score", "test_metrics", "search"}``."""
    best, best_hp, best_params, best_metrics, trace = None, None, None, None, []
    for hp in candidates:
        params = merger.merge(hp)
        metrics = evaluate(params, selection_split)
        value = score(metrics)
        trace.append({**hp, f"{selection_split}_score": value})
        logger.info("%s %s: %s score %s", label, hp, selection_split, value)
        if best_hp is None or is_better({"s": value}, {"s": best}, "s"):
            best, best_hp, best_params, best_metrics = value, hp, params, metrics
    test_metrics = best_metrics if selection_split == "test" else evaluate(best_params, "test")
    return {
        "hyperparameters": best_hp,
        "selection_metrics": best_metrics,
        "selection_score": best,
        "test_metrics": test_metrics,
        "search": trace,
    }


def search_pair(
    merger: TaskMerger,
    candidates: Sequence[dict],
    evaluate,
    target: str,
    selection_split: str,
    metric: str = "main",
) -> dict:
    """:func:`search` for a pair: the score is the target task's metric."""
    key = score_key(target, metric)
    found = search(merger, candidates, evaluate, lambda m: m.get(key), selection_split, target)
    for row in found["search"]:
        row[f"{selection_split}_{key[5:]}"] = row.pop(f"{selection_split}_score")
    return found


# ----------------------------------------------------------------------------------------------- N-task tables
def all_tasks_row(result: dict) -> dict:
    """One row of the N-task table: method, chosen settings, each task's test score, mean, normalised mean."""
    hp = {k: v for k, v in result.get("hyperparameters", {}).items()}
    row = {"method": method_label(result) if "merging_method_name" in result else result.get("method", "")}
    row["settings"] = ", ".join(
        f"{k}={v[0] if isinstance(v, list) and len(set(map(str, v))) == 1 else v}" for k, v in hp.items()
    )
    for task in result["tasks"]:
        row[task] = result["test_scores"].get(task)
    row["mean"] = result.get("mean")
    row["normalized_mean"] = result.get("normalized_mean")
    return row


def all_tasks_table(results_dir: str | Path, tasks: Sequence[str], settings: MergeSettings) -> list[dict]:
    """The table across methods of one N-task protocol: the fine-tuned models first, then every result file of
    the same tasks, model and common settings (:func:`common_suffix`) under ``results_dir``, best mean first."""
    paths = all_tasks_paths(results_dir, tasks, settings)
    rows = []
    if paths["finetuned"].is_file():
        ft = json.loads(paths["finetuned"].read_text(encoding="utf-8"))
        rows.append(
            {
                "method": "fine-tuned (individual)",
                "settings": "",
                **{t: ft["test_scores"].get(t) for t in tasks},
                "mean": ft.get("mean"),
                "normalized_mean": 1.0 if ft.get("mean") is not None else None,
            }
        )
    folder = Path(results_dir) / group_folder(tasks, "all")
    found = []
    lm = model_short_name(settings.language_model_name)
    for path in sorted(folder.rglob("*.json")) if folder.is_dir() else []:
        if path.parent.name == "finetuned":
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("merge_mode") != "all":
            continue
        if data.get("common_suffix") != common_suffix(settings) or data.get("model") != lm:
            continue
        if list(data.get("tasks", [])) != list(tasks):
            continue
        row = all_tasks_row(data)
        row["file"] = path.stem
        found.append(row)
    found.sort(key=lambda r: -(r["mean"] if _finite(r["mean"]) else -math.inf))
    return rows + found


def plot_all_tasks_table(rows: Sequence[dict], tasks: Sequence[str], path: str | Path, title: str) -> Path:
    """Grouped bars: one group per method (fine-tuned first), one bar per task plus the mean (hatched)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = [str(r["method"]) + (f"\n{r['settings']}" if r.get("settings") else "") for r in rows]
    series = [*tasks, "mean"]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    for j, name in enumerate(series):
        values = [r.get(name) if _finite(r.get(name)) else 0.0 for r in rows]
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, values, width, label=name, hatch="//" if name == "mean" else None, edgecolor="black",
               linewidth=0.3)  # fmt: skip
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(series), 5))
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path
