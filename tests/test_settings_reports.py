"""Every script's results carry a ``settings`` object, and make_report reports the settings exactly from it
(non-default seeds, rates and methods), not from file names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_inference_llms import _argv, data, models  # noqa: F401 - fixtures
from utils.results_report import records_from_file
from utils.run_settings import SETTINGS_SCHEMA


def _records(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.rglob("results.json")):
        recs, reason = records_from_file(path)
        assert reason is None, (path, reason)
        out += recs
    return out


def test_inference_llms_results_carry_settings_and_report_reads_them(models, data, tmp_path):  # noqa: F811
    import inference_llms_instruct_math_code as inf

    out = tmp_path / "out"
    argv = _argv(models, out, "gsm8k", data, "--end_index", "2", "--weight_mask_rate", "0.3", "--seed", "7",
                 "--pretrained_model_name", str(models["base"]), "--save_model_path", str(tmp_path / "dare"))  # fmt: skip
    inf.main(argv)
    (path,) = list(out.rglob("results.json"))
    settings = json.loads(path.read_text())["settings"]
    assert (
        settings["schema"] == SETTINGS_SCHEMA and settings["script"] == "inference_llms_instruct_math_code.py"
    )
    assert settings["flags"]["seed"] == 7 and settings["dare"]["weight_mask_rate"] == 0.3
    assert settings["versions"]["torch"] and "git_commit" in settings
    (rec,) = _records(out)
    assert (rec["kind"], rec["drop_rate"], rec["seed"], rec["variant"]) == ("dare", 0.3, 7, "DropOnly")


@pytest.mark.parametrize(
    "flags,label",
    [
        (["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate", "0.4",
          "--use_weight_rescale", "--seed", "5", "--param_value_mask_rate", "0.6", "--scaling_coefficient", "0.7"],
         "DARE p=0.4 + TIES (trim 0.6, λ=0.7)"),
        (["--merging_method_name", "della_merging", "--weight_mask_rate", "0.3", "--della_epsilon", "0.2", "--seed", "3"],
         "DELLA (λ=1, weight_mask_rate=0.3/0.3, della_epsilon=0.2)"),
    ],
)  # fmt: skip
def test_merge_llms_results_carry_settings_and_report_reads_them(models, data, tmp_path, flags, label):  # noqa: F811
    import merge_llms_instruct_math_code as merge

    out = tmp_path / "eval"
    merge.main(["--pretrained_model_name", str(models["base"]), "--finetuned_model_names", str(models["ft"]),
                str(models["ft2"]), "--merged_model_path", str(tmp_path / "merged"), "--evaluate_tasks", "math",
                "--gsm8k_file", str(data["gsm8k"]), "--math_file", str(data["MATH"]), "--end_index", "1",
                "--inference_backend", "hf", "--max_new_tokens", "2", "--evaluation_output_dir", str(out), *flags])  # fmt: skip
    recs = _records(out)
    assert {r["dataset"] for r in recs} == {"gsm8k", "MATH"}
    assert all(r["kind"] == "merge" and r["method"] == label for r in recs), recs
    manifest = json.loads((tmp_path / "merged" / "merge_manifest.json").read_text())
    assert manifest["settings"]["merge"]["method"] in ("ties_merging", "della_merging")
    assert manifest["settings"]["flags"]["seed"] in (5, 3)


# ----------------------------------------------------------------------------------------------- GLUE and quickstart
# Each script runs with non-default seeds, rates and methods on tiny models; make_report.py then reports exactly those
# settings, read from the results' ``settings`` objects.


def _report(root: Path, out: Path) -> list[dict]:
    """make_report.py's main on ``root``: its records table (one row per number, with its settings)."""
    import make_report

    rep = make_report.main([str(root), "--output_dir", str(out), "--quiet", "--no_plots"])
    assert rep["skipped"] == [], rep["skipped"]
    return rep["records"]


def _settings(path: Path) -> dict:
    settings = json.loads(path.read_text())["settings"]
    assert settings["schema"] == SETTINGS_SCHEMA
    assert {"flags", "versions", "git_commit", "created"} <= set(settings)
    assert settings["versions"]["torch"] and settings["versions"]["python"]
    return settings


def _glue_common(world, results_dir: Path) -> list[str]:
    from tests.glue_helpers import LR

    return ["--language_model_name", world.bert, "--learning_rate", LR, "--glue_data_dir", world.glue,
            "--models_dir", world.models, "--results_dir", str(results_dir)]  # fmt: skip


def test_train_plms_glue_results_carry_settings_and_report_reads_them(glue_world, tmp_path):
    import train_plms_glue

    results = tmp_path / "train_results"
    train_plms_glue.main(["--dataset_name", "rte", "--language_model_name", glue_world.bert, "--num_runs", "2",
                          "--num_epochs", "1", "--learning_rate", "0.0007", "--seed", "11",
                          "--glue_data_dir", glue_world.glue, "--models_dir", str(tmp_path / "models"),
                          "--results_dir", str(results), "--max_train_samples", "16", "--max_eval_samples", "16"])  # fmt: skip
    files = sorted(results.rglob("*.json"))
    assert [f.stem for f in files] == ["tiny-bert_lr0.0007", "tiny-bert_lr0.0007_run1"]
    for run, f in enumerate(files):
        settings = _settings(f)
        assert (settings["script"], settings["kind"], settings["run"], settings["training_seed"]) == (
            "train_plms_glue.py", "train", run, 11 + run)  # fmt: skip
        assert settings["flags"]["seed"] == 11 and settings["flags"]["learning_rate"] == 0.0007
    rows = _report(results, tmp_path / "report")
    assert sorted((r["kind"], r["model"], r["dataset"], r["seed"]) for r in rows) == [
        ("model", "tiny-bert fine-tuned", "rte", 11),
        ("model", "tiny-bert fine-tuned_run1", "rte", 12),
    ]


def test_inference_plms_glue_results_carry_settings_and_report_reads_them(glue_world, glue_trained, tmp_path):
    import inference_plms_glue

    results = tmp_path / "dare_results"
    common = [
        *_glue_common(glue_world, results),
        "--dataset_names",
        "cola",
        "rte",
        "--max_eval_samples",
        "16",
    ]
    inference_plms_glue.main(common)  # p = 0: the fine-tuned models
    inference_plms_glue.main([*common, "--weight_mask_rate", "0.3", "--use_weight_rescale", "--seed", "7"])
    inference_plms_glue.main([*common, "--weight_mask_rate", "0.6", "--mask_strategy", "magnitude",
                              "--weight_format", "finetuned_weight", "--seed", "7"])  # fmt: skip
    files = sorted(results.glob("*/*/*.json"))
    assert len(files) == 6
    for f in files:
        settings = _settings(f)
        assert settings["script"] == "inference_plms_glue.py" and settings["flags"]["seed"] in (7, 0)
        assert settings["dare"]["weight_mask_rate"] == settings["flags"]["weight_mask_rate"]
    rows = _report(results, tmp_path / "report")
    got = sorted((r["kind"], r["model"], r["dataset"], r["drop_rate"], r["variant"], r["seed"]) for r in rows)
    assert got == sorted(
        (kind, "tiny-bert", task, rate, variant, seed)
        for task in ("cola", "rte")
        for kind, rate, variant, seed in (("dare", 0.0, "fine-tuned", 0), ("dare", 0.3, "DARE", 7),
                                          ("dare", 0.6, "magnitude on weights", 7))
    )  # fmt: skip
    report = tmp_path / "report"
    dare = {r["dataset"]: r for r in json.loads((report / "report.json").read_text())["tables"]["dare"]}
    assert set(dare["rte"]) >= {"p=0", "DARE p=0.3", "magnitude on weights p=0.6"}
    # a file written before results carried settings: the seed in its GLUE name (_seed7) is read
    (legacy,) = [f for f in files if "_seed7" in f.name and f.parent.parent.name == "rte"]
    doc = json.loads(legacy.read_text())
    del doc["settings"]
    old = tmp_path / "old" / "rte" / legacy.parent.name / legacy.name
    old.parent.mkdir(parents=True)
    old.write_text(json.dumps(doc))
    (row,) = _report(tmp_path / "old", tmp_path / "old_report")
    assert (row["drop_rate"], row["variant"], row["seed"]) == (0.3, "DARE", 7)


def test_merge_plms_glue_pairs_results_carry_settings_and_report_reads_them(
    glue_world, glue_trained, tmp_path
):
    import merge_plms_glue

    results = tmp_path / "merge_results"
    common = [*_glue_common(glue_world, results), "--dataset_names", "cola", "stsb", "--max_eval_samples", "16",
              "--max_selection_samples", "8", "--scaling_coefficient", "0.7", "--param_value_mask_rate", "0.6"]  # fmt: skip
    merge_plms_glue.main([*common, "--merging_method_name", "ties_merging"])
    merge_plms_glue.main([*common, "--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic",
                          "--weight_mask_rate", "0.4", "--use_weight_rescale", "--seed", "5"])  # fmt: skip
    files = sorted(p for p in results.rglob("*.json") if "summary" not in p.parts)
    assert (
        len(files) == 6
    )  # TIES, the plain task arithmetic DARE + X reads its λ from, DARE + task arithmetic
    for f in files:
        settings = _settings(f)
        assert settings["kind"] == "merge" and settings["flags"]["max_selection_samples"] == 8
        assert settings["merge"]["models"] in (["cola", "stsb"], ["stsb", "cola"])
    dare_file = next(f for f in files if "mask_merging" in f.parts)
    settings = _settings(dare_file)
    assert settings["merge"] == {"method": "task_arithmetic", "params": {"scaling_coefficient": 0.7},
                                 "models": settings["merge"]["models"]}  # fmt: skip
    assert settings["dare"] == {"weight_mask_rate": 0.4, "use_weight_rescale": True, "mask_strategy": "random",
                                "weight_format": "delta_weight", "seed": 5}  # fmt: skip
    assert settings["flags"]["merging_method_name"] == "mask_merging" and settings["flags"]["seed"] == 5
    rows = _report(results, tmp_path / "report")
    got = sorted((r["kind"], r["model"], r["dataset"], r["method"], r.get("seed")) for r in rows)
    assert got == sorted(
        ("merge", f"{src}+{tgt}", tgt, label, seed)
        for src, tgt in (("cola", "stsb"), ("stsb", "cola"))
        for label, seed in (("TIES (trim 0.6, λ=0.7)", None), ("task arithmetic (λ=0.7)", None),
                            ("DARE p=0.4 + task arithmetic (λ=0.7)", 5))
    )  # fmt: skip


def test_merge_plms_glue_all_tasks_results_carry_settings_and_report_reads_them(
    glue_world, glue_trained, tmp_path
):
    import merge_plms_glue

    results = tmp_path / "merge_results"
    merge_plms_glue.main([*_glue_common(glue_world, results), "--dataset_names", "cola", "stsb", "rte",
                          "--merge_mode", "all", "--max_eval_samples", "16", "--merging_method_name", "mask_merging",
                          "--mask_apply_method", "ties_merging", "--scaling_coefficient", "0.7",
                          "--param_value_mask_rate", "0.6", "--weight_mask_rate", "0.4", "--seed", "3"])  # fmt: skip
    files = sorted(p for p in (results / "all_cola_stsb_rte").rglob("*.json"))
    assert len(files) == 3  # the fine-tuned reference, TIES, DARE + TIES
    for f in files:
        settings = _settings(f)
        assert settings["flags"]["merge_mode"] == "all" and settings["flags"]["seed"] == 3
    dare_file = next(f for f in files if "mask_merging" in f.parts)
    settings = _settings(dare_file)
    assert settings["merge"]["method"] == "ties_merging" and settings["merge"]["models"] == [
        "cola",
        "stsb",
        "rte",
    ]
    assert settings["merge"]["params"]["scaling_coefficient"] == 0.7
    assert settings["merge"]["params"]["param_value_mask_rate"] == 0.6
    assert (settings["dare"]["weight_mask_rate"], settings["dare"]["seed"]) == (0.4, 3)
    rows = _report(results, tmp_path / "report")
    got = sorted((r["kind"], r["model"], r["dataset"], r.get("method"), r.get("seed")) for r in rows)
    assert got == sorted(
        [("model", "fine-tuned (individual)", t, None, None) for t in ("cola", "stsb", "rte")]
        + [("merge", "all_cola_stsb_rte", t, label, seed) for t in ("cola", "stsb", "rte")
           for label, seed in (("TIES (trim 0.6, λ=0.7)", None), ("DropOnly p=0.4 + TIES (trim 0.6, λ=0.7)", 3))]
    )  # fmt: skip


@pytest.mark.slow
def test_quickstart_results_carry_settings_and_report_reads_them(tmp_path):
    """quickstart.py at its CI size (about a minute) with non-default mask seeds, rates and merge settings."""
    import quickstart

    out = tmp_path / "quickstart"
    quickstart.main(["--size", "ci", "--output_dir", str(out), "--threads", "1", "--no_plots", "--mask_seeds", "4",
                     "--drop_rates", "0", "0.3", "--ablation_rate", "0.8", "--merge_drop_rates", "0.7",
                     "--scaling_coefficient", "0.7", "--param_value_mask_rate", "0.6"])  # fmt: skip
    settings = _settings(out / "results.json")
    assert (settings["script"], settings["kind"]) == ("quickstart.py", "quickstart")
    assert settings["flags"]["mask_seeds"] == [4] and settings["flags"]["drop_rates"] == [0.0, 0.3]
    assert settings["flags"]["output_dir"] == str(out)
    rows = _report(out / "results.json", tmp_path / "report")
    dare = {(r["variant"], r["drop_rate"], r["seed"]) for r in rows if r["kind"] == "dare"}
    assert dare == {("fine-tuned", 0.0, None), ("DARE", 0.3, 4), ("DropOnly", 0.8, 4), ("magnitude", 0.8, 0)}
    merges = {r["method"] for r in rows if r["kind"] == "merge"}
    assert merges == {
        "average", "task arithmetic (λ=0.7)", "TIES (trim 0.6, λ=0.7)", "DARE p=0.7 + average",
        "DARE p=0.7 + task arithmetic (λ=0.7)", "DARE p=0.7 + TIES (trim 0.6, λ=0.7)",
    }  # fmt: skip
