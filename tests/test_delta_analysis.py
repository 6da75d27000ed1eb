"""Delta statistics (utils/delta_analysis.py) and analyze_delta_parameters.py end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyze_delta_parameters
from utils.cli import UserError
from utils.delta_analysis import (
    AbsHistogram,
    dare_regime_verdict,
    delta_statistics_of_state_dicts,
    module_type,
)
from utils.tiny_models import build_char_tokenizer, build_tiny_llama, tiny_llama_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.3.self_attn.q_proj.weight", "self_attn.q_proj"),
        ("model.layers.12.mlp.down_proj.weight", "mlp.down_proj"),
        ("model.layers.0.input_layernorm.weight", "input_layernorm"),
        ("model.embed_tokens.weight", "embed_tokens"),
        ("model.norm.weight", "norm"),
        ("lm_head.weight", "lm_head"),
        ("bert.encoder.layer.0.attention.self.query.bias", "attention.self.query"),
        ("classifier.dense.weight", "dense"),
    ],
)
def test_module_type(name, expected):
    assert module_type(name) == expected


def test_histogram_quantiles_match_exact_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * 0.003
    x[:1000] = 0.0  # exact zeros (as after DARE) count as |x| = 0
    h = AbsHistogram()
    for chunk in x.split(30_000):  # streamed in pieces
        h.update(chunk)
    s = h.summary()
    a = x.abs().double()
    assert s["numel"] == x.numel()
    assert s["zero_fraction"] == pytest.approx(1000 / x.numel())
    assert s["max_abs"] == pytest.approx(float(a.max()), rel=0, abs=0)
    assert s["mean_abs"] == pytest.approx(float(a.mean()), rel=1e-9)
    assert s["rms"] == pytest.approx(float(a.pow(2).mean().sqrt()), rel=1e-9)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = float(torch.quantile(a[torch.randperm(a.numel(), generator=g)[:100_000]], q))
        # bin width is 10^(1/200) ≈ 1.2% relative; the subsample used for the exact value adds a little noise
        assert s[f"q{q * 100:g}_abs"] == pytest.approx(exact, rel=0.03), q
    assert h.quantile(0.001) == 0.0  # inside the zeros
    edges, counts = h.bins(per_decade=20)
    assert len(edges) == len(counts) + 1 and sum(counts) == x.numel() - 1000


def test_state_dict_statistics_per_module_and_notes():
    pre = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.layers.1.self_attn.q_proj.weight": torch.zeros(4, 4),
        "model.embed_tokens.weight": torch.zeros(10, 4),
        "model.rotary.inv_freq_int": torch.arange(4),  # not floating: skipped
    }
    ft = {k: v.clone() for k, v in pre.items()}
    ft["model.layers.0.self_attn.q_proj.weight"][0, 0] = 0.5
    ft["model.layers.1.self_attn.q_proj.weight"][1, 1] = -0.25
    ft["model.embed_tokens.weight"] = torch.cat(
        [torch.full((10, 4), 0.001), torch.ones(1, 4)]
    )  # + a [PAD] row
    rep = delta_statistics_of_state_dicts(ft, pre)
    d = rep.to_dict()
    assert d["overall"]["numel"] == 16 + 16 + 40
    assert d["overall"]["max_abs"] == pytest.approx(0.5)
    q = d["by_module_type"]["self_attn.q_proj"]
    assert q["numel"] == 32 and q["max_abs"] == pytest.approx(0.5)
    assert q["mean_abs"] == pytest.approx(0.75 / 32)
    assert d["by_module_type"]["embed_tokens"]["max_abs"] == pytest.approx(
        0.001
    )  # the extra row is not compared
    assert any("11 vs 10 rows" in n for n in d["notes"])
    assert [t["name"] for t in d["per_tensor"]] == list(pre)[:3]
    # exclusion
    rep2 = delta_statistics_of_state_dicts(ft, pre, exclude_param_names_regex=[".*q_proj.*"])
    assert rep2.overall.n == 40


def test_state_dict_statistics_errors():
    with pytest.raises(ValueError, match="shape mismatch for w"):
        delta_statistics_of_state_dicts({"w": torch.zeros(3, 4)}, {"w": torch.zeros(3, 5)})
    with pytest.raises(ValueError, match="non-finite delta in tensor w"):
        delta_statistics_of_state_dicts({"w": torch.tensor([float("nan")])}, {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="no floating-point tensor"):
        delta_statistics_of_state_dicts({"w": torch.zeros(1)}, {"v": torch.zeros(1)})


@pytest.mark.parametrize("q, word", [(0.002, "IN DARE's regime"), (0.01, "BETWEEN"), (0.04, "OUTSIDE")])
def test_verdict(q, word):
    assert dare_regime_verdict({"q99.9_abs": q, "max_abs": 2 * q}).startswith(word)


def _family(tmp_path: Path, scale: float) -> tuple[Path, Path]:
    tok = build_char_tokenizer()
    cfg = tiny_llama_config(len(tok), hidden_size=16, num_hidden_layers=1, intermediate_size=32)
    base_dir, ft_dir = tmp_path / "base", tmp_path / f"ft_{scale}"
    base = build_tiny_llama(cfg, seed=0, save_dir=base_dir, tokenizer=tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    base.save_pretrained(str(ft_dir))
    tok.save_pretrained(str(ft_dir))
    return base_dir, ft_dir


def test_analyze_script_end_to_end(tmp_path):
    base_dir, ft_dir = _family(tmp_path, 0.001)
    _, far_dir = _family(tmp_path, 0.02)
    out = tmp_path / "out"
    res = analyze_delta_parameters.main(
        [
            "--pretrained_model_name",
            str(base_dir),
            "--finetuned_model_names",
            str(ft_dir),
            str(far_dir),
            "--output_dir",
            str(out),
            "--no_progress",
        ]
    )
    assert set(res) == {str(ft_dir), str(far_dir)}
    # the exact max |δ| of the perturbation (read independently from the saved weights)
    from safetensors.torch import load_file

    a, b = load_file(str(base_dir / "model.safetensors")), load_file(str(ft_dir / "model.safetensors"))
    exact_max = max(float((b[k] - a[k]).abs().max()) for k in a)
    stats = json.loads((out / "ft_0.001_delta_stats.json").read_text())
    assert stats["overall"]["max_abs"] == pytest.approx(exact_max, abs=1e-8)  # written with 8 decimals
    assert stats["overall"]["numel"] == sum(v.numel() for v in a.values())
    assert stats["verdict"].startswith("IN DARE's regime")
    # 99.9th percentile of |N(0, 0.001²)| is about 3.29e-3
    assert stats["overall"]["q99.9_abs"] == pytest.approx(3.29e-3, rel=0.15)
    far = json.loads((out / "ft_0.02_delta_stats.json").read_text())
    assert far["verdict"].startswith("OUTSIDE")
    assert "self_attn.q_proj" in far["by_module_type"]
    assert (out / "ft_0.001_delta_by_module.csv").read_text().startswith("module_type,")
    png = out / "delta_hist.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_script_errors(tmp_path):
    base_dir, _ = _family(tmp_path, 0.001)
    args = [
        "--pretrained_model_name",
        str(base_dir),
        "--finetuned_model_names",
        str(tmp_path / "nope"),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    with pytest.raises(UserError, match="model folder not found"):
        analyze_delta_parameters.main([*args, "--no_progress"])
    proc = subprocess.run(
        [sys.executable, "analyze_delta_parameters.py", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model folder not found")
    assert not (tmp_path / "o").exists()
