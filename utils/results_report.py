"""Results JSON files → uniform records → the paper's tables and plots.

A *record* is one number with its context (a flat dict):

``kind``      ``"dare"`` (one model, possibly with delta parameters dropped), ``"merge"`` (a merged model) or
              ``"model"`` (a model evaluated as is, e.g. a pre-trained base);
``model``     the model (for DARE: the fine-tuned model; for merges: the merged group, e.g. ``instruct_math``);
``method``    merges: a readable label (``task arithmetic (λ=1.0)``, ``DARE p=0.9 + TIES``);
``dataset``   the evaluated task/skill;  ``metric``, ``value``;
``drop_rate``, ``variant`` (``DARE``, ``DropOnly``, ``magnitude``, ``magnitude+rescale``, ``DARE on weights``,
              ...) and ``seed`` for DARE records;  ``source``: the file it came from.

Readers (:func:`records_from_file`) understand
* the quickstart's ``results.json`` (``"schema": "dare-toolkit/quickstart-results/v1"``, records inside);
* GLUE results written by ``train_plms_glue.py`` and ``inference_plms_glue.py``
  (``{task}/{save_name}/{save_name}.json``, HF ``eval_*`` keys, settings in the original save name
  ``{lm}_lr{lr}_inference_mask_{p}[_rescale_{b}][_strategy_magnitude][_weight_format_finetuned_weight][_seed{s}]``)
  and by ``merge_plms_glue.py`` (``{src}_{tgt}/{method}[/{apply}]/{lm}.json``; ``--merge_mode all``:
  ``all_{tasks}/...`` with ``test_scores`` per task, and the fine-tuned models' ``all_{tasks}/finetuned/``);
* LLM results written by ``utils.llm_evaluation.evaluate_model`` (``results.json`` with ``dataset`` and
  ``save_name``; DARE save names as above; merge save names with ``average_merging``, ``task_arithmetic_...``,
  ``ties_merging_...`` or ``mask_merging/{apply}/mask_{p1}_{p2}...``).
Files that are none of these are skipped with a reason. A results file that carries a ``settings`` object
(:mod:`utils.run_settings`; every file written by this version of the scripts) is read from it
(:func:`settings_record`): the names above are parsed only for older files.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from model_merging_methods.registry import all_methods
from utils.run_names import GLUE_UNNAMED_MASK_SEED

QUICKSTART_SCHEMA = "dare-toolkit/quickstart-results/v1"

GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte")
# main metric per GLUE task (spec §5.3); utils.glue_data_loader is preferred when importable
_GLUE_MAIN_METRIC = {
    "cola": "matthews_correlation",
    "sst2": "accuracy",
    "mrpc": "averaged_scores",
    "stsb": "averaged_scores",
    "qqp": "averaged_scores",
    "mnli": "accuracy",
    "qnli": "accuracy",
    "rte": "accuracy",
}
LLM_DATASETS = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")
# every registered merging method (the paper's five first) and its label, from the method registry
MERGE_METHODS = tuple(m.name for m in all_methods())
METHOD_LABELS = {m.name: m.label for m in all_methods()}

# the mask seed of a GLUE DARE file without a seed in its name: the original's implicit seed (HF Trainer's
# set_seed(42)), inference_plms_glue.py's default before every script's became 0; names still omit it (run_names)
LEGACY_GLUE_MASK_SEED = GLUE_UNNAMED_MASK_SEED

_DARE_NAME = re.compile(
    r"^(?P<model>.+?)_inference_mask_(?P<rate>[0-9.eE+-]+?)(?:_rescale_(?P<rescale>True|False))?(?P<rest>(?:_.*)?)$"
)


def glue_main_metric(task: str) -> str:
    try:
        from utils.glue_data_loader import get_task

        return get_task(task).main_metric
    except Exception:  # noqa: BLE001 - the GLUE module is optional here
        return _GLUE_MAIN_METRIC[task]


def dare_variant(
    rate: float, rescale: bool, strategy: str = "random", weight_format: str = "delta_weight"
) -> str:
    """The paper's name of a masking setting: rate 0 → ``fine-tuned``; random + rescale → ``DARE``; random without
    rescale → ``DropOnly``; magnitude → ``magnitude`` (``+rescale``); masking the weights → ``... on weights``."""
    if rate == 0.0:
        return "fine-tuned"
    if strategy == "magnitude":
        name = "magnitude+rescale" if rescale else "magnitude"
    else:
        name = "DARE" if rescale else "DropOnly"
    if weight_format == "finetuned_weight":
        name += " on weights"
    return name


def parse_dare_name(name: str, default_seed: int = 0) -> dict[str, Any] | None:
    """Settings encoded in the original's DARE save name, or None when ``name`` is not one. The seed is spelled
    ``_seed_7`` (LLM) or ``_seed7`` (GLUE); a name without one was made with ``default_seed`` (LLM files: 0; GLUE
    files: 42, the original's implicit seed and this toolkit's GLUE default before every script's became 0)."""
    m = _DARE_NAME.match(name)
    if not m:
        return None
    try:
        rate = float(m.group("rate"))
    except ValueError:
        return None
    rest = m.group("rest") or ""
    rescale = m.group("rescale") == "True"
    strategy = "magnitude" if "_strategy_magnitude" in rest else "random"
    weight_format = "finetuned_weight" if "_weight_format_finetuned_weight" in rest else "delta_weight"
    seed_m = re.search(r"_seed_?(\d+)", rest)
    model = re.sub(r"_lr[0-9.eE+-]+$", "", m.group("model"))
    if "_llama_2_as_backbone" in rest:
        model += " (vs Llama-2)"
    return {
        "model": model,
        "drop_rate": rate,
        "use_weight_rescale": rescale,
        "mask_strategy": strategy,
        "weight_format": weight_format,
        "seed": int(seed_m.group(1)) if seed_m else default_seed,
        "variant": dare_variant(rate, rescale, strategy, weight_format),
    }


def _fmt_num(x: str) -> str:
    try:
        return f"{float(x):g}"
    except ValueError:
        return x


def merge_label(parts: Sequence[str]) -> str | None:
    """A readable merge label from path/save-name components, e.g. ``DARE p=0.9 + task arithmetic (λ=1)``;
    None when no merging method is named."""
    text = "/".join(parts)

    def plain(t: str) -> str | None:
        for method in MERGE_METHODS:
            if method in t:
                label = METHOD_LABELS[method]
                extra = []
                lam = re.search(r"scaling_coefficient_([0-9.eE+-]+?)(?=_|/|$)", t)
                trim = re.search(r"param_value_mask_rate_([0-9.eE+-]+?)(?=_|/|$)", t)
                if trim:
                    extra.append(f"trim {_fmt_num(trim.group(1))}")
                if lam:
                    extra.append(f"λ={_fmt_num(lam.group(1))}")
                return label + (f" ({', '.join(extra)})" if extra else "")
        return None

    if "mask_merging" in text:
        after = text.split("mask_merging", 1)[1]
        base = plain(after) or "?"
        rates = re.search(r"mask_([0-9.]+(?:_[0-9.]+)*)(?=_rescale|/|$)", after)
        rate_txt = ""
        if rates:
            vals = sorted({_fmt_num(r) for r in rates.group(1).split("_") if r})
            rate_txt = f" p={'/'.join(vals)}"
        variant = "DARE"
        if "_rescale_False" in after:
            variant = "DropOnly"
        if "strategy_magnitude" in after:
            variant = "magnitude"
        return f"{variant}{rate_txt} + {base}"
    return plain(text)


_PARAM_TEXT = {"param_value_mask_rate": "trim {}", "scaling_coefficient": "λ={}"}


def method_label(method: str, params: Mapping[str, Any] | None = None) -> str:
    """A merge label from a method name and its settings: the registry's label, then λ and the trim rate (always,
    as the original's names carry them) and every other parameter that differs from its default."""
    from model_merging_methods.registry import get_method

    try:
        spec = get_method(method)
    except ValueError:
        return method
    params = dict(params or {})
    order = spec.name_order or tuple(p.name for p in spec.params)
    # the method's own parameters, then those of its data statistics (e.g. Fisher's example counts)
    declared = [spec.param(n) for n in order] + [
        p for stat in spec.data_statistics for p in stat.params if p.name not in order
    ]
    shown = []
    for param in sorted(
        declared, key=lambda p: (p.name != "param_value_mask_rate", p.name != "scaling_coefficient")
    ):
        name = param.name
        if name not in params or params[name] is None:
            continue
        value = params[name]
        text = "/".join(_fmt_num(str(v)) for v in value) if isinstance(value, list) else _fmt_num(str(value))
        if name in _PARAM_TEXT:
            shown.append(_PARAM_TEXT[name].format(text))
        elif value != param.default and not (isinstance(value, list) and set(value) == {param.default}):
            shown.append(f"{param.short or param.name}={text}")
    return spec.label + (f" ({', '.join(shown)})" if shown else "")


def _draws_random(method: str) -> bool:
    """Whether a merging method draws random numbers (its results depend on the seed)."""
    from model_merging_methods.registry import get_method

    try:
        return get_method(method).random
    except ValueError:
        return False


def _dare_text(dare: Mapping[str, Any]) -> tuple[str, list[float]]:
    rates = dare.get("weight_mask_rate")
    rates = [float(r) for r in (rates if isinstance(rates, list) else [rates])]
    variant = dare_variant(
        max(rates), bool(dare.get("use_weight_rescale")), str(dare.get("mask_strategy", "random")),
        str(dare.get("weight_format", "delta_weight")),
    )  # fmt: skip
    return variant, rates


def settings_record(
    settings: Any, dataset: str, metric: str, value: float, path: Path
) -> dict[str, Any] | None:
    """The record of a result whose file carries a ``settings`` object (:mod:`utils.run_settings`), or None for an
    older file without one (its names are parsed instead)."""
    from utils.run_settings import SETTINGS_SCHEMA

    if not isinstance(settings, dict) or settings.get("schema") != SETTINGS_SCHEMA:
        return None
    common = {"dataset": dataset, "metric": metric, "value": value, "source": str(path)}
    model = str(settings.get("model") or "?")
    dare, merge = settings.get("dare"), settings.get("merge")
    if settings.get("kind") == "merge" and isinstance(merge, dict):
        label = method_label(str(merge.get("method")), merge.get("params"))
        seed = None
        if isinstance(dare, dict):
            variant, rates = _dare_text(dare)
            label = f"{variant} p={'/'.join(sorted({_fmt_num(str(r)) for r in rates}))} + {label}"
            seed = dare.get("seed")
        elif _draws_random(str(merge.get("method"))) and isinstance(settings.get("flags"), dict):
            seed = settings["flags"].get("seed")
        record = {"kind": "merge", "model": model, "method": label, **common}
        return record | ({"seed": seed} if isinstance(seed, int) else {})
    if isinstance(dare, dict):  # a DARE'd model; at rate 0 the fine-tuned model, the p = 0 point of its sweep
        variant, rates = _dare_text(dare)
        return {
            "kind": "dare", "model": model, "drop_rate": max(rates), "variant": variant,
            "seed": int(dare.get("seed", 0)), **common,
        }  # fmt: skip
    if settings.get("kind") == "train" and isinstance(settings.get("training_seed"), int):
        return {"kind": "model", "model": model, "seed": settings["training_seed"], **common}
    return {"kind": "model", "model": model, **common}


def _read(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool, string, list, null, NaN or infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        x = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return x if math.isfinite(x) else None


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float | int):
        return f"the number {value!r}" if _number(value) is not None else f"{value!r} (not a finite number)"
    return {list: "a list", dict: "an object", str: "a string"}.get(type(value), type(value).__name__)


def _dare_or_model_record(
    name: str, model: str, dataset: str, metric: str, value: float, path: Path, default_seed: int = 0
) -> list[dict[str, Any]]:
    """A ``dare`` record when ``name`` is a DARE'd model's name (:func:`parse_dare_name`), else a ``model`` record
    for ``model``."""
    d = parse_dare_name(name, default_seed)
    if d is not None:
        return [
            {
                "kind": "dare",
                "model": d["model"],
                "dataset": dataset,
                "metric": metric,
                "value": value,
                "drop_rate": d["drop_rate"],
                "variant": d["variant"],
                "seed": d["seed"],
                "source": str(path),
            }
        ]
    return [
        {
            "kind": "model",
            "model": model,
            "dataset": dataset,
            "metric": metric,
            "value": value,
            "source": str(path),
        }
    ]


def _glue_records(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    parts = list(path.parts)
    task, pair = None, None
    for p in reversed(parts[:-1]):
        if "_" in p and all(t in GLUE_TASKS for t in p.split("_")) and len(p.split("_")) == 2:
            pair = p.split("_")
            task = pair[1]
            break
        if p in GLUE_TASKS:
            task = p
            break
    if task is None:
        return []
    metric = glue_main_metric(task)
    key = f"eval_{metric}"
    if key not in data:
        return []
    value = _number(data[key])
    if value is None:
        raise _BadMetric(f"metric {key} is {_describe(data[key])}, not a number")
    from_settings = settings_record(data.get("settings"), task, metric, value, path)
    if from_settings is not None:
        return [from_settings]
    comps = [c for c in parts[:-1] if c not in (".",)]
    label = merge_label(comps) if pair else None
    if pair and label:
        return [
            {
                "kind": "merge",
                "model": f"{pair[0]}+{pair[1]}",
                "settings": path.stem,
                "method": label,
                "dataset": task,
                "metric": metric,
                "value": value,
                "source": str(path),
            }
        ]
    model = re.sub(r"_lr[0-9.eE+-]+(_run\d+)?$", r" fine-tuned\1", path.stem)
    return _dare_or_model_record(path.stem, model, task, metric, value, path, LEGACY_GLUE_MASK_SEED)


def _all_tasks_records(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Records of an N-task GLUE merge (``merge_plms_glue.py --merge_mode all``): each task's test score of the
    merged model, or of the fine-tuned models (the reference file ``all_{tasks}/finetuned/*.json``)."""
    tasks, scores = data.get("tasks"), data.get("test_scores")
    if not isinstance(tasks, list) or not isinstance(scores, dict):
        return []
    keys = data.get("score_keys") if isinstance(data.get("score_keys"), dict) else {}
    finetuned = data.get("method") == "fine-tuned (individual)"
    records = []
    for task in tasks:
        if task not in scores or not isinstance(task, str):
            continue
        value = _number(scores[task])
        if value is None:
            if scores[task] is None:  # not scored (e.g. no finite metric): nothing to report
                continue
            raise _BadMetric(f"test score of {task[:40]} is {_describe(scores[task])}, not a number")
        key = keys.get(task)
        metric = key[5:] if isinstance(key, str) and key.startswith("eval_") else glue_main_metric(task)
        rec = settings_record(data.get("settings"), task, metric, value, path)
        if rec is None:  # an older file: its own fields
            common = {"dataset": task, "metric": metric, "value": value, "source": str(path)}
            if finetuned:
                rec = {"kind": "model", "model": "fine-tuned (individual)", **common}
            else:
                label = data.get("method") if isinstance(data.get("method"), str) else "?"
                rec = {
                    "kind": "merge",
                    "model": "all_" + "_".join(map(str, tasks)),
                    "method": label,
                    **common,
                }
        records.append(rec)
    return records


def llm_metric(dataset: str, data: dict[str, Any]) -> tuple[str, float] | None:
    """The headline metric of an LLM results JSON: GSM8K ``accuracy``; MATH ``accuracy_math_verify`` when present,
    else ``accuracy_original``; code ``pass@1``; AlpacaEval a judged ``win_rate`` if someone added one."""
    candidates = {
        "gsm8k": ("accuracy", "accuracy_original"),
        "MATH": ("accuracy_math_verify", "accuracy_original", "accuracy"),
        "human_eval": ("pass@1",),
        "mbpp": ("pass@1",),
        "alpaca_eval": ("win_rate", "length_controlled_winrate"),
    }.get(dataset, ("accuracy",))
    for k in candidates:
        value = _number(data.get(k))
        if value is not None:
            return k, value
    return None


def _llm_records(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    dataset = data.get("dataset")
    if not isinstance(dataset, str) or dataset not in LLM_DATASETS:
        return []
    mv = llm_metric(dataset, data)
    if mv is None:
        return []
    metric, value = mv
    from_settings = settings_record(data.get("settings"), dataset, metric, value, path)
    if from_settings is not None:
        return [from_settings]
    save_name = str(data.get("save_name") or path.parent.name)
    comps = save_name.split("/")
    label = merge_label(comps)
    if label is not None:
        group = comps[0] if len(comps) > 1 and merge_label(comps[:1]) is None else "merged"
        return [
            {
                "kind": "merge",
                "model": group,
                "method": label,
                "dataset": dataset,
                "metric": metric,
                "value": value,
                "source": str(path),
            }
        ]
    return _dare_or_model_record(comps[-1], save_name, dataset, metric, value, path)


class _BadMetric(ValueError):
    """A results file whose metric has the wrong type (null, a list, a string, NaN...)."""


_RECORD_TEXT = ("model", "dataset", "metric")


def _check_quickstart_record(i: int, r: Any) -> dict[str, Any]:
    """A quickstart record with the fields the tables use, of the right types; else :class:`_BadMetric`."""
    if not isinstance(r, dict):
        raise _BadMetric(f"record {i} is {_describe(r)}, not an object")
    if r.get("kind") not in ("dare", "merge", "model"):
        raise _BadMetric(f"record {i} has kind {str(r.get('kind'))[:40]!r} (expected dare, merge or model)")
    for k in _RECORD_TEXT:
        if not isinstance(r.get(k), str):
            raise _BadMetric(f"record {i} field {k} is {_describe(r.get(k))}, not text")
    value = _number(r.get("value"))
    if value is None:
        raise _BadMetric(f"record {i} value is {_describe(r.get('value'))}, not a number")
    out = dict(r, value=value)
    if r["kind"] == "dare":
        rate = _number(r.get("drop_rate"))
        if rate is None or not 0.0 <= rate <= 1.0:
            raise _BadMetric(f"record {i} drop_rate is {_describe(r.get('drop_rate'))}, not a rate in [0, 1]")
        if not isinstance(r.get("variant"), str):
            raise _BadMetric(f"record {i} field variant is {_describe(r.get('variant'))}, not text")
        out["drop_rate"] = rate
    if r["kind"] == "merge" and not isinstance(r.get("method", ""), str):
        raise _BadMetric(f"record {i} field method is {_describe(r.get('method'))}, not text")
    return out


def records_from_file(path: str | Path) -> tuple[list[dict[str, Any]], str | None]:
    """(records, None) for a results file this module understands, else ([], reason). Never raises for a bad
    file: unreadable, not UTF-8, not JSON, or a metric that is null, a list, a string or not finite are reasons."""
    path = Path(path)
    try:
        data = _read(path)
    except UnicodeDecodeError as exc:
        return [], f"not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        return [], f"not readable ({exc.strerror or exc})"
    except (ValueError, RecursionError) as exc:
        return [], f"not valid JSON ({str(exc)[:200]})"
    if not isinstance(data, dict):
        return [], "not a JSON object"
    try:
        if data.get("schema") == QUICKSTART_SCHEMA:
            recs = data.get("records", [])
            if not isinstance(recs, list):
                return [], f"records is {_describe(recs)}, not a list"
            return [dict(_check_quickstart_record(i, r), source=str(path)) for i, r in enumerate(recs)], None
        if data.get("merge_mode") == "all":
            recs = _all_tasks_records(path, data)
            return (recs, None) if recs else ([], "an N-task GLUE merge without test scores")
        if any(isinstance(k, str) and k.startswith("eval_") for k in data):
            recs = _glue_records(path, data)
            return (recs, None) if recs else ([], "GLUE-like metrics but no GLUE task in the path")
        if "dataset" in data:
            recs = _llm_records(path, data)
            if recs:
                return recs, None
            return [], _no_llm_metric_reason(data)
    except _BadMetric as exc:
        return [], str(exc)
    return [], "unknown results format"


def _no_llm_metric_reason(data: dict[str, Any]) -> str:
    dataset = data.get("dataset")
    if not isinstance(dataset, str):
        return f"dataset is {_describe(dataset)}, not a dataset name"
    bad = [
        f"{k} is {_describe(data[k])}"
        for k in ("accuracy", "accuracy_original", "accuracy_math_verify", "pass@1", "win_rate")
        if k in data and data[k] is not None and _number(data[k]) is None
    ]
    if bad:
        return f"no usable metric for dataset {dataset!r}: {', '.join(bad)}"
    return f"no scored metric for dataset {dataset[:80]!r}"


def collect_records(
    paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Records of every ``*.json`` under the given files/folders, and the (file, reason) pairs that were skipped.
    Files ending in ``manifest.json``, ``generation_config.json`` or ``config.json`` are ignored silently, and so
    is everything under the folders in ``exclude`` (e.g. the report's own output folder)."""
    excluded = [Path(os.path.realpath(e)) for e in exclude]

    def is_excluded(q: Path) -> bool:
        real = Path(os.path.realpath(q))
        return any(real == e or e in real.parents for e in excluded)

    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(q for q in p.rglob("*.json") if q.is_file() and not is_excluded(q))
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise FileNotFoundError(f"not a regular file or folder: {p}")
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    ignore = (
        "manifest.json",
        "config.json",
        "tokenizer.json",
        "special_tokens_map.json",
        "stats.json",
        "trainer_state.json",
        "toy_family_stage.json",
        ".dare_toolkit_output.json",  # model_merging_methods.paths.OWNER_MARKER
        "alpaca_eval_outputs.json",  # the LLM harness files (utils.llm_evaluation.HARNESS_FILES)
        "mbpp_bigcode_generations.json",
    )
    records, skipped = [], []
    for f in files:
        if f.name.endswith(ignore) or "/summary/" in f.as_posix() or "/cache/" in f.as_posix():
            continue
        recs, reason = records_from_file(f)
        if reason is not None:
            skipped.append((printable(str(f)), printable(reason)))
        records += [{k: printable(v) if isinstance(v, str) else v for k, v in r.items()} for r in recs]
    return records, skipped


def printable(text: str) -> str:
    """``text`` unchanged when it can be written as UTF-8; else with its lone surrogates (a ``\\ud800`` escape in
    a JSON file, a file name that is not UTF-8) written as ``\\udcXX`` escapes, so tables, plots and messages
    can always be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _col(variant: str, rate: float) -> str:
    return f"{variant} p={rate:g}"


def dare_table(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, dataset, metric): ``p=0`` (the fine-tuned model), then DARE at each rate, then the
    ablations (``DropOnly p=0.9``...), each the mean over mask seeds; ``seeds`` is the largest seed count."""
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    cols: dict[str, tuple] = {}
    for r in records:
        if r.get("kind") != "dare":
            continue
        key = (r["model"], r["dataset"], r["metric"])
        rate = float(r["drop_rate"])
        col = "p=0" if rate == 0.0 else _col(r["variant"], rate)
        order = (0, 0.0) if rate == 0.0 else (0 if r["variant"] == "DARE" else 1, r["variant"], rate)
        cols[col] = order
        groups[key][col].append(float(r["value"]))
    ordered = sorted(
        cols, key=lambda c: tuple(str(x) if isinstance(x, str) else f"{x:012.6f}" for x in cols[c])
    )
    rows = []
    for (model, dataset, metric), by_col in groups.items():
        row: dict[str, Any] = {"model": model, "dataset": dataset, "metric": metric}
        for c in ordered:
            row[c] = _mean(by_col[c]) if by_col.get(c) else None
        row["seeds"] = max(len(v) for v in by_col.values())
        rows.append(row)
    return rows


def retention_table(dare_rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The DARE table as a share of the fine-tuned model's score (``value / p=0``); None where p=0 is 0/absent."""
    out = []
    for row in dare_rows:
        ref = row.get("p=0")
        new = {k: row[k] for k in ("model", "dataset", "metric")}
        for k, v in row.items():
            if k in ("model", "dataset", "metric", "seeds", "p=0"):
                continue
            new[k] = (v / ref) if (v is not None and ref) else None
        out.append(new)
    return out


def keeps_fraction_up_to(row: dict[str, Any], fraction: float = 0.95, variant: str = "DARE") -> float | None:
    """The largest drop rate r such that ``variant`` keeps ≥ ``fraction`` of p=0 at every rate ≤ r (0.0 when it
    fails at the first rate; None without a p=0 reference)."""
    ref = row.get("p=0")
    if not ref:
        return None
    rates = sorted(
        float(k.split("p=")[1]) for k in row if k.startswith(f"{variant} p=") and row[k] is not None
    )
    best = 0.0
    for rate in rates:
        if row[_col(variant, rate)] >= fraction * ref:
            best = rate
        else:
            break
    return best


def _method_rank(label: str) -> tuple[int, int, str]:
    """Sort key of merge labels: plain methods before their DARE versions, methods in the paper's order."""
    base = label.split(" + ", 1)[1] if " + " in label else label
    names = [METHOD_LABELS[m] for m in MERGE_METHODS]
    idx = next((i for i, n in enumerate(names) if base.startswith(n)), len(names))
    return (1 if " + " in label else 0, idx, label)


def merge_table(
    records: Iterable[dict[str, Any]], references: Iterable[dict[str, Any]] = ()
) -> tuple[list[dict[str, Any]], list[str]]:
    """The merge matrix. Rows: the ``references`` first (records of models evaluated as they are, e.g. the base and
    each specialist), then one row per merge method (and merged group when there are several). Columns: the
    datasets; or, when every merged group was evaluated on one dataset only (GLUE pairs, where only the target task
    is scored), one column per ``group→dataset``. Cells are means over repeated records. Returns (rows, columns).
    """
    references = list(references)
    merges = [r for r in records if r.get("kind") == "merge"]
    group_ds: dict[str, list[str]] = {}
    for r in merges:
        ds = group_ds.setdefault(r["model"], [])
        if r["dataset"] not in ds:
            ds.append(r["dataset"])
    pivot = len(group_ds) > 1 and all(len(ds) == 1 for ds in group_ds.values())
    columns: list[tuple[str | None, str]] = []
    if pivot:
        columns = [(g, ds[0]) for g, ds in group_ds.items()]
    else:
        for r in references + merges:
            if (None, r["dataset"]) not in columns:
                columns.append((None, r["dataset"]))
    labels = [f"{g}→{d}" if g is not None else d for g, d in columns]
    cells: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    order: list[str] = []
    for r in references:
        order.append(r["model"]) if r["model"] not in order else None
        for j, (_, d) in enumerate(columns):
            if d == r["dataset"]:
                cells[r["model"]][j].append(float(r["value"]))
    for r in merges:
        name = r.get("method") or r["model"]
        if not pivot and len(group_ds) > 1:
            name = f"{name} [{r['model']}]"
        order.append(name) if name not in order else None
        j = columns.index((r["model"], r["dataset"]) if pivot else (None, r["dataset"]))
        cells[name][j].append(float(r["value"]))
    n_refs = len({r["model"] for r in references})
    order = order[:n_refs] + sorted(order[n_refs:], key=_method_rank)
    rows = []
    for name in order:
        row: dict[str, Any] = {"model": name}
        for j, label in enumerate(labels):
            row[label] = _mean(cells[name][j]) if cells[name].get(j) else None
        rows.append(row)
    return rows, labels


def records_table(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    cols = (
        "kind",
        "model",
        "method",
        "dataset",
        "metric",
        "value",
        "drop_rate",
        "variant",
        "seed",
        "settings",
        "source",
    )
    return [{c: r.get(c) for c in cols} for r in records]


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------


def drop_rate_plot_data(
    records: Iterable[dict[str, Any]],
) -> dict[str, tuple[dict[str, dict[float, float]], dict[str, dict[str, float]]]]:
    """Per dataset: (curves ``{model [variant]: {rate: mean value}}``, markers ``{curve: {label: value}}``).
    DARE (and any variant with two or more rates) becomes a curve through p=0; a variant with one rate becomes a
    marker on its model's DARE curve."""
    vals: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.get("kind") == "dare":
            vals[(r["dataset"], r["model"], r["variant"], float(r["drop_rate"]))].append(float(r["value"]))
    out: dict[str, tuple[dict, dict]] = {}
    by_ds: dict[str, dict[tuple[str, str], dict[float, float]]] = defaultdict(lambda: defaultdict(dict))
    for (ds, model, variant, rate), v in vals.items():
        by_ds[ds][(model, variant)][rate] = _mean(v)
    for ds, series in by_ds.items():
        curves: dict[str, dict[float, float]] = {}
        markers: dict[str, dict[str, float]] = defaultdict(dict)
        models = sorted({m for m, _ in series})
        for model in models:
            p0 = series.get((model, "fine-tuned"), {})
            dare = {**p0, **series.get((model, "DARE"), {})}
            if dare:
                curves[model] = dare
        for (model, variant), pts in sorted(series.items()):
            if variant in ("fine-tuned", "DARE"):
                continue
            if len(pts) >= 2:
                curves[f"{model} [{variant}]"] = {**series.get((model, "fine-tuned"), {}), **pts}
            else:
                ((rate, value),) = pts.items()
                target = model if model in curves else next(iter(curves), model)
                markers[target][f"{variant} p={rate:g}"] = value
        out[ds] = (curves, dict(markers))
    return out
