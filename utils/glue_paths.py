"""Where GLUE models and results live (the original's path patterns) and the authors' learning rates (§5.5).

* fine-tuned model: ``{models_dir}/{task}/{lm}_lr{lr}`` (run 0; ``_run{k}`` for later runs), where ``{lm}`` is the
  model name, or the base name of a local folder, and ``{lr}`` is Python's ``str(float)`` (``1e-05``);
* training result: ``{results_dir}/{task}/{name}/{name}.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from utils.cli import UserError

DEFAULT_MODELS_DIR = "./save_models"
DEFAULT_LEARNING_RATE = 1e-5

# The authors' chosen learning rates (spec §5.5), keyed "{task}_{model}".
DATASET_MODEL_LEARNING_RATE: dict[str, float] = {
    "cola_bert-base-uncased": 5e-5, "sst2_bert-base-uncased": 1e-5, "mrpc_bert-base-uncased": 5e-5,
    "stsb_bert-base-uncased": 5e-5, "qqp_bert-base-uncased": 1e-5, "mnli_bert-base-uncased": 1e-5,
    "qnli_bert-base-uncased": 1e-5, "rte_bert-base-uncased": 1e-5,
    "cola_roberta-base": 1e-5, "sst2_roberta-base": 1e-5, "mrpc_roberta-base": 5e-5, "stsb_roberta-base": 1e-5,
    "qqp_roberta-base": 1e-5, "mnli_roberta-base": 1e-5, "qnli_roberta-base": 1e-5, "rte_roberta-base": 1e-5,
}  # fmt: skip


def model_short_name(language_model_name: str) -> str:
    """The name used in paths: the model name itself, or the base name of a local folder."""
    if os.path.isdir(language_model_name):
        return Path(language_model_name).resolve().name
    return (
        language_model_name.rstrip("/").split("/")[-1] if "/" in language_model_name else language_model_name
    )


def save_model_name(language_model_name: str, learning_rate: float, run: int = 0) -> str:
    """``{lm}_lr{lr}`` for run 0, ``{lm}_lr{lr}_run{run}`` after (floats as ``str(float)``: ``1e-05``)."""
    name = f"{model_short_name(language_model_name)}_lr{float(learning_rate)}"
    return name if run == 0 else f"{name}_run{run}"


def chosen_learning_rate(task: str, language_model_name: str, learning_rate: float | None = None) -> float:
    """An explicit ``learning_rate`` wins; otherwise the authors' rate for bert-base-uncased / roberta-base;
    otherwise the training default 1e-5."""
    if learning_rate is not None:
        return float(learning_rate)
    return DATASET_MODEL_LEARNING_RATE.get(
        f"{task}_{model_short_name(language_model_name)}", DEFAULT_LEARNING_RATE
    )


def finetuned_model_dir(
    models_dir: str, task: str, language_model_name: str, learning_rate: float | None = None
) -> Path:
    lr = chosen_learning_rate(task, language_model_name, learning_rate)
    return Path(models_dir) / task / save_model_name(language_model_name, lr)


def require_finetuned_model(
    models_dir: str, task: str, language_model_name: str, learning_rate: float | None = None
) -> Path:
    """The fine-tuned model folder; a missing one (or one without ``trainer_state.json``, the completion
    marker) is a :class:`UserError` naming the path and the training command that creates it."""
    path = finetuned_model_dir(models_dir, task, language_model_name, learning_rate)
    if not (path / "trainer_state.json").is_file():
        lr = chosen_learning_rate(task, language_model_name, learning_rate)
        extra = "" if models_dir == DEFAULT_MODELS_DIR else f" --models_dir {models_dir}"
        raise UserError(
            f"fine-tuned model not found: {path} (no trainer_state.json); create it with: python "
            f"train_plms_glue.py --dataset_name {task} --language_model_name {language_model_name} "
            f"--learning_rate {lr} --num_runs 1{extra}"
        )
    return path


# ----------------------------------------------------------------------------------------------- loading
def load_tokenizer(name_or_path: str | Path):
    """``AutoTokenizer.from_pretrained``; a model that cannot be found (or the hub offline) is a UserError."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure("tokenizer", name_or_path, exc)) from None


def load_sequence_classifier(name_or_path: str | Path, num_labels: int | None = None):
    """``AutoModelForSequenceClassification`` (a head of ``num_labels`` outputs, re-initialised when the
    checkpoint's head has another size); load failures are a UserError."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        return AutoModelForSequenceClassification.from_pretrained(str(name_or_path), **kwargs).eval()
    except (OSError, ValueError) as exc:
        raise UserError(_load_failure("model", name_or_path, exc)) from None


def _load_failure(what: str, name_or_path: str | Path, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (
        "local folder"
        if os.path.isdir(str(name_or_path))
        else "model name (not a local folder; the hub may be offline)"
    )
    return f"cannot load {what} {str(name_or_path)!r} ({where}): {first}"
