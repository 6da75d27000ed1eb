"""Issue 13 end to end through the streaming engine: LoRA adapters as merge inputs (against PEFT's
merge_and_unload), adapters as merge outputs (--output_format lora), the extract → merge round trip, and the union
vocabulary of fine-tunes that added different tokens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from model_merging_methods.errors import MergeError
from model_merging_methods.lora import extract_lora
from model_merging_methods.streaming import OutputOptions, merge_checkpoints, stream_mask_model, stream_merge
from tests.lora_helpers import build_base, load_model, make_adapter, max_abs_diff, merged_reference


def _load(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter_merging")
    base = build_base(root / "base")
    return {
        "root": root,
        "base": base,
        "plain": make_adapter(base, root / "plain", seed=1, target_modules=["q_proj", "v_proj", "down_proj"]),
        "rslora": make_adapter(
            base,
            root / "rslora",
            seed=2,
            target_modules=["q_proj", "k_proj", "up_proj"],
            use_rslora=True,
            r=8,
        ),  # fmt: skip
        "head": make_adapter(
            base, root / "head", seed=3, target_modules=["o_proj"], modules_to_save=["lm_head"], bias="all"
        ),
    }


@pytest.mark.parametrize("name", ["plain", "rslora", "head"])
def test_one_adapter_into_its_base_equals_merge_and_unload(fam, tmp_path, name):
    ref = merged_reference(fam["base"], fam[name])
    manifest = stream_mask_model(
        str(fam["base"]), str(fam[name]), str(tmp_path / "out"), weight_mask_rate=0.0
    )
    out = _load(tmp_path / "out")
    assert set(out) == set(ref)
    assert max(max_abs_diff(out[k], ref[k]) for k in ref) <= 1e-6
    assert manifest["inputs"][1]["format"] == "peft-lora"
    # the same through a merge: task arithmetic of the adapter and the base itself
    merge_checkpoints(
        str(fam["base"]), [str(fam[name]), str(fam["base"])], str(tmp_path / "ta"), "task_arithmetic"
    )
    out = _load(tmp_path / "ta")
    assert max(max_abs_diff(out[k], ref[k]) for k in ref) <= 1e-6


def test_task_arithmetic_of_adapters_is_the_sum_of_their_deltas(fam, tmp_path):
    base = load_model(fam["base"]).state_dict()
    refs = [merged_reference(fam["base"], fam[n]) for n in ("plain", "rslora", "head")]
    want = {k: base[k] + sum(r[k] - base[k] for r in refs) for k in base}
    merge_checkpoints(
        str(fam["base"]), [str(fam[n]) for n in ("plain", "rslora", "head")], str(tmp_path / "out"),
        "task_arithmetic", {"scaling_coefficient": 1.0},
    )  # fmt: skip
    out = _load(tmp_path / "out")
    assert max(max_abs_diff(out[k], want[k]) for k in want) <= 1e-6
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert [i["format"] for i in manifest["inputs"]] == ["safetensors"] + ["peft-lora"] * 3


def test_dare_and_ties_run_on_adapters(fam, tmp_path):
    """DARE + TIES on adapters equals DARE + TIES on the adapters' merged full models."""
    fulls = []
    for n in ("plain", "rslora"):
        folder = tmp_path / f"full_{n}"
        load_model(fam["base"])  # warm
        stream_mask_model(str(fam["base"]), str(fam[n]), str(folder), weight_mask_rate=0.0)
        fulls.append(str(folder))
    kw = dict(
        merging_method_name="mask_merging", mask_apply_method="ties_merging", weight_mask_rates=0.5, seed=3,
        param_value_mask_rate=0.5, scaling_coefficient=1.0,
    )  # fmt: skip
    stream_merge(str(fam["base"]), [str(fam["plain"]), str(fam["rslora"])], str(tmp_path / "a"), **kw)
    stream_merge(str(fam["base"]), fulls, str(tmp_path / "b"), **kw)
    a, b = _load(tmp_path / "a"), _load(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_from_the_adapters_config(fam, tmp_path):
    merge_checkpoints(None, [str(fam["plain"]), str(fam["rslora"])], str(tmp_path / "out"), "average_merging")
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert manifest["inputs"][0]["folder"] == str(fam["base"].resolve())


def test_bfloat16_base_keeps_the_adapters_delta(tmp_path):
    base = build_base(tmp_path / "base", dtype=torch.bfloat16)
    ad = [
        make_adapter(base, tmp_path / f"a{i}", seed=i, target_modules=["q_proj"], scale=0.01)
        for i in range(2)
    ]
    manifest = merge_checkpoints(str(base), [str(a) for a in ad], str(tmp_path / "out"), "task_arithmetic")
    out = _load(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    assert not [
        w for w in manifest["warnings"] if "different dtypes" in w
    ]  # read in float32, merged as bfloat16
    w = load_model(base, torch.bfloat16).state_dict()
    deltas = [merged_reference(base, a, dtype=torch.float32) for a in ad]  # float32 base copy: exact deltas
    name = "model.layers.0.self_attn.q_proj.weight"
    exact = w[name].float() + sum(d[name] - w[name].float() for d in deltas)
    assert torch.equal(out[name], exact.to(torch.bfloat16))  # rounded once, at the end


def test_lora_output_of_a_merge(fam, tmp_path):
    """Task arithmetic of two adapters written as an adapter of rank r1 + r2: exact, loadable with PEFT."""
    names = [str(fam["plain"]), str(fam["rslora"])]
    merge_checkpoints(str(fam["base"]), names, str(tmp_path / "full"), "task_arithmetic")
    manifest = merge_checkpoints(
        str(fam["base"]), names, str(tmp_path / "lora"), "task_arithmetic",
        options=OutputOptions(output_format="lora", lora_rank=12),
    )  # fmt: skip
    assert manifest["output"]["format"] == "lora"
    assert sorted(manifest["output"]["files"]) == [
        ".dare_toolkit_output.json", "adapter_config.json", "adapter_model.safetensors",
    ]  # fmt: skip
    assert (tmp_path / "lora" / "merge_manifest.json").is_file() and not (
        tmp_path / "lora" / "config.json"
    ).exists()
    assert manifest["lora"]["modules_to_save"] == []
    assert all(
        m["relative_error"] <= 1e-5 for m in manifest["lora"]["modules"].values() if m["kind"] == "lora"
    )
    ref = merged_reference(fam["base"], tmp_path / "lora")
    full = _load(tmp_path / "full")
    assert max(max_abs_diff(ref[k], full[k]) for k in full) <= 1e-5  # float32 SVD of deltas up to |1|
    # TIES patches its output after writing: the deferred adapter writer takes that
    kw = dict(merging_method_name="ties_merging", param_value_mask_rate=0.5, scaling_coefficient=1.0)
    stream_merge(str(fam["base"]), names, str(tmp_path / "ties"), **kw)
    stream_merge(
        str(fam["base"]), names, str(tmp_path / "ties_lora"), output_format="lora", lora_rank=64, **kw
    )
    ref = merged_reference(fam["base"], tmp_path / "ties_lora")
    full = _load(tmp_path / "ties")
    assert max(max_abs_diff(ref[k], full[k]) for k in full) <= 1e-5


def test_full_finetune_extract_merge_back_round_trip(fam, tmp_path):
    model = load_model(fam["base"])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "embed" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(tmp_path / "ft"))
    extract_lora(str(fam["base"]), str(tmp_path / "ft"), str(tmp_path / "ad"), 64)
    stream_mask_model(str(fam["base"]), str(tmp_path / "ad"), str(tmp_path / "back"), weight_mask_rate=0.0)
    back, want = _load(tmp_path / "back"), model.state_dict()
    assert max(max_abs_diff(back[k], want[k]) for k in want) <= 1e-6


def test_refusals(fam, tmp_path):
    with pytest.raises(MergeError, match="lora_rank"):
        merge_checkpoints(
            str(fam["base"]), [str(fam["plain"]), str(fam["rslora"])], str(tmp_path / "x"), "average_merging",
            options=OutputOptions(output_format="lora"),
        )  # fmt: skip
    with pytest.raises(MergeError, match="output_format must be"):
        merge_checkpoints(
            str(fam["base"]), [str(fam["plain"]), str(fam["rslora"])], str(tmp_path / "x"), "average_merging",
            options=OutputOptions(output_format="gguf"),
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------- union vocabulary


def _finetune_with_token(base, folder, token, seed):
    """A fine-tune of ``base`` that added ``token`` (tokenizer + one embedding/lm_head row) and moved every weight."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"additional_special_tokens": [token]})
    model = load_model(base)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def token_family(fam):
    root = fam["root"]
    return (
        fam["base"],
        _finetune_with_token(fam["base"], root / "math", "<|math|>", 21),
        _finetune_with_token(fam["base"], root / "code", "<|code|>", 22),
    )


def test_union_vocabulary_merge(token_family, tmp_path):
    from transformers import AutoTokenizer

    base, math_ft, code_ft = token_family
    manifest = merge_checkpoints(
        str(base), [str(math_ft), str(code_ft)], str(tmp_path / "out"), "task_arithmetic",
        {"scaling_coefficient": 1.0}, options=OutputOptions(vocab_policy="union"),
    )  # fmt: skip
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.convert_tokens_to_ids(["<|math|>", "<|code|>"]) == [100, 101] and len(tok) == 102
    out = _load(tmp_path / "out")
    m, c = _load(math_ft), _load(code_ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (102, 32)
        assert torch.equal(out[name][100], m[name][100])  # <|math|>: the math model's row, exactly
        assert torch.equal(out[name][101], c[name][100])  # <|code|>: the code model's row (its id 100)
        b = load_model(base).state_dict()[name]
        want = b + (m[name][:100] - b) + (c[name][:100] - b)  # shared rows: task arithmetic
        assert max_abs_diff(out[name][:100], want) <= 1e-6
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["vocab_size"] == 102
    assert manifest["vocabulary"]["policy"] == "union"
    merged = load_model(tmp_path / "out")
    for token in ("<|math|>", "<|code|>"):
        ids = tok(f"ab{token}c", return_tensors="pt")
        assert tok.convert_tokens_to_ids(token) in ids["input_ids"][0].tolist()
        gen = merged.generate(**ids, max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == ids["input_ids"].shape[1] + 3


def test_union_vocabulary_padding_and_errors(token_family, tmp_path):
    base, math_ft, code_ft = token_family
    merge_checkpoints(
        str(base), [str(math_ft), str(code_ft)], str(tmp_path / "out"), "average_merging",
        options=OutputOptions(vocab_policy="union", pad_to_multiple_of=64),
    )  # fmt: skip
    out = _load(tmp_path / "out")
    b = load_model(base).state_dict()["lm_head.weight"]
    assert out["lm_head.weight"].shape == (128, 32)
    assert torch.equal(out["lm_head.weight"][102:], b.double().mean(0).float().expand(26, 32))
    no_tok = tmp_path / "no_tok"
    load_model(math_ft).save_pretrained(str(no_tok))
    with pytest.raises(MergeError, match="needs every model's tokenizer"):
        merge_checkpoints(
            str(base), [str(no_tok), str(code_ft)], str(tmp_path / "y"), "average_merging",
            options=OutputOptions(vocab_policy="union"),
        )  # fmt: skip
    with pytest.raises(MergeError, match="pad_to_multiple_of needs vocab_policy union"):
        merge_checkpoints(
            str(base), [str(math_ft), str(code_ft)], str(tmp_path / "z"), "average_merging",
            options=OutputOptions(vocab_policy="pad_mean", pad_to_multiple_of=8),
        )  # fmt: skip
