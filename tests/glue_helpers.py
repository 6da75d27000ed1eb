"""The tiny GLUE world the GLUE script tests share: tiny BERT/RoBERTa encoders built here, a few real GLUE rows from
../shared/data/glue (synthetic rows when that folder is absent), and cola, stsb and rte fine-tuned from tiny-bert
(the session fixtures ``glue_world`` and ``glue_trained`` in conftest.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_GLUE = REPO_ROOT.parent / "shared" / "data" / "glue"
TASKS = ("cola", "stsb", "rte")
LR = "0.0005"
LIMITS = ["--max_train_samples", "48", "--max_eval_samples", "32"]


WORDS = "the a cat dog man woman runs sees big small red blue house car park tree".split()


def synthetic_glue(
    d: Path, words: list[str] = WORDS, splits=(("train", 120), ("dev", 40)), min_words: int = 3
) -> None:
    """CoLA, STS-B and RTE in the GLUE TSV layout, seeded random sentences of ``min_words`` to 8 ``words``."""
    gen = torch.Generator().manual_seed(0)

    def sentence():
        idx = torch.randint(
            0, len(words), (int(torch.randint(min_words, 9, (1,), generator=gen)),), generator=gen
        )
        return " ".join(words[i] for i in idx.tolist())

    for folder, header, make in (
        ("CoLA", None, lambda i: f"src\t{i % 2}\t\t{sentence()}"),
        ("STS-B", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
         lambda i: f"{i}\tg\tf\ty\t0\tn\tn\t{sentence()}\t{sentence()}\t{(i % 21) / 4:.3f}"),
        ("RTE", "index\tsentence1\tsentence2\tlabel",
         lambda i: f"{i}\t{sentence()}\t{sentence()}\t{['entailment', 'not_entailment'][i % 2]}"),
    ):  # fmt: skip
        (d / folder).mkdir(parents=True)
        for split, n in splits:
            rows = ([header] if header else []) + [make(i) for i in range(n)]
            (d / folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def build_world(root: Path) -> SimpleNamespace:
    """The GLUE folder and the tiny encoders (with their tokenizers) under ``root``."""
    from utils.glue_data_loader import load_raw_task_splits
    from utils.tiny_models import build_tiny_encoder, build_word_tokenizer

    glue_dir = SHARED_GLUE
    if not (SHARED_GLUE / "CoLA" / "train.tsv").is_file():
        glue_dir = root / "glue"
        synthetic_glue(glue_dir)
    texts = []
    for task in TASKS:
        for split in load_raw_task_splits(
            task, str(glue_dir), max_train_samples=48, max_eval_samples=32
        ).values():
            texts += list(split.texts) + list(split.text_pairs or ())
    for style in ("bert", "roberta"):
        tok = build_word_tokenizer(texts, style, vocab_size=1500)
        build_tiny_encoder(style, len(tok), num_labels=2, seed=0, hidden_size=32, num_hidden_layers=1,
                           pad_token_id=tok.pad_token_id, save_dir=root / f"tiny-{style}", tokenizer=tok)  # fmt: skip
    return SimpleNamespace(
        root=root, glue=str(glue_dir), bert=str(root / "tiny-bert"), roberta=str(root / "tiny-roberta"),
        models=str(root / "save_models"), train_results=str(root / "save_model_results"),
        merge_results=str(root / "save_merge_results"),
    )  # fmt: skip


def train_tasks(world: SimpleNamespace) -> dict[str, dict]:
    """cola, stsb and rte fine-tuned from tiny-bert (a few optimiser steps each)."""
    import train_plms_glue

    results = {}
    for task in TASKS:
        argv = ["--dataset_name", task, "--language_model_name", world.bert, "--num_runs", "1", "--num_epochs", "1",
                "--learning_rate", LR, "--glue_data_dir", world.glue, "--models_dir", world.models,
                "--results_dir", world.train_results, *LIMITS]  # fmt: skip
        results[task] = train_plms_glue.main(argv)[0]
    return results
