"""Multi-task GLUE model: a shared backbone (``AutoModel``, with its pooler) and one linear head per task.

The sentence representation is the backbone's ``pooler_output`` when it has one (BERT, RoBERTa: the original);
otherwise the hidden state of the first token for masked-LM encoders (DeBERTa, ELECTRA: their [CLS]) and of the
last real token (by the attention mask) for decoder-only models (GPT-2), as their sequence classifiers read it.

Output for a batch: ``logits`` of shape ``(B, max_num_labels)``. Row ``b`` holds the head of task
``dataset_ids[b]``; the columns beyond that task's ``num_labels`` are filled with :data:`PAD_LOGIT`.
All heads are applied to the whole batch and each row's head is then picked with one gather (vectorised),
instead of the original's per-example Python loop; the values are the same.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel

from utils.glue_data_loader import get_task

PAD_LOGIT = -1000.0  # fills the columns a narrower head does not produce (the original's magic number)
MULTITASK_CONFIG = "multitask_config.json"
WEIGHTS_FILE = "model.safetensors"


class MultiTaskModel(nn.Module):
    """Shared backbone + ``heads[task] = nn.Linear(hidden_size, num_labels)`` (no dropout in the heads).

    ``forward(input_ids, attention_mask, dataset_ids, token_type_ids=None)`` runs the backbone, takes its
    ``pooler_output`` and returns ``{"logits": (B, max_num_labels)}``."""

    def __init__(self, base_model: nn.Module, task_names: Sequence[str]):
        super().__init__()
        self.base_model = base_model
        self.task_names = list(task_names)
        hidden = base_model.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, get_task(t).num_labels) for t in self.task_names})
        self.max_num_labels = max(get_task(t).num_labels for t in self.task_names)
        # dataset id → position of its head in ``self.task_names`` (-1 for tasks without a head)
        lookup = torch.full((max(get_task(t).dataset_id for t in self.task_names) + 1,), -1, dtype=torch.long)
        for pos, t in enumerate(self.task_names):
            lookup[get_task(t).dataset_id] = pos
        self.register_buffer("_head_index", lookup, persistent=False)

    @property
    def config(self):
        return self.base_model.config

    @property
    def pooling(self) -> str:
        """``pooler``, ``first`` or ``last`` (see the module docstring)."""
        if getattr(self.base_model, "pooler", None) is not None:
            return "pooler"
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        return (
            "first"
            if getattr(self.config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            else "last"
        )

    def forward(self, input_ids, attention_mask, dataset_ids, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        out = self.base_model(**kwargs)
        pooling = self.pooling
        if pooling == "pooler":
            pooled = out.pooler_output  # (B, H)
        elif pooling == "first":
            pooled = out.last_hidden_state[:, 0]
        else:  # the rightmost position with attention (right or left padding alike)
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (positions * attention_mask.long()).argmax(dim=1)
            pooled = out.last_hidden_state[torch.arange(input_ids.shape[0], device=input_ids.device), last]
        stacked = pooled.new_full((len(self.task_names), pooled.shape[0], self.max_num_labels), PAD_LOGIT)
        for pos, task_name in enumerate(self.task_names):
            out = self.heads[task_name](pooled)
            stacked[pos, :, : out.shape[-1]] = out
        dataset_ids = dataset_ids.reshape(-1).long()
        if dataset_ids.max() >= self._head_index.numel() or (self._head_index[dataset_ids] < 0).any():
            raise ValueError(f"dataset ids {dataset_ids.unique().tolist()} include a task without a head")
        head_pos = self._head_index[dataset_ids]  # (B,)
        logits = stacked[head_pos, torch.arange(pooled.shape[0], device=pooled.device)]  # (B, max_labels)
        return {"logits": logits}

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_dir: str | Path) -> None:
        """``config.json`` (backbone), ``multitask_config.json`` (task names) and ``model.safetensors``."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.base_model.config.save_pretrained(str(save_dir))
        (save_dir / MULTITASK_CONFIG).write_text(json.dumps({"task_names": self.task_names}, indent=4) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_dir / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, save_dir: str | Path) -> MultiTaskModel:
        save_dir = Path(save_dir)
        task_names = json.loads((save_dir / MULTITASK_CONFIG).read_text())["task_names"]
        model = cls(AutoModel.from_config(AutoConfig.from_pretrained(str(save_dir))), task_names)
        model.load_state_dict(load_file(str(save_dir / WEIGHTS_FILE)))
        return model.eval()

    @classmethod
    def from_backbone(cls, model_name_or_path: str, task_names: Sequence[str]) -> MultiTaskModel:
        """A backbone loaded with ``AutoModel`` (with pooler; for RoBERTa checkpoints without pooler weights
        the pooler is freshly initialised, as in the original) and fresh heads."""
        return cls(AutoModel.from_pretrained(model_name_or_path), task_names)
