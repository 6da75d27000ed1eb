"""GLUE data: the eight tasks, loading (hub or a local GLUE folder), the original split and tokenisation.

Split construction (spec §5.2), for every task:

* ``perm = numpy.random.RandomState(0).permutation(N)`` over the original train split (N rows);
* new **train** = ``perm[: int((1 - 0.1) * N)]``, new **validation** = the rest of ``perm``;
* new **test** = the GLUE dev set (``validation_matched`` for MNLI), unshuffled.

``max_train_samples`` / ``max_eval_samples`` keep the first rows of those splits (after the permutation), so a
quick run sees a prefix of exactly the same splits a full run sees.

Texts are tokenised with ``tokenizer(text, text_pair, max_length=128, truncation=True)`` and no padding; batches
are padded dynamically (``DataCollatorWithPadding``).

Local folders use the classic ``download_glue_data.py`` layout: ``CoLA/train.tsv`` (no header),
``SST-2``, ``MRPC`` (UTF-8 BOM), ``STS-B``, ``QQP``, ``MNLI`` (``train.tsv``, ``dev_matched.tsv`` or
``dev_matched.jsonl`` with ``premise``/``hypothesis``/``label``), ``QNLI`` and ``RTE``, each with
``train.tsv`` and ``dev.tsv``.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import DataCollatorWithPadding

from utils.cli import UserError

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
MAX_SEQ_LENGTH = 128
VAL_RATIO = 0.1
SPLIT_SEED = 0
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class GlueTask:
    """Static facts about one GLUE task (spec §5.1, §5.3)."""

    name: str
    text_key: str
    text_pair_key: str | None
    num_labels: int
    dataset_id: int
    metric_names: tuple[str, ...]  # what the GLUE metric returns
    main_metric: str  # model selection / reporting
    dir_name: str  # folder in the classic GLUE layout
    label_names: tuple[str, ...] = ()  # string labels in the TSV files, in id order (empty: numeric labels)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "sentence", None, 2, 0, ("matthews_correlation",), "matthews_correlation", "CoLA"),
        GlueTask("sst2", "sentence", None, 2, 1, ("accuracy",), "accuracy", "SST-2"),
        GlueTask("mrpc", "sentence1", "sentence2", 2, 2, ("accuracy", "f1"), "averaged_scores", "MRPC"),
        GlueTask("stsb", "sentence1", "sentence2", 1, 3, ("pearson", "spearmanr"), "averaged_scores", "STS-B"),
        GlueTask("qqp", "question1", "question2", 2, 4, ("accuracy", "f1"), "averaged_scores", "QQP"),
        GlueTask(
            "mnli", "premise", "hypothesis", 3, 5, ("accuracy",), "accuracy", "MNLI",
            ("entailment", "neutral", "contradiction"),
        ),
        GlueTask(
            "qnli", "question", "sentence", 2, 6, ("accuracy",), "accuracy", "QNLI",
            ("entailment", "not_entailment"),
        ),
        GlueTask(
            "rte", "sentence1", "sentence2", 2, 7, ("accuracy",), "accuracy", "RTE",
            ("entailment", "not_entailment"),
        ),
    )
}  # fmt: skip
TASK_NAMES: tuple[str, ...] = tuple(GLUE_TASKS)
TASK_BY_ID: dict[int, GlueTask] = {t.dataset_id: t for t in GLUE_TASKS.values()}

# Local TSV layout: (file's text column, file's pair column, file's label column); CoLA has no header, so
# integer column positions are used for it.
_TSV_COLUMNS: dict[str, tuple[str | int, str | int | None, str | int]] = {
    "cola": (3, None, 1),
    "sst2": ("sentence", None, "label"),
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "stsb": ("sentence1", "sentence2", "score"),
    "qqp": ("question1", "question2", "is_duplicate"),
    "mnli": ("sentence1", "sentence2", "gold_label"),
    "qnli": ("question", "sentence", "label"),
    "rte": ("sentence1", "sentence2", "label"),
}


def get_task(name: str) -> GlueTask:
    """The task called ``name``; an unknown name is a :class:`UserError`."""
    if name not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {name!r} (choose from {', '.join(TASK_NAMES)})")
    return GLUE_TASKS[name]


def check_task_names(names: Sequence[str]) -> list[str]:
    """Validate a list of task names; duplicates are an error."""
    for name in names:
        get_task(name)
    if len(set(names)) != len(names):
        raise UserError(f"task names repeat: {' '.join(names)}")
    return list(names)


@dataclass(frozen=True)
class RawSplit:
    """Untokenised rows of one split: texts, optional pair texts, labels (int, or float for STS-B)."""

    texts: tuple[str, ...]
    text_pairs: tuple[str, ...] | None
    labels: tuple[int | float, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> RawSplit:
        return RawSplit(
            tuple(self.texts[i] for i in indices),
            None if self.text_pairs is None else tuple(self.text_pairs[i] for i in indices),
            tuple(self.labels[i] for i in indices),
        )


# ----------------------------------------------------------------------------------------------- raw loading
def _convert_label(task: GlueTask, value: str, where: str) -> int | float:
    value = value.strip()
    try:
        if task.is_regression:
            return float(value)
        if task.label_names and value in task.label_names:
            return task.label_names.index(value)
        label = int(value)
    except ValueError:
        raise UserError(f"{where}: bad label {value!r} for task {task.name}") from None
    if not 0 <= label < task.num_labels:
        raise UserError(f"{where}: label {label} out of range for task {task.name}")
    return label


def _read_tsv(task: GlueTask, path: Path) -> RawSplit:
    try:
        return _read_tsv_rows(task, path)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise UserError(f"{path}: not a readable TSV file ({exc})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_tsv_rows(task: GlueTask, path: Path) -> RawSplit:
    text_col, pair_col, label_col = _TSV_COLUMNS[task.name]
    has_header = task.name != "cola"
    texts, pairs, labels = [], [], []
    # utf-8-sig drops MRPC's byte-order mark; QUOTE_NONE because GLUE texts contain bare quote characters.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None) if has_header else None
        if has_header and header is None:
            raise UserError(f"{path}: empty file (no header row, no data)")
        if header is not None:
            missing = [c for c in (text_col, pair_col, label_col) if c is not None and c not in header]
            if missing:
                raise UserError(f"{path}: header lacks column(s) {missing} expected for {task.name}")
            text_i, label_i = header.index(text_col), header.index(label_col)
            pair_i = header.index(pair_col) if pair_col is not None else None
        else:
            text_i, pair_i, label_i = text_col, pair_col, label_col
        needed = max(i for i in (text_i, pair_i, label_i) if i is not None) + 1
        for line_no, row in enumerate(reader, start=2 if has_header else 1):
            if not row:
                continue
            if len(row) < needed:
                raise UserError(
                    f"{path}:{line_no}: expected at least {needed} tab-separated fields, got {len(row)}"
                )
            texts.append(row[text_i])
            if pair_i is not None:
                pairs.append(row[pair_i])
            labels.append(_convert_label(task, row[label_i], f"{path}:{line_no}"))
    if not texts:
        raise UserError(f"{path}: no data rows")
    return RawSplit(tuple(texts), tuple(pairs) if pair_col is not None else None, tuple(labels))


def _read_jsonl(task: GlueTask, path: Path) -> RawSplit:
    texts, pairs, labels = [], [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row[task.text_key]
                    pair = row[task.text_pair_key] if task.text_pair_key is not None else None
                    raw_label = row["label"]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError, RecursionError) as exc:
                    raise UserError(f"{path}:{line_no}: not a {task.name} JSON row ({exc})") from None
                if not isinstance(text, str) or (
                    task.text_pair_key is not None and not isinstance(pair, str)
                ):
                    raise UserError(f"{path}:{line_no}: the texts of a {task.name} row must be strings")
                texts.append(text)
                if task.text_pair_key is not None:
                    pairs.append(pair)
                labels.append(_convert_label(task, str(raw_label), f"{path}:{line_no}"))
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not texts:
        raise UserError(f"{path}: no data rows")
    return RawSplit(tuple(texts), tuple(pairs) if task.text_pair_key else None, tuple(labels))


def _local_file(task: GlueTask, glue_dir: Path, which: str) -> Path:
    """``which`` is 'train' or 'dev'. MNLI's dev is the matched set (TSV or JSONL)."""
    folder = glue_dir / task.dir_name
    candidates = [folder / f"{which}.tsv"]
    if task.name == "mnli" and which == "dev":
        candidates = [folder / "dev_matched.tsv", folder / "dev_matched.jsonl"]
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"GLUE folder {glue_dir} lacks {task.name} {which} data (looked for "
        f"{', '.join(str(c.relative_to(glue_dir)) for c in candidates)})"
    )


@functools.lru_cache(maxsize=32)
def load_raw_split(task_name: str, which: str, glue_data_dir: str | None = None) -> RawSplit:
    """The original GLUE ``train`` or ``dev`` rows of a task, from ``glue_data_dir`` or the hub.

    Cached per process (the merge script reads the same tasks many times)."""
    task = get_task(task_name)
    if which not in ("train", "dev"):
        raise ValueError(f"which must be 'train' or 'dev', got {which!r}")
    if glue_data_dir is not None:
        glue_dir = Path(glue_data_dir)
        if not glue_dir.is_dir():
            raise UserError(
                f"--glue_data_dir {glue_dir} is not a folder"
                if glue_dir.exists()
                else f"GLUE data folder not found: {glue_dir}"
            )
        path = _local_file(task, glue_dir, which)
        return _read_jsonl(task, path) if path.suffix == ".jsonl" else _read_tsv(task, path)
    return _load_hub_split(task, which)


def _load_hub_split(task: GlueTask, which: str) -> RawSplit:
    import datasets

    split = "train" if which == "train" else ("validation_matched" if task.name == "mnli" else "validation")
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, split=split)
    except Exception as exc:  # offline, no cache, hub error: all end in the same advice
        raise UserError(
            f"cannot load GLUE {task.name} from the hub ({HUB_DATASET}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}; pass --glue_data_dir with a local GLUE folder"
        ) from None
    pairs = tuple(ds[task.text_pair_key]) if task.text_pair_key else None
    labels = (
        tuple(float(v) for v in ds["label"]) if task.is_regression else tuple(int(v) for v in ds["label"])
    )
    return RawSplit(tuple(ds[task.text_key]), pairs, labels)


# ----------------------------------------------------------------------------------------------- splits
def split_indices(
    num_rows: int, val_ratio: float = VAL_RATIO, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """The original train/validation split of the GLUE train set (spec §5.2): a seed-0 NumPy permutation;
    the first ``int((1 - val_ratio) * N)`` indices train, the rest validation."""
    perm = np.random.RandomState(seed=seed).permutation(num_rows)
    n_train = int((1 - val_ratio) * num_rows)
    return perm[:n_train], perm[n_train:]


def load_raw_task_splits(
    task_name: str,
    glue_data_dir: str | None = None,
    splits: Sequence[str] = SPLITS,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> dict[str, RawSplit]:
    """The untokenised ``train`` / ``validation`` / ``test`` splits of §5.2 (only those asked for)."""
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}")
    out: dict[str, RawSplit] = {}
    if "train" in splits or "validation" in splits:
        train = load_raw_split(task_name, "train", glue_data_dir)
        if len(train) < 2:
            raise UserError(
                f"{task_name}: the GLUE train set has {len(train)} row(s); at least 2 are needed to split it "
                "into train (90%) and validation (10%)"
            )
        train_idx, val_idx = split_indices(len(train))
        if "train" in splits:
            out["train"] = train.subset(_limit(train_idx, max_train_samples))
        if "validation" in splits:
            out["validation"] = train.subset(_limit(val_idx, max_eval_samples))
    if "test" in splits:
        test = load_raw_split(task_name, "dev", glue_data_dir)
        out["test"] = test.subset(_limit(np.arange(len(test)), max_eval_samples))
    return out


def _limit(indices: np.ndarray, limit: int | None) -> list[int]:
    if limit is not None:
        if limit <= 0:
            raise UserError(f"sample limits must be positive, got {limit}")
        indices = indices[:limit]
    return [int(i) for i in indices]


# ----------------------------------------------------------------------------------------------- tokenisation
def tokenize_split(
    raw: RawSplit,
    task_name: str,
    tokenizer,
    max_seq_length: int = MAX_SEQ_LENGTH,
    label_dtype: str | None = None,
) -> Dataset:
    """Tokenise without padding; columns ``input_ids``, ``attention_mask`` (``token_type_ids`` when the
    tokenizer makes them), ``label`` and ``dataset_ids``."""
    task = get_task(task_name)
    enc = tokenizer(
        list(raw.texts),
        list(raw.text_pairs) if raw.text_pairs is not None else None,
        max_length=max_seq_length,
        truncation=True,
    )
    columns = {k: list(v) for k, v in enc.items()}
    labels = list(raw.labels)
    if label_dtype == "float" or task.is_regression:
        labels = [float(v) for v in labels]
    columns["label"] = labels
    columns["dataset_ids"] = [task.dataset_id] * len(labels)
    return Dataset.from_dict(columns)


def load_glue_task(
    task_name: str,
    tokenizer,
    glue_data_dir: str | None = None,
    splits: Sequence[str] = SPLITS,
    max_seq_length: int = MAX_SEQ_LENGTH,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    label_dtype: str | None = None,
) -> dict[str, Dataset]:
    """Tokenised ``train``/``validation``/``test`` datasets of one task (only the splits asked for)."""
    raw = load_raw_task_splits(task_name, glue_data_dir, splits, max_train_samples, max_eval_samples)
    return {s: tokenize_split(r, task_name, tokenizer, max_seq_length, label_dtype) for s, r in raw.items()}


def load_multitask_datasets(
    task_names: Sequence[str],
    tokenizer,
    glue_data_dir: str | None = None,
    splits: Sequence[str] = SPLITS,
    max_seq_length: int = MAX_SEQ_LENGTH,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> dict[str, Dataset]:
    """Each split is the concatenation of the tasks' splits in the given order; labels are stored as floats
    (STS-B is regression) and cast back per task by the loss and the metrics."""
    per_task = [
        load_glue_task(
            t, tokenizer, glue_data_dir, splits, max_seq_length, max_train_samples, max_eval_samples, "float"
        )
        for t in task_names
    ]
    return {s: concatenate_datasets([d[s] for d in per_task]) for s in splits}


MODEL_INPUT_COLUMNS = ("input_ids", "attention_mask", "token_type_ids", "label", "labels")


def make_dataloader(
    dataset: Dataset, tokenizer, batch_size: int, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """Batches of model inputs padded per batch (``label`` becomes ``labels``). With ``shuffle`` the order
    comes from a ``torch.Generator`` seeded with ``seed`` (the original used the global RNG reseeded to 0)."""
    keep = [c for c in dataset.column_names if c in MODEL_INPUT_COLUMNS]
    dataset = dataset.select_columns(keep).with_format(None)
    collator = DataCollatorWithPadding(tokenizer)
    if shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator)
