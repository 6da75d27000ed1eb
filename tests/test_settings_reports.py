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
