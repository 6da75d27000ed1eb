"""make_report.py: results files of the GLUE, LLM and quickstart scripts → tables and plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import make_report
from utils.cli import UserError
from utils.results_report import (
    QUICKSTART_SCHEMA,
    dare_table,
    keeps_fraction_up_to,
    merge_label,
    parse_dare_name,
    records_from_file,
)

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _glue_dare(root: Path, task: str, metric: str, value: float, suffix: str) -> Path:
    name = f"roberta-base_lr1e-05_inference_mask_{suffix}"
    return _write(
        root / task / name / f"{name}.json", {f"eval_{metric}": value, "eval_loss": 0.5, "epoch": 1.0}
    )


def _llm(root: Path, dataset: str, save_name: str, **metrics) -> Path:
    return _write(
        root / dataset / save_name / "results.json",
        {"dataset": dataset, "save_name": save_name, "model": "m", "n": 10, **metrics},
    )


@pytest.fixture()
def results_tree(tmp_path: Path) -> Path:
    """Files laid out as the project's scripts write them (names from their save-name functions)."""
    glue = tmp_path / "save_model_results"
    _glue_dare(glue, "cola", "matthews_correlation", 0.60, "0.0")
    _glue_dare(glue, "cola", "matthews_correlation", 0.59, "0.5_rescale_True")
    _glue_dare(glue, "cola", "matthews_correlation", 0.55, "0.9_rescale_True")
    _glue_dare(glue, "cola", "matthews_correlation", 0.05, "0.9_rescale_False")
    _glue_dare(glue, "cola", "matthews_correlation", 0.01, "0.9_rescale_False_strategy_magnitude")
    _glue_dare(glue, "rte", "accuracy", 0.70, "0.0")
    _glue_dare(glue, "rte", "accuracy", 0.69, "0.9_rescale_True")
    merges = tmp_path / "save_merge_results"
    _write(
        merges / "cola_rte" / "task_arithmetic" / "roberta-base.json",
        {"eval_accuracy": 0.66, "scaling_coefficient": 0.5},
    )
    _write(
        merges / "cola_rte" / "mask_merging" / "task_arithmetic" / "roberta-base.json",
        {"eval_accuracy": 0.68, "scaling_coefficient": 0.5, "weight_mask_rate": 0.9},
    )
    llm = tmp_path / "save_llm_results"
    _llm(llm, "gsm8k", "WizardMath-7B-V1.0_inference_mask_0.0", accuracy=0.55, accuracy_original=0.54)
    for seed, acc in ((0, 0.54), (1, 0.52)):
        name = "WizardMath-7B-V1.0_inference_mask_0.9_rescale_True" + (f"_seed_{seed}" if seed else "")
        _llm(llm, "gsm8k", name, accuracy=acc, accuracy_original=acc)
    _llm(llm, "human_eval", "WizardCoder-Python-7B-V1.0_inference_mask_0.0", **{"pass@1": 0.5})
    _llm(llm, "alpaca_eval", "WizardLM-7B_inference_mask_0.0", evaluated=False)  # not scored here: skipped
    merged = tmp_path / "save_merge_llm_results"
    _llm(merged, "gsm8k", "instruct_math/task_arithmetic_scaling_coefficient_1.0", accuracy=0.6)
    _llm(
        merged,
        "gsm8k",
        "instruct_math/mask_merging/task_arithmetic_scaling_coefficient_1.0/mask_0.9_0.9_rescale_True_strategy_random"
        "_weight_format_delta_weight_seed_0",
        accuracy=0.64,
    )
    _write(tmp_path / "other" / "notes.json", {"hello": 1})
    _write(tmp_path / "other" / "config.json", {"model_type": "llama"})  # ignored silently
    return tmp_path


def test_name_parsers():
    d = parse_dare_name("roberta-base_lr1e-05_inference_mask_0.9_rescale_False_strategy_magnitude")
    assert d == {
        "model": "roberta-base",
        "drop_rate": 0.9,
        "use_weight_rescale": False,
        "mask_strategy": "magnitude",
        "weight_format": "delta_weight",
        "seed": 0,
        "variant": "magnitude",
    }
    d = parse_dare_name(
        "WizardMath-7B-V1.0_inference_mask_0.99_rescale_True_weight_format_finetuned_weight_seed_3"
    )
    assert (d["model"], d["drop_rate"], d["variant"], d["seed"]) == (
        "WizardMath-7B-V1.0",
        0.99,
        "DARE on weights",
        3,
    )
    assert parse_dare_name("WizardMath-7B-V1.0_inference_mask_0.0")["variant"] == "fine-tuned"
    # the GLUE spelling of a seed (_seed7) is read as well as the LLM one (_seed_7)
    assert (
        parse_dare_name("roberta-base_lr1e-05_inference_mask_0.9_rescale_True_seed7_maxeval32")["seed"] == 7
    )
    assert (
        parse_dare_name("roberta-base_lr1e-05_inference_mask_0.9_rescale_True", default_seed=42)["seed"] == 42
    )
    assert parse_dare_name("average_merging") is None
    assert merge_label(["average_merging"]) == "average"
    assert merge_label(["x", "task_arithmetic_scaling_coefficient_0.5"]) == "task arithmetic (λ=0.5)"
    assert (
        merge_label(["ties_merging_param_value_mask_rate_0.8_scaling_coefficient_1.0_trim_global"])
        == "TIES (trim 0.8, λ=1)"
    )
    assert (
        merge_label(["mask_merging", "average_merging", "mask_0.2_0.2_rescale_True"])
        == "DARE p=0.2 + average"
    )
    assert merge_label(["cola_rte", "mask_merging", "ties_merging"]) == "DARE + TIES"
    assert merge_label(["WizardMath-7B-V1.0_inference_mask_0.9"]) is None


def test_records_from_each_format(results_tree):
    recs, why = records_from_file(
        results_tree / "save_model_results/cola/roberta-base_lr1e-05_inference_mask_0.9_rescale_True"
        "/roberta-base_lr1e-05_inference_mask_0.9_rescale_True.json"
    )
    assert why is None
    assert recs[0] | {"source": None} == {
        "kind": "dare",
        "model": "roberta-base",
        "dataset": "cola",
        "metric": "matthews_correlation",
        "value": 0.55,
        "drop_rate": 0.9,
        "variant": "DARE",
        "seed": 42,  # a GLUE file without settings or a seed in its name: the original's implicit seed 42
        "source": None,
    }
    recs, _ = records_from_file(
        results_tree / "save_merge_results/cola_rte/mask_merging/task_arithmetic/roberta-base.json"
    )
    assert (recs[0]["kind"], recs[0]["method"], recs[0]["dataset"], recs[0]["value"]) == (
        "merge",
        "DARE + task arithmetic",
        "rte",
        0.68,
    )
    recs, why = records_from_file(
        results_tree / "save_llm_results/alpaca_eval/WizardLM-7B_inference_mask_0.0/results.json"
    )
    assert recs == [] and "no scored metric" in why


def test_make_report_tables_and_plots(results_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("report_out") / "report"  # outside the input tree
    rep = make_report.main([str(results_tree), "--output_dir", str(out), "--quiet"])
    dare = {(r["model"], r["dataset"]): r for r in rep["tables"]["dare"]}
    cola = dare[("roberta-base", "cola")]
    assert cola["p=0"] == 0.60 and cola["DARE p=0.5"] == 0.59 and cola["DARE p=0.9"] == 0.55
    assert cola["DropOnly p=0.9"] == 0.05 and cola["magnitude p=0.9"] == 0.01
    math_row = dare[("WizardMath-7B-V1.0", "gsm8k")]
    assert math_row["DARE p=0.9"] == pytest.approx(0.53) and math_row["seeds"] == 2  # mean over mask seeds
    ret = {(r["model"], r["dataset"]): r for r in rep["tables"]["dare_retention"]}
    assert ret[("roberta-base", "cola")]["DARE p=0.9"] == pytest.approx(0.55 / 0.60, abs=1e-6)
    assert ret[("roberta-base", "cola")]["DARE keeps >=95% up to p"] == 0.5  # 0.55/0.60 = 0.917 < 0.95
    assert ret[("roberta-base", "rte")]["DARE keeps >=95% up to p"] == 0.9
    # each merged group was scored on one dataset (GLUE: the target task): one column per group→dataset
    merges = rep["tables"]["merges"]
    assert [r["model"] for r in merges] == [
        "task arithmetic",
        "task arithmetic (λ=1)",
        "DARE + task arithmetic",
        "DARE p=0.9 + task arithmetic (λ=1)",
    ]
    by = {r["model"]: r for r in merges}
    assert by["task arithmetic (λ=1)"] == {
        "model": "task arithmetic (λ=1)",
        "cola+rte→rte": None,
        "instruct_math→gsm8k": 0.6,
    }
    assert by["DARE p=0.9 + task arithmetic (λ=1)"]["instruct_math→gsm8k"] == 0.64
    assert by["DARE + task arithmetic"]["cola+rte→rte"] == 0.68
    assert by["task arithmetic"]["cola+rte→rte"] == 0.66
    skipped = {Path(s["file"]).name: s["reason"] for s in rep["skipped"]}
    assert "notes.json" in skipped and "config.json" not in skipped
    with open(out / "dare.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4  # cola, rte, gsm8k, human_eval
    assert (out / "merges.md").read_text().startswith("| model |")
    for name in ("drop_rate_cola.png", "drop_rate_gsm8k.png", "merge_matrix.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG
    assert json.loads((out / "report.json").read_text())["tables"]["dare"]


def test_quickstart_results_are_read(tmp_path):
    records = [
        {
            "kind": "dare",
            "model": "a specialist",
            "dataset": "a",
            "metric": "accuracy",
            "value": 0.8,
            "drop_rate": 0.0,
            "variant": "fine-tuned",
            "seed": 0,
        },
        {
            "kind": "dare",
            "model": "a specialist",
            "dataset": "a",
            "metric": "accuracy",
            "value": 0.76,
            "drop_rate": 0.9,
            "variant": "DARE",
            "seed": 0,
        },
        {
            "kind": "dare",
            "model": "a specialist",
            "dataset": "a",
            "metric": "accuracy",
            "value": 0.2,
            "drop_rate": 0.99,
            "variant": "DARE",
            "seed": 0,
        },
        {
            "kind": "merge",
            "model": "a+b",
            "method": "average",
            "dataset": "a",
            "metric": "accuracy",
            "value": 0.5,
        },
    ]
    f = _write(tmp_path / "q" / "results.json", {"schema": QUICKSTART_SCHEMA, "records": records})
    rep = make_report.main([str(f), "--output_dir", str(tmp_path / "r"), "--quiet", "--no_plots"])
    row = rep["tables"]["dare"][0]
    assert (row["p=0"], row["DARE p=0.9"], row["DARE p=0.99"]) == (0.8, 0.76, 0.2)
    assert keeps_fraction_up_to(row, 0.95) == 0.9
    assert dare_table(records)[0] == row
    assert rep["tables"]["merges"] == [{"model": "average", "a": 0.5}]
    assert not (tmp_path / "r" / "plots").exists()


def test_make_report_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no results found"):
        make_report.main([str(empty), "--output_dir", str(tmp_path / "r")])
    proc = subprocess.run(
        [sys.executable, "make_report.py", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "r")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"no such file or folder: {tmp_path / 'missing'}")
