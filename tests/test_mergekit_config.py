"""mergekit configurations in and out (``merge_llms_instruct_math_code.py --config``, ``utils/mergekit_config.py``):
every supported method's YAML against the in-memory core with the corresponding options, gradients and filters
against hand-computed values, every refusal as one line and exit 2 with nothing written, and the YAML written beside
the manifest read back to the same bytes. mergekit itself is not needed (benchmarks/mergekit_yaml_compare.py runs it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import merge_llms_instruct_math_code as cli
from model_merging_methods.engine import merge_in_memory
from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import merge_state_dicts
from model_merging_methods.sparsify import keep_count_mask, l1_rescale, top_k_mask
from model_merging_methods.streaming import DareSettings, PerTensorSettings, merge_checkpoints
from utils.cli import run_main
from utils.mergekit_config import evaluate_setting, headline_setting, layer_position, load_recipe
from utils.tiny_models import build_tiny_llama, tiny_llama_config

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_LAYERS = 3


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """A tiny float32 LLaMA family: base + three fine-tuned models (shared direction + own noise)."""
    root = tmp_path_factory.mktemp("mk_family")
    config = tiny_llama_config(vocab_size=24, hidden_size=16, num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
                               intermediate_size=24)  # fmt: skip
    model = build_tiny_llama(config, seed=0)
    pre = {n: t.detach().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    shared = {n: torch.randn(t.shape, generator=g) for n, t in pre.items()}
    out = {"root": root, "pre": pre, "fts": [], "base": root / "base"}
    model.save_pretrained(str(out["base"]))
    for i in range(3):
        sd = {n: t + 0.01 * (shared[n] + torch.randn(t.shape, generator=g)) for n, t in pre.items()}
        model.load_state_dict(sd)
        model.save_pretrained(str(root / f"ft{i}"))
        out[f"ft{i}"] = root / f"ft{i}"
        out["fts"].append(load_file(str(root / f"ft{i}" / "model.safetensors")))
    out["pre"] = load_file(str(out["base"] / "model.safetensors"))
    return out


def write(tmp_path: Path, fam, text: str, name: str = "recipe.yml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(**{k: str(v) for k, v in fam.items() if isinstance(v, Path)}))
    return path


def run_config(config: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    cli.main(["--config", str(config), "--merged_model_path", str(out), "--skip_evaluation", "--num_threads", "1",
              *extra])  # fmt: skip
    return load_file(str(out / "model.safetensors"))


def assert_same_bytes(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for n in expected:
        assert got[n].dtype == expected[n].dtype and got[n].shape == expected[n].shape, n
        assert torch.equal(got[n].view(torch.int32), expected[n].view(torch.int32)), n


# ------------------------------------------------------------------------------------------------ every method

W = [0.9, 0.5, 0.7]


def _models(entries: list[str]) -> str:
    return "models:\n" + "".join(f"  - {e}\n" for e in entries)


CASES = {
    "linear": (
        "merge_method: linear\n" + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}}}}}}}}}" for i, w in
                                            enumerate(W)]) + "dtype: float32\n",
        lambda P, F, s: merge_state_dicts("average_merging", None, F, model_weights=W),
    ),
    "linear_base_unnormalized": (
        "merge_method: linear\nbase_model: {base}\n"
        + _models(["{{model: {ft0}, parameters: {{weight: 0.7}}}}", "{{model: {ft1}}}"])
        + "parameters: {{weight: -0.3, normalize: false}}\n",
        lambda P, F, s: merge_state_dicts("average_merging", None, [F[0], F[1], P], model_weights=[0.7, -0.3, -0.3],
                                          no_normalize=True),
    ),
    "task_arithmetic": (
        "merge_method: task_arithmetic\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}}}}}}}}}" for i, w in enumerate(W)])
        + "parameters: {{lambda: 0.8, normalize: true}}\n",
        lambda P, F, s: merge_state_dicts("task_arithmetic", P, F, model_weights=W, normalize=True,
                                          scaling_coefficient=0.8),
    ),
    "ties": (
        "merge_method: ties\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: {d}}}}}}}}}"
                   for i, (w, d) in enumerate(zip(W, (0.3, 0.5, 0.2)))])
        + "parameters: {{lambda: 1.2}}\n",
        lambda P, F, s: merge_state_dicts(
            "ties_merging", P, F, trim_scope="tensor", trim_rule="exact_k", densities=[0.3, 0.5, 0.2],
            zero_sign="plus", model_weights=W, scaling_coefficient=1.2),
    ),
    "ties_sum_rescale": (
        "merge_method: ties\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: 1, density: 0.4}}}}}}}}" for i in range(3)])
        + "parameters: {{normalize: false, rescale: true}}\n",
        lambda P, F, s: merge_state_dicts(
            "ties_merging", P, F, trim_scope="tensor", trim_rule="exact_k", densities=[0.4] * 3, zero_sign="plus",
            model_weights=[1.0] * 3, no_normalize=True, sparsify_rescale="l1"),
    ),
    "dare_ties": (
        "merge_method: dare_ties\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: 0.6}}}}}}}}" for i, w in
                   enumerate(W)]),
        lambda P, F, s: merge_in_memory(
            "ties_merging", P, F, dare=DareSettings([0.4] * 3, True, seed=s, rescale_rule="l1").checked(3), seed=s,
            trim_scope="tensor", param_value_mask_rate=0.0, zero_sign="plus", model_weights=W, no_normalize=True),
    ),
    "dare_linear": (
        "merge_method: dare_linear\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: {d}}}}}}}}}"
                   for i, (w, d) in enumerate(zip(W, (0.5, 0.7, 0.9)))])
        + "parameters: {{rescale: false, lambda: 0.9}}\n",
        lambda P, F, s: merge_in_memory(
            "task_arithmetic", P, F, dare=DareSettings([1 - 0.5, 1 - 0.7, 1 - 0.9], False, seed=s).checked(3),
            seed=s, model_weights=W, scaling_coefficient=0.9),
    ),
    "breadcrumbs": (
        "merge_method: breadcrumbs\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: 0.6}}}}}}}}" for i, w in
                   enumerate(W)])
        + "parameters: {{gamma: 0.05, normalize: true}}\n",
        lambda P, F, s: merge_state_dicts(
            "breadcrumbs_merging", P, F, breadcrumbs_rule="keep_count", densities=[0.6] * 3, outlier_mask_rate=0.05,
            model_weights=W, normalize=True),
    ),
    "breadcrumbs_ties": (
        "merge_method: breadcrumbs_ties\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: 0.5, gamma: 0.02}}}}}}}}"
                   for i, w in enumerate(W)]),
        lambda P, F, s: merge_state_dicts(
            "breadcrumbs_merging", P, F, breadcrumbs_rule="keep_count", densities=[0.5] * 3, outlier_mask_rate=0.02,
            model_weights=W, breadcrumbs_elect_sign=True, zero_sign="plus"),
    ),
    "della": (
        "merge_method: della\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: 0.6, epsilon: 0.2}}}}}}}}"
                   for i, w in enumerate(W)]),
        lambda P, F, s: merge_state_dicts(
            "della_merging", P, F, seed=s, densities=[0.6] * 3, weight_mask_rate=[1 - 0.6] * 3, della_epsilon=0.2,
            della_rescale="l1", zero_sign="plus", model_weights=W),
    ),
    "della_linear": (
        "merge_method: della_linear\nbase_model: {base}\n"
        + _models([f"{{{{model: {{ft{i}}}, parameters: {{{{weight: {w}, density: 0.5}}}}}}}}" for i, w in
                   enumerate(W)])
        + "parameters: {{epsilon: 0.1, rescale: false, normalize: true}}\n",
        lambda P, F, s: merge_state_dicts(
            "della_merging", P, F, seed=s, densities=[0.5] * 3, weight_mask_rate=[0.5] * 3, della_epsilon=0.1,
            della_rescale="none", zero_sign="plus", model_weights=W, della_linear=True),
    ),
    "model_stock": (
        "merge_method: model_stock\nbase_model: {base}\n" + _models(["model: {ft0}", "model: {ft1}", "model: {ft2}"]),
        lambda P, F, s: merge_state_dicts("model_stock_merging", P, F),
    ),
    "slerp": (
        "merge_method: slerp\nbase_model: {ft1}\n" + _models(["model: {ft0}", "model: {ft1}"])
        + "parameters:\n  t: 0.3\n",
        lambda P, F, s: merge_state_dicts("slerp_merging", None, [F[1], F[0]], slerp_t=0.3),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_method_equals_the_core_with_its_options(case, fam, tmp_path):
    text, expected = CASES[case]
    seed = 3
    got = run_config(write(tmp_path, fam, text), tmp_path / "out", "--seed", str(seed))
    assert_same_bytes(got, expected(fam["pre"], fam["fts"], seed))
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert manifest["mergekit"]["config"] == "mergekit_config.yml"


# ------------------------------------------------------------------------------------- gradients and filters


def _float(v):
    return float(v)


def test_gradient_interpolation_hand_computed():
    # mergekit's rule: scaled = t·(n − 1), i0 = int(scaled), value = (1 − frac)·v[i0] + frac·v[i0 + 1]
    table = [
        ([1, 0.7, 0.1], 0.0, 1.0),
        ([1, 0.7, 0.1], 0.5, 0.7),
        ([1, 0.7, 0.1], 1.0, 0.1),
        ([1, 0.7, 0.1], 0.25, 0.85),
        ([1, 0.7, 0.1], 0.75, 0.4),
        ([0, 0.3, 0.7, 1], 0.5, 0.5),
        ([0, 0.3, 0.7, 1], 1 / 3, 0.3),
        ([0.2, 1.0], 0.5, 0.6),
        ([5], 0.7, 5.0),
    ]
    for values, t, expected in table:
        assert evaluate_setting("x", values, t, _float) == pytest.approx(expected, abs=1e-12), (values, t)
    assert evaluate_setting("x", [True, False], 0.4, bool) is True  # booleans pick, they do not interpolate
    assert evaluate_setting("x", [True, False], 0.6, bool) is True
    assert evaluate_setting("x", [True, False], 1.0, bool) is False
    assert headline_setting([0.3, 0.9], _float) == 0.3


def test_layer_positions_and_filters():
    assert layer_position("model.embed_tokens.weight", 3) == 0.0  # outside the layers: t = 0, as mergekit
    assert layer_position("lm_head.weight", 3) == 0.0
    assert layer_position("model.norm.weight", 3) == 0.0
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 3) for i in range(3)] == [0.0, 0.5, 1.0]
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: t = 1
    with pytest.raises(MergeError, match="layer 5"):
        layer_position("model.layers.5.mlp.up_proj.weight", 3)
    conds = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 2.0}]
    assert evaluate_setting("model.layers.1.mlp.up_proj.weight", conds, 0.5, _float) == 0.5
    assert evaluate_setting("model.layers.1.self_attn.q_proj.weight", conds, 0.5, _float) == 0.5
    assert evaluate_setting("model.norm.weight", conds, 0.0, _float) == 2.0
    assert evaluate_setting("model.norm.weight", conds[:2], 0.0, _float) is None  # no match: the next scope


def test_gradients_and_filters_end_to_end(fam, tmp_path):
    """Per-model weight gradients, a global weight, a lambda filter list: each tensor equals the core run on that
    tensor alone with the hand-computed values."""
    text = """merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: [0.2, 1.0]}}}}
  - {{model: {ft1}, parameters: {{weight: [1.0, 0.5, 0.0]}}}}
  - {{model: {ft2}}}
parameters:
  weight: 0.6
  lambda:
    - {{filter: mlp, value: 0.5}}
    - {{filter: self_attn, value: [1.0, 0.25]}}
    - {{value: 1.0}}
"""
    got = run_config(write(tmp_path, fam, text), tmp_path / "out")
    pre, fts = fam["pre"], fam["fts"]
    for name in pre:
        layer = (
            next((int(p) for p in name.split(".")[2:3] if p.isdigit()), None) if ".layers." in name else None
        )
        t = 0.0 if layer is None else layer / (NUM_LAYERS - 1)
        w0 = {0.0: 0.2, 0.5: 0.6, 1.0: 1.0}[t]
        w1 = {0.0: 1.0, 0.5: 0.5, 1.0: 0.0}[t]
        lam = 0.5 if "mlp" in name else ({0.0: 1.0, 0.5: 0.625, 1.0: 0.25}[t] if "self_attn" in name else 1.0)
        expected = merge_state_dicts(
            "task_arithmetic", {name: pre[name]}, [{name: f[name]} for f in fts], model_weights=[w0, w1, 0.6],
            scaling_coefficient=lam,
        )[name]  # fmt: skip
        assert torch.allclose(got[name], expected, atol=1e-6, rtol=0), name
    details = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())["method_details"][
        "per_tensor"
    ]
    assert details["model.layers.2.mlp.up_proj.weight"]["model_weights"] == [1.0, 0.0, 0.6]


def test_density_gradient_dare_rates_per_tensor(fam, tmp_path):
    text = """merge_method: dare_linear
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 1.0, density: [1.0, 0.5, 0.2]}}}}
  - {{model: {ft1}, parameters: {{weight: 1.0, density: 0.5}}}}
"""
    got = run_config(write(tmp_path, fam, text), tmp_path / "out", "--seed", "5")
    pre, fts = fam["pre"], fam["fts"]
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
    ):
        layer = int(name.split(".")[2]) if ".layers." in name else None
        d0 = {None: 1.0, 1: 0.5, 2: 0.2}[layer]
        dare = DareSettings([1.0 - d0, 0.5], True, seed=5, rescale_rule="l1").checked(2)
        expected = merge_in_memory("task_arithmetic", {name: pre[name]}, [{name: f[name]} for f in fts[:2]],
                                   dare=dare, seed=5, model_weights=[1.0, 1.0])[name]  # fmt: skip
        assert torch.equal(got[name], expected), name


# ------------------------------------------------------------------------------------------------ refusals


def _fails(argv: list[str], capsys, target: Path) -> str:
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: cli.main([*argv, "--merged_model_path", str(target), "--skip_evaluation"]))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    assert not target.exists()
    assert [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")] == []
    return err[0]


GOOD = "merge_method: ties\nbase_model: {base}\nmodels:\n  - {{model: {ft0}, parameters: {{weight: 1, density: 0.5}}}}\n" \
       "  - {{model: {ft1}, parameters: {{weight: 1, density: 0.5}}}}\n"  # fmt: skip
REFUSED = [
    ("slices:\n  - sources: []\nmerge_method: passthrough\n", "slices: layer slices"),
    (GOOD + "modules: {{}}\n", "modules:"),
    (GOOD + "tokenizer:\n  source: union\n", "tokenizer: mergekit's tokenizer block"),
    (GOOD + "chat_template: chatml\n", "chat_template:"),
    (GOOD + "tokenizer_source: union\n", "tokenizer_source: union"),
    (GOOD + "foo: 1\n", "foo: unknown key"),
    (GOOD.replace("ties", "passthrough"), "merge_method: passthrough is not supported"),
    (GOOD.replace("ties", "sce"), "merge_method: sce is not supported"),
    (GOOD.replace("ties", "frobnicate"), "merge_method: frobnicate is not supported"),
    (GOOD.replace("density: 0.5}}}}\n  -", "density: 0.5, foo: 2}}}}\n  -"), "models[0].parameters.foo: unknown"),
    (GOOD.replace("density: 0.5}}}}\n  -", "density: 0.5, normalize: true}}}}\n  -"),
     "models[0].parameters.normalize: normalize is a global parameter"),
    (GOOD + "parameters: {{lambda: abc}}\n", "parameters.lambda: expected a number"),
    (GOOD + "parameters: {{weight: [{{filter: mlp, valu: 1}}]}}\n", "parameters.weight[0].valu: unknown key"),
    (GOOD.replace("weight: 1, ", "", 1), "missing required parameter weight"),
    (GOOD.replace("density: 0.5}}}}\n  -", "density: 1.5}}}}\n  -"), "density must be in [0, 1]"),
    (GOOD + "dtype: float64\n", "dtype: expected one of"),
    (GOOD.replace("model: {ft1}", "model: {ft0}"), "listed twice"),
    (GOOD.replace("model: {ft1}", "model: {ft1}+adapter"), "LoRA"),
    (GOOD + "  - {{model: {base}, parameters: {{weight: 1}}}}\n", "the base model's parameters have no effect"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels:\n  - model: {ft0}\n  - model: {ft1}\n"
     "parameters: {{filter_wise: true}}\n", "filter_wise"),
    ("merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {ft0}\n  - model: {ft1}\nparameters: {{t: 0.5}}\n",
     "exactly one other model"),
    ("merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
     "  - {{model: {ft0}, parameters: {{weight: 1, gamma: 0.01}}}}\n"
     "  - {{model: {ft1}, parameters: {{weight: 1, gamma: 0.02}}}}\n", "gamma differs between the models"),
    ("merge_method: ties\nmodels:\n  - model: {ft0}\n", "base_model: mergekit's ties needs a base model"),
    (GOOD.replace("ties", "dare_ties") + "parameters: {{rescale: [true, false]}}\n", "parameters.rescale: one value"),
    (GOOD.replace("model: {ft1}, parameters: {{weight: 1, density: 0.5}}", "model: {ft1}, parameters: {{weight: 0}}")
     .replace("  - {{model: {ft0}", "  - {{model: {ft0}x"), "models[0].model:"),
    ("- just\n- a list\n", "a mergekit configuration is a mapping"),
    ("merge_method: ties\nmodels: [unclosed\n", "not valid YAML"),
    ("merge_method: ties\nmerge_method: linear\n", "given twice"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), REFUSED, ids=[e for _, e in REFUSED])
def test_refused_keys_are_one_line_and_exit_2(text, expected, fam, tmp_path, capsys):
    line = _fails(["--config", str(write(tmp_path, fam, text))], capsys, tmp_path / "out")
    assert expected in line, line


def test_missing_model_and_missing_file(fam, tmp_path, capsys):
    text = GOOD.replace("model: {ft1}", "model: " + str(tmp_path / "nowhere"))
    line = _fails(["--config", str(write(tmp_path, fam, text))], capsys, tmp_path / "out")
    assert "models[1].model:" in line and "nowhere" in line
    line = _fails(["--config", str(tmp_path / "absent.yml")], capsys, tmp_path / "out")
    assert "no file" in line


@pytest.mark.parametrize(
    "flags",
    [["--merging_method_name", "ties_merging"], ["--finetuned_model_names", "a", "b"], ["--scaling_coefficient", "1"],
     ["--weight_mask_rate", "0.1"]],
)  # fmt: skip
def test_model_and_method_flags_with_config_are_refused(flags, fam, tmp_path, capsys):
    line = _fails(["--config", str(write(tmp_path, fam, GOOD)), *flags], capsys, tmp_path / "out")
    assert "cannot be combined with --config" in line and flags[0] in line


def test_dtype_twice_is_refused(fam, tmp_path, capsys):
    line = _fails(["--config", str(write(tmp_path, fam, GOOD + "dtype: float32\n")), "--dtype", "bfloat16"],
                  capsys, tmp_path / "out")  # fmt: skip
    assert "--dtype: the configuration sets dtype" in line


@pytest.mark.slow
def test_syntax_error_through_the_script_process(fam, tmp_path):
    config = write(tmp_path, fam, "merge_method: [ties\n")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "merge_llms_instruct_math_code.py"), "--config", str(config),
         "--merged_model_path", str(tmp_path / "out"), "--skip_evaluation"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not valid YAML" in lines[0]
    assert not (tmp_path / "out").exists()


def test_per_tensor_values_refused_with_the_global_trim(fam, tmp_path):
    with pytest.raises(MergeError, match="cannot vary per tensor"):
        merge_checkpoints(
            str(fam["base"]), [str(fam["ft0"]), str(fam["ft1"])], str(tmp_path / "out"), "ties_merging",
            {"trim_scope": "global"}, per_tensor=PerTensorSettings(params=lambda name: {"trim_scope": "global"}),
        )  # fmt: skip
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="needs trim_scope='tensor'"):
        merge_state_dicts("ties_merging", fam["pre"], fam["fts"], model_weights=[1.0, 2.0, 1.0])


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case", ["ties", "dare_ties", "della", "slerp"])
def test_written_yaml_reads_back_to_the_same_bytes(case, fam, tmp_path):
    first = run_config(write(tmp_path, fam, CASES[case][0]), tmp_path / "a", "--seed", "2")
    written = tmp_path / "a" / "mergekit_config.yml"
    assert written.read_text().startswith("# mergekit configuration")
    again = run_config(written, tmp_path / "b", "--seed", "2")
    assert_same_bytes(again, first)


FLAG_RUNS = {
    "average": (["--merging_method_name", "average_merging"], "linear"),
    "task_arithmetic": (["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "0.6"], "task_arithmetic"),
    "model_stock": (["--merging_method_name", "model_stock_merging"], "model_stock"),
    "slerp": (["--merging_method_name", "slerp_merging", "--slerp_t", "0.35"], "slerp"),
    "dare_linear": (["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic",
                     "--weight_mask_rate", "0.3", "--seed", "4"], "dare_linear"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FLAG_RUNS))
def test_flag_runs_write_an_equivalent_yaml(case, fam, tmp_path):
    flags, merge_method = FLAG_RUNS[case]
    fts = [str(fam["ft0"]), str(fam["ft1"])] + ([] if case == "slerp" else [str(fam["ft2"])])
    out = tmp_path / "flags"
    cli.main(["--pretrained_model_name", str(fam["base"]), "--finetuned_model_names", *fts, *flags,
              "--merged_model_path", str(out), "--skip_evaluation", "--num_threads", "1"])  # fmt: skip
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["mergekit"]["config"] == "mergekit_config.yml"
    recipe = load_recipe(out / "mergekit_config.yml")
    assert recipe.merge_method == merge_method
    seed = ["--seed", "4"] if case == "dare_linear" else []
    assert_same_bytes(
        run_config(out / "mergekit_config.yml", tmp_path / "back", *seed),
        load_file(str(out / "model.safetensors")),
    )


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--merging_method_name", "ties_merging"], "trim_scope global"),
        (["--merging_method_name", "ties_merging", "--trim_scope", "tensor"], "zero_sign majority"),
        (["--merging_method_name", "magmax_merging"], "no MagMax"),
        (["--merging_method_name", "consensus_merging", "--consensus_k", "1"], "no consensus"),
        (["--merging_method_name", "breadcrumbs_merging"], "breadcrumbs_rule drop_counts"),
        (["--merging_method_name", "mask_merging", "--mask_apply_method", "task_arithmetic", "--use_weight_rescale"],
         "1/(1 − p)"),
    ],
)  # fmt: skip
def test_no_equivalent_is_explained_in_the_manifest(flags, reason, fam, tmp_path):
    out = tmp_path / "flags"
    cli.main(["--pretrained_model_name", str(fam["base"]), "--finetuned_model_names", str(fam["ft0"]),
              str(fam["ft1"]), *flags, "--merged_model_path", str(out), "--skip_evaluation"])  # fmt: skip
    entry = json.loads((out / "merge_manifest.json").read_text())["mergekit"]
    assert entry["config"] is None and reason in entry["reason"]
    assert not (out / "mergekit_config.yml").exists()


# ------------------------------------------------------------------------------------------------ the rules


def test_mergekit_rules_on_small_tensors():
    tau = torch.tensor([0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 1.0, -1.5, 0.3, 0.05])
    assert top_k_mask(tau, 0.3).tolist() == [
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
        False,
    ]
    assert int(top_k_mask(tau, 0.01).sum()) == 1  # at least one entry: max(1, int(d·n))
    assert bool(top_k_mask(tau, 1.0).all()) and not bool(top_k_mask(tau, 0.0).any())
    # keep int(0.5·10) = 5 entries after dropping int(0.2·10) = 2 largest: ranks 3..7 of the ascending order
    keep = keep_count_mask(tau, 0.5, 0.2)
    assert sorted(tau[keep].abs().tolist()) == pytest.approx([0.2, 0.3, 0.5, 1.0, 1.5])
    masked = torch.where(top_k_mask(tau, 0.3), tau, 0.0)
    assert float(l1_rescale(tau, masked).abs().sum()) == pytest.approx(float(tau.abs().sum()))
    assert torch.equal(l1_rescale(tau, torch.zeros_like(tau)), torch.zeros_like(tau))  # no rescale of nothing


def test_zero_sign_plus_and_weights_before_the_election():
    base = torch.zeros(3)
    fts = [{"w": base + torch.tensor([1.0, 2.0, -1.0])}, {"w": base + torch.tensor([-1.0, -1.0, 3.0])}]
    pre = {"w": base}
    common = dict(trim_scope="tensor", param_value_mask_rate=0.0)
    plus = merge_state_dicts("ties_merging", pre, fts, zero_sign="plus", **common)["w"]
    assert plus.tolist() == [1.0, 2.0, 3.0]  # entry 0: sum 0 → +1 elects the first model's +1
    # weights scale τ before the sign election: w·τ = [0.25, 0.5, −0.25] and [−1, −1, 3], sums [−0.75, −0.5, 2.75],
    # so the second model's signs win everywhere; the mean divides by the agreeing weights (1.0)
    weighted = merge_state_dicts(
        "ties_merging", pre, fts, zero_sign="plus", model_weights=[0.25, 1.0], **common
    )["w"]
    assert weighted.tolist() == [-1.0, -1.0, 3.0]
    summed = merge_state_dicts("ties_merging", pre, fts, zero_sign="plus", model_weights=[0.25, 1.0],
                               no_normalize=True, **common)["w"]  # fmt: skip
    assert summed.tolist() == [-1.0, -1.0, 3.0]
    halves = merge_state_dicts("ties_merging", pre, fts, zero_sign="plus", model_weights=[0.5, 0.5],
                               no_normalize=True, **common)["w"]  # fmt: skip
    assert halves.tolist() == [0.5, 1.0, 1.5]  # sums [0, 0.5, 1]: +1 elected at entry 0
