"""FusionBench's GPT-2 protocol: the command block of docs/glue.md, run verbatim (through bash) on tiny GPT-2 models
built offline under the names it uses (``gpt2``, ``tanganke/gpt2_{task}``) and a synthetic GLUE folder."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import merge_plms_glue
from utils.glue_data_loader import get_task, load_raw_split
from utils.glue_paths import head_parameter_names
from utils.tiny_models import build_tiny_classifier, build_word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2")
WORDS = "the a cat dog man woman runs sees big small red blue house car park tree why how what".split()


def _sentence(i: int, k: int = 5) -> str:
    return " ".join(WORDS[(i * (j + 3) + j) % len(WORDS)] for j in range(2 + i % k))


def _write_glue(d: Path) -> None:
    nli = ["entailment", "neutral", "contradiction"]
    layouts = {
        "CoLA": (None, lambda i: f"src\t{i % 2}\t\t{_sentence(i)}"),
        "SST-2": ("sentence\tlabel", lambda i: f"{_sentence(i)}\t{i % 2}"),
        "MRPC": ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                 lambda i: f"{i % 2}\t{i}\t{i + 1}\t{_sentence(i)}\t{_sentence(i + 1)}"),
        "QNLI": ("index\tquestion\tsentence\tlabel",
                 lambda i: f"{i}\t{_sentence(i)}\t{_sentence(i + 2)}\t{['entailment', 'not_entailment'][i % 2]}"),
        "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                lambda i: f"{i}\t{i}\t{i + 1}\t{_sentence(i)}\t{_sentence(i + 3)}\t{i % 2}"),
        "RTE": ("index\tsentence1\tsentence2\tlabel",
                lambda i: f"{i}\t{_sentence(i)}\t{_sentence(i + 1)}\t{['entailment', 'not_entailment'][i % 2]}"),
        "MNLI": ("sentence1\tsentence2\tgold_label", lambda i: f"{_sentence(i)}\t{_sentence(i + 4)}\t{nli[i % 3]}"),
    }  # fmt: skip
    for folder, (header, row) in layouts.items():
        (d / folder).mkdir(parents=True)
        for name, n in (("train.tsv", 40), ("dev_matched.tsv" if folder == "MNLI" else "dev.tsv", 12)):
            lines = ([header] if header else []) + [row(i) for i in range(n)]
            (d / folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _build_models(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``gpt2`` (no pad token, as released) and ``tanganke/gpt2_{task}`` (its backbone moved a little, a head of the
    task's size, pad id = eos as the fine-tuned checkpoints carry). Returns each task's head."""
    tok = build_word_tokenizer([" ".join(WORDS)], "gpt2", vocab_size=100)
    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tokenizer=tok)  # fmt: skip
    build_tiny_classifier("gpt2", len(tok), pad_token_id=None, save_dir=root / "gpt2", **common)
    heads = {}
    gen = torch.Generator().manual_seed(0)
    for i, task in enumerate(TASKS):
        model = build_tiny_classifier("gpt2", len(tok), num_labels=get_task(task).num_labels, seed=0,
                                      pad_token_id=tok.eos_token_id, **{**common, "tokenizer": None})  # fmt: skip
        torch.manual_seed(100 + i)
        torch.nn.init.normal_(model.score.weight, std=0.5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("transformer."):
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(root / "tanganke" / f"gpt2_{task}"))
        tok.save_pretrained(str(root / "tanganke" / f"gpt2_{task}"))
        heads[task] = {
            n: p.detach().clone() for n, p in model.named_parameters() if n in head_parameter_names(model)
        }
    return heads


def _docs_commands(cwd: Path) -> list[list[str]]:
    """The ``fusionbench-gpt2`` block of docs/glue.md, expanded by bash with ``python`` recording its arguments."""
    text = (REPO_ROOT / "docs" / "glue.md").read_text(encoding="utf-8")
    block = re.search(r"```bash fusionbench-gpt2\n(.*?)```", text, re.S)
    assert block, "docs/glue.md lacks the fusionbench-gpt2 command block"
    shim = 'python() { printf "%s\\0" "$@" >> argv.bin; printf "\\n\\0" >> argv.bin; }\n'
    subprocess.run(["bash", "-c", shim + block.group(1)], cwd=cwd, check=True, timeout=60)
    raw = (cwd / "argv.bin").read_bytes().decode().split("\0")
    commands, current = [], []
    for item in raw:
        if item == "\n":
            commands.append(current)
            current = []
        elif item:
            current.append(item)
    return commands


@pytest.mark.slow
def test_fusionbench_gpt2_commands_on_tiny_models(tmp_path, monkeypatch):
    _write_glue(tmp_path / "glue")
    load_raw_split.cache_clear()
    heads = _build_models(tmp_path)
    commands = _docs_commands(tmp_path)
    assert [c[0] for c in commands] == ["merge_plms_glue.py"] * 5
    methods = [c[c.index("--merging_method_name") + 1] for c in commands]
    assert methods == [
        "average_merging",
        "fisher_merging",
        "regmean_merging",
        "task_arithmetic",
        "ties_merging",
    ]
    monkeypatch.chdir(tmp_path)  # gpt2 and tanganke/gpt2_{task} resolve to the tiny folders here
    seen = []
    from utils.customized_trainers import GlueEvaluator

    original = GlueEvaluator.evaluate

    def evaluate(self, dataset, task_name):  # every evaluated model carries its task's own head, bit for bit
        own = {n: p for n, p in self.model.named_parameters() if n in heads[task_name]}
        seen.append(all(torch.equal(own[n], heads[task_name][n]) for n in heads[task_name]))
        return original(self, dataset, task_name)

    monkeypatch.setattr(GlueEvaluator, "evaluate", evaluate)
    extra = [
        "--glue_data_dir",
        str(tmp_path / "glue"),
        "--max_train_samples",
        "24",
        "--max_eval_samples",
        "12",
    ]
    results = [merge_plms_glue.main(c[1:] + extra)[0] for c in commands]
    load_raw_split.cache_clear()
    assert seen and all(seen)
    for r in results:
        assert r["tasks"] == list(TASKS) and r["metric"] == "accuracy"
        assert set(r["score_keys"].values()) == {"eval_accuracy"}
        assert all(0 <= v <= 1 for v in r["test_scores"].values())
        assert r["normalized_mean"] is not None
        assert len(r["search"]) == 1  # fixed settings, as published: no search
    assert results[3]["hyperparameters"] == {"scaling_coefficient": 0.5}
    assert results[4]["hyperparameters"] == {"scaling_coefficient": 0.6, "param_value_mask_rate": 0.8}
    assert results[2]["hyperparameters"]["reduce_non_diagonal_ratio"] == 0.6
    assert results[1]["hyperparameters"]["nums_fisher_examples"] == [256] * 7
    table = next((tmp_path / "save_merge_results" / "fusionbench_gpt2" / "summary").rglob("*.json"))
    rows = json.loads(table.read_text())["rows"]
    assert rows[0]["method"] == "fine-tuned (individual)" and len(rows) == 6
    assert {r["method"] for r in rows[1:]} == set(methods)
    assert table.with_suffix(".png").is_file() and table.with_suffix(".md").is_file()
