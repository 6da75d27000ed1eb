"""The offline GLUE story: the paper's encoder findings on a tiny pre-trained encoder, on a CPU, without a network.

``python -m utils.glue_quickstart`` (``quickstart.py --suite glue``):

1. **Data.** The local GLUE copy (``--glue_data_dir``, default ``../shared/data/glue``) has training sets for CoLA,
   SST-2, MRPC, STS-B and RTE only. MNLI's and QNLI's training sets are missing; the story re-splits their dev sets
   (a seeded 80 / 20 permutation: "mnli" and "qnli" below are these re-splits, not the official protocol) into a
   derived GLUE folder under the output directory (the other tasks are links to the real files).
2. **Pre-training.** A WordPiece tokenizer (deterministic vocabulary) and a tiny BERT (masked-language modelling,
   loss on the masked positions only) trained on every training text of that folder: single sentences packed into
   blocks, sentence pairs kept as pairs (so attention learns to look across the two sentences). Saved as a sequence
   classifier whose pooler is part of the backbone (as BERT's).
3. **Fine-tuning** on SST-2, STS-B, QNLI and MNLI with ``train_plms_glue.py``, a learning rate per task (the
   sentence-pair tasks QNLI and MNLI overfit their 4-8k re-split rows at SST-2's 5e-4 and learn at 1e-4; the other
   scripts find the models with ``--learning_rate sst2=5e-4,...``). Each model is compared with its task's majority
   class on its whole test split (a constant prediction for STS-B). CoLA, MRPC and RTE were tried
   and left out: at this scale the fine-tuned models did not beat their majority class (CoLA MCC 0.03-0.13, MRPC at
   the majority, RTE at chance).
4. **DARE sweep** with ``inference_plms_glue.py``: p = 0 / 0.5 / 0.9 / 0.99 (DARE: drop + rescale), DropOnly and
   magnitude pruning at 0.9, mean of two mask seeds.
5. **Merging** with ``merge_plms_glue.py``'s run object: pairs in a cycle through the tasks (each task once as the
   source, once as the target) and all four tasks at once, with every method of the method registry and DARE + each,
   on reduced grids (selection on the validation split).
6. Tables (JSON, CSV, Markdown), plots and the paper's two encoder findings checked on the numbers.

Everything is cached under ``--output_dir``: the derived data, the pre-trained encoder (by its own settings), the
fine-tuned models and every result; a second run reads them back. ``--size ci`` is the reduced size the tests run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.cli import UserError, run_main, setup_logging
from utils.run_names import glue_story_folder
from utils.run_settings import run_settings

logger = logging.getLogger("glue_quickstart")

DEFAULT_GLUE_DIR = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "glue")
SCHEMA = "glue-quickstart/1"


@dataclass(frozen=True)
class StorySize:
    """Every setting that changes a result (hashed into the run folder's name)."""

    tasks: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    pretrain_steps: int
    pretrain_batch_size: int
    pretrain_lr: float
    pretrain_block: int
    pair_repeats: int
    learning_rates: dict[str, float]  # per task (the scripts' --learning_rate sst2=5e-4,qnli=1e-4)
    epochs: dict[str, int]
    max_train_samples: dict[str, int | None]
    max_eval_samples: int
    batch_size: int
    max_seq_length: int
    dare_rates: tuple[float, ...] = (0.0, 0.5, 0.9, 0.99)
    dare_seeds: tuple[int, ...] = (0, 1, 2)
    merge_grids: dict[str, list] = field(default_factory=dict)
    merge_max_train_samples: int = 512
    merge_selection_samples: int | None = None  # the merge search's validation rows (test: max_eval_samples)
    merge_pairs: str = "cycle"  # "cycle": t1→t2, …, tn→t1 (each task once as source, once as target); "all"
    mnli_train_fraction: float = 0.8  # MNLI and QNLI re-splits: the share of their dev set to train on


SIZES: dict[str, StorySize] = {
    "full": StorySize(
        tasks=("sst2", "stsb", "qnli", "mnli"),
        vocab_size=6000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
        pretrain_steps=1200, pretrain_batch_size=64, pretrain_lr=2e-3, pretrain_block=64, pair_repeats=2,
        learning_rates={"sst2": 5e-4, "stsb": 5e-4, "qnli": 1e-4, "mnli": 1e-4},
        epochs={"sst2": 1, "stsb": 2, "qnli": 6, "mnli": 6},
        max_train_samples={"sst2": 12000, "stsb": None, "qnli": None, "mnli": None},
        max_eval_samples=2000, batch_size=32, max_seq_length=64,  # every test row (STS-B's dev is sorted by genre)
        merge_grids={"scaling_coefficient": [0.5, 1.0], "param_value_mask_rate": [0.8],
                     "fisher_scaling_coefficients": [1.0], "nums_fisher_examples": [256],
                     "nums_regmean_examples": [256], "reduce_non_diagonal_ratio": [0.9],
                     "weight_mask_rate": [0.5, 0.9], "slerp_t": [0.5], "tall_mask_lambda": [0.4]},
        merge_selection_samples=150, dare_seeds=(0, 1),  # the first run within 15 minutes on 2 cores
    ),
    "ci": StorySize(
        tasks=("sst2", "stsb", "qnli", "mnli"),
        vocab_size=800, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        pretrain_steps=30, pretrain_batch_size=16, pretrain_lr=2e-3, pretrain_block=32, pair_repeats=1,
        learning_rates={"sst2": 1e-3, "stsb": 1e-3, "qnli": 5e-4, "mnli": 5e-4},
        epochs={"sst2": 1, "stsb": 1, "qnli": 1, "mnli": 1},
        max_train_samples={"sst2": 64, "stsb": 64, "qnli": 64, "mnli": 64},
        max_eval_samples=32, batch_size=16, max_seq_length=64, dare_seeds=(0,),
        merge_grids={"scaling_coefficient": [0.5], "param_value_mask_rate": [0.8],
                     "fisher_scaling_coefficients": [1.0], "nums_fisher_examples": [16],
                     "nums_regmean_examples": [16], "reduce_non_diagonal_ratio": [0.9], "weight_mask_rate": [0.5],
                     "slerp_t": [0.5], "tall_mask_lambda": [0.4]},
        merge_max_train_samples=32, merge_selection_samples=16,
    ),
}  # fmt: skip

# the settings the pre-trained encoder depends on (besides the seed and the data)
PRETRAINING_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "pretrain_steps", "pretrain_batch_size", "pretrain_lr", "pretrain_block", "pair_repeats", "max_seq_length",
)  # fmt: skip

# the DARE sweep: (label, rate, use_weight_rescale, mask_strategy)
ABLATIONS = (("DropOnly", 0.9, False, "random"), ("magnitude", 0.9, False, "magnitude"))


# ----------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m utils.glue_quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", default="./glue_quickstart_runs", help="models, results, tables and plots")
    p.add_argument(
        "--size", default="full", choices=sorted(SIZES), help="full: the story; ci: a tiny run for tests"
    )
    p.add_argument("--seed", type=int, default=0, help="pre-training, fine-tuning and DARE seeds start here")
    p.add_argument("--glue_data_dir", default=DEFAULT_GLUE_DIR, help="the local GLUE folder (TSV layout)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores not kept busy by other processes, by the 1-minute "
        "load average; oversubscribed cores slow tiny models down many times)",
    )
    p.add_argument("--no_plots", action="store_true", help="skip the PNG plots")
    return p  # fmt: skip


def default_threads() -> int:
    """torch's thread count less the cores other processes keep busy (1-minute load average), at least 1. With a
    tiny model a step is a handful of short parallel regions; a thread whose core is taken stalls the others
    (measured here: 2 threads on 2 shared cores ran a pre-training step 12x slower than 1 thread)."""
    import torch

    n = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        return n
    return max(1, min(n, (os.cpu_count() or n) - int(busy + 0.25)))


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- data
# tasks whose training set the local copy lacks: re-split from their dev set (file, the text fields, the label)
RESPLIT = {
    "mnli": ("dev_matched.jsonl", "dev_matched.tsv"),
    "qnli": ("dev.tsv", "dev.tsv"),
}


def _resplit(task: str, source: Path, out: Path, fraction: float, seed: int) -> None:
    """``fraction`` of a seeded permutation of the task's dev set as ``train.tsv``, the rest as its dev file, in
    the classic TSV layout (MNLI's JSONL is written with the GLUE TSV columns)."""
    import csv

    import numpy as np

    from utils.glue_data_loader import get_task

    src_name, dev_name = RESPLIT[task]
    src = source / get_task(task).dir_name / src_name
    if not src.is_file():
        raise UserError(
            f"{source} lacks {get_task(task).dir_name}/{src_name} (the story re-splits it into train/test)"
        )
    if task == "mnli":
        header = ["sentence1", "sentence2", "gold_label"]
        rows = []
        for line in src.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows.append(
                    [" ".join(row["premise"].split()), " ".join(row["hypothesis"].split()), row["label"]]
                )
    else:
        with open(src, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader)
            rows = [r for r in reader if r]
    perm = np.random.RandomState(seed).permutation(len(rows))
    cut = int(fraction * len(rows))
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train.tsv", perm[:cut]), (dev_name, perm[cut:])):
        lines = ["\t".join(header), *("\t".join(rows[int(i)]) for i in idx)]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare_glue(source: Path, target: Path, fraction: float, seed: int = 0) -> Path:
    """A GLUE folder for the story: links to the real task folders that have a training set, and MNLI and QNLI
    re-split from their dev sets (:func:`_resplit`)."""
    from utils.glue_data_loader import GLUE_TASKS

    target.mkdir(parents=True, exist_ok=True)
    for task in GLUE_TASKS.values():
        out = target / task.dir_name
        if task.name in RESPLIT:
            if not (out / "train.tsv").is_file():
                _resplit(task.name, source, out, fraction, seed)
        elif not out.exists() and (source / task.dir_name / "train.tsv").is_file():
            out.symlink_to((source / task.dir_name).resolve(), target_is_directory=True)
    return target


def available_tasks(glue_dir: Path) -> tuple[str, ...]:
    """The tasks with a training set in the story's GLUE folder (what the encoder is pre-trained on)."""
    from utils.glue_data_loader import GLUE_TASKS

    return tuple(t.name for t in GLUE_TASKS.values() if (glue_dir / t.dir_name / "train.tsv").is_file())


def pretraining_texts(glue_dir: Path, tasks: tuple[str, ...]) -> tuple[list[str], list[tuple[str, str]]]:
    """Single sentences and sentence pairs of the tasks' training sets (the 90% the fine-tuning trains on plus the
    10% it validates on: all of GLUE train, never the dev/test sets)."""
    from utils.glue_data_loader import load_raw_split

    singles, pairs = [], []
    for task in tasks:
        raw = load_raw_split(task, "train", str(glue_dir))
        if raw.text_pairs is None:
            singles += list(raw.texts)
        else:
            pairs += list(zip(raw.texts, raw.text_pairs))
    return singles, pairs


# ----------------------------------------------------------------------------------------------- pre-training
def pretrain_encoder(size: StorySize, glue_dir: Path, out: Path, seed: int) -> dict:
    """Masked-language-model pre-training of a tiny BERT on the tasks' training texts; saves a
    ``BertForSequenceClassification`` (pooler seeded, saved once, so every script loads the same one) and the
    tokenizer into ``out``. Returns the log (steps, losses, time)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from utils.tiny_models import build_wordpiece_tokenizer

    t0 = time.time()
    singles, pairs = pretraining_texts(glue_dir, available_tasks(glue_dir))
    tok = build_wordpiece_tokenizer(
        [*singles, *(a for a, _ in pairs), *(b for _, b in pairs)], size.vocab_size
    )
    block = size.pretrain_block
    flat: list[int] = []
    for ids in tok(singles, add_special_tokens=False)["input_ids"]:
        flat += [*ids, tok.sep_token_id]
    examples = [
        [tok.cls_token_id, *flat[i : i + block - 1]] for i in range(0, len(flat) - block + 1, block - 1)
    ]
    if pairs:
        encoded = tok([a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=block)[
            "input_ids"
        ]
        examples += encoded * size.pair_repeats
    config = BertConfig(
        vocab_size=len(tok), hidden_size=size.hidden_size, num_hidden_layers=size.num_hidden_layers,
        num_attention_heads=size.num_attention_heads, intermediate_size=size.intermediate_size,
        max_position_embeddings=max(160, size.max_seq_length + 8), pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    steps = size.pretrain_steps
    opt = torch.optim.AdamW(model.parameters(), lr=size.pretrain_lr, weight_decay=0.01)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (steps - s) / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    special = torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id])
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(examples), (size.pretrain_batch_size,), generator=gen).tolist()
        length = max(len(examples[i]) for i in idx)
        x = torch.full((len(idx), length), tok.pad_token_id)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, i in enumerate(idx):
            x[row, : len(examples[i])] = torch.tensor(examples[i])
            mask[row, : len(examples[i])] = 1
        chosen = (torch.rand(x.shape, generator=gen) < 0.15) & ~torch.isin(x, special)
        if not chosen.any():
            continue
        inputs = x.clone()
        r = torch.rand(x.shape, generator=gen)
        inputs[chosen & (r < 0.8)] = tok.mask_token_id  # BERT's 80 / 10 / 10
        swap = chosen & (r >= 0.8) & (r < 0.9)
        inputs[swap] = torch.randint(5, len(tok), (int(swap.sum()),), generator=gen)
        hidden = model.bert(input_ids=inputs, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), x[chosen])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            losses.append([step, round(loss.item(), 4)])
            logger.info(
                "pre-training step %d/%d: MLM loss %.3f (%.0f s)",
                step + 1,
                steps,
                losses[-1][1],
                time.time() - t0,
            )
    torch.manual_seed(seed + 1)
    classifier = BertForSequenceClassification(config)
    missing = classifier.bert.load_state_dict(model.bert.state_dict(), strict=False)
    if set(missing.missing_keys) - {"pooler.dense.weight", "pooler.dense.bias"} or missing.unexpected_keys:
        raise RuntimeError(f"unexpected pre-training weights: {missing}")  # pragma: no cover - a bug
    tmp = out.with_name(out.name + ".partial")
    classifier.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, out)
    return {"examples": len(examples), "single_texts": len(singles), "pairs": len(pairs), "losses": losses,
            "parameters": sum(p.numel() for p in classifier.parameters()), "seconds": round(time.time() - t0, 1)}  # fmt: skip


# ----------------------------------------------------------------------------------------------- stages
class Story:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.size = SIZES[args.size]
        self.out = Path(args.output_dir)
        data = str(Path(args.glue_data_dir).resolve())
        key = _hash({"size": dataclasses.asdict(self.size), "seed": args.seed, "data": data})
        self.run = self.out / "runs" / glue_story_folder(args.size, args.seed, key)
        # the derived GLUE folder depends on the source only; the pre-trained encoder on its own settings only, so
        # changing a fine-tuning or merging setting does not pre-train again
        self.glue = self.out / "glue_data" / _hash({"data": data, "resplit": self.size.mnli_train_fraction})
        pretraining = {f: getattr(self.size, f) for f in PRETRAINING_FIELDS}
        self.base = (
            self.out
            / "pretrained"
            / glue_story_folder(args.size, args.seed, _hash([pretraining, data]))
            / "tiny-bert"
        )
        self.models = self.run / "models"
        self.timings: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    # ---------------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def stage(self, name: str):
        t0 = time.time()
        logger.info("== %s", name)
        yield
        self.timings[name] = round(time.time() - t0, 1)

    @contextlib.contextmanager
    def quiet(self):
        """The scripts' logging and progress bars kept to WARNING while they run inside the story."""
        from transformers.utils import logging as hf_logging

        root = logging.getLogger()
        level, hf_level = root.level, hf_logging.get_verbosity()
        root.setLevel(logging.WARNING)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            root.setLevel(level)
            hf_logging.set_verbosity(hf_level)

    def _quiet(self, fn, argv):
        with self.quiet():
            return fn(argv)

    def common(self, task: str | None = None) -> list[str]:
        """The scripts' shared flags; the learning rate of ``task``, or (None) every task's as ``t=lr,...``."""
        rates = self.size.learning_rates
        lr = str(rates[task]) if task else ",".join(f"{t}={rates[t]}" for t in self.size.tasks)
        return ["--language_model_name", str(self.base), "--learning_rate", lr,
                "--glue_data_dir", str(self.glue), "--models_dir", str(self.models),
                "--max_eval_samples", str(self.size.max_eval_samples), "--batch_size", str(self.size.batch_size),
                "--max_seq_length", str(self.size.max_seq_length)]  # fmt: skip

    # ---------------------------------------------------------------------------------------- 1-2
    def pretrain(self) -> dict:
        log_path = self.base.parent / "pretraining.json"
        if self.base.is_dir() and log_path.is_file():
            self.cached["pretraining"] = True
            return json.loads(log_path.read_text())
        self.cached["pretraining"] = False
        self.base.parent.mkdir(parents=True, exist_ok=True)
        log = pretrain_encoder(self.size, self.glue, self.base, self.args.seed)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        return log

    # ---------------------------------------------------------------------------------------- 3
    def finetune(self) -> dict[str, dict]:
        import train_plms_glue
        from utils.glue_paths import save_model_name

        results = {}
        self.cached["fine-tuning"] = True
        for task in self.size.tasks:
            name = save_model_name(str(self.base), self.size.learning_rates[task])
            done = (self.models / task / name / "trainer_state.json").is_file()
            result_file = self.run / "train_results" / task / name / f"{name}.json"
            if done and result_file.is_file():
                results[task] = json.loads(result_file.read_text())
                continue
            argv = ["--dataset_name", task, *self.common(task), "--num_runs", "1", "--num_epochs",
                    str(self.size.epochs[task]), "--seed", str(42 + self.args.seed),
                    "--results_dir", str(self.run / "train_results")]  # fmt: skip
            if self.size.max_train_samples.get(task):
                argv += ["--max_train_samples", str(self.size.max_train_samples[task])]
            logger.info("fine-tuning %s (%d epochs)", task, self.size.epochs[task])
            self.cached["fine-tuning"] = False
            results[task] = self._quiet(train_plms_glue.main, argv)[0]
        return results

    def majority(self) -> dict[str, dict]:
        """The majority class of each task's training split, scored on its test split (STS-B: the training mean,
        a constant prediction, whose correlations are 0)."""
        from collections import Counter

        from utils.glue_data_loader import get_task, load_raw_task_splits
        from utils.metrics import glue_scores

        out = {}
        for task in self.size.tasks:
            splits = load_raw_task_splits(task, str(self.glue), ("train", "test"),
                                          max_eval_samples=self.size.max_eval_samples)  # fmt: skip
            labels = splits["train"].labels
            if get_task(task).is_regression:
                constant = sum(labels) / len(labels)
            else:
                constant = Counter(labels).most_common(1)[0][0]
            scores = glue_scores(task, [constant] * len(splits["test"]), list(splits["test"].labels))
            out[task] = {"prediction": constant, **scores}
        return out

    # ---------------------------------------------------------------------------------------- 4
    def dare_sweep(self) -> list[dict]:
        import inference_plms_glue

        variants = [("DARE", r, True, "random") for r in self.size.dare_rates] + list(ABLATIONS)
        records = []
        self.cached["DARE sweep"] = True
        for label, rate, rescale, strategy in variants:
            seeds = (
                self.size.dare_seeds if (rate > 0 and strategy == "random") else (self.size.dare_seeds[0],)
            )
            for seed in seeds:
                argv = ["--dataset_names", *self.size.tasks, *self.common(), "--weight_mask_rate", str(rate),
                        "--mask_strategy", strategy, "--seed", str(seed),
                        "--results_dir", str(self.run / "dare_results")]  # fmt: skip
                if rescale:
                    argv.append("--use_weight_rescale")
                parsed = inference_plms_glue.parse_args(argv)
                paths = {
                    t: self.run / "dare_results" / t / inference_plms_glue.result_name(parsed, t)
                    for t in self.size.tasks
                }
                files = {t: p / f"{p.name}.json" for t, p in paths.items()}
                if all(f.is_file() for f in files.values()):
                    metrics = [json.loads(f.read_text()) for f in files.values()]
                else:
                    self.cached["DARE sweep"] = False
                    metrics = self._quiet(inference_plms_glue.main, argv)
                for task, m in zip(self.size.tasks, metrics):
                    records.append({"task": task, "variant": "fine-tuned" if rate == 0 else label, "rate": rate,
                                    "seed": seed, "score": m.get(_score_key(task))})  # fmt: skip
        return records

    # ---------------------------------------------------------------------------------------- 5
    def methods(self, num_models: int) -> list[tuple[str, str | None]]:
        """(merging_method_name, mask_apply_method): every plain method of the merge script that can merge
        ``num_models`` models, then DARE + each that takes DARE as a pre-step."""
        from utils.glue_merging import DARE_METHODS, METHODS, check_num_models

        def fits(method: str) -> bool:
            try:
                check_num_models(method, num_models)
            except UserError:
                return False
            return True

        plain = [m for m in METHODS if m != "mask_merging" and fits(m)]
        return [(m, None) for m in plain] + [("mask_merging", m) for m in plain if m in DARE_METHODS]

    def merge_argv(self, method: str, apply: str | None, mode: str) -> list[str]:
        from utils.glue_merging import METHOD_GRID_KEYS

        base = apply or method
        argv = ["--dataset_names", *self.size.tasks, *self.common(), "--merge_mode", mode,
                "--merging_method_name", method, "--results_dir", str(self.run / "merge_results"),
                "--max_train_samples", str(self.size.merge_max_train_samples), "--seed", str(self.args.seed)]  # fmt: skip
        if self.size.merge_selection_samples is not None:
            argv += ["--max_selection_samples", str(self.size.merge_selection_samples)]
        if apply:
            argv += ["--mask_apply_method", apply, "--use_weight_rescale"]
        # the story's weight_mask_rate grid is DARE's drop rates; a method whose own parameter has that name (DELLA)
        # keeps its declared grid
        keys = [k for k in METHOD_GRID_KEYS.get(base, ()) if k != "weight_mask_rate"]
        keys += ["weight_mask_rate"] if apply else []
        for key in keys:
            if key in self.size.merge_grids:
                argv += [f"--{key}", *(str(v) for v in self.size.merge_grids[key])]
        if base == "fisher_merging":
            argv.append("--normalize_fisher_weight")
        return argv

    def pairs(self) -> list[tuple[str, str]]:
        """The ordered (source, target) pairs merged: a cycle through the tasks (each task once as the target,
        once as the source: a third of the 12 ordered pairs of four tasks), or every ordered pair."""
        import itertools

        tasks = list(self.size.tasks)
        if self.size.merge_pairs == "all":
            return list(itertools.permutations(tasks, 2))
        return [(tasks[i], tasks[(i + 1) % len(tasks)]) for i in range(len(tasks))]

    def merges(self, mode: str) -> list[dict]:
        """Every method (and DARE + each) through the merge script's own run object: one per mode, so the
        models, data and evaluators are loaded once; result files and names are the script's."""
        import merge_plms_glue
        from utils.glue_merging import result_path

        out, todo, run = [], [], None
        stage = f"{mode} merges"
        results_dir = self.run / "merge_results"
        for method, apply in self.methods(len(self.size.tasks) if mode == "all" else 2):
            argv = self.merge_argv(method, apply, mode)
            args = merge_plms_glue.parse_args(argv)
            settings = merge_plms_glue.settings_from_args(args)
            if mode == "all":
                files = [result_path(results_dir, list(self.size.tasks), settings=settings)]
            else:
                files = [result_path(results_dir, a, b, settings) for a, b in self.pairs()]
            todo.append((method, apply, args, settings, files))
        self.cached[stage] = all(f.is_file() for *_, files in todo for f in files)
        try:
            for method, apply, args, settings, files in todo:
                if all(f.is_file() for f in files):
                    results = [json.loads(f.read_text()) for f in files]
                else:
                    logger.info("merging (%s): %s%s", mode, method, f" + {apply}" if apply else "")
                    with self.quiet():
                        if run is None:
                            run = merge_plms_glue.GlueMergeRun(
                                args, settings, list(self.size.tasks), load_train=True
                            )
                        if mode == "all":
                            results = [run.run_all(settings)]
                        else:
                            results = [run.run_pair(a, b, settings) for a, b in self.pairs()]
                label = f"DARE + {apply}" if apply else method
                for r in results:
                    out.append({"method": label, "base_method": apply or method, "dare": bool(apply),
                                **_merge_record(r, mode)})  # fmt: skip
            if run is not None and mode == "all":
                with self.quiet():
                    run.write_all_tasks_table(todo[0][3])
        finally:
            if run is not None:
                run.close()
        return out

    # ---------------------------------------------------------------------------------------- run
    def execute(self) -> dict:
        t_start = time.time()
        with self.stage("data"):
            prepare_glue(Path(self.args.glue_data_dir), self.glue, self.size.mnli_train_fraction)
        with self.stage("pre-training"):
            pretraining = self.pretrain()
        with self.stage("fine-tuning"):
            finetuned = self.finetune()
        majority = self.majority()
        with self.stage("DARE sweep"):
            dare = self.dare_sweep()
        with self.stage("pairwise merges"):
            pairs = self.merges("pairs")
        with self.stage("all-task merges"):
            alls = self.merges("all")
        total = round(time.time() - t_start, 1)
        summary = build_summary(self.size, finetuned, majority, dare, pairs, alls)
        summary.update(
            schema=SCHEMA, size=self.args.size, seed=self.args.seed, run_folder=str(self.run), pretraining=pretraining,
            timings={**self.timings, "total": total}, cached=self.cached, threads=_threads(),
            load_average=_load(), python=sys.version.split()[0],
            settings=run_settings(self.args, script="utils/glue_quickstart.py", kind="quickstart",
                                  size=self.args.size, story=dataclasses.asdict(self.size)),
        )  # fmt: skip
        write_outputs(self.out, summary, plots=not self.args.no_plots,
                      all_tasks_png=_all_tasks_png(self.run, self.size))  # fmt: skip
        return summary


def _score_key(task: str) -> str:
    from utils.glue_merging import score_key

    return score_key(task, "main")


def _merge_record(result: dict, mode: str) -> dict:
    if mode == "all":
        return {"mode": "all", "tasks": result["tasks"], "scores": result["test_scores"], "mean": result["mean"],
                "normalized_mean": result["normalized_mean"], "hyperparameters": result["hyperparameters"]}  # fmt: skip
    target = result["target_dataset"]
    hp = {k: result[k] for k in result if k in _hp_keys()}
    return {"mode": "pairs", "source": result["source_dataset"], "target": target,
            "score": result.get(_score_key(target)), "hyperparameters": hp}  # fmt: skip


def _hp_keys() -> set[str]:
    from utils.glue_merging import METHOD_GRID_KEYS

    return {k for keys in METHOD_GRID_KEYS.values() for k in keys} | {"weight_mask_rate"}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _all_tasks_png(run: Path, size: StorySize) -> Path | None:
    folder = run / "merge_results" / "summary" / ("all_" + "_".join(size.tasks))
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return pngs[0] if pngs else None


# ----------------------------------------------------------------------------------------------- tables
def _mean(xs):
    xs = [x for x in xs if isinstance(x, int | float)]
    return sum(xs) / len(xs) if xs else None


def build_summary(size, finetuned, majority, dare, pairs, alls) -> dict:
    """Tables and the findings, from the raw records."""
    tasks = list(size.tasks)
    ft_scores = {t: finetuned[t].get(_score_key(t)) for t in tasks}
    # 1. fine-tuned vs majority class
    models = [{"task": t, "metric": _score_key(t)[5:], "fine-tuned": ft_scores[t],
               "majority class": majority[t].get(_score_key(t)[5:]),
               "margin": None if ft_scores[t] is None else ft_scores[t] - majority[t].get(_score_key(t)[5:], 0.0)}
              for t in tasks]  # fmt: skip
    # 2. DARE sweep (mean over mask seeds)
    columns = (
        [("fine-tuned", 0.0)]
        + [("DARE", r) for r in size.dare_rates if r > 0]
        + [(a[0], a[1]) for a in ABLATIONS]
    )
    dare_rows = []
    for t in tasks:
        row: dict[str, Any] = {"task": t}
        for variant, rate in columns:
            vals = [
                r["score"] for r in dare if r["task"] == t and r["variant"] == variant and r["rate"] == rate
            ]
            row[variant if variant == "fine-tuned" else f"{variant} {rate:g}"] = _mean(vals)
        dare_rows.append(row)
    retention, margin_kept = [], []
    for row in dare_rows:
        base = row["fine-tuned"]
        floor = majority[row["task"]].get(_score_key(row["task"])[5:], 0.0)
        retention.append(
            {
                "task": row["task"],
                **{
                    k: (None if v is None or not base or base <= 0 else v / base)
                    for k, v in row.items()
                    if k not in ("task", "fine-tuned")
                },
            }
        )
        # the share of the fine-tuned model's margin over the majority class that is kept (1: all, 0: none)
        margin_kept.append(
            {
                "task": row["task"],
                **{
                    k: (None if v is None or base is None or base <= floor else (v - floor) / (base - floor))
                    for k, v in row.items()
                    if k not in ("task", "fine-tuned")
                },
            }
        )
    # 3. pairwise merges: one row per method, one column per (source → target)
    pair_keys = (
        [(p["source"], p["target"]) for p in pairs if p["method"] == pairs[0]["method"]] if pairs else []
    )
    methods = list(dict.fromkeys(p["method"] for p in pairs))
    pair_rows = []
    for m in methods:
        row = {"method": m}
        for s, t in pair_keys:
            row[f"{s}→{t}"] = next(
                (p["score"] for p in pairs if p["method"] == m and (p["source"], p["target"]) == (s, t)), None
            )
        row["mean"] = _mean([row[f"{s}→{t}"] for s, t in pair_keys])
        pair_rows.append(row)
    # 4. all tasks at once
    all_rows = [{"method": "fine-tuned (individual)", **ft_scores, "mean": _mean(list(ft_scores.values())),
                 "normalized_mean": 1.0}]  # fmt: skip
    for a in alls:
        all_rows.append({"method": a["method"], **{t: a["scores"].get(t) for t in tasks}, "mean": a["mean"],
                         "normalized_mean": a["normalized_mean"],
                         "settings": ", ".join(f"{k}={v[0] if isinstance(v, list) else v}" for k, v in a["hyperparameters"].items())})  # fmt: skip
    findings = findings_from(size, retention, pairs, alls, models, margin_kept)
    return {"tasks": tasks, "models": models, "dare": dare_rows, "dare_retention": retention,
            "dare_margin_kept": margin_kept, "pairwise": pair_rows,
            "all_tasks": all_rows, "findings": findings, "records": {"dare": dare, "pairs": pairs, "all": alls}}  # fmt: skip


def findings_from(size, retention, pairs, alls, models, margin_kept=()) -> dict:
    """The paper's two encoder findings, checked on these numbers."""
    from scipy.stats import binomtest

    keep = {r["task"]: r.get("DARE 0.9") for r in retention}
    margin = {r["task"]: r.get("DARE 0.9") for r in margin_kept}
    keeps_09 = all(v is not None and v >= 0.95 for v in keep.values())
    beats = []
    for p in pairs:
        if not p["dare"]:
            continue
        plain = next((q for q in pairs if not q["dare"] and q["method"] == p["base_method"]
                      and (q["source"], q["target"]) == (p["source"], p["target"])), None)  # fmt: skip
        if plain and isinstance(p["score"], int | float) and isinstance(plain["score"], int | float):
            beats.append(p["score"] - plain["score"])
    all_beats = {}
    for a in alls:
        if a["dare"]:
            plain = next((q for q in alls if not q["dare"] and q["method"] == a["base_method"]), None)
            if plain and a["mean"] is not None and plain["mean"] is not None:
                all_beats[a["base_method"]] = a["mean"] - plain["mean"]
    margins = {m["task"]: m["margin"] for m in models}
    better, worse = sum(d > 0 for d in beats), sum(d < 0 for d in beats)
    # two-sided sign test over the (pair, method) cases, ties left out: 20 better / 18 worse is a coin's outcome
    sign_p = float(binomtest(better, better + worse).pvalue) if better + worse else None
    return {
        "dare_keeps_up_to_0.9": {"per_task_share_at_0.9": keep, "per_task_margin_kept_at_0.9": margin,
                                 "reproduces": keeps_09,
                                 "rule": "mean DARE score at p = 0.9 ≥ 95% of the fine-tuned score on every task"},
        "dare_plus_x_beats_x": {
            "pairwise": {"better": better, "equal": sum(d == 0 for d in beats), "worse": worse,
                         "mean_difference": _mean(beats), "sign_test_p": sign_p},
            "all_tasks_mean_difference": all_beats,
            "reproduces": sign_p is not None and better > worse and sign_p < 0.05,
            "rule": "pairwise, DARE + X scores above X (same settings) in more cases than below, and a two-sided "
                    "sign test over those cases gives p < 0.05",
        },
        "finetuned_beat_majority": {"margins": margins, "all": all(m is not None and m > 0.05 for m in margins.values())},
    }  # fmt: skip


def write_outputs(out: Path, summary: dict, plots: bool, all_tasks_png: Path | None) -> None:
    from utils.results_io import markdown_table, write_json, write_table

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "glue_story.json", summary)
    for name in ("models", "dare", "dare_retention", "dare_margin_kept", "pairwise", "all_tasks"):
        write_table(summary[name], out / f"glue_{name}.csv", out / f"glue_{name}.md")
    f = summary["findings"]
    lines = ["# Offline GLUE story", "",
             f"Size `{summary['size']}`, seed {summary['seed']}, {summary['threads']} torch thread(s), load average "
             f"{summary['load_average']}; run folder `{summary['run_folder']}`.", "",
             "Times (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items()), "",
             "## Fine-tuned models against the majority class (test split)", "", markdown_table(summary["models"]),
             "## DARE sweep (mean over mask seeds)", "", markdown_table(summary["dare"]),
             "Share of the fine-tuned score:", "", markdown_table(summary["dare_retention"]),
             "Share of the fine-tuned model's margin over the majority class:", "",
             markdown_table(summary["dare_margin_kept"]),
             "## Pairwise merges (target task's score)", "", markdown_table(summary["pairwise"]),
             "## All tasks at once", "", markdown_table(summary["all_tasks"]),
             "## Findings", "",
             f"* DARE keeps the score up to p = 0.9: **{'reproduces' if f['dare_keeps_up_to_0.9']['reproduces'] else 'does not reproduce'}** "
             f"(share at 0.9: {json.dumps(f['dare_keeps_up_to_0.9']['per_task_share_at_0.9'])}).",
             f"* DARE + X beats X: **{'reproduces' if f['dare_plus_x_beats_x']['reproduces'] else 'does not reproduce'}** "
             f"(pairwise {json.dumps(f['dare_plus_x_beats_x']['pairwise'])}; all tasks, mean difference per X: "
             f"{json.dumps(f['dare_plus_x_beats_x']['all_tasks_mean_difference'])}).",
             f"* Every fine-tuned model beats its majority class by more than 0.05: {f['finetuned_beat_majority']['all']} "
             f"(margins {json.dumps(f['finetuned_beat_majority']['margins'])}).", ""]  # fmt: skip
    (out / "glue_story.md").write_text("\n".join(lines), encoding="utf-8")
    if plots:
        from utils.plotting import plot_drop_rate_curves

        curves, markers = {}, {}
        for row in summary["dare"]:
            curves[row["task"]] = {0.0: row["fine-tuned"], **{float(k.split()[1]): v for k, v in row.items()
                                                             if k.startswith("DARE ") and v is not None}}  # fmt: skip
            markers[row["task"]] = {
                a[0]: row.get(f"{a[0]} {a[1]:g}")
                for a in ABLATIONS
                if row.get(f"{a[0]} {a[1]:g}") is not None
            }
        plot_drop_rate_curves(curves, out / "glue_dare_drop_rate.png", title="Tiny BERT on GLUE: score against the DARE drop rate",
                              ylabel="task metric (test)", markers=markers)  # fmt: skip
        if all_tasks_png is not None:
            (out / "glue_all_tasks.png").write_bytes(all_tasks_png.read_bytes())


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.threads is not None and args.threads < 1:
        raise UserError("--threads must be at least 1")
    glue = Path(args.glue_data_dir)
    if not glue.is_dir():
        raise UserError(f"--glue_data_dir {glue} is not a folder (the local GLUE copy; see docs/glue.md)")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} exists and is not a folder")
    from model_merging_methods.paths import guard_outputs

    guard_outputs({"--output_dir": out}, {"--glue_data_dir": glue})
    import torch

    torch.set_num_threads(args.threads or default_threads())
    random.seed(args.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    summary = Story(args).execute()
    logger.info("tables and plots in %s (glue_story.md); total %.0f s", out, summary["timings"]["total"])
    return summary


if __name__ == "__main__":
    run_main(main)
