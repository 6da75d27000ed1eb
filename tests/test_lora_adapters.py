"""LoRA adapters as inputs (LoraModelReader against PEFT's merge_and_unload) and as outputs (LoraAdapterWriter:
loadable with PeftModel.from_pretrained, exact at full rank, Eckart–Young error when truncated)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from model_merging_methods.checkpoint_io import CheckpointReader
from model_merging_methods.errors import MergeError
from model_merging_methods.lora import (
    LoraAdapterWriter,
    LoraModelReader,
    _compress,
    feed_reader,
    is_lora_folder,
    open_model_or_adapter,
    randomized_svd,
    resolve_base_model,
)
from tests.lora_helpers import build_base, load_model, make_adapter, max_abs_diff, merged_reference

CASES = {
    "lora": dict(target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_head": dict(
        target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True, modules_to_save=["lm_head"]
    ),
    "patterns_embedding": dict(
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3},
    ),  # fmt: skip
    "bias_all": dict(target_modules=["q_proj", "o_proj"], bias="all"),
    "lora_bias_tokens": dict(target_modules=["k_proj"], lora_bias=True, trainable_token_indices=[3, 5, 7]),
    "lora_only_bias": dict(target_modules=["gate_proj", "up_proj"], r=8, lora_alpha=4, bias="lora_only"),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("lora_base") / "base")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_adapters")
    return {name: make_adapter(base, root / name, seed=i, **kw) for i, (name, kw) in enumerate(CASES.items())}


def _theta(reader) -> dict[str, torch.Tensor]:
    return {n: reader.read(n) for n in reader.names()}


@pytest.mark.parametrize("case", list(CASES))
def test_reader_equals_merge_and_unload(base, adapters, case):
    ref = merged_reference(base, adapters[case])
    with CheckpointReader(base) as b, LoraModelReader(adapters[case], b) as r:
        theta = _theta(r)
        assert set(theta) == set(ref)
        for name, x in theta.items():
            assert x.dtype == ref[name].dtype and x.shape == ref[name].shape, name
            assert max_abs_diff(x, ref[name]) <= 1e-6, name
        changed = {n for n in theta if r.changed(n)}
        base_sd = {n: b.read(n) for n in b.names()}
    # every tensor the adapter does not touch is the base's, bit for bit
    assert changed, case
    for name in set(theta) - changed:
        assert torch.equal(theta[name], base_sd[name]), name


def test_rslora_scaling_is_alpha_over_sqrt_r(base, adapters):
    with CheckpointReader(base) as b, LoraModelReader(adapters["rslora_head"], b) as r:
        mod = r.low_rank("model.layers.0.self_attn.q_proj.weight")
        assert mod.rank == 4 and mod.scaling == pytest.approx(8 / math.sqrt(4))
        # independent reference: s·B·A from the raw adapter tensors
        a = r.adapter.tensors.read(mod.a).double().numpy()
        bb = r.adapter.tensors.read(mod.b).double().numpy()
        want = b.read(mod.param).double().numpy() + 4.0 * bb @ a
        assert np.abs(r.read(mod.param).double().numpy() - want).max() <= 1e-6
    with CheckpointReader(base) as b, LoraModelReader(adapters["patterns_embedding"], b) as r:
        assert r.low_rank("model.layers.0.self_attn.v_proj.weight").rank == 2
        assert r.low_rank("model.layers.1.self_attn.q_proj.weight").scaling == pytest.approx(3 / 4)
        assert r.low_rank("model.layers.0.self_attn.q_proj.weight").scaling == pytest.approx(8 / 4)
        assert r.low_rank("model.embed_tokens.weight").kind == "embedding"


def test_slices_are_bitwise_consistent_and_lazy(base, adapters):
    with CheckpointReader(base) as b, LoraModelReader(adapters["lora_bias_tokens"], b) as r:
        for name in r.names():
            whole = r.read(name).reshape(-1)
            n = whole.numel()
            for step in (1, 7, 33, n):
                parts = torch.cat([r.read_flat_slice(name, s, step) for s in range(0, n, step)])
                assert torch.equal(parts, whole), (name, step)
    with CheckpointReader(base) as b, LoraModelReader(adapters["lora"], b) as r:
        name = "model.layers.1.mlp.down_proj.weight"  # [32, 64], lora_A [4, 64], lora_B [32, 4]
        r.read_flat_slice(name, 64 * 5, 64)  # row 5: A (then cached) and B's row 5
        assert r.adapter.tensors.bytes_read == (4 * 64 + 4) * 4
        r.read_flat_slice(name, 64 * 10 + 3, 64 * 2)  # rows 10 to 12: three more rows of B
        assert r.adapter.tensors.bytes_read == (4 * 64 + 4 * 4) * 4


def test_bfloat16_base(tmp_path):
    base = build_base(tmp_path / "base_bf16", dtype=torch.bfloat16)
    adapter = make_adapter(
        base, tmp_path / "ad", target_modules=["q_proj", "up_proj"], modules_to_save=["lm_head"]
    )
    ref = merged_reference(base, adapter, dtype=torch.bfloat16)
    with CheckpointReader(base) as b, LoraModelReader(adapter, b) as r:
        for name in r.names():
            x = r.read(name)
            assert x.dtype == torch.bfloat16
            assert torch.equal(x, ref[name]), name
    with CheckpointReader(base) as b, LoraModelReader(adapter, b, dtype=torch.float32) as r:
        mod = r.low_rank("model.layers.0.self_attn.q_proj.weight")
        delta = r.read(mod.param) - b.read(mod.param).float()
        s_ba = mod.scaling * r.adapter.tensors.read(mod.b) @ r.adapter.tensors.read(mod.a)
        assert max_abs_diff(delta, s_ba) <= 1e-6  # float32 presentation keeps the small delta


def test_resized_vocabulary_adapter(base, tmp_path):
    adapter = make_adapter(
        base,
        tmp_path / "ad",
        resize_to=103,
        target_modules=["q_proj"],
        modules_to_save=["embed_tokens", "lm_head"],
    )
    ref = merged_reference(base, adapter, resize_to=103)
    with CheckpointReader(base) as b, LoraModelReader(adapter, b) as r:
        assert r.config["vocab_size"] == 103 and b.config["vocab_size"] == 100
        assert r.infos["lm_head.weight"].shape == (103, 32)
        for name in r.names():
            assert max_abs_diff(r.read(name), ref[name]) <= 1e-6, name
        assert any("resizes the vocabulary" in w for w in r.warnings)


def _edit_config(folder, **updates):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(updates)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"r": 3}, "rank 4 in the weights but r=3"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "target_parameters"),
        ({"layer_replication": [[0, 1], [0, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
    ],
)
def test_unsupported_adapters_are_refused(base, adapters, tmp_path, updates, expected):
    folder = tmp_path / "ad"
    shutil.copytree(adapters["lora"], folder)
    _edit_config(folder, **updates)
    with CheckpointReader(base) as b, pytest.raises(MergeError, match=expected):
        LoraModelReader(folder, b)


def test_bad_adapter_files(base, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ad"
    shutil.copytree(adapters["lora"], folder)
    sd = load_file(folder / "adapter_model.safetensors")
    bad = dict(sd)
    bad["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
    save_file(bad, folder / "adapter_model.safetensors")
    with CheckpointReader(base) as b, pytest.raises(MergeError, match="not understood"):
        LoraModelReader(folder, b)
    bad = {k: v for k, v in sd.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    save_file(bad, folder / "adapter_model.safetensors")
    with CheckpointReader(base) as b, pytest.raises(MergeError, match="lacks its B factor"):
        LoraModelReader(folder, b)
    bad = dict(sd)
    bad["base_model.model.model.layers.0.mlp.nonexistent.weight"] = torch.ones(3)
    save_file(bad, folder / "adapter_model.safetensors")
    with CheckpointReader(base) as b, pytest.raises(MergeError, match="does not have"):
        LoraModelReader(folder, b)
    (folder / "adapter_model.safetensors").unlink()
    with CheckpointReader(base) as b, pytest.raises(MergeError, match="no adapter_model.safetensors"):
        LoraModelReader(folder, b)


def test_tied_base_refuses_lora_on_lm_head(tmp_path):
    tied = build_base(tmp_path / "tied", tie=True)
    with CheckpointReader(tied) as b:
        assert "lm_head.weight" not in b.infos
    untied = build_base(tmp_path / "untied")
    adapter = make_adapter(untied, tmp_path / "ad", target_modules=["q_proj", "lm_head"])
    with CheckpointReader(tied) as b, pytest.raises(MergeError, match="ties it to the input embedding"):
        LoraModelReader(adapter, b)


def test_open_model_or_adapter_and_base_resolution(base, adapters, tmp_path):
    assert is_lora_folder(adapters["lora"]) and not is_lora_folder(base)
    with CheckpointReader(base) as b:
        r = open_model_or_adapter(str(adapters["lora"]), b)
        assert isinstance(r, LoraModelReader)
        r.close()
        full = open_model_or_adapter(str(base), b)
        assert isinstance(full, CheckpointReader) and not isinstance(full, LoraModelReader)
        full.close()
        with pytest.raises(MergeError, match="needs its base model"):
            open_model_or_adapter(str(adapters["lora"]), None)
        both = tmp_path / "both"
        shutil.copytree(adapters["lora"], both)
        shutil.copyfile(base / "model.safetensors", both / "model.safetensors")
        with pytest.raises(MergeError, match="both a LoRA adapter"):
            open_model_or_adapter(str(both), b)
    named = tmp_path / "named"
    shutil.copytree(adapters["lora"], named)
    _edit_config(named, base_model_name_or_path=str(base))
    assert resolve_base_model(None, [str(named)]) == str(base)
    assert resolve_base_model("explicit", [str(named)]) == "explicit"
    anonymous = tmp_path / "anonymous"
    shutil.copytree(adapters["lora"], anonymous)
    _edit_config(anonymous, base_model_name_or_path=None)
    with pytest.raises(MergeError, match="names no base model"):
        resolve_base_model(None, [str(anonymous)])
    other = tmp_path / "other"
    shutil.copytree(named, other)
    _edit_config(other, base_model_name_or_path=str(tmp_path / "elsewhere"))
    with pytest.raises(MergeError, match="different base models"):
        resolve_base_model(None, [str(named), str(other)])
    with pytest.raises(MergeError, match="no pretrained model"):
        resolve_base_model(None, [str(base)])


# ---------------------------------------------------------------------------------------------------- writing


def _perturbed_model(base, folder, seed=1, scale=0.01, skip=("embed",)):
    model = load_model(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(str(folder))
    return folder


def _write_adapter(base, finetuned, out, rank, **kw):
    with CheckpointReader(base) as b, CheckpointReader(finetuned) as f:
        specs = [(n, torch.float32, b.infos[n].shape) for n in b.names()]
        writer = LoraAdapterWriter(out, specs, b, rank, **kw)
        feed_reader(writer, f, b.names())
        return writer.close()


def test_written_adapter_loads_in_peft_and_is_exact_at_full_rank(base, tmp_path):
    ft = _perturbed_model(base, tmp_path / "ft")
    report = _write_adapter(base, ft, tmp_path / "ad", 64)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (
        cfg["peft_type"] == "LORA"
        and cfg["r"] == 64
        and cfg["lora_alpha"] == 64
        and cfg["bias"] == "lora_only"
    )
    assert sorted(cfg["modules_to_save"]) == ["input_layernorm", "norm", "post_attention_layernorm"]
    assert "lm_head" in cfg["target_modules"] and cfg["rank_pattern"]  # modules of rank 32 < 64
    ref = merged_reference(base, tmp_path / "ad")
    want = {k: v for k, v in load_model(ft).state_dict().items()}
    assert max(max_abs_diff(ref[k], want[k]) for k in want) <= 1e-6
    assert all(m["relative_error"] <= 1e-5 for m in report["modules"].values() if m["kind"] == "lora")
    # our own reader gives the same model
    with CheckpointReader(base) as b, LoraModelReader(tmp_path / "ad", b) as r:
        assert max(max_abs_diff(r.read(k), want[k]) for k in want) <= 1e-6


def test_deferred_writer_gives_the_same_adapter(base, tmp_path):
    """Spilling everything, overwriting parts, factorising in close(): the same files as the immediate writer."""
    ft = _perturbed_model(base, tmp_path / "ft")
    immediate = _write_adapter(base, ft, tmp_path / "a", 5, svd="full")
    with CheckpointReader(base) as b, CheckpointReader(ft) as f:
        specs = [(n, torch.float32, b.infos[n].shape) for n in b.names()]
        writer = LoraAdapterWriter(tmp_path / "b", specs, b, 5, svd="full", deferred=True)
        for name in reversed(b.names()):  # any order; first a wrong value, then overwritten
            x = f.read(name).float().reshape(-1)
            writer.write_at(name, 0, torch.zeros_like(x))
            writer.overwrite_at(name, 0, x)
            assert torch.equal(
                torch.frombuffer(writer.read_at(name, 0, x.numel() * 4), dtype=torch.float32), x
            )
        deferred = writer.close()
    assert deferred["modules"] == immediate["modules"]
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()
    assert not (tmp_path / "b" / ".lora_spill.tmp").exists()


def test_truncated_rank_error_is_eckart_young(base, tmp_path):
    ft = _perturbed_model(base, tmp_path / "ft", skip=("embed", "norm", "bias"))
    report = _write_adapter(base, ft, tmp_path / "ad", 3, svd="full")
    assert report["modules_to_save"] == [] and report["base_layer_biases"] == []
    with CheckpointReader(base) as b, CheckpointReader(ft) as f:
        for module, row in report["modules"].items():
            delta = (f.read(module + ".weight").double() - b.read(module + ".weight").double()).numpy()
            s = np.linalg.svd(delta, compute_uv=False)
            optimal = math.sqrt(float((s[3:] ** 2).sum()) / float((s**2).sum()))
            assert row["rank"] == 3 and row["relative_error"] == pytest.approx(optimal, rel=1e-4), module


def test_randomized_svd_is_seeded_and_near_optimal():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    s = 0.5 ** torch.arange(200, dtype=torch.float32)
    m = (u[:, :200] * s) @ v.T
    a = randomized_svd(m, 10, torch.Generator().manual_seed(3))
    b = randomized_svd(m, 10, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.allclose(a[1], s[:10], rtol=1e-4)
    err = torch.linalg.matrix_norm(m - (a[0] * a[1]) @ a[2]) / torch.linalg.matrix_norm(m)
    assert float(err) <= 1.01 * math.sqrt(float((s[10:] ** 2).sum() / (s**2).sum()))


def test_writer_refusals(base, tmp_path):
    with CheckpointReader(base) as b:
        specs = [(n, torch.float32, b.infos[n].shape) for n in b.names()]
        bad = [(n, d, (s[0] + 1, *s[1:]) if n == "lm_head.weight" else s) for n, d, s in specs]
        with pytest.raises(MergeError, match="cannot change shapes"):
            LoraAdapterWriter(tmp_path / "a", bad, b, 4)
        with pytest.raises(MergeError, match="missing from the model"):
            LoraAdapterWriter(tmp_path / "b", specs[1:], b, 4)
        with pytest.raises(MergeError, match="positive integer"):
            LoraAdapterWriter(tmp_path / "c", specs, b, 0)
        writer = LoraAdapterWriter(tmp_path / "d", specs, b, 4)
        feed_reader(writer, b, b.names())  # the base itself: nothing changed
        with pytest.raises(MergeError, match="equals the base"):
            writer.close()


def test_compress_picks_unambiguous_short_names():
    modules = [f"model.layers.{i}.{m}" for i in range(12) for m in ("self_attn.q_proj", "input_layernorm")]
    modules += ["model.norm", "lm_head"]
    chosen = {m for m in modules if m.endswith("q_proj")}
    assert _compress(chosen, modules, False) == ["q_proj"]
    one = {"model.layers.1.self_attn.q_proj"}
    assert _compress(one, modules, False) == ["model.layers.1.self_attn.q_proj"]
    # modules_to_save matching is a plain endswith: "norm" would also pick every input_layernorm
    assert _compress({"model.norm"}, modules, True) == ["model.norm"]
    norms = {m for m in modules if m.endswith("norm")}
    assert _compress(norms, modules, True) == ["input_layernorm", "norm"]


def test_config_is_read_as_peft_reads_it(base, adapters):
    """The adapter config is parsed without importing peft; the fields that decide the weights agree with
    peft.LoraConfig, and pattern matching agrees with peft's get_pattern_key."""
    from peft import PeftConfig
    from peft.utils.other import get_pattern_key

    from model_merging_methods.lora import LoraAdapter, pattern_key

    for name, folder in adapters.items():
        ours, theirs = LoraAdapter(folder).config, PeftConfig.from_pretrained(str(folder))
        for field in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                      "trainable_token_indices", "base_model_name_or_path"):  # fmt: skip
            want = getattr(theirs, field)
            if field.endswith("pattern"):
                want = want or {}
            assert getattr(ours, field) == want, (name, field)
    keys = ["v_proj", "layers.1.self_attn.q_proj", r"model\.layers\.0\..*", "q_proj"]
    for module in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj",
                   "model.layers.11.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"):  # fmt: skip
        assert pattern_key(keys, module) == get_pattern_key(keys, module), module


def test_reading_an_adapter_does_not_import_peft(base, adapters):
    import subprocess
    import sys

    code = (
        "import sys; from model_merging_methods.checkpoint_io import CheckpointReader; "
        "from model_merging_methods.lora import LoraModelReader; "
        f"r = LoraModelReader({str(adapters['rslora_head'])!r}, CheckpointReader({str(base)!r})); "
        "[r.read(n) for n in r.names()]; print('peft' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("value", [{"r": 0}, {"r": 2.5}, {"lora_alpha": "8"}, {"rank_pattern": {"q_proj": -1}},
                                   {"use_rslora": "yes"}, {"rank_pattern": {"(": 2}}])  # fmt: skip
def test_bad_config_values(base, adapters, tmp_path, value):
    folder = tmp_path / "ad"
    shutil.copytree(adapters["lora"], folder)
    _edit_config(folder, **value)
    with CheckpointReader(base) as b, pytest.raises(MergeError, match="adapter|regular expression"):
        LoraModelReader(folder, b)
