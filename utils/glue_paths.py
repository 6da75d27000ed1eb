"""Where GLUE models and results live (the original's path patterns), the authors' learning rates (§5.5), and
loading any Hugging Face sequence classifier with its backbone told apart from its head.

* fine-tuned model: ``{models_dir}/{task}/{lm}_lr{lr}`` (run 0; ``_run{k}`` for later runs), where ``{lm}`` is the
  model name, or the base name of a local folder, and ``{lr}`` is Python's ``str(float)`` (``1e-05``); or, with
  a template such as ``tanganke/gpt2_{task}``, a hub id or folder per task;
* training result: ``{results_dir}/{task}/{name}/{name}.json``.

Backbone and head (:func:`backbone_prefix`): what ``AutoModelForSequenceClassification`` adds on top of the base
model is the head. The model class names its base model in ``base_model_prefix`` (``bert``, ``roberta``,
``deberta``, ``electra``, ``transformer`` for GPT-2); every parameter under that prefix is backbone (BERT's pooler
included), everything else is head (BERT ``classifier``; RoBERTa / ELECTRA ``classifier.dense`` and
``classifier.out_proj``; DeBERTa ``pooler`` and ``classifier``; GPT-2 ``score``). Heads are never masked or merged.

Padding (:func:`prepare_tokenizer`): batches are always padded on the right (a checkpoint whose tokenizer pads on
the left is padded on the right too, so absolute positions start at 0); a tokenizer without a pad token (GPT-2)
gets its eos token, else its unk token, as pad (for GPT-2 both are ``<|endoftext|>``, FusionBench's pad), and the
model's ``config.pad_token_id`` is set to the tokenizer's, so models that read the score at the last real token
(GPT-2: the rightmost position whose id is not the pad id) find it.
"""

from __future__ import annotations

import os
import re
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
    """``{lm}_lr{lr}`` for run 0, ``{lm}_lr{lr}_run{run}`` after (floats as ``str(float)``: ``1e-05``;
    :func:`utils.run_names.glue_model_name`)."""
    from utils.run_names import glue_model_name

    return glue_model_name(model_short_name(language_model_name), learning_rate, run)


def learning_rates(value: str) -> float | dict[str, float]:
    """``--learning_rate`` of the evaluation and merge scripts: one rate (``5e-4``) for every task, or one per
    task (``sst2=5e-4,qnli=1e-4``), as the authors' table gives per task for bert-base / roberta-base. An
    ``argparse`` type: a malformed value is argparse's usage and error line, exit 2."""
    import argparse

    try:
        if "=" not in value:
            return float(value)
        pairs = [item.split("=") for item in value.split(",")]
        if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
            raise ValueError
        rates = {task.strip(): float(rate) for task, rate in pairs}
        if len(rates) != len(pairs):
            raise ValueError
        return rates
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a learning rate (5e-4) nor one per task (sst2=5e-4,qnli=1e-4, each task once)"
        ) from None


def chosen_learning_rate(
    task: str, language_model_name: str, learning_rate: float | dict[str, float] | None = None
) -> float:
    """An explicit ``learning_rate`` wins (one per task: the task's, and a task it does not name is a
    :class:`UserError`); otherwise the authors' rate for bert-base-uncased / roberta-base; otherwise the
    training default 1e-5."""
    if isinstance(learning_rate, dict):
        if task not in learning_rate:
            raise UserError(f"--learning_rate names no rate for {task} (given: {sorted(learning_rate)})")
        return float(learning_rate[task])
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


def check_models_dir(models_dir: str) -> None:
    """``--models_dir`` must be a folder (or not exist yet); a file there is a :class:`UserError`."""
    if os.path.exists(models_dir) and not os.path.isdir(models_dir):
        raise UserError(f"--models_dir {models_dir} is not a folder")


def check_model_template(template: str) -> str:
    """A ``--finetuned_model_template`` must contain ``{task}`` and nothing else in braces."""
    try:
        filled = template.format(task="cola")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(
            f"--finetuned_model_template {template!r}: only {{task}} may appear in braces ({exc})"
        ) from None
    if filled == template:
        raise UserError(f"--finetuned_model_template {template!r} must contain {{task}}")
    return template


def require_finetuned_model(
    models_dir: str,
    task: str,
    language_model_name: str,
    learning_rate: float | None = None,
    template: str | None = None,
) -> Path | str:
    """The fine-tuned model folder; a missing one (or one without ``trainer_state.json``, the completion
    marker) is a :class:`UserError` naming the path and the training command that creates it.

    With ``template`` (e.g. ``tanganke/gpt2_{task}``) the model is ``template.format(task=task)``: a local folder
    (which must exist) or a hub id (loaded, or refused offline, by the loader)."""
    if template is not None:
        name = check_model_template(template).format(task=task)
        looks_local = (
            os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
        )
        if looks_local and not os.path.isdir(name):
            raise UserError(f"fine-tuned model for {task} not found: {name} is not a folder")
        return Path(name) if os.path.isdir(name) else name
    check_models_dir(models_dir)
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
    """``AutoTokenizer.from_pretrained`` prepared for classification batches (:func:`prepare_tokenizer`); a model
    that cannot be found (or the hub offline) is a UserError."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(_load_failure("tokenizer", name_or_path, exc)) from None
    return prepare_tokenizer(tokenizer, str(name_or_path))


def prepare_tokenizer(tokenizer, where: str = "the tokenizer"):
    """Right padding, and a pad token: the tokenizer's own, else its eos token, else its unk token (for GPT-2 both
    are ``<|endoftext|>``, FusionBench's pad). A tokenizer with none of them is a UserError."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise UserError(f"{where}: the tokenizer has no pad, unk or eos token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def load_sequence_classifier(
    name_or_path: str | Path, num_labels: int | None = None, pad_token_id: int | None = None
):
    """``AutoModelForSequenceClassification`` (a head of ``num_labels`` outputs, re-initialised when the
    checkpoint's head has another size), with ``config.pad_token_id`` set to ``pad_token_id`` when given (the id
    the batches are padded with). Load failures, and model types without a sequence-classification class, are a
    UserError; so is a model whose backbone cannot be told from its head."""
    from transformers import AutoModelForSequenceClassification

    kwargs = {} if num_labels is None else {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(name_or_path), **kwargs).eval()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(_load_failure("model", name_or_path, exc)) from None
    backbone_prefix(model, str(name_or_path))
    if pad_token_id is not None:
        model.config.pad_token_id = int(pad_token_id)
    return model


def backbone_prefix(model, where: str | None = None) -> str:
    """The model class's ``base_model_prefix``: the parameters under it are the backbone, the rest the head.
    A model without parameters under that prefix is a UserError."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters()]
    if not prefix or not any(n.startswith(prefix + ".") for n in names):
        label = where or type(model).__name__
        raise UserError(
            f"{label}: cannot tell the backbone of {type(model).__name__} from its head (no parameters under "
            f"its base_model_prefix {prefix!r})"
        )
    if not any(not n.startswith(prefix + ".") for n in names):
        label = where or type(model).__name__
        raise UserError(f"{label}: {type(model).__name__} has no classification head outside {prefix!r}")
    return prefix


def head_parameter_names(model) -> list[str]:
    """Names of the head's parameters (everything outside the backbone), in ``named_parameters()`` order."""
    prefix = backbone_prefix(model)
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix + ".")]


def head_exclude_regex(model) -> tuple[str, ...]:
    """One ``re.match`` pattern that matches every head parameter and no backbone parameter (for the core's
    ``exclude_param_names_regex``)."""
    return (rf"(?!{re.escape(backbone_prefix(model))}\.)",)


def _load_failure(what: str, name_or_path: str | Path, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = (
        "local folder"
        if os.path.isdir(str(name_or_path))
        else "model name (not a local folder; the hub may be offline)"
    )
    return f"cannot load {what} {str(name_or_path)!r} ({where}): {first}"


# ----------------------------------------------------------------------------------------------- outputs
def local_inputs(**named: str | Path | None) -> dict[str, str]:
    """``{label: path}`` for the inputs that are local paths (a hub id such as ``bert-base-uncased`` that is no
    local path cannot overlap an output and is left out)."""
    return {k: str(v) for k, v in named.items() if v is not None and os.path.exists(str(v))}


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_outputs(outputs: list[tuple[str, str | Path, bool]], inputs: dict[str, str | Path]) -> None:
    """Refuse, before anything is read or written, every output ``(label, path, is_folder)`` that equals, contains
    or lies inside an input (:func:`model_merging_methods.paths.guard_outputs`), that exists as the wrong kind
    (a file where a folder is written, or the other way round), or that lies under a file, a read-only file system
    or a folder without write permission. One UserError naming the flag and the path."""
    from model_merging_methods.paths import guard_outputs

    guard_outputs({label: path for label, path, _ in outputs}, inputs)
    for label, path, is_folder in outputs:
        target = Path(os.path.abspath(os.path.expanduser(str(path))))
        existing = target
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if existing == target:
            if is_folder and not target.is_dir():
                raise UserError(f"{label} {path} exists and is not a folder")
            if not is_folder and target.is_dir():
                raise UserError(f"{label} {path} is a folder; a file is written there")
            writable_dir = target if is_folder else target.parent
        else:
            if not existing.is_dir():
                raise UserError(f"{label} {path}: {existing} is not a folder")
            writable_dir = existing
        if _read_only(writable_dir):
            raise UserError(f"{label} {path}: {writable_dir} is on a read-only file system")
        if not os.access(writable_dir, os.W_OK | os.X_OK):
            raise UserError(f"{label} {path}: no permission to write in {writable_dir}")


def missing_dirs(path: Path) -> list[Path]:
    """The ancestors of ``path`` that do not exist yet, deepest first."""
    out = []
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent) and parent != parent.parent:
        out.append(parent)
        parent = parent.parent
    return out


def write_output(path: str | Path, write) -> Path:
    """Run ``write(path)`` (an atomic writer); an OSError (disk full, read-only, permissions, over-long name)
    becomes one UserError naming the path, and the folders this call created are removed again."""
    path = Path(path)
    created = missing_dirs(path)
    try:
        write(path)
    except OSError as exc:
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot write {exc.filename or path}: {reason}") from None
    return path


ARCHITECTURE_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "embedding_size", "max_position_embeddings", "type_vocab_size", "n_embd", "n_layer", "n_head", "n_inner",
    "n_positions",
)  # fmt: skip


def check_model_configs(models: dict[str, str | Path]) -> None:
    """Before anything heavy is loaded or written: every ``{label: model}`` has a readable config whose model type
    has a sequence-classification class in transformers, and all have the same type and sizes. Else a UserError
    naming the model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    seen: list[tuple[str, object]] = []
    for label, name in models.items():
        try:
            config = AutoConfig.from_pretrained(str(name))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{label}: " + _load_failure("model config", name, exc)) from None
        if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
            raise UserError(
                f"{label} {name}: model type {config.model_type!r} has no sequence-classification class in "
                "transformers (AutoModelForSequenceClassification cannot build it)"
            )
        for other_label, other in seen:
            if other.model_type != config.model_type:
                raise UserError(
                    f"models of different architectures: {label} is {config.model_type}, {other_label} is "
                    f"{other.model_type}"
                )
            for key in ARCHITECTURE_KEYS:
                a, b = getattr(config, key, None), getattr(other, key, None)
                if a != b:
                    raise UserError(
                        f"models of different architectures: {key} is {a} in {label} but {b} in {other_label}"
                    )
        seen.append((label, config))
