"""The HF ``Trainer`` with the original's loss (spec §5.6) and the TrainingArguments of §5.4.

Loss (the model's own loss is never used; ``labels`` are taken out of the inputs):

* single task: cross-entropy when the logits have more than one column, else MSE between the regression value
  and the float label;
* multi-task: for every dataset id in the batch, the task's loss on its rows (logits sliced to its
  ``num_labels`` columns; MSE on column 0 for STS-B); the total is the **plain sum** of the per-task means
  (not weighted by row counts), as in the original.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from utils.glue_data_loader import TASK_BY_ID


def single_task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(logits, labels) for classification; MSE(logits[:, 0], labels) when there is one logit column."""
    if logits.shape[-1] > 1:
        return F.cross_entropy(logits, labels.long())
    return F.mse_loss(logits.reshape(-1), labels.float().reshape(-1))


def multitask_loss(logits: torch.Tensor, labels: torch.Tensor, dataset_ids: torch.Tensor) -> torch.Tensor:
    """Σ over the tasks present in the batch of that task's mean loss on its rows."""
    dataset_ids = dataset_ids.reshape(-1)
    total = logits.new_zeros(())
    for dataset_id in torch.unique(dataset_ids).tolist():
        task = TASK_BY_ID[int(dataset_id)]
        rows = dataset_ids == dataset_id
        if task.is_regression:
            total = total + F.mse_loss(logits[rows, 0], labels[rows].float())
        else:
            total = total + F.cross_entropy(logits[rows, : task.num_labels], labels[rows].long())
    return total


class CustomizedTrainer(Trainer):
    """``Trainer`` whose ``compute_loss`` (also used for the evaluation loss) is the original's."""

    def __init__(self, *args, use_multitask_setting: bool = False, **kwargs):
        self.use_multitask_setting = use_multitask_setting
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise ValueError("CustomizedTrainer needs 'labels' in every batch")
        labels = inputs.pop("labels")
        if self.use_multitask_setting:
            if "dataset_ids" not in inputs:
                raise ValueError("multi-task batches need 'dataset_ids'")
            outputs = model(**inputs)
            logits = outputs["logits"]
            loss = multitask_loss(logits, labels, inputs["dataset_ids"])
        else:
            inputs.pop("dataset_ids", None)
            outputs = model(**inputs)
            logits = outputs["logits"]
            loss = single_task_loss(logits, labels)
        return (loss, outputs) if return_outputs else loss


def training_arguments(
    output_dir: str,
    learning_rate: float,
    num_epochs: int,
    batch_size: int,
    metric_for_best_model: str,
    seed: int = 42,
    multitask: bool = False,
    save_total_limit: int = 1,
) -> TrainingArguments:
    """§5.4: warm-up 6% of the steps, weight decay 0.01, evaluate and save every epoch, keep the best model by
    the validation main metric (``averaged_scores`` in multi-task mode). HF defaults otherwise (AdamW, linear
    decay, grad-norm 1.0). Added: ``report_to="none"`` and ``save_total_limit`` (the best checkpoint is always
    kept by the Trainer) so disk use stays bounded."""
    return TrainingArguments(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=num_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        warmup_steps=0.06,  # a float below 1 is a ratio of the total steps (transformers v5)
        weight_decay=0.01,
        eval_strategy="epoch",
        save_strategy="epoch",
        logging_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=metric_for_best_model,
        greater_is_better=True,
        label_names=["dataset_ids", "labels"] if multitask else None,
        seed=seed,
        report_to="none",
        save_total_limit=save_total_limit,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )


def evaluation_arguments(
    output_dir: str, batch_size: int, seed: int = 42, multitask: bool = False
) -> TrainingArguments:
    """Arguments for evaluation-only Trainers (batch size set, HF defaults otherwise; nothing is saved)."""
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        label_names=["dataset_ids", "labels"] if multitask else None,
        seed=seed,
        report_to="none",
        save_strategy="no",
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
    )


class GlueEvaluator:
    """Evaluates one model object on GLUE datasets with a :class:`CustomizedTrainer` built once (its weights
    may be changed in place between calls). Returns the Trainer's ``eval_*`` metrics."""

    def __init__(self, model, tokenizer, batch_size: int, seed: int = 42, output_dir: str | None = None):
        import tempfile

        self._tmp = tempfile.TemporaryDirectory(prefix="glue_eval_") if output_dir is None else None
        self.trainer = CustomizedTrainer(
            model=model,
            args=evaluation_arguments(output_dir or self._tmp.name, batch_size, seed),
            processing_class=tokenizer,
        )

    @property
    def model(self):
        return self.trainer.model

    def evaluate(self, dataset, task_name: str) -> dict:
        from utils.metrics import single_task_compute_metrics

        self.trainer.compute_metrics = single_task_compute_metrics(task_name)
        return self.trainer.evaluate(eval_dataset=dataset)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
