"""End to end: train_plms_glue.py (single and multi-task), inference_plms_glue.py (DARE sweep) and
merge_plms_glue.py (every method and DARE + X on one pair) with tiny BERT/RoBERTa models, on a few real GLUE rows
from ../shared/data/glue (synthetic rows when that folder is absent): the session fixtures ``glue_world`` and
``glue_trained`` of conftest.py (tests/glue_helpers.py)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference_plms_glue
import merge_plms_glue
import train_plms_glue
from tests.glue_helpers import LIMITS, LR, REPO_ROOT
from utils.cli import UserError, run_main
from utils.glue_merging import MergeSettings, settings_suffix
from utils.glue_paths import chosen_learning_rate, finetuned_model_dir, learning_rates, save_model_name
from utils.multitask_model import PAD_LOGIT, MultiTaskModel
from utils.tiny_models import build_tiny_encoder


@pytest.fixture(scope="module")
def world(glue_world):
    return glue_world


@pytest.fixture(scope="module")
def trained(glue_trained):
    """cola, stsb and rte fine-tuned from tiny-bert (a few optimiser steps each)."""
    return glue_trained


def _read(path) -> dict:
    return json.loads(Path(path).read_text())


def _csv_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _exit_code(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_main(lambda: main(argv))
    return info.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- paths
def test_model_paths_and_authors_learning_rates():
    assert save_model_name("roberta-base", 1e-5) == "roberta-base_lr1e-05"
    assert save_model_name("bert-base-uncased", 5e-5, run=2) == "bert-base-uncased_lr5e-05_run2"
    assert chosen_learning_rate("cola", "bert-base-uncased") == 5e-5
    assert chosen_learning_rate("cola", "roberta-base") == 1e-5
    assert chosen_learning_rate("mrpc", "FacebookAI/roberta-base") == 5e-5
    assert chosen_learning_rate("cola", "some-other-model") == 1e-5
    assert chosen_learning_rate("cola", "bert-base-uncased", 3e-5) == 3e-5
    # one learning rate per task (--learning_rate sst2=5e-4,qnli=1e-4)
    assert learning_rates("5e-4") == 5e-4
    per_task = learning_rates("sst2=5e-4, qnli=0.0001")
    assert per_task == {"sst2": 5e-4, "qnli": 1e-4}
    assert chosen_learning_rate("qnli", "bert-base-uncased", per_task) == 1e-4
    assert finetuned_model_dir("m", "sst2", "tiny", per_task) == Path("m/sst2/tiny_lr0.0005")
    with pytest.raises(UserError, match="names no rate for cola"):
        chosen_learning_rate("cola", "bert-base-uncased", per_task)
    for bad in ("fast", "sst2=", "=1e-4", "sst2=1e-4,sst2=2e-4", "sst2=1e-4=2", "sst2=1e-4,,qnli=1e-4"):
        with pytest.raises(argparse.ArgumentTypeError, match="neither a learning rate"):
            learning_rates(bad)
    assert finetuned_model_dir("./save_models", "stsb", "bert-base-uncased") == Path(
        "save_models/stsb/bert-base-uncased_lr5e-05"
    )


def test_result_names_do_not_collide():
    variants = [
        dict(merging_method_name="fisher_merging"),
        dict(merging_method_name="fisher_merging", fisher_variant="per_example"),
        dict(merging_method_name="fisher_merging", normalize_fisher_weight=True),
        dict(merging_method_name="fisher_merging", selection_split="test"),
        dict(merging_method_name="fisher_merging", seed=1),
        dict(merging_method_name="fisher_merging", max_train_samples=10),
        dict(merging_method_name="regmean_merging"),
        dict(merging_method_name="regmean_merging", regmean_exclude_padding=True),
        dict(merging_method_name="ties_merging"),
        dict(merging_method_name="ties_merging", ties_trim_scope="tensor"),
        dict(merging_method_name="mask_merging", mask_apply_method="ties_merging"),
        dict(merging_method_name="mask_merging", mask_apply_method="ties_merging", use_weight_rescale=True),
        dict(merging_method_name="mask_merging", mask_apply_method="ties_merging", mask_strategy="magnitude"),
        dict(
            merging_method_name="mask_merging",
            mask_apply_method="ties_merging",
            weight_format="finetuned_weight",
        ),
    ]
    names = set()
    for v in variants:
        settings = MergeSettings(language_model_name="roberta-base", **v)
        names.add((settings.merging_method_name, settings.base_method, settings_suffix(settings)))
    assert len(names) == len(variants)
    grid = MergeSettings("task_arithmetic", "roberta-base")
    grid.grids["scaling_coefficient"] = [0.5]
    assert (
        settings_suffix(grid).startswith("_grid")
        and settings_suffix(MergeSettings("task_arithmetic", "x")) == ""
    )


# ----------------------------------------------------------------------------------------------- training
def test_multitask_model_is_vectorised_per_example_heads():
    backbone = build_tiny_encoder("bert", 30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).bert
    model = MultiTaskModel(backbone, ["cola", "stsb", "mnli"]).eval()
    ids = torch.randint(1, 30, (5, 6))
    mask = torch.ones_like(ids)
    dataset_ids = torch.tensor([0, 5, 3, 0, 5])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, dataset_ids=dataset_ids)["logits"]
        pooled = backbone(input_ids=ids, attention_mask=mask).pooler_output
    assert logits.shape == (5, 3)
    names = {0: "cola", 3: "stsb", 5: "mnli"}
    for b in range(5):  # the original's per-example loop, padded with -1000
        head = model.heads[names[int(dataset_ids[b])]]
        row = head(pooled[b])
        expected = torch.cat([row, torch.full((3 - row.numel(),), PAD_LOGIT)])
        torch.testing.assert_close(logits[b], expected)
    with pytest.raises(ValueError, match="without a head"):
        model(input_ids=ids, attention_mask=mask, dataset_ids=torch.tensor([1, 0, 0, 0, 0]))


def test_train_single_task(world, trained):
    expected = {"cola": ["eval_matthews_correlation"], "stsb": ["eval_pearson", "eval_spearmanr", "eval_averaged_scores"],
                "rte": ["eval_accuracy"]}  # fmt: skip
    name = f"tiny-bert_lr{LR}"
    for task, keys in expected.items():
        result = _read(Path(world.train_results) / task / name / f"{name}.json")
        assert result == trained[task]
        assert result["epoch"] == 1.0 and "eval_loss" in result
        for key in keys:
            low = 0.0 if key == "eval_accuracy" else -1.0
            assert low <= result[key] <= 1.0, (task, key, result[key])
        assert all(round(v, 4) == v for v in result.values() if isinstance(v, float))  # rounded to 4 decimals
        model_dir = Path(world.models) / task / name
        assert {"trainer_state.json", "config.json", "model.safetensors"} <= {
            p.name for p in model_dir.iterdir()
        }
        assert not list(model_dir.glob("checkpoint-*"))  # checkpoints removed after the best model was saved
    stsb = _read(Path(world.train_results) / "stsb" / name / f"{name}.json")
    assert stsb["eval_averaged_scores"] == pytest.approx(
        (stsb["eval_pearson"] + stsb["eval_spearmanr"]) / 2, abs=1e-4
    )
    # a folder with trainer_state.json is evaluated, not trained again: the same model gives the same numbers
    state = Path(world.models) / "cola" / name / "trainer_state.json"
    before = state.stat().st_mtime_ns
    again = train_plms_glue.main(["--dataset_name", "cola", "--language_model_name", world.bert, "--num_runs", "1",
                                  "--learning_rate", LR, "--glue_data_dir", world.glue, "--models_dir", world.models,
                                  "--results_dir", world.train_results, *LIMITS])[0]  # fmt: skip
    assert state.stat().st_mtime_ns == before
    assert again["eval_matthews_correlation"] == trained["cola"]["eval_matthews_correlation"]
    assert again["eval_loss"] == trained["cola"]["eval_loss"]


def test_train_multitask(world):
    argv = ["--dataset_name", "rte", "--auxiliary_dataset_name", "cola", "--multitask_training",
            "--language_model_name", world.roberta, "--num_runs", "1", "--num_epochs", "1", "--learning_rate", LR,
            "--glue_data_dir", world.glue, "--models_dir", world.models, "--results_dir", world.train_results,
            "--max_train_samples", "24", "--max_eval_samples", "16"]  # fmt: skip
    result = train_plms_glue.main(argv)[0]
    name = f"tiny-roberta_lr{LR}"
    assert _read(Path(world.train_results) / "cola_rte" / name / f"{name}.json") == result
    assert -1 <= result["cola_matthews_correlation"] <= 1 and 0 <= result["rte_accuracy"] <= 1
    assert result["eval_averaged_scores"] == pytest.approx(
        (result["cola_matthews_correlation"] + result["rte_accuracy"]) / 2, abs=1e-4
    )
    assert [r["dataset_name"] for r in result["eval_all_results"]] == ["cola", "rte"]
    model = MultiTaskModel.from_pretrained(Path(world.models) / "cola_rte" / name)
    assert model.task_names == ["cola", "rte"]
    out = model(input_ids=torch.tensor([[0, 5, 6, 2]]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                dataset_ids=torch.tensor([7]))["logits"]  # fmt: skip
    assert out.shape == (1, 2)


# ----------------------------------------------------------------------------------------------- inference
def test_inference_sweep(world, trained):
    results_dir = str(world.root / "inference_results")
    common = ["--language_model_name", world.bert, "--learning_rate", LR, "--dataset_names", "cola", "stsb",
              "--glue_data_dir", world.glue, "--models_dir", world.models, "--results_dir", results_dir,
              "--max_eval_samples", "32"]  # fmt: skip
    plain = inference_plms_glue.main(common)
    # rate 0 is plain evaluation: the numbers of the training script's test evaluation
    for task, metrics in zip(("cola", "stsb"), plain):
        for key in ("eval_loss", "eval_matthews_correlation", "eval_averaged_scores"):
            if key in trained[task]:
                assert metrics[key] == trained[task][key], (task, key)
    name0 = f"tiny-bert_lr{LR}_inference_mask_0.0_maxeval32"
    assert (Path(results_dir) / "cola" / name0 / f"{name0}.json").is_file()
    dare = inference_plms_glue.main([*common, "--weight_mask_rate", "0.9", "--use_weight_rescale"])
    name = f"tiny-bert_lr{LR}_inference_mask_0.9_rescale_True_seed0_maxeval32"
    stsb = _read(Path(results_dir) / "stsb" / name / f"{name}.json")
    assert stsb == dare[1] and -1 <= stsb["eval_averaged_scores"] <= 1
    assert dare[1]["eval_loss"] != plain[1]["eval_loss"]  # the model really changed
    rows = _csv_rows(
        Path(results_dir)
        / "summary"
        / f"tiny-bert_lr{LR}_inference_mask_0.9_rescale_True_seed0_maxeval32.csv"
    )
    assert [r["task"] for r in rows] == ["cola", "stsb"]
    assert [r["main_metric"] for r in rows] == ["matthews_correlation", "averaged_scores"]
    assert float(rows[1]["score"]) == stsb["eval_averaged_scores"]
    md = (
        Path(results_dir) / "summary" / f"tiny-bert_lr{LR}_inference_mask_0.9_rescale_True_seed0_maxeval32.md"
    ).read_text()
    assert md.startswith("| task | main_metric | score |")
    inference_plms_glue.main([*common[:4], "--dataset_names", "rte", *common[7:], "--weight_mask_rate", "0.5",
                              "--mask_strategy", "magnitude", "--weight_format", "finetuned_weight"])  # fmt: skip
    name = f"tiny-bert_lr{LR}_inference_mask_0.5_rescale_False_strategy_magnitude_weight_format_finetuned_weight_maxeval32"
    assert 0 <= _read(Path(results_dir) / "rte" / name / f"{name}.json")["eval_accuracy"] <= 1


# ----------------------------------------------------------------------------------------------- merging
def _merge(world, *extra) -> list[dict]:
    argv = ["--language_model_name", world.bert, "--learning_rate", LR, "--dataset_names", "cola", "stsb",
            "--glue_data_dir", world.glue, "--models_dir", world.models, "--results_dir", world.merge_results,
            "--max_train_samples", "32", "--max_eval_samples", "32", "--batch_size", "16",
            "--scaling_coefficient", "0.5", "--param_value_mask_rate", "0.8", "--fisher_scaling_coefficients", "1.0",
            "--nums_fisher_examples", "16", "--nums_regmean_examples", "16", "--reduce_non_diagonal_ratio", "0.9",
            "--weight_mask_rate", "0.5", *extra]  # fmt: skip
    return merge_plms_glue.main(argv)


def _check_pair_results(results, method, keys):
    assert [(r["source_dataset"], r["target_dataset"]) for r in results] == [
        ("cola", "stsb"),
        ("stsb", "cola"),
    ]
    for r in results:
        main = "eval_averaged_scores" if r["target_dataset"] == "stsb" else "eval_matthews_correlation"
        assert -1 <= r[main] <= 1 and -1 <= r["selection_metrics"][main] <= 1
        assert r["merging_method_name"] == method and r["selection_split"] == "validation"
        for key in keys:
            assert key in r, key
        assert len(r["search"]) >= 1


def test_merge_every_method_on_one_pair(world, trained):
    root = Path(world.merge_results)
    # DARE + RegMean before plain RegMean exists: it runs the plain search itself (and writes its result)
    dare_regmean = _merge(world, "--merging_method_name", "mask_merging", "--mask_apply_method", "regmean_merging",
                          "--use_weight_rescale")  # fmt: skip
    plain_regmean = root / "cola_stsb" / "regmean_merging"
    assert len(list(plain_regmean.glob("tiny-bert_*.json"))) == 1
    _check_pair_results(
        dare_regmean,
        "mask_merging",
        ["nums_regmean_examples", "reduce_non_diagonal_ratio", "weight_mask_rate"],
    )
    assert dare_regmean[0]["nums_regmean_examples"] == [16, 16] and dare_regmean[0]["weight_mask_rate"] == 0.5

    results = {}
    for method, keys in (("average_merging", []), ("task_arithmetic", ["scaling_coefficient"]),
                         ("ties_merging", ["scaling_coefficient", "param_value_mask_rate"]),
                         ("fisher_merging", ["fisher_scaling_coefficients", "nums_fisher_examples"])):  # fmt: skip
        results[method] = _merge(world, "--merging_method_name", method)
        _check_pair_results(results[method], method, keys)
        files = list((root / "cola_stsb" / method).glob("tiny-bert*.json"))
        assert len(files) == 1 and _read(files[0]) == results[method][0]
        assert len(_csv_rows(next((root / "summary" / method).glob("*.csv")))) == 2
    # Average of two models = Task Arithmetic with λ = 1/2: the same merged encoder, the same numbers
    for avg, ta in zip(results["average_merging"], results["task_arithmetic"]):
        assert avg["selection_metrics"]["eval_loss"] == ta["selection_metrics"]["eval_loss"]
        assert avg["eval_loss"] == ta["eval_loss"]
    # DARE + Task Arithmetic reads the plain best from its file
    dare_ta = _merge(world, "--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic",
                     "--use_weight_rescale")  # fmt: skip
    _check_pair_results(dare_ta, "mask_merging", ["scaling_coefficient", "weight_mask_rate"])
    assert dare_ta[0]["mask_apply_method"] == "task_arithmetic"
    assert dare_ta[0]["eval_loss"] != results["task_arithmetic"][0]["eval_loss"]
    # the original protocol: select on test, report test
    select_test = _merge(world, "--merging_method_name", "task_arithmetic", "--selection_split", "test")
    assert select_test[0]["selection_split"] == "test"
    assert select_test[0]["eval_loss"] == select_test[0]["selection_metrics"]["eval_loss"]
    assert len(list((root / "cola_stsb" / "task_arithmetic").glob("*select_test*.json"))) == 1
    # a cheaper search on the first 8 validation rows: the one-point grid selects the same λ, so the test numbers are
    # those of the full search; the selection numbers are the 8 rows' own
    cheap = _merge(world, "--merging_method_name", "task_arithmetic", "--max_selection_samples", "8")
    for full, few in zip(results["task_arithmetic"], cheap):
        assert few["scaling_coefficient"] == full["scaling_coefficient"]
        assert few["eval_loss"] == full["eval_loss"]
        assert few["selection_metrics"]["eval_loss"] != full["selection_metrics"]["eval_loss"]
    assert len(list((root / "cola_stsb" / "task_arithmetic").glob("*maxsel8*.json"))) == 1


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_error_line_and_nothing_written(world, trained, capsys, tmp_path):
    out = str(tmp_path / "out")
    code, err = _exit_code(train_plms_glue.main, ["--dataset_name", "colaa", "--results_dir", out], capsys)
    assert code == 2 and "unknown GLUE task 'colaa'" in err and err.count("\n") == 1
    common = ["--language_model_name", world.bert, "--learning_rate", LR, "--glue_data_dir", world.glue,
              "--models_dir", world.models, "--results_dir", out]  # fmt: skip
    code, err = _exit_code(inference_plms_glue.main, [*common, "--dataset_names", "cola", "qnli"], capsys)
    assert (
        code == 2 and "fine-tuned model not found" in err and "train_plms_glue.py --dataset_name qnli" in err
    )
    code, err = _exit_code(inference_plms_glue.main, [*common, "--dataset_names", "cola", "--weight_mask_rate", "1.5"],
                           capsys)  # fmt: skip
    assert code == 2 and "weight_mask_rate" in err
    code, err = _exit_code(inference_plms_glue.main, [*common[:2], "--learning_rate", "cola=1e-4,stsb", *common[4:],
                                                      "--dataset_names", "cola"], capsys)  # fmt: skip
    assert code == 2 and "neither a learning rate" in err.splitlines()[-1]  # argparse: usage, then the error
    code, err = _exit_code(merge_plms_glue.main, [*common[:2], "--learning_rate", f"cola={LR}", *common[4:],
                                                  "--dataset_names", "cola", "stsb"], capsys)  # fmt: skip
    assert code == 2 and "names no rate for stsb" in err and err.count("\n") == 1
    code, err = _exit_code(merge_plms_glue.main, [*common, "--dataset_names", "cola", "stsb", "--merging_method_name",
                                                  "mask_merging", "--weight_mask_rate", "0.5", "-0.1"], capsys)  # fmt: skip
    assert code == 2 and "must be in [0, 1]" in err
    partial_glue = tmp_path / "glue"
    shutil.copytree(Path(world.glue) / "CoLA", partial_glue / "CoLA")
    code, err = _exit_code(merge_plms_glue.main, [*common[:4], "--glue_data_dir", str(partial_glue), *common[6:],
                                                  "--dataset_names", "cola", "stsb"], capsys)  # fmt: skip
    assert code == 2 and "lacks stsb" in err
    # a RoBERTa model where a BERT one is expected: different architectures
    mixed = tmp_path / "mixed_models"
    shutil.copytree(Path(world.models) / "cola", mixed / "cola")
    shutil.copytree(world.roberta, mixed / "stsb" / f"tiny-bert_lr{LR}")
    (mixed / "stsb" / f"tiny-bert_lr{LR}" / "trainer_state.json").write_text("{}")
    code, err = _exit_code(merge_plms_glue.main, [*common[:6], "--models_dir", str(mixed), "--results_dir", out,
                                                  "--dataset_names", "cola", "stsb"], capsys)  # fmt: skip
    assert code == 2 and "different architectures" in err
    assert not Path(out).exists()  # nothing half-written


def test_script_exit_status_from_the_command_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "merge_plms_glue.py"), "--dataset_names", "cola", "nope",
                           "--results_dir", str(tmp_path / "r")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown GLUE task 'nope' (choose from cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte)"
    ]
    assert not (tmp_path / "r").exists()
