"""The GLUE scripts on every supported backbone (BERT, RoBERTa, DeBERTa-v2, ELECTRA, GPT-2), tiny models built here:
train → DARE → pairwise and N-task merge, scores in range, heads bit-identical to the fine-tuned heads; GPT-2's
padding and last-token score; RegMean on GPT-2's Conv1D; bad inputs → one error line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding

import inference_plms_glue
import merge_plms_glue
import train_plms_glue
from tests.glue_helpers import synthetic_glue
from utils.cli import run_main
from utils.customized_trainers import GlueEvaluator
from utils.glue_data_loader import load_raw_split
from utils.glue_merging import MergeSettings, TaskMerger, kept_parameters
from utils.glue_paths import (
    backbone_prefix,
    head_exclude_regex,
    head_parameter_names,
    load_sequence_classifier,
    load_tokenizer,
)
from utils.merge_statistics import collect_regmean_grams, transposed_weight_names
from utils.tiny_models import CLASSIFIER_BACKBONES, build_tiny_classifier, build_word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TASKS = ("cola", "stsb", "rte")
LR = "0.001"
WORDS = "the a cat dog man woman runs sees big small red blue house car park tree not very good bad".split()
EXPECTED_HEADS = {
    "bert": {"classifier.weight", "classifier.bias"},
    "roberta": {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"},
    "deberta-v2": {"pooler.dense.weight", "pooler.dense.bias", "classifier.weight", "classifier.bias"},
    "electra": {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight",
                "classifier.out_proj.bias"},
    "gpt2": {"score.weight"},
}  # fmt: skip


def _tokenizer_style(backbone: str) -> str:
    return {"gpt2": "gpt2", "roberta": "roberta"}.get(backbone, "bert")


def _build(backbone: str, folder: Path, num_labels: int = 2):
    tok = build_word_tokenizer([" ".join(WORDS)], _tokenizer_style(backbone), vocab_size=200)
    kwargs = (
        dict(pad_token_id=None, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        if backbone == "gpt2"
        else dict(pad_token_id=tok.pad_token_id)
    )
    build_tiny_classifier(backbone, len(tok), num_labels=num_labels, hidden_size=16, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=32, save_dir=folder, tokenizer=tok, **kwargs)  # fmt: skip
    return tok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue_backbones")
    synthetic_glue(root / "glue", WORDS, splits=(("train", 60), ("dev", 24)), min_words=2)
    load_raw_split.cache_clear()
    for backbone in CLASSIFIER_BACKBONES:
        _build(backbone, root / f"tiny-{backbone}")
    yield SimpleNamespace(root=root, glue=str(root / "glue"))
    load_raw_split.cache_clear()


def _exit(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_main(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


def _train(world, backbone: str, models: Path, tasks=TASKS) -> None:
    for task in tasks:
        train_plms_glue.main(["--dataset_name", task, "--language_model_name", str(world.root / f"tiny-{backbone}"),
                              "--num_runs", "1", "--num_epochs", "1", "--learning_rate", LR, "--batch_size", "8",
                              "--glue_data_dir", world.glue, "--models_dir", str(models), "--results_dir",
                              str(models.parent / "train_results"), "--max_train_samples", "24",
                              "--max_eval_samples", "16"])  # fmt: skip


# ----------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("backbone", CLASSIFIER_BACKBONES)
def test_head_is_what_the_class_adds_on_top_of_its_base_model(backbone, world):
    import re

    model = load_sequence_classifier(world.root / f"tiny-{backbone}")
    heads = set(head_parameter_names(model))
    assert heads == EXPECTED_HEADS[backbone]
    backbone_names = set(kept_parameters(model))
    assert backbone_names and not backbone_names & heads
    assert backbone_names | heads == {n for n, _ in model.named_parameters()}
    assert all(n.startswith(backbone_prefix(model) + ".") for n in backbone_names)
    (pattern,) = head_exclude_regex(model)
    assert {n for n, _ in model.named_parameters() if re.match(pattern, n)} == heads


# ----------------------------------------------------------------------------------------------- GPT-2
def test_gpt2_pads_on_the_right_and_scores_the_last_real_token(world, tmp_path):
    folder = world.root / "tiny-gpt2"
    raw = __import__("transformers").AutoTokenizer.from_pretrained(str(folder))
    assert raw.pad_token is None  # GPT-2 ships without one
    left = tmp_path / "left"
    raw.padding_side = "left"
    raw.save_pretrained(str(left))
    tok = load_tokenizer(left)
    assert tok.padding_side == "right" and tok.pad_token == "<|endoftext|>"
    model = load_sequence_classifier(folder, pad_token_id=tok.pad_token_id)
    assert model.config.pad_token_id == tok.pad_token_id
    texts = ["the cat", "a big red dog runs to the park", "tree", "zebra unknownword"]
    singles = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            enc = tok(text, return_tensors="pt")
            singles.append(model(**enc).logits[0])
        batch = DataCollatorWithPadding(tok)([tok(t) for t in texts])
        assert (batch["input_ids"][:, -1] == tok.pad_token_id).sum() == len(texts) - 1  # right padding
        batched = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(batched, torch.stack(singles), atol=1e-5, rtol=1e-5)


def test_regmean_on_gpt2_conv1d_matches_a_numpy_reference(world):
    model = load_sequence_classifier(world.root / "tiny-gpt2", pad_token_id=0)
    names = list(kept_parameters(model))
    conv = transposed_weight_names(model, names)
    assert "transformer.h.0.attn.c_attn.weight" in conv and "transformer.h.0.mlp.c_fc.weight" in conv
    gen = torch.Generator().manual_seed(1)
    models, grams = [], []
    for _ in range(3):
        m = load_sequence_classifier(world.root / "tiny-gpt2", pad_token_id=0)
        with torch.no_grad():
            for p in kept_parameters(m).values():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        batches = [{"input_ids": torch.randint(2, 20, (4, 6), generator=gen),
                    "attention_mask": torch.ones(4, 6, dtype=torch.long)} for _ in range(2)]  # fmt: skip
        grams.append(collect_regmean_grams(m, batches, 8, param_names=names))
        models.append(m)
    name = "transformer.h.0.mlp.c_fc.weight"  # stored in × out
    assert grams[0][name].shape == (16, 16)
    settings = MergeSettings("regmean_merging", "x")
    merger = TaskMerger(settings, kept_parameters(model), models, ["cola", "stsb", "rte"], None, None)
    merger.statistics = lambda key, i, rate: {8: grams[i]}  # the statistics above
    merged = merger.merge({"nums_regmean_examples": [8, 8, 8], "reduce_non_diagonal_ratio": 1.0})
    g = [gr[name].double().numpy() for gr in grams]
    w = [kept_parameters(m)[name].double().numpy() for m in models]  # in × out
    expected = np.linalg.solve(sum(g), sum(gi @ wi for gi, wi in zip(g, w)))
    np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    bias = "transformer.h.0.mlp.c_fc.bias"  # not a weight: averaged
    torch.testing.assert_close(merged[bias], sum(kept_parameters(m)[bias] for m in models) / 3)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture()
def head_probe(monkeypatch):
    """Records every head tensor of every model the GLUE evaluator evaluates."""
    seen: list[dict[str, torch.Tensor]] = []
    original = GlueEvaluator.evaluate

    def evaluate(self, dataset, task_name):
        heads = set(head_parameter_names(self.model))
        seen.append({n: p.detach().clone() for n, p in self.model.named_parameters() if n in heads})
        return original(self, dataset, task_name)

    monkeypatch.setattr(GlueEvaluator, "evaluate", evaluate)
    return seen


def _saved_heads(models: Path, backbone: str) -> list[dict[str, torch.Tensor]]:
    out = []
    for task in TASKS:
        weights = load_file(str(models / task / f"tiny-{backbone}_lr{LR}" / "model.safetensors"))
        out.append({n: t for n, t in weights.items() if n in EXPECTED_HEADS[backbone]})
    return out


def _is_one_of(heads: dict[str, torch.Tensor], candidates: list[dict[str, torch.Tensor]]) -> bool:
    return any(
        heads.keys() == c.keys() and all(torch.equal(heads[n], c[n]) for n in heads) for c in candidates
    )


@pytest.mark.slow
@pytest.mark.parametrize("backbone", CLASSIFIER_BACKBONES)
def test_train_dare_pairwise_and_all_task_merge(backbone, world, tmp_path, head_probe):
    models = tmp_path / "save_models"
    _train(world, backbone, models)
    lm = str(world.root / f"tiny-{backbone}")
    saved = _saved_heads(models, backbone)
    assert all(h.keys() == EXPECTED_HEADS[backbone] for h in saved)
    common = ["--language_model_name", lm, "--learning_rate", LR, "--glue_data_dir", world.glue,
              "--models_dir", str(models), "--max_eval_samples", "16", "--batch_size", "8"]  # fmt: skip
    # DARE on every task: the backbone changes, the head is the fine-tuned one
    dare = inference_plms_glue.main([*common, "--dataset_names", *TASKS, "--results_dir", str(tmp_path / "dare"),
                                     "--weight_mask_rate", "0.5", "--use_weight_rescale"])  # fmt: skip
    assert -1 <= dare[0]["eval_matthews_correlation"] <= 1 and 0 <= dare[2]["eval_accuracy"] <= 1
    assert -1 <= dare[1]["eval_averaged_scores"] <= 1
    # pairwise: task arithmetic on cola → rte
    pair = merge_plms_glue.main([*common, "--dataset_names", "cola", "rte", "--results_dir", str(tmp_path / "m"),
                                 "--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.5"])  # fmt: skip
    assert [r["target_dataset"] for r in pair] == ["rte", "cola"]
    assert 0 <= pair[0]["eval_accuracy"] <= 1 and -1 <= pair[1]["eval_matthews_correlation"] <= 1
    assert set(pair[0]["excluded_parameters"]) == EXPECTED_HEADS[backbone]
    # all tasks at once: DARE + TIES (which first runs the plain TIES search)
    (result,) = merge_plms_glue.main([*common, "--dataset_names", *TASKS, "--results_dir", str(tmp_path / "m"),
                                      "--merge_mode", "all", "--merging_method_name", "mask_merging",
                                      "--mask_apply_method", "ties_merging", "--use_weight_rescale",
                                      "--scaling_coefficient", "0.5", "1.0", "--param_value_mask_rate", "0.8",
                                      "--weight_mask_rate", "0.5"])  # fmt: skip
    assert result["tasks"] == list(TASKS) and result["merging_method_name"] == "mask_merging"
    scores = result["test_scores"]
    assert -1 <= scores["cola"] <= 1 and -1 <= scores["stsb"] <= 1 and 0 <= scores["rte"] <= 1
    assert result["mean"] == pytest.approx(sum(scores.values()) / 3, abs=2e-4)
    assert result["hyperparameters"]["weight_mask_rate"] == 0.5
    assert result["hyperparameters"]["scaling_coefficient"] in (0.5, 1.0)
    assert len(result["search"]) == 1
    folder = tmp_path / "m" / "all_cola_stsb_rte"
    plain = next((folder / "ties_merging").glob("*.json"))
    assert len(json.loads(plain.read_text())["search"]) == 2  # the plain grid: λ ∈ {0.5, 1.0}
    table = next((tmp_path / "m" / "summary" / "all_cola_stsb_rte").glob("*.csv"))
    rows = table.read_text().splitlines()
    assert rows[0].startswith("method,settings,cola,stsb,rte,mean,normalized_mean")
    assert rows[1].startswith("fine-tuned (individual)") and len(rows) == 4  # fine-tuned, TIES, DARE + TIES
    assert table.with_suffix(".png").stat().st_size > 1000 and table.with_suffix(".md").is_file()
    # every evaluated model carried one of the fine-tuned heads, bit for bit
    assert head_probe and all(_is_one_of(h, saved) for h in head_probe)


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_backbone_without_a_classification_class(world, tmp_path, capsys):
    from transformers import ViTConfig

    folder = tmp_path / "tiny-vit"
    ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    ).save_pretrained(folder)
    build_word_tokenizer([" ".join(WORDS)], "bert", vocab_size=100).save_pretrained(str(folder))
    out = tmp_path / "out"
    code, err = _exit(train_plms_glue.main, ["--dataset_name", "cola", "--language_model_name", str(folder),
                                             "--glue_data_dir", world.glue, "--models_dir", str(out / "m"),
                                             "--results_dir", str(out / "r"), "--num_runs", "1"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "model type 'vit' has no sequence-classification class" in err
    assert not out.exists()


@pytest.mark.slow
def test_tasks_fine_tuned_from_different_backbones(world, tmp_path, capsys):
    models = tmp_path / "save_models"
    _train(world, "bert", models, tasks=("cola",))
    # an rte "tiny-bert" model that really is a GPT-2
    fake = models / "rte" / f"tiny-bert_lr{LR}"
    _build("gpt2", fake)
    (fake / "trainer_state.json").write_text("{}")
    common = ["--language_model_name", str(world.root / "tiny-bert"), "--learning_rate", LR, "--glue_data_dir",
              world.glue, "--models_dir", str(models), "--dataset_names", "cola", "rte"]  # fmt: skip
    before = sorted(p for p in tmp_path.rglob("*"))
    capsys.readouterr()
    for mode in ("pairs", "all"):
        out = tmp_path / f"merge_{mode}"
        code, err = _exit(
            merge_plms_glue.main, [*common, "--results_dir", str(out), "--merge_mode", mode], capsys
        )
        assert code == 2 and err.count("\n") == 1 and "different architectures" in err and "gpt2" in err, err
        assert not out.exists()
    code, err = _exit(inference_plms_glue.main, [*common, "--results_dir", str(tmp_path / "inf"),
                                                 "--weight_mask_rate", "0.5"], capsys)  # fmt: skip
    assert code == 2 and "different architectures" in err and not (tmp_path / "inf").exists()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "merge_plms_glue.py"), *common, "--merge_mode", "all",
                           "--results_dir", str(tmp_path / "cli")], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: models of different architectures")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
