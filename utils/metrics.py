"""GLUE metrics with scikit-learn / SciPy (no metric downloads), as the HF ``evaluate`` "glue" metric names them.

* cola → ``matthews_correlation``; sst2, mnli, qnli, rte → ``accuracy``; mrpc, qqp → ``accuracy`` + ``f1``;
  stsb → ``pearson`` + ``spearmanr``.
* Whenever a task returns more than one value, ``averaged_scores`` = their arithmetic mean.
* Every classification task also reports ``accuracy`` (for CoLA an extra key, outside ``averaged_scores``), so
  FusionBench's "accuracy on every task" can be read from any result.
* Main metric (selection and reporting): see :data:`utils.glue_data_loader.GLUE_TASKS` (``averaged_scores``
  for mrpc, stsb and qqp).
* Predictions: ``argmax`` over the logits when there is more than one column, else the regression value.

Degenerate inputs: a correlation with a constant prediction or reference vector is undefined (SciPy gives
NaN); it is reported as 0.0 here, as scikit-learn's Matthews correlation already does.
Rounding to 4 decimals (spec §1.5) happens when results are written (:func:`utils.results_io.round_floats`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from utils.glue_data_loader import TASK_BY_ID, get_task


def _correlation(fn, predictions: np.ndarray, references: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(predictions, references)[0])
    return 0.0 if math.isnan(value) else value


def glue_scores(task_name: str, predictions: Sequence, references: Sequence) -> dict[str, float]:
    """The GLUE metric values of one task (plus ``averaged_scores`` for two-valued tasks)."""
    task = get_task(task_name)
    preds, refs = np.asarray(predictions), np.asarray(references)
    if preds.shape != refs.shape:
        raise ValueError(f"predictions {preds.shape} and references {refs.shape} differ in shape")
    if len(preds) == 0:
        raise ValueError("no predictions to score")
    scores: dict[str, float] = {}
    for name in task.metric_names:
        if name == "matthews_correlation":
            scores[name] = float(matthews_corrcoef(refs.astype(np.int64), preds.astype(np.int64)))
        elif name == "accuracy":
            scores[name] = float(accuracy_score(refs.astype(np.int64), preds.astype(np.int64)))
        elif name == "f1":
            scores[name] = float(f1_score(refs.astype(np.int64), preds.astype(np.int64)))
        elif name == "pearson":
            scores[name] = _correlation(pearsonr, preds.astype(np.float64), refs.astype(np.float64))
        elif name == "spearmanr":
            scores[name] = _correlation(spearmanr, preds.astype(np.float64), refs.astype(np.float64))
        else:  # pragma: no cover - the table above is closed
            raise ValueError(f"unknown metric {name}")
    if len(scores) > 1:
        scores["averaged_scores"] = float(np.mean(list(scores.values())))
    if not task.is_regression and "accuracy" not in scores:  # CoLA: accuracy too (FusionBench reports it)
        scores["accuracy"] = float(accuracy_score(refs.astype(np.int64), preds.astype(np.int64)))
    return scores


def predictions_from_logits(logits: np.ndarray) -> np.ndarray:
    """``argmax`` over the last axis when it has more than one column, else the squeezed regression value."""
    logits = np.asarray(logits)
    if logits.ndim == 2 and logits.shape[1] > 1:
        return logits.argmax(axis=1)
    return logits.reshape(-1)


def main_metric_value(task_name: str, scores: dict[str, float], prefix: str = "") -> float:
    return scores[prefix + get_task(task_name).main_metric]


def single_task_compute_metrics(task_name: str) -> Callable:
    """A ``compute_metrics`` function for the HF ``Trainer`` of one task."""
    get_task(task_name)

    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return glue_scores(task_name, predictions_from_logits(logits), np.asarray(labels).reshape(-1))

    return compute


def multitask_scores(logits: np.ndarray, dataset_ids: np.ndarray, labels: np.ndarray) -> dict:
    """Multi-task metrics: group rows by dataset id, slice each group's logits to the task's ``num_labels``
    columns (classification labels as int64, regression column 0) and score it.

    Returns ``{"averaged_scores": mean of the tasks' main metrics, "all_results": [per-task dicts]}``."""
    logits, dataset_ids, labels = np.asarray(logits), np.asarray(dataset_ids).reshape(-1), np.asarray(labels)
    labels = labels.reshape(-1)
    all_results, mains = [], []
    for dataset_id in sorted(set(int(i) for i in dataset_ids)):
        task = TASK_BY_ID[dataset_id]
        rows = dataset_ids == dataset_id
        if task.is_regression:
            preds, refs = logits[rows, 0], labels[rows].astype(np.float64)
        else:
            preds, refs = logits[rows, : task.num_labels].argmax(axis=1), labels[rows].astype(np.int64)
        scores = glue_scores(task.name, preds, refs)
        mains.append(scores[task.main_metric])
        all_results.append({"dataset_name": task.name, **scores})
    return {"averaged_scores": float(np.mean(mains)), "all_results": all_results}


def multitask_compute_metrics() -> Callable:
    """A ``compute_metrics`` for the multi-task ``Trainer`` (``label_ids`` = ``(dataset_ids, labels)``)."""

    def compute(eval_pred) -> dict:
        logits = eval_pred.predictions
        if isinstance(logits, tuple):
            logits = logits[0]
        dataset_ids, labels = eval_pred.label_ids
        return multitask_scores(logits, dataset_ids, labels)

    return compute


def flatten_multitask_results(metrics: dict, prefix: str = "eval_") -> dict:
    """Add ``"{task}_{main metric}"`` keys (e.g. ``cola_matthews_correlation``) for every per-task result
    list in ``metrics`` (spec §2.1 step 6)."""
    out = dict(metrics)
    for value in metrics.values():
        if isinstance(value, list):
            for entry in value:
                if isinstance(entry, dict) and "dataset_name" in entry:
                    main = get_task(entry["dataset_name"]).main_metric
                    out[f"{entry['dataset_name']}_{main}"] = entry[main]
    return out
