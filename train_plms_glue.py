"""Fine-tune any Hugging Face sequence classifier (BERT, RoBERTa, DeBERTa, ELECTRA, GPT-2, ...) on GLUE, single-task
or multi-task (spec §2.1).

Single task: ``AutoModelForSequenceClassification``; multi-task (``--multitask_training``): a shared backbone
with one linear head per task (:class:`utils.multitask_model.MultiTaskModel`) on ``{aux}_{target}``. A tokenizer
without a pad token (GPT-2) pads with its unk/eos token, always on the right, and the model's ``pad_token_id`` is
set to match (see :mod:`utils.glue_paths`).
Training uses the HF ``Trainer`` with the §5.4 arguments on 90% of the GLUE train set, keeps the best epoch
by the validation main metric (the other 10%) and reports the GLUE dev set ("test").

Outputs per run ``k`` (``_run{k}`` suffix for k > 0):
  ``{models_dir}/{task}/{lm}_lr{lr}[_run{k}]/``  the model (config, weights, tokenizer, trainer_state.json)
  ``{results_dir}/{task}/{name}/{name}.json``     test metrics (eval_* keys; floats rounded to 4 decimals)
A folder that already has ``trainer_state.json`` is not trained again, only evaluated. A model folder that exists
without it must have been started by this toolkit (its marker file); a folder of someone else is refused.

Runs unchanged under ``torchrun`` / ``accelerate launch`` (the Trainer handles the processes; only the main
process writes the result file).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from transformers import set_seed

from model_merging_methods.paths import is_toolkit_output, write_owner_marker
from utils.cli import UserError, run_main, setup_logging
from utils.customized_trainers import CustomizedTrainer, training_arguments
from utils.glue_data_loader import (
    MAX_SEQ_LENGTH,
    TASK_NAMES,
    get_task,
    load_glue_task,
    load_multitask_datasets,
)
from utils.glue_paths import (
    DEFAULT_MODELS_DIR,
    check_model_configs,
    check_outputs,
    load_sequence_classifier,
    load_tokenizer,
    local_inputs,
    missing_dirs,
    model_short_name,
    save_model_name,
    write_output,
)
from utils.metrics import flatten_multitask_results, multitask_compute_metrics, single_task_compute_metrics
from utils.multitask_model import MultiTaskModel
from utils.results_io import round_floats, write_json

logger = logging.getLogger("train_plms_glue")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_name", default="cola", help=f"target task: {', '.join(TASK_NAMES)}")
    p.add_argument(
        "--auxiliary_dataset_name", default="cola", help="the other task with --multitask_training"
    )
    p.add_argument(
        "--language_model_name",
        default="roberta-base",
        help="model name (e.g. bert-base-uncased) or local folder",
    )
    p.add_argument("--multitask_training", action="store_true")
    p.add_argument("--batch_size", type=int, default=16, help="per-device train and eval batch size")
    p.add_argument("--num_epochs", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument(
        "--gpu", type=int, default=0, help="accepted for compatibility; the Trainer picks the devices"
    )
    p.add_argument(
        "--num_runs", type=int, default=5, help="run k uses seed + k and saves under _run{k} (k > 0)"
    )
    p.add_argument("--seed", type=int, default=42, help="Trainer seed (data order, dropout) and head init")
    p.add_argument("--glue_data_dir", default=None, help="local GLUE folder (TSV layout); default: the hub")
    p.add_argument("--max_train_samples", type=int, default=None, help="keep the first N training rows")
    p.add_argument("--max_eval_samples", type=int, default=None, help="keep the first N validation/test rows")
    p.add_argument("--max_seq_length", type=int, default=MAX_SEQ_LENGTH, help="truncation length in tokens")
    p.add_argument("--models_dir", default=DEFAULT_MODELS_DIR)
    p.add_argument("--results_dir", default="./save_model_results")
    p.add_argument(
        "--keep_checkpoints", action="store_true", help="keep the checkpoint-* folders after training"
    )
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    get_task(args.dataset_name)
    if args.multitask_training:
        get_task(args.auxiliary_dataset_name)
        if args.auxiliary_dataset_name == args.dataset_name:
            raise UserError("--auxiliary_dataset_name must differ from --dataset_name in multi-task training")
    for name in ("batch_size", "num_epochs", "num_runs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if not args.learning_rate > 0:
        raise UserError("--learning_rate must be positive")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1")
    if args.max_seq_length < 2:
        raise UserError("--max_seq_length must be at least 2")


def _run_paths(args: argparse.Namespace, run: int) -> tuple[str, Path, Path]:
    name = save_model_name(args.language_model_name, args.learning_rate, run)
    tasks = (
        [args.auxiliary_dataset_name, args.dataset_name] if args.multitask_training else [args.dataset_name]
    )
    folder = "_".join(tasks)
    return (
        name,
        Path(args.models_dir) / folder / name,
        Path(args.results_dir) / folder / name / f"{name}.json",
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """Every model folder and result file of the runs: outside the inputs, writable, and a model folder that
    exists unfinished must be one this toolkit started."""
    inputs = local_inputs(
        **{"--language_model_name": args.language_model_name, "--glue_data_dir": args.glue_data_dir}
    )
    outputs = []
    for run in range(args.num_runs):
        _, model_dir, result_path = _run_paths(args, run)
        outputs += [("--models_dir", model_dir, True), ("--results_dir", result_path, False)]
        if model_dir.is_dir() and not _is_trained(model_dir) and any(model_dir.iterdir()):
            if not is_toolkit_output(model_dir):
                raise UserError(
                    f"--models_dir: {model_dir} exists, holds files and was not written by this toolkit; "
                    "choose another --models_dir"
                )
    check_outputs(outputs, inputs)


def _is_trained(model_dir: Path, multitask: bool = False) -> bool:
    weights = (model_dir / "model.safetensors").is_file() or (model_dir / "pytorch_model.bin").is_file()
    return (model_dir / "trainer_state.json").is_file() and weights


def train_settings(args: argparse.Namespace, run: int, seed: int, tasks: list[str]) -> dict:
    """The ``settings`` object of run ``run`` (:func:`utils.run_settings.run_settings`): every flag, the run and
    its training seed (``--seed`` + run), the model as reports name it."""
    from utils.run_settings import run_settings

    model = f"{model_short_name(args.language_model_name)} {'multi-task ' if args.multitask_training else ''}fine-tuned"
    return run_settings(
        args, script="train_plms_glue.py", kind="train", model=model + (f"_run{run}" if run else ""), run=run,
        training_seed=seed, tasks=tasks,
    )  # fmt: skip


def train_one_run(args: argparse.Namespace, tokenizer, run: int) -> dict:
    seed = args.seed + run
    name, model_dir, result_path = _run_paths(args, run)
    tasks = (
        [args.auxiliary_dataset_name, args.dataset_name] if args.multitask_training else [args.dataset_name]
    )
    folder = "_".join(tasks)
    limits = dict(
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        max_seq_length=args.max_seq_length,
    )  # fmt: skip
    if args.multitask_training:
        data = load_multitask_datasets(tasks, tokenizer, args.glue_data_dir, **limits)
    else:
        data = load_glue_task(args.dataset_name, tokenizer, args.glue_data_dir, **limits)

    trained = _is_trained(model_dir, args.multitask_training)
    set_seed(seed)  # the head is initialised from a seeded RNG (the original's was unseeded)
    if args.multitask_training:
        if trained:
            model = MultiTaskModel.from_pretrained(model_dir)
        else:
            try:
                model = MultiTaskModel.from_backbone(args.language_model_name, tasks)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"cannot load model {args.language_model_name!r}: {exc}") from None
        model.config.pad_token_id = tokenizer.pad_token_id
        metric = "averaged_scores"
    else:
        source = model_dir if trained else args.language_model_name
        model = load_sequence_classifier(
            source, get_task(args.dataset_name).num_labels, tokenizer.pad_token_id
        )
        metric = get_task(args.dataset_name).main_metric
    created = [] if trained else [model_dir, *missing_dirs(model_dir)]
    created = [d for d in created if not d.exists()]
    if not trained:
        try:
            model_dir.mkdir(parents=True, exist_ok=True)
            write_owner_marker(model_dir, "glue fine-tuned model", task=folder, name=name)
        except OSError as exc:
            raise UserError(f"cannot write {exc.filename or model_dir}: {exc.strerror or exc}") from None

    trainer = CustomizedTrainer(
        model=model,
        args=training_arguments(
            str(model_dir), args.learning_rate, args.num_epochs, args.batch_size, metric, seed,
            multitask=args.multitask_training,
        ),
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        processing_class=tokenizer,
        compute_metrics=multitask_compute_metrics() if args.multitask_training else single_task_compute_metrics(
            args.dataset_name
        ),
        use_multitask_setting=args.multitask_training,
    )  # fmt: skip
    if trained:
        logger.info("%s already has trainer_state.json: evaluating it without training", model_dir)
    else:
        logger.info("training %s on %s (%d rows), validation %d rows", name, folder, len(data["train"]),
                    len(data["validation"]))  # fmt: skip
        before = {p.name for p in model_dir.glob("checkpoint-*")}
        try:
            trainer.train()
            trainer.save_model(str(model_dir))
            if args.multitask_training and trainer.is_world_process_zero():
                # config + task names, so MultiTaskModel.from_pretrained works
                model.save_pretrained(model_dir)
        except BaseException as exc:
            for folder in created:  # a model folder this run created holds nothing usable: remove it
                shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OSError):
                raise UserError(f"cannot write {exc.filename or model_dir}: {exc.strerror or exc}") from None
            raise
        if not args.keep_checkpoints and trainer.is_world_process_zero():
            for checkpoint in model_dir.glob("checkpoint-*"):
                if checkpoint.name not in before:  # only the checkpoints this run wrote
                    shutil.rmtree(checkpoint, ignore_errors=True)
        trainer.save_state()  # trainer_state.json last: the completion marker
    metrics = trainer.evaluate(eval_dataset=data["test"])
    if args.multitask_training:
        metrics = flatten_multitask_results(metrics)
    metrics = round_floats(metrics)
    # after rounding: the flags keep their exact values
    metrics["settings"] = train_settings(args, run, seed, tasks)
    if trainer.is_world_process_zero():
        write_output(result_path, lambda p: write_json(p, metrics))
        logger.info("run %d test metrics %s -> %s", run, metrics, result_path)
    return metrics


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    setup_logging()
    _check_args(args)
    check_model_configs({"--language_model_name": args.language_model_name})
    _check_outputs(args)
    tokenizer = load_tokenizer(args.language_model_name)
    results = [train_one_run(args, tokenizer, run) for run in range(args.num_runs)]
    for run, metrics in enumerate(results):
        logger.info("run %d: %s", run, metrics)
    return results


if __name__ == "__main__":
    run_main(main)
