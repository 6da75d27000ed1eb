"""LoRA adapters through the LLM scripts: merging adapters (and writing an adapter) with
merge_llms_instruct_math_code.py, DARE / plain inference of an adapter with inference_llms_instruct_math_code.py,
and the delta analysis of an adapter with analyze_delta_parameters.py."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

import analyze_delta_parameters
import inference_llms_instruct_math_code as inf
import merge_llms_instruct_math_code as merge
from model_merging_methods.mask_weights_utils import mask_model_weights
from tests.lora_helpers import build_base, make_adapter, max_abs_diff, merged_reference
from utils import generation_backends
from utils.cli import UserError, run_main


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_cli")
    base = build_base(root / "base")
    a = make_adapter(base, root / "lora_a", seed=1, scale=0.02, target_modules=["q_proj", "v_proj"])
    b = make_adapter(
        base, root / "lora_b", seed=2, scale=0.02, target_modules=["q_proj", "up_proj"], use_rslora=True
    )
    return {"base": base, "a": a, "b": b}


def test_merge_script_merges_adapters_and_writes_an_adapter(fam, tmp_path, capsys):
    common = ["--finetuned_model_names", str(fam["a"]), str(fam["b"]), "--merging_method_name", "task_arithmetic",
              "--scaling_coefficient", "1.0", "--skip_evaluation"]  # fmt: skip
    # the base comes from the adapters' base_model_name_or_path
    merge.main([*common, "--merged_model_path", str(tmp_path / "full")])
    assert "merged model:" in capsys.readouterr().out
    base = load_file(fam["base"] / "model.safetensors")
    refs = [merged_reference(fam["base"], fam[k]) for k in ("a", "b")]
    out = load_file(tmp_path / "full" / "model.safetensors")
    assert (
        max(max_abs_diff(out[k], base[k] + (refs[0][k] - base[k]) + (refs[1][k] - base[k])) for k in base)
        <= 1e-6
    )
    merge.main(
        [
            *common,
            "--merged_model_path",
            str(tmp_path / "lora"),
            "--output_format",
            "lora",
            "--lora_rank",
            "12",
        ]
    )
    assert "merged LoRA adapter:" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 12 and cfg["base_model_name_or_path"] == str(fam["base"])
    back = merged_reference(fam["base"], tmp_path / "lora")
    assert max(max_abs_diff(back[k], out[k]) for k in out) <= 1e-6


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--output_format", "lora"], "needs lora_rank"),
        (["--lora_rank", "4"], "lora_rank needs output_format lora"),
        (["--output_format", "lora", "--lora_rank", "0"], "positive integer"),
        (["--pad_to_multiple_of", "8"], "pad_to_multiple_of needs vocab_policy union"),
    ],
)
def test_merge_script_bad_lora_flags(fam, tmp_path, capsys, extra, expected):
    argv = ["--finetuned_model_names", str(fam["a"]), str(fam["b"]), "--merging_method_name", "average_merging",
            "--skip_evaluation", "--merged_model_path", str(tmp_path / "out"), *extra]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: merge.main(argv))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists()


def test_merge_script_lora_output_is_not_evaluated(fam, tmp_path):
    argv = ["--finetuned_model_names", str(fam["a"]), str(fam["b"]), "--output_format", "lora", "--lora_rank", "4",
            "--merged_model_path", str(tmp_path / "out"), "--evaluate_tasks", "math"]  # fmt: skip
    with pytest.raises(UserError, match="pass --skip_evaluation"):
        merge.main(argv)


def test_inference_script_takes_an_adapter(fam, tmp_path, monkeypatch):
    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: pytest.fail("model built"))
    # plain inference: the adapter is merged into its base (named by the adapter) first
    argv = ["--finetuned_model_name", str(fam["a"]), "--dataset_name", "gsm8k", "--output_dir", str(tmp_path / "o"),
            "--save_model_path", str(tmp_path / "merged"), "--skip_evaluation"]  # fmt: skip
    assert inf.main(argv) == {}
    ref = merged_reference(fam["base"], fam["a"])
    got = load_file(tmp_path / "merged" / "model.safetensors")
    assert max(max_abs_diff(got[k], ref[k]) for k in ref) <= 1e-6
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"
    # DARE of the adapter's delta: the core's mask_model_weights on the merged model
    argv = ["--finetuned_model_name", str(fam["a"]), "--dataset_name", "gsm8k", "--output_dir", str(tmp_path / "o"),
            "--weight_mask_rate", "0.5", "--use_weight_rescale", "--pretrained_model_name", str(fam["base"]),
            "--save_model_path", str(tmp_path / "dare"), "--skip_evaluation"]  # fmt: skip
    assert inf.main(argv) == {}
    full = {k: v.contiguous() for k, v in ref.items()}
    expected = mask_model_weights(
        full,
        load_file(fam["base"] / "model.safetensors"),
        weight_mask_rate=0.5,
        use_weight_rescale=True,
        seed=0,
    )
    got = load_file(tmp_path / "dare" / "model.safetensors")
    assert max(max_abs_diff(got[k], expected[k]) for k in expected) <= 1e-6


def test_analyze_script_takes_an_adapter(fam, tmp_path):
    out = tmp_path / "out"
    res = analyze_delta_parameters.main(
        ["--finetuned_model_names", str(fam["a"]), "--output_dir", str(out), "--no_progress", "--no_plot"]
    )
    stats = res[str(fam["a"])]
    ref = merged_reference(fam["base"], fam["a"])
    base = load_file(fam["base"] / "model.safetensors")
    exact_max = max(float((ref[k] - base[k]).abs().max()) for k in base)
    assert stats["overall"]["max_abs"] == pytest.approx(exact_max, rel=1e-5)
    assert stats["pretrained_model"] == str(fam["base"])
    assert set(stats["by_module_type"]) >= {"self_attn.q_proj", "self_attn.v_proj"}


def test_adapter_without_base_is_one_error(fam, tmp_path, capsys):
    lone = tmp_path / "lone"
    shutil.copytree(fam["a"], lone)
    cfg = json.loads((lone / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (lone / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: analyze_delta_parameters.main(["--finetuned_model_names", str(lone), "--output_dir",
                                                        str(tmp_path / "o")]))  # fmt: skip
    assert exc.value.code == 2
    assert "names no base model" in capsys.readouterr().err
