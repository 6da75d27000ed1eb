"""The contract every registered merging method keeps, checked for all of them at once.

* in memory and streamed (out of core) give identical bytes, with and without DARE as a pre-step;
* merging copies of one model gives that model back, under the settings listed in :data:`SELF_MERGE`;
* DARE at p = 0 as a pre-step is the identity (the same bytes as the plain merge);
* inputs are never modified; excluded and non-float tensors are copied unchanged;
* every declaration is complete (label, formula, reference, parameters with validators) and listed in the README.

Adding a method means adding its row to :data:`SELF_MERGE` (the test fails until then).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_merging_methods import planning
from model_merging_methods.errors import MergeError
from model_merging_methods.merging_methods import mask_merging, merge_state_dicts
from model_merging_methods.registry import all_methods, get_method, method_names, shared_params
from model_merging_methods.streaming import stream_merge

REPO_ROOT = Path(__file__).resolve().parents[1]

# method -> (number of copies, settings) under which merging copies of one model returns it; None: not defined
SELF_MERGE: dict[str, tuple[int, dict] | None] = {
    "average_merging": (3, {}),
    "task_arithmetic": (1, {"scaling_coefficient": 1.0}),
    "fisher_merging": None,  # needs data statistics: checked in tests/test_merging_methods.py
    "regmean_merging": None,
    "ties_merging": (1, {"param_value_mask_rate": 0.0, "scaling_coefficient": 1.0}),
    "breadcrumbs_merging": (
        1,
        {"param_value_mask_rate": 0.0, "outlier_mask_rate": 0.0, "scaling_coefficient": 1.0},
    ),
    "della_merging": (1, {"weight_mask_rate": 0.0, "della_epsilon": 0.0, "scaling_coefficient": 1.0}),
    "model_stock_merging": (3, {}),
    "slerp_merging": (2, {"slerp_t": 0.5}),
    "magmax_merging": (1, {"scaling_coefficient": 1.0}),
    "consensus_merging": (1, {"consensus_k": 1, "scaling_coefficient": 1.0}),
}
EXCLUDE = (r"head\..*",)


def family(num_models: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (37, 8), "layer.w": (16, 12), "layer.b": (16,), "norm": (12,), "head.w": (5, 12)}
    base = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    base["steps"] = torch.tensor([3, 4], dtype=torch.int64)
    models = []
    for _ in range(num_models):
        m = {n: (t + 0.01 * torch.randn(t.shape, generator=g).to(dtype)) if t.is_floating_point() else t.clone()
             for n, t in base.items()}  # fmt: skip
        models.append(m)
    return base, models


def num_models_for(name: str) -> int:
    method = get_method(name)
    n = 3 if method.max_models is None or method.max_models >= 3 else method.max_models
    return max(n, method.min_models)


def streamable_names() -> list[str]:
    return method_names(streamable=True)


def clone(sd):
    return {n: t.clone() for n, t in sd.items()}


def test_every_method_is_declared_completely_and_listed():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for method in all_methods():
        assert method.label and method.formula and method.reference, method.name
        assert method.name in SELF_MERGE, f"add {method.name} to SELF_MERGE"
        assert re.search(rf"^\| `{method.name}` \|", readme, flags=re.M), (
            f"{method.name} missing in the README table"
        )
        for p in method.params:
            assert p.help and callable(p.check), (method.name, p.name)
            if p.default is not None:
                p.validate(p.default, 2)  # the default is valid
            for value in p.grid or ():
                p.validate(value, 2)
    params = shared_params()
    assert params["scaling_coefficient"].default == 1.0


@pytest.mark.parametrize("name", streamable_names())
def test_self_merge_returns_the_model(name):
    row = SELF_MERGE[name]
    if row is None:
        pytest.skip("not defined for this method")
    copies, settings = row
    base, (model,) = family(1)
    out = merge_state_dicts(name, base, [model] * copies, EXCLUDE, **settings)
    for n, t in out.items():
        expected = base[n] if (re.match(EXCLUDE[0], n) and get_method(name).copy_from == "base") else model[n]
        assert torch.allclose(t, expected, atol=1e-6, rtol=0), (name, n)


@pytest.mark.parametrize("name", [n for n in streamable_names() if get_method(n).dare_prestep])
def test_dare_at_rate_zero_is_the_plain_merge(name):
    base, models = family(num_models_for(name))
    plain = merge_state_dicts(name, base, models, EXCLUDE)
    dare = mask_merging(
        base, models, name, 0.0, use_weight_rescale=True, seed=3, exclude_param_names_regex=EXCLUDE
    )
    for n in plain:
        assert torch.equal(plain[n], dare[n]), (name, n)


@pytest.mark.parametrize("name", streamable_names())
def test_inputs_unchanged_and_excluded_and_non_float_copied(name):
    base, models = family(num_models_for(name))
    base0, models0 = clone(base), [clone(m) for m in models]
    out = merge_state_dicts(name, base, models, EXCLUDE)
    for before, after in zip([base0, *models0], [base, *models]):
        for n in before:
            assert torch.equal(before[n], after[n])
    source = base if get_method(name).copy_from == "base" else models[0]
    assert torch.equal(out["head.w"], source["head.w"])
    assert torch.equal(out["steps"], source["steps"])
    for n, t in out.items():
        assert t.dtype == source[n].dtype and t.shape == source[n].shape


@pytest.mark.parametrize("name", streamable_names())
def test_bfloat16_in_bfloat16_out(name):
    base, models = family(num_models_for(name), dtype=torch.bfloat16)
    out = merge_state_dicts(name, base, models, EXCLUDE)
    assert all(t.dtype == (torch.bfloat16 if t.is_floating_point() else torch.int64) for t in out.values())


def test_unknown_method_and_unknown_parameter_are_one_line_errors():
    base, models = family(2)
    with pytest.raises(MergeError, match="unknown merging method 'nope'"):
        merge_state_dicts("nope", base, models)
    with pytest.raises(MergeError, match="task_arithmetic has no parameter 'lambda_'"):
        merge_state_dicts("task_arithmetic", base, models, lambda_=0.3)
    with pytest.raises(MergeError, match="finite and non-negative"):
        merge_state_dicts("task_arithmetic", base, models, scaling_coefficient=-1.0)


def save_family(tmp_path: Path, base, models) -> tuple[str, list[str]]:
    folders = []
    for i, sd in enumerate([base, *models]):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file(
            {n: t.contiguous() for n, t in sd.items()},
            folder / "model.safetensors",
            metadata={"format": "pt"},
        )
        (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
        folders.append(str(folder))
    return folders[0], folders[1:]


SETTINGS = {  # non-default settings so that every parameter matters
    "ties_merging": [{"param_value_mask_rate": 0.5, "trim_scope": "global"}, {"trim_scope": "tensor"}],
    "task_arithmetic": [{"scaling_coefficient": 0.7}],
    "breadcrumbs_merging": [{"param_value_mask_rate": 0.3, "outlier_mask_rate": 0.05}],
    "della_merging": [{"weight_mask_rate": 0.4, "della_epsilon": 0.2, "seed": 5}],
    "slerp_merging": [{"slerp_t": 0.3}],
    "consensus_merging": [{"tall_mask_lambda": 0.5, "consensus_k": 2}],
}


@pytest.mark.parametrize("dare", [False, True], ids=["plain", "dare"])
@pytest.mark.parametrize("name", streamable_names())
def test_streamed_bytes_equal_in_memory_bytes(name, dare, tmp_path, monkeypatch):
    """Every streamable method, streamed in small row blocks on 2 threads, gives the in-memory bytes."""
    method = get_method(name)
    if dare and not method.dare_prestep:
        pytest.skip("no DARE pre-step")
    monkeypatch.setattr(planning, "CHUNK_ELEMENTS", 50)
    base, models = family(num_models_for(name), dtype=torch.bfloat16, seed=1)
    pre, fts = save_family(tmp_path, base, models)
    for k, settings in enumerate(SETTINGS.get(name, [{}])):
        if dare:
            kw = dict(weight_mask_rates=[0.3, 0.6, 0.5][: len(models)], use_weight_rescale=True, seed=9)
            expected = mask_merging(base, models, name, exclude_param_names_regex=EXCLUDE, **kw, **settings)
            call = dict(merging_method_name="mask_merging", mask_apply_method=name, **kw)
        else:
            expected = merge_state_dicts(name, base, models, EXCLUDE, **settings)
            call = dict(merging_method_name=name)
        for threads in (1, 2):
            out = tmp_path / f"out{k}_{threads}"
            stream_merge(
                pre, fts, str(out), exclude_param_names_regex=EXCLUDE, num_threads=threads, **call, **settings
            )
            got = load_file(out / "model.safetensors")
            assert set(got) == set(expected)
            for n in expected:
                assert torch.equal(got[n], expected[n]), (name, settings, threads, n)


@pytest.mark.parametrize("name", streamable_names())
def test_every_streamable_method_runs_from_the_llm_merge_script(name, tmp_path):
    """The script's flags come from the registry: each method runs with its defaults and gives the core's bytes."""
    import merge_llms_instruct_math_code as script

    base, models = family(num_models_for(name), seed=2)
    pre, fts = save_family(tmp_path, base, models)
    out = tmp_path / "merged"
    argv = ["--pretrained_model_name", pre, "--finetuned_model_names", *fts, "--merging_method_name", name]
    script.main([*argv, "--merged_model_path", str(out), "--skip_evaluation", "--num_threads", "1"])
    expected = merge_state_dicts(name, base, models)
    got = load_file(out / "model.safetensors")
    for n in expected:
        assert torch.equal(got[n], expected[n]), (name, n)
