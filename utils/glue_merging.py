"""Pairwise GLUE merging with hyper-parameter search (spec §2.3), on top of the functional core.

For an ordered pair (source, target) the fine-tuned models are merged (``models = [source, target]``, the
target last), the classifier heads are never merged (the target's head is used), and only the target task is
evaluated. The merging math is the core's (``model_merging_methods.merging_methods``); this module builds the
candidates, collects Fisher / RegMean statistics (:mod:`utils.merge_statistics`), evaluates and selects.

Selection: a candidate replaces the best only when its main metric on the selection split is **strictly**
greater (ties keep the earliest grid point). Default selection split: ``validation`` (the 10% held out of
GLUE train), and the best candidate is then evaluated on ``test`` (GLUE dev) for the report;
``selection_split="test"`` reproduces the original protocol (select and report on GLUE dev).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from model_merging_methods.mask_weights_utils import check_same_parameters, mask_model_weights
from model_merging_methods.merging_methods import MERGING_METHODS, mask_merging, merge_state_dicts
from utils.cli import UserError
from utils.glue_data_loader import get_task, make_dataloader
from utils.glue_paths import model_short_name
from utils.merge_statistics import collect_fisher_weights_at, collect_regmean_grams_at

logger = logging.getLogger(__name__)

EXCLUDE_PARAM_NAMES_REGEX = (".*classifier.*",)
METHODS = (*MERGING_METHODS, "mask_merging")
DATA_METHODS = ("fisher_merging", "regmean_merging")

# The spec's grids (§2.3); every one can be replaced from the command line.
DEFAULT_GRIDS: dict[str, list] = {
    "scaling_coefficient": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
    "fisher_scaling_coefficients": [0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
    "nums_fisher_examples": [256, 512, 1024, 2048],
    "nums_regmean_examples": [256, 512, 1024, 2048],
    "reduce_non_diagonal_ratio": [0.7, 0.8, 0.9, 1.0],
    "param_value_mask_rate": [0.7, 0.8, 0.9],
    "weight_mask_rate": [0.1, 0.3, 0.5, 0.7, 0.9],
}
# grid keys per method, outer loop first
METHOD_GRID_KEYS: dict[str, tuple[str, ...]] = {
    "average_merging": (),
    "task_arithmetic": ("scaling_coefficient",),
    "fisher_merging": ("fisher_scaling_coefficients", "nums_fisher_examples"),
    "regmean_merging": ("nums_regmean_examples", "reduce_non_diagonal_ratio"),
    "ties_merging": ("scaling_coefficient", "param_value_mask_rate"),
}
# hyper-parameter keys a plain result contributes to DARE + X (the original's best-dict keys): its grid keys
METHOD_RESULT_KEYS: dict[str, tuple[str, ...]] = METHOD_GRID_KEYS


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
    fisher_variant: str = "faithful"
    normalize_fisher_weight: bool = False
    minimal_fisher_weight: float = 1e-6
    regmean_exclude_padding: bool = False
    ties_trim_scope: str = "global"
    weight_format: str = "delta_weight"
    use_weight_rescale: bool = False
    mask_strategy: str = "random"
    grids: dict[str, list] = field(default_factory=lambda: copy.deepcopy(DEFAULT_GRIDS))

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


# ----------------------------------------------------------------------------------------------- naming
def _grid_tag(settings: MergeSettings, keys: Sequence[str]) -> str | None:
    grid = {k: settings.grids[k] for k in keys}
    if grid == {k: DEFAULT_GRIDS[k] for k in keys}:
        return None
    return "grid" + hashlib.sha1(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:8]


def settings_suffix(settings: MergeSettings) -> str:
    """Name parts for every setting that differs from the original's defaults (so that no two settings
    share a result file): selection split, seed, sample limits, estimator variants, grids, DARE options."""
    base = settings.base_method
    uses_data = base in DATA_METHODS
    parts: list[str] = []
    if settings.selection_split == "test":
        parts.append("select_test")
    if settings.seed != 0 and (uses_data or settings.is_dare):
        parts.append(f"seed{settings.seed}")
    if uses_data and settings.batch_size != 16:
        parts.append(f"bs{settings.batch_size}")
    if uses_data and settings.max_train_samples is not None:
        parts.append(f"maxtrain{settings.max_train_samples}")
    if settings.max_eval_samples is not None:
        parts.append(f"maxeval{settings.max_eval_samples}")
    if base == "fisher_merging":
        if settings.fisher_variant != "faithful":
            parts.append(f"fisher_{settings.fisher_variant}")
        if settings.normalize_fisher_weight:
            parts.append("normalized")
        if settings.minimal_fisher_weight != 1e-6:
            parts.append(f"minfw{settings.minimal_fisher_weight}")
    if base == "regmean_merging" and settings.regmean_exclude_padding:
        parts.append("regmean_exclude_padding")
    if base == "ties_merging" and settings.ties_trim_scope != "global":
        parts.append(f"trim_{settings.ties_trim_scope}")
    tag = _grid_tag(settings, METHOD_GRID_KEYS[base])
    if tag:
        parts.append(tag)
    if settings.is_dare:
        parts.append(f"rescale_{settings.use_weight_rescale}")
        if settings.mask_strategy != "random":
            parts.append(f"strategy_{settings.mask_strategy}")
        if settings.weight_format != "delta_weight":
            parts.append(f"weight_format_{settings.weight_format}")
        tag = _grid_tag(settings, ("weight_mask_rate",))
        if tag:
            parts.append("dare" + tag)
    return "".join(f"_{p}" for p in parts)


def method_folder(settings: MergeSettings) -> str:
    return f"mask_merging/{settings.mask_apply_method}" if settings.is_dare else settings.merging_method_name


def result_path(results_dir: str | Path, source: str, target: str, settings: MergeSettings) -> Path:
    """``{results_dir}/{src}_{tgt}/{method}[/{apply}]/{lm}{suffix}.json`` (the original's pattern + suffix)."""
    name = model_short_name(settings.language_model_name) + settings_suffix(settings)
    return Path(results_dir) / f"{source}_{target}" / method_folder(settings) / f"{name}.json"


def summary_path(results_dir: str | Path, settings: MergeSettings) -> Path:
    name = model_short_name(settings.language_model_name) + settings_suffix(settings)
    return Path(results_dir) / "summary" / method_folder(settings).replace("/", "_") / name


# ----------------------------------------------------------------------------------------------- grids
def grid_points(settings: MergeSettings) -> list[dict]:
    """Candidate hyper-parameters of the base method, in the result file's form (lists for per-model values)."""
    keys = METHOD_GRID_KEYS[settings.base_method]
    points = []
    for values in itertools.product(*(settings.grids[k] for k in keys)):
        hp: dict = {}
        for key, value in zip(keys, values):
            if key in ("fisher_scaling_coefficients", "nums_fisher_examples", "nums_regmean_examples"):
                hp[key] = [value, value]  # the same value for both models, as in the original
            else:
                hp[key] = value
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
    """``name → tensor`` over ``named_parameters()`` not matched by :data:`EXCLUDE_PARAM_NAMES_REGEX`."""
    from model_merging_methods.mask_weights_utils import is_excluded

    return {
        n: p.detach() for n, p in model.named_parameters() if not is_excluded(n, EXCLUDE_PARAM_NAMES_REGEX)
    }


def check_architectures(pretrained: nn.Module, models: dict[str, nn.Module]) -> None:
    """Same model type and the same merged parameter names and shapes, else a UserError."""
    ref_type = getattr(pretrained.config, "model_type", None)
    for label, model in models.items():
        model_type = getattr(model.config, "model_type", None)
        if model_type != ref_type:
            raise UserError(
                f"models of different architectures: {label} is {model_type}, the pretrained model {ref_type}"
            )
    labels = ["the pretrained model", *models]
    try:
        check_same_parameters(
            [kept_parameters(pretrained), *(kept_parameters(m) for m in models.values())], labels
        )
    except ValueError as exc:
        raise UserError(f"models of different architectures: {exc}") from None


def load_parameters_(model: nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Copy ``params`` into ``model``'s parameters of the same names (in place)."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in params.items():
            own[name].copy_(tensor)


class StatsCache:
    """A small LRU of per-model statistics (``{count: {name: tensor}}``, on the CPU)."""

    def __init__(self, max_entries: int = 4):
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


class PairMerger:
    """Merges ``[source, target]`` for one set of settings; Fisher / RegMean statistics on demand."""

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

    # statistics -------------------------------------------------------------------------------------
    def _counts(self) -> list[int]:
        key = (
            "nums_fisher_examples"
            if self.settings.base_method == "fisher_merging"
            else "nums_regmean_examples"
        )
        return sorted(set(int(n) for n in self.settings.grids[key]))

    def _masked_model(self, index: int, rate: float) -> nn.Module:
        s = self.settings
        masked = mask_model_weights(
            self.params[index], self.pretrained, weight_format=s.weight_format, weight_mask_rate=rate,
            use_weight_rescale=s.use_weight_rescale, mask_strategy=s.mask_strategy,
            exclude_param_names_regex=EXCLUDE_PARAM_NAMES_REGEX, seed=s.seed, model_index=index,
        )  # fmt: skip
        model = copy.deepcopy(self.models[index])
        load_parameters_(model, masked)
        return model

    def statistics(self, index: int, rate: float | None) -> dict[int, dict[str, torch.Tensor]]:
        """Statistics of model ``index`` (masked at ``rate`` for DARE + X) for every example count."""
        s, task = self.settings, self.tasks[index]
        kind = s.base_method
        variant = s.fisher_variant if kind == "fisher_merging" else s.regmean_exclude_padding
        key = (kind, variant, task, None if rate is None else (index, rate), tuple(self._counts()))

        def compute():
            if task not in self.train_datasets:
                raise UserError(f"no training data loaded for {task}")
            model = self.models[index] if rate is None else self._masked_model(index, rate)
            loader = make_dataloader(
                self.train_datasets[task], self.tokenizer, s.batch_size, shuffle=True, seed=s.seed
            )
            names = list(self.params[index])
            logger.info("collecting %s statistics of %s (%s examples)", kind, task, self._counts())
            if kind == "fisher_merging":
                stats = collect_fisher_weights_at(
                    model,
                    loader,
                    self._counts(),
                    param_names=names,
                    variant=s.fisher_variant,
                    batch_size=s.batch_size,
                )
            else:
                stats = collect_regmean_grams_at(
                    model,
                    loader,
                    self._counts(),
                    param_names=names,
                    exclude_padding=s.regmean_exclude_padding,
                )
            return {n: {k: v.cpu() for k, v in d.items()} for n, d in stats.items()}

        return self.cache.get(key, compute)

    # merging --------------------------------------------------------------------------------------
    def method_kwargs(self, hp: dict, rate: float | None) -> dict:
        s, base = self.settings, self.settings.base_method
        if base == "task_arithmetic":
            return {"scaling_coefficient": float(hp["scaling_coefficient"])}
        if base == "ties_merging":
            return {
                "scaling_coefficient": float(hp["scaling_coefficient"]),
                "param_value_mask_rate": float(hp["param_value_mask_rate"]),
                "trim_scope": s.ties_trim_scope,
            }
        if base == "fisher_merging":
            nums = hp["nums_fisher_examples"]
            return {
                "fisher_weights": [self.statistics(i, rate)[int(nums[i])] for i in range(len(self.models))],
                "fisher_scaling_coefficients": [float(c) for c in hp["fisher_scaling_coefficients"]],
                "normalize_fisher_weight": s.normalize_fisher_weight,
                "minimal_fisher_weight": s.minimal_fisher_weight,
            }
        if base == "regmean_merging":
            nums = hp["nums_regmean_examples"]
            return {
                "gram_matrices": [self.statistics(i, rate)[int(nums[i])] for i in range(len(self.models))],
                "reduce_non_diagonal_ratio": float(hp["reduce_non_diagonal_ratio"]),
            }
        return {}

    def merge(self, hp: dict) -> dict[str, torch.Tensor]:
        """The merged (non-excluded) parameters for the hyper-parameters ``hp``."""
        s = self.settings
        if s.is_dare:
            rate = float(hp["weight_mask_rate"])
            return mask_merging(
                self.pretrained, self.params, s.mask_apply_method, [rate] * len(self.params),
                use_weight_rescale=s.use_weight_rescale, mask_strategy=s.mask_strategy,
                weight_format=s.weight_format, seed=s.seed, exclude_param_names_regex=EXCLUDE_PARAM_NAMES_REGEX,
                **self.method_kwargs(hp, rate),
            )  # fmt: skip
        return merge_state_dicts(
            s.merging_method_name, self.pretrained, self.params, EXCLUDE_PARAM_NAMES_REGEX,
            **self.method_kwargs(hp, None),
        )  # fmt: skip


def search_pair(
    merger: PairMerger,
    candidates: Sequence[dict],
    evaluate,
    target: str,
    selection_split: str,
) -> dict:
    """Evaluate every candidate on ``selection_split``, keep the first strictly best, and (when selecting on
    validation) evaluate it on test. ``evaluate(params, split) -> eval_* metrics``.

    Returns ``{"hyperparameters", "selection_metrics", "test_metrics", "search"}``."""
    key = f"eval_{get_task(target).main_metric}"
    best, best_hp, best_params, search = None, None, None, []
    for hp in candidates:
        params = merger.merge(hp)
        metrics = evaluate(params, selection_split)
        search.append({**hp, f"{selection_split}_{key[5:]}": metrics.get(key)})
        logger.info("%s %s: %s on %s = %s", target, hp, key, selection_split, metrics.get(key))
        if is_better(metrics, best, key):
            best, best_hp, best_params = metrics, hp, params
    test_metrics = best if selection_split == "test" else evaluate(best_params, "test")
    return {
        "hyperparameters": best_hp,
        "selection_metrics": best,
        "test_metrics": test_metrics,
        "search": search,
    }
