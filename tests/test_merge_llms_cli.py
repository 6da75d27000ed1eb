"""merge_llms_instruct_math_code.py end to end: every method through the CLI against the core; bad input."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merge_llms_instruct_math_code as cli
from model_merging_methods.merging_methods import average_merging, mask_merging, task_arithmetic, ties_merging
from tests.test_streaming_merge import (
    VOCAB_NAMES,
    aligned,
    assert_same,
    build_family,
    load_dir,
    perturbed,
    save_state,
    set_config,
)
from utils.cli import run_main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("cli_fam"))


def _models(fam, names=("ft_a", "ft_b", "ft_c")):
    return [
        "--pretrained_model_name",
        str(fam["base"]),
        "--finetuned_model_names",
        *[str(fam[n]) for n in names],
    ]


def _refs(fam, names=("ft_a", "ft_b", "ft_c")):
    rows = max(load_dir(fam[n])[VOCAB_NAMES[0]].shape[0] for n in ("base", *names))
    return aligned(load_dir(fam["base"]), rows), [aligned(load_dir(fam[n]), rows) for n in names]


METHODS = {
    "average": (["--merging_method_name", "average_merging"], lambda P, F: average_merging(F)),
    "task_arithmetic": (
        ["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.8"],
        lambda P, F: task_arithmetic(P, F, 0.8),
    ),
    "ties": (
        ["--merging_method_name", "ties_merging", "--param_value_mask_rate", "0.7", "--trim_scope", "global"],
        lambda P, F: ties_merging(P, F, 0.7, 1.0, "global"),
    ),
    "ties_tensor": (
        ["--merging_method_name", "ties_merging", "--trim_scope", "tensor", "--scaling_coefficient", "0.5"],
        lambda P, F: ties_merging(P, F, 0.8, 0.5, "tensor"),
    ),
    "dare_average": (
        ["--merging_method_name", "mask_merging", "--weight_mask_rate", "0.3", "--use_weight_rescale"],
        lambda P, F: mask_merging(P, F, "average_merging", 0.3),
    ),
    "dare_ta": (
        ["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic", "--weight_mask_rate",
         "0.9", "0.5", "0.1", "--seed", "4"],
        lambda P, F: mask_merging(P, F, "task_arithmetic", [0.9, 0.5, 0.1], use_weight_rescale=False, seed=4),
    ),
    "dare_ties": (
        ["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate", "0.5",
         "--use_weight_rescale", "--param_value_mask_rate", "0.6", "--mask_strategy", "magnitude"],
        lambda P, F: mask_merging(P, F, "ties_merging", 0.5, mask_strategy="magnitude", param_value_mask_rate=0.6),
    ),
}  # fmt: skip


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_through_the_cli(fam, tmp_path, method):
    flags, reference = METHODS[method]
    out = tmp_path / "merged"
    manifest = cli.main([*_models(fam), *flags, "--merged_model_path", str(out), "--skip_evaluation"])
    P, F = _refs(fam)
    assert_same(reference(P, F), out)
    assert json.loads((out / "merge_manifest.json").read_text())["parameters"] == manifest["parameters"]


def test_default_output_name_holds_every_setting(fam, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = [*_models(fam, ("ft_a", "ft_b")), "--merging_method_name", "mask_merging", "--skip_evaluation"]
    cli.main([*base, "--mask_apply_method", "task_arithmetic", "--weight_mask_rate", "0.2"])
    cli.main([*base, "--mask_apply_method", "task_arithmetic", "--weight_mask_rate", "0.2", "--mask_strategy",
              "magnitude"])  # fmt: skip
    cli.main([*base, "--mask_apply_method", "task_arithmetic", "--weight_mask_rate", "0.2", "--seed", "1",
              "--weight_format", "finetuned_weight", "--dtype", "bfloat16"])  # fmt: skip
    root = (
        tmp_path
        / "save_merge_models"
        / "ft_a_ft_b"
        / "mask_merging"
        / "task_arithmetic_scaling_coefficient_1.0"
    )
    assert sorted(p.name for p in root.iterdir()) == [
        "mask_0.2_0.2_rescale_False_strategy_magnitude_weight_format_delta_weight_seed_0_base_base",
        "mask_0.2_0.2_rescale_False_strategy_random_weight_format_delta_weight_seed_0_base_base",
        "mask_0.2_0.2_rescale_False_strategy_random_weight_format_finetuned_weight_seed_1_dtype_bfloat16_base_base",
    ]
    assert "merged model: save_merge_models/ft_a_ft_b/mask_merging" in capsys.readouterr().out


def test_evaluation_hook(fam, tmp_path, monkeypatch, capsys):
    import utils.llm_evaluation as ev

    calls = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: calls.append(a) or {"gsm8k": {"accuracy": 0.5}})
    checked = []
    monkeypatch.setattr(ev, "check_data", lambda datasets, args: checked.append(datasets))  # no data here
    out = tmp_path / "m"
    manifest = cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(out), "--evaluate_tasks",
                         "math", "code", "--start_index", "2", "--end_index", "5"])  # fmt: skip
    (model_path, datasets, save_name, _root, args) = calls[0]
    assert model_path == str(out) and datasets == ["gsm8k", "MATH", "human_eval", "mbpp"]
    assert save_name == "ft_a_ft_b/average_merging_base_base" and (args.start_index, args.end_index) == (2, 5)
    assert manifest["evaluation"] == {"gsm8k": {"accuracy": 0.5}}
    assert checked == [["gsm8k", "MATH", "human_eval", "mbpp"]]  # the data is checked before merging
    cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(tmp_path / "m2")])
    assert "no tasks to evaluate" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "utils.llm_evaluation", None)  # not importable
    cli.main(
        [
            *_models(fam, ("ft_a", "ft_b")),
            "--merged_model_path",
            str(tmp_path / "m3"),
            "--evaluate_tasks",
            "math",
        ]
    )
    assert "evaluation is not available yet" in capsys.readouterr().err
    assert (tmp_path / "m3" / "model.safetensors").is_file()


def test_script_runs_as_a_process(fam, tmp_path):
    out = tmp_path / "merged"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "merge_llms_instruct_math_code.py"), *_models(fam, ("ft_a", "ft_b")),
         "--merging_method_name", "task_arithmetic", "--merged_model_path", str(out), "--skip_evaluation",
         "--max_shard_size", "40KB", "--dtype", "bfloat16"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "task_arithmetic: 21 tensors" in proc.stderr and "peak RSS" in proc.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert all(t.dtype == torch.bfloat16 for t in load_dir(out).values())
    bad = subprocess.run(
        [sys.executable, str(REPO_ROOT / "merge_llms_instruct_math_code.py"), *_models(fam, ("ft_a", "ft_b")),
         "--merged_model_path", str(out), "--skip_evaluation"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: output path")


# ------------------------------------------------------------------------------------------------- bad input


def _fails(argv, capsys, target: Path) -> str:
    """Run the script's main through run_main; check exit 2, one error line, and no output folder."""
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main([*argv, "--merged_model_path", str(target), "--skip_evaluation"]))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1
    assert not target.exists()
    assert [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")] == []
    return err[0]


@pytest.fixture(scope="module")
def broken(fam, tmp_path_factory):
    """Variants of ft_a that are wrong in one way each."""
    root = tmp_path_factory.mktemp("broken")
    a = load_dir(fam["ft_a"])
    missing = dict(a)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_state(missing, root / "missing_tensor", "st", fam["ft_a"])
    shaped = dict(a)
    shaped["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    save_state(shaped, root / "shape", "st", fam["ft_a"])
    save_state(a, root / "arch", "st", fam["ft_a"])
    set_config(root / "arch", model_type="mistral", architectures=["MistralForCausalLM"])
    for bad, value in (("nan", math.nan), ("inf", math.inf)):
        t = dict(a)
        t["model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"].clone()
        t["model.layers.1.mlp.down_proj.weight"][3, 5] = value
        save_state(t, root / bad, "st", fam["ft_a"])
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text("{}")
    save_state(perturbed(a, 5), root / "sharded", "st_sharded", fam["ft_a"])
    (root / "sharded" / "model-00003-of-00003.safetensors").unlink()
    return root


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_folder", "model folder not found: .*does_not_exist"),
        ("no_weights", "no model weights .*no_weights"),
        ("missing_shard", "shard model-00003-of-00003.safetensors .* is missing"),
        (
            "missing_tensor",
            "tensor model.layers.1.mlp.up_proj.weight is in pretrained .* but missing in finetuned",
        ),
        (
            "shape",
            r"tensor model.layers.0.self_attn.q_proj.weight has shape \(32, 32\) in .* but \(16, 32\) in",
        ),
        ("arch", "models of different architectures: .*model_type=llama but .*arch has model_type=mistral"),
        ("nan", "tensor model.layers.1.mlp.down_proj.weight of finetuned .*nan contains NaN or Inf"),
        ("inf", "tensor model.layers.1.mlp.down_proj.weight of finetuned .*inf contains NaN or Inf"),
    ],
)
def test_bad_models(fam, broken, tmp_path, capsys, case, expected):
    other = {
        "missing_folder": str(tmp_path / "does_not_exist"),
        "missing_shard": str(broken / "sharded"),
    }.get(case, str(broken / case))
    argv = ["--pretrained_model_name", str(fam["base"]), "--finetuned_model_names", str(fam["ft_b"]), other,
            "--merging_method_name", "task_arithmetic"]  # fmt: skip
    line = _fails(argv, capsys, tmp_path / "out")
    assert re.search(expected, line), line


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--merging_method_name", "mask_merging", "--weight_mask_rate", "1.5"], r"weight_mask_rate must be in \[0, 1\]"),
        (["--merging_method_name", "ties_merging", "--param_value_mask_rate", "-0.1"], "param_value_mask_rate must be in"),
        (["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "nan"], "finite and non-negative"),
        (["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "-1"], "finite and non-negative"),
        (["--merging_method_name", "mask_merging", "--weight_mask_rate", "0.1", "0.2", "0.3"], "3 rates for 2 models"),
    ],
)  # fmt: skip
def test_bad_parameters(fam, tmp_path, capsys, flags, expected):
    line = _fails([*_models(fam, ("ft_a", "ft_b")), *flags], capsys, tmp_path / "out")
    assert re.search(expected, line), line


def test_too_few_models_and_existing_output(fam, tmp_path, capsys):
    line = _fails(["--pretrained_model_name", str(fam["base"]), "--finetuned_model_names", str(fam["ft_a"])], capsys,
                  tmp_path / "o1")  # fmt: skip
    assert "at least two fine-tuned models, got 1" in line
    line = _fails(["--merge_math"], capsys, tmp_path / "o2")
    assert "at least two of --merge_instruct" in line
    # registry names resolve to hub ids; offline and not cached -> a clear error naming the model
    line = _fails(["--merge_instruct", "--merge_math"], capsys, tmp_path / "o3")
    assert "Llama-2-13b-hf (meta-llama/Llama-2-13b-hf)" in line
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(tmp_path / "exists"),
                                   "--skip_evaluation"]))  # fmt: skip
    assert exc.value.code == 2 and "already exists (pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]
    # --overwrite never replaces a folder this toolkit did not write
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(tmp_path / "exists"),
                                   "--skip_evaluation", "--overwrite"]))  # fmt: skip
    assert exc.value.code == 2 and "not written by this toolkit" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "exists").iterdir()] == ["keep.txt"]
    # ... but does replace a merged model it wrote
    merged = tmp_path / "merged"
    cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(merged), "--skip_evaluation"])
    first = (merged / "merge_manifest.json").read_text()
    cli.main([*_models(fam, ("ft_a", "ft_b")), "--merged_model_path", str(merged), "--skip_evaluation",
              "--merging_method_name", "task_arithmetic", "--overwrite"])  # fmt: skip
    assert (merged / "merge_manifest.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "merged"]  # nothing temporary left


def test_missing_evaluation_data_fails_before_merging(fam, tmp_path, capsys, monkeypatch):
    from model_merging_methods import streaming

    monkeypatch.setattr(
        streaming, "stream_merge", lambda *a, **k: pytest.fail("merged before checking the data")
    )
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main([*_models(fam, ("ft_a", "ft_b")), "--evaluate_tasks", "math", "--gsm8k_file",
                                   str(tmp_path / "missing.jsonl"), "--merged_model_path", str(tmp_path / "out")]))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "data file not found" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_empty_model_name(fam, tmp_path, capsys):
    line = _fails(["--pretrained_model_name", "", "--finetuned_model_names", str(fam["ft_a"]), str(fam["ft_b"])],
                  capsys, tmp_path / "out")  # fmt: skip
    assert "a model name or path is empty" in line
