"""Run names: the one place that encodes settings into folder and file names.

Names only keep runs apart on disk; what a run did is recorded as data (the ``settings`` object in its results and
the manifest), and reports read that first. A method's part of a name is derived from its declaration: the method
name, then ``_<parameter>_<value>`` for each parameter in the declaration's ``name_order`` (default: declaration
order), which reproduces the original's names (``task_arithmetic_scaling_coefficient_1.0``,
``ties_merging_param_value_mask_rate_0.8_scaling_coefficient_1.0_trim_global``).

Every script's names come from here: DARE'd models (:func:`dare_name`), GLUE fine-tuned models
(:func:`glue_model_name`), GLUE merges (:func:`glue_merge_suffix`, :func:`glue_common_suffix`,
:func:`glue_method_folder`), LLM merges (:func:`llm_merge_name`) and the GLUE story's folders. Names omit a setting
at its default; the mask seed's default is :data:`DEFAULT_MASK_SEED` (0) in every script. The GLUE names spell a
seed ``_seed7`` and the LLM names ``_seed_7`` (their existing schemes, kept so that existing results keep their
names): reports never depend on it for files that carry ``settings``, and parse both spellings for older files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from model_merging_methods.registry import get_method
from utils.method_cli import DARE_SEED_DEFAULT


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "_".join(_value(v) for v in value)
    return str(value)


def method_run_name(method_name: str, params: Mapping[str, Any]) -> str:
    """``<method>`` followed by ``_<parameter>_<value>`` for each of its parameters (those given in ``params``)."""
    method = get_method(method_name)
    order = method.name_order or tuple(p.name for p in method.params)
    parts = [method.name]
    for name in order:
        if name in params and params[name] is not None:
            param = method.param(name)
            parts.append(f"{param.short or param.name}_{_value(params[name])}")
    return "_".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# DARE'd single models (inference_plms_glue.py, inference_llms_instruct_math_code.py)
# ---------------------------------------------------------------------------------------------------------------
DEFAULT_MASK_SEED = DARE_SEED_DEFAULT  # the --seed default of every script: a name omits the mask seed at it
# GLUE DARE names omit the seed at 42 instead: the seed of every GLUE DARE result written before the default became 0
# (the original's implicit seed), so a new run at another seed never takes an older result's name
GLUE_UNNAMED_MASK_SEED = 42


def dare_name(
    model: str,
    weight_mask_rate: float,
    use_weight_rescale: bool,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = DEFAULT_MASK_SEED,
    *,
    glue: bool = False,
    llama2_backbone: bool = False,
) -> str:
    """The original's DARE save name (§2.2 step 4, §2.4 step 1): ``{model}_inference_mask_{p}`` at p = 0, else
    ``..._rescale_{b}`` [``_strategy_magnitude``] [``_weight_format_finetuned_weight``] [``_llama_2_as_backbone``],
    plus the mask seed when it is not the one a name omits. The two scripts' spellings of the seed are kept, so that
    existing result files keep their names (``make_report.py`` parses both for files without a ``settings`` object,
    and reads the seed from ``settings`` for every other): GLUE ``_seed7`` (random masks only: magnitude pruning
    draws nothing; omitted at :data:`GLUE_UNNAMED_MASK_SEED`, so the default seed 0 is written ``_seed0``), LLM
    ``_seed_7`` (omitted at the default 0)."""
    name = f"{model}_inference_mask_{weight_mask_rate}"
    if weight_mask_rate == 0.0:
        return name
    name += f"_rescale_{use_weight_rescale}"
    if mask_strategy == "magnitude":
        name += "_strategy_magnitude"
    if weight_format == "finetuned_weight":
        name += "_weight_format_finetuned_weight"
    if llama2_backbone:
        name += "_llama_2_as_backbone"
    if glue:
        if seed != GLUE_UNNAMED_MASK_SEED and mask_strategy == "random":
            name += f"_seed{seed}"
    elif seed != DEFAULT_MASK_SEED:
        name += f"_seed_{seed}"
    return name


def glue_eval_suffix(max_eval_samples: int | None, max_seq_length: int, default_length: int) -> str:
    """``_maxeval{n}`` / ``_len{n}`` for an evaluation on fewer rows or another truncation length than a full run."""
    suffix = "" if max_eval_samples is None else f"_maxeval{max_eval_samples}"
    return suffix + ("" if max_seq_length == default_length else f"_len{max_seq_length}")


# ---------------------------------------------------------------------------------------------------------------
# GLUE fine-tuned models (train_plms_glue.py) and the GLUE scripts' summaries
# ---------------------------------------------------------------------------------------------------------------
def glue_model_name(model_short_name: str, learning_rate: float, run: int = 0) -> str:
    """``{lm}_lr{lr}`` for run 0, ``{lm}_lr{lr}_run{run}`` after (floats as ``str(float)``: ``1e-05``)."""
    name = f"{model_short_name}_lr{float(learning_rate)}"
    return name if run == 0 else f"{name}_run{run}"


def glue_summary_name(model_short_name: str, learning_rate: float | dict | None, suffix: str) -> str:
    """A summary across tasks (whose learning rates may differ): the lr appears only when one was given for all."""
    lr = "" if learning_rate is None or isinstance(learning_rate, dict) else f"_lr{float(learning_rate)}"
    return f"{model_short_name}{lr}{suffix}"


# ---------------------------------------------------------------------------------------------------------------
# GLUE merges (merge_plms_glue.py; settings: utils.glue_merging.MergeSettings)
# ---------------------------------------------------------------------------------------------------------------
def glue_method_folder(settings) -> str:
    """``{method}``, or ``mask_merging/{apply}`` for DARE + X."""
    return f"mask_merging/{settings.mask_apply_method}" if settings.is_dare else settings.merging_method_name


def glue_group_folder(tasks: Sequence[str], merge_mode: str) -> str:
    """``{src}_{tgt}`` for a pair, ``all_{t1}_..._{tn}`` for an N-task merge."""
    return ("all_" if merge_mode == "all" else "") + "_".join(tasks)


def _grid_tag(settings, keys: Sequence[str]) -> str | None:
    from utils.glue_merging import default_grid

    given = [k for k in keys if k in settings.grids]
    grid = {k: settings.grid(k) for k in given}
    if not given or all(grid[k] == default_grid(settings, k) for k in given):
        return None
    return "grid" + hashlib.sha1(json.dumps(grid, sort_keys=True).encode()).hexdigest()[:8]


def _template_tag(template: str) -> str:
    return "ft" + hashlib.sha1(template.encode()).hexdigest()[:8]


def _protocol_parts(settings) -> list[str]:
    """The name parts of the evaluation protocol every GLUE merge name ends with: metric, sequence length and the
    fine-tuned models' template, when they are not the defaults."""
    from utils.glue_data_loader import MAX_SEQ_LENGTH

    parts = []
    if settings.metric != "main":
        parts.append(f"metric_{settings.metric}")
    if settings.max_seq_length != MAX_SEQ_LENGTH:
        parts.append(f"len{settings.max_seq_length}")
    if settings.finetuned_model_template is not None:
        parts.append(_template_tag(settings.finetuned_model_template))
    return parts


def glue_common_suffix(settings) -> str:
    """Name parts shared by every method of one protocol: evaluation sample limit, metric, sequence length and
    the fine-tuned models' template (what the fine-tuned reference scores depend on)."""

    parts = [f"maxeval{settings.max_eval_samples}"] if settings.max_eval_samples is not None else []
    return "".join(f"_{p}" for p in [*parts, *_protocol_parts(settings)])


def glue_merge_suffix(settings) -> str:
    """Name parts for every setting that differs from the original's defaults (so that no two settings share a
    result file): selection split, seed (``_seed{s}``, for methods that draw random numbers or read data), sample
    limits, estimator variants, grids, DARE options."""
    from utils.glue_merging import DATA_METHODS, METHOD_GRID_KEYS, METHOD_OPTION_KEYS, RANDOM_METHODS

    base = settings.base_method
    uses_data = base in DATA_METHODS
    parts: list[str] = []
    if settings.selection_split == "test":
        parts.append("select_test")
    if settings.seed != DEFAULT_MASK_SEED and (uses_data or settings.is_dare or base in RANDOM_METHODS):
        parts.append(f"seed{settings.seed}")
    if uses_data and settings.batch_size != 16:
        parts.append(f"bs{settings.batch_size}")
    if uses_data and settings.max_train_samples is not None:
        parts.append(f"maxtrain{settings.max_train_samples}")
    if settings.max_eval_samples is not None:
        parts.append(f"maxeval{settings.max_eval_samples}")
    if settings.max_selection_samples is not None:
        parts.append(f"maxsel{settings.max_selection_samples}")
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
    for key in METHOD_OPTION_KEYS.get(base, ()):
        if key in settings.method_options:
            parts.append(f"{key}{settings.method_options[key]}")
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
    return "".join(f"_{p}" for p in [*parts, *_protocol_parts(settings)])


def glue_story_folder(size: str, seed: int, key: str) -> str:
    """A folder of the offline GLUE story (utils.glue_quickstart): its size, seed and settings hash."""
    return f"{size}_seed{seed}_{key}"


# ---------------------------------------------------------------------------------------------------------------
# LLM merges (merge_llms_instruct_math_code.py)
# ---------------------------------------------------------------------------------------------------------------
def llm_merge_name(
    merging_method_name: str,
    params: Mapping[str, Any],
    *,
    mask_apply_method: str | None = None,
    weight_mask_rates: Sequence[float] = (),
    use_weight_rescale: bool = False,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = DEFAULT_MASK_SEED,
    dtype: str = "auto",
    vocab_policy: str = "auto",
    pad_to_multiple_of: int | None = None,
    lora: bool = False,
    lora_rank: int | None = None,
    base: str | None = None,
) -> str:
    """The merged model's folder name: the original's name (``{method}_{param}_{value}...``, or
    ``mask_merging/{apply name}/mask_{p1}_{p2}_rescale_{b}...``) plus every setting it left out (strategy, weight
    format, seed, dtype, vocabulary policy, LoRA output, overridden backbone), so variants never overwrite each
    other. ``params``: the method's parameters (for DARE + X: those of ``mask_apply_method``); ``lora``: a LoRA
    output (of rank ``lora_rank``); ``base``: a file-name-safe form of an overridden backbone."""
    if merging_method_name == "mask_merging":
        name = (
            f"mask_merging/{method_run_name(mask_apply_method, params)}"
            f"/mask_{'_'.join(str(r) for r in weight_mask_rates)}"
            f"_rescale_{use_weight_rescale}_strategy_{mask_strategy}_weight_format_{weight_format}_seed_{seed}"
        )
    else:
        name = method_run_name(merging_method_name, params)
    if dtype != "auto":
        name += f"_dtype_{dtype}"
    if vocab_policy != "auto":
        name += f"_vocab_{vocab_policy}"
    if pad_to_multiple_of:
        name += f"_pad{pad_to_multiple_of}"
    if lora:
        name += f"_lora_r{lora_rank}"
    if base is not None:
        name += f"_base_{base}"
    return name
