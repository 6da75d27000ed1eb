"""extract_lora.py: full-rank round trip, the per-module error report, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import extract_lora as cli
from tests.lora_helpers import build_base, load_model, make_adapter, max_abs_diff, merged_reference
from utils.cli import run_main

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = build_base(root / "base")
    model = load_model(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(root / "ft"))
    return base, root / "ft"


def _argv(base, ft, out, rank, *extra):
    return [
        "--pretrained_model_name", str(base), "--finetuned_model_name", str(ft), "--lora_rank", str(rank),
        "--output_path", str(out), *extra,
    ]  # fmt: skip


def test_full_rank_round_trip(pair, tmp_path, capsys):
    base, ft = pair
    report = cli.main(_argv(base, ft, tmp_path / "ad", 64))
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj" in out and "LoRA rank 64" in out
    saved = json.loads((tmp_path / "ad" / "lora_report.json").read_text())
    assert saved["modules"] == json.loads(json.dumps(report["modules"]))
    assert saved["lora_modules"] == 15  # 7 projections x 2 layers + lm_head
    merged = merged_reference(base, tmp_path / "ad")
    want = load_model(ft).state_dict()
    assert max(max_abs_diff(merged[k], want[k]) for k in want) <= 1e-6
    for module, row in saved["modules"].items():
        if row["kind"] == "lora":
            assert row["rank"] == min(row["shape"]) and row["relative_error"] <= 1e-5, module


def test_low_rank_report_and_overwrite(pair, tmp_path, capsys):
    base, ft = pair
    cli.main(_argv(base, ft, tmp_path / "ad", 2, "--quiet"))
    saved = json.loads((tmp_path / "ad" / "lora_report.json").read_text())
    errors = [r["relative_error"] for r in saved["modules"].values() if r["kind"] == "lora"]
    assert errors and all(0.3 < e < 1.0 for e in errors)  # random deltas: rank 2 of 32 keeps little
    assert "model.layers.0.self_attn.q_proj" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main(_argv(base, ft, tmp_path / "ad", 2)))
    assert exc.value.code == 2
    assert "already exists" in capsys.readouterr().err
    cli.main(_argv(base, ft, tmp_path / "ad", 3, "--overwrite", "--quiet", "--full_modules", "lm_head"))
    saved = json.loads((tmp_path / "ad" / "lora_report.json").read_text())
    assert saved["rank"] == 3 and "lm_head" in saved["modules_to_save"]


def test_reextract_an_adapter(pair, tmp_path):
    """An adapter is accepted as the fine-tuned model: re-factorising it at its own rank is exact."""
    base, _ = pair
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"], r=4, use_rslora=True)
    cli.main(_argv(base, adapter, tmp_path / "again", 4, "--quiet", "--svd", "full"))
    first = merged_reference(base, adapter)
    second = merged_reference(base, tmp_path / "again")
    assert max(max_abs_diff(first[k], second[k]) for k in first) <= 1e-6


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("inside_input", "lies inside input"),
        ("rank0", "lora_rank must be a positive integer"),
        ("missing", "model folder not found"),
        ("other_family", "is in the base model but not in"),
    ],
)
def test_bad_input_is_one_error_line(pair, tmp_path, capsys, case, expected):
    base, ft = pair
    out, rank, model = tmp_path / "out", 4, ft
    if case == "inside_input":
        out = ft / "sub"
    elif case == "rank0":
        rank = 0
    elif case == "missing":
        model = tmp_path / "nope"
    elif case == "other_family":
        model = build_base(tmp_path / "wide", seed=1, attention_bias=False)
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main(_argv(base, model, out, rank)))
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], errors
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_subprocess_exit_status(pair, tmp_path):
    base, ft = pair
    done = subprocess.run(
        [sys.executable, "extract_lora.py", *_argv(base, ft, ft / "inside", 4)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: output --output_path")
