"""The streaming engine against the in-memory functional core, on tiny LLaMA families built here.

Families: a float32 base (single safetensors) with fine-tuned models = base + N(0, 0.002²) deltas saved as single
safetensors, sharded safetensors, and a ``.bin`` with an extra ``[PAD]`` vocabulary row; and a bfloat16 family.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model_merging_methods import planning
from model_merging_methods.mask_weights_utils import mask_model_weights
from model_merging_methods.merging_methods import average_merging, mask_merging, task_arithmetic, ties_merging
from model_merging_methods.streaming import (
    pad_rows_with_mean,
    stream_mask_model,
    stream_merge,
    stream_recover_from_delta,
)
from utils.cli import UserError
from utils.tiny_models import build_char_tokenizer, build_tiny_llama, tiny_llama_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


# ------------------------------------------------------------------------------------------------ family builder


def save_state(sd: dict[str, torch.Tensor], folder: Path, fmt: str, side_from: Path | None = None) -> Path:
    """Save a state dict as ``st`` (model.safetensors), ``st_sharded`` (3 shards + index), ``bin``
    (pytorch_model.bin) or ``bin_sharded`` (2 shards + index); copy config/tokenizer files from ``side_from``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    if fmt == "st":
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        n = 3 if fmt == "st_sharded" else 2
        ext = "safetensors" if fmt == "st_sharded" else "bin"
        prefix = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i in range(n):
            part = {k: sd[k].contiguous() for k in names[i::n]}
            fname = f"{prefix}-{i + 1:05d}-of-{n:05d}.{ext}"
            if ext == "safetensors":
                save_file(part, folder / fname, metadata={"format": "pt"})
            else:
                torch.save(part, folder / fname)
            weight_map.update(dict.fromkeys(part, fname))
        index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if side_from is not None:
        for f in side_from.iterdir():
            if f.suffix in (".json", ".model", ".jinja") and not f.name.endswith("index.json"):
                shutil.copyfile(f, folder / f.name)
    return folder


def set_config(folder: Path, **updates) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(updates)
    (folder / "config.json").write_text(json.dumps(cfg))


def perturbed(sd, seed, scale=0.002):
    g = torch.Generator().manual_seed(seed)
    return {
        n: (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype).contiguous()
        for n, t in sd.items()
    }


def build_family(root: Path, dtype: torch.dtype = torch.float32, pad_model: bool = True) -> dict[str, Path]:
    """base (st) + ft_a (st) + ft_b (st_sharded) + ft_c (bin, one extra [PAD] row when ``pad_model``)."""
    tok = build_char_tokenizer()
    cfg = tiny_llama_config(vocab_size=len(tok))
    model = build_tiny_llama(cfg, seed=0)
    base_sd = {n: t.detach().to(dtype).contiguous() for n, t in model.state_dict().items()}
    model.config.save_pretrained(root / "_side")
    tok.save_pretrained(root / "_side")
    out = {"base": save_state(base_sd, root / "base", "st", root / "_side")}
    out["ft_a"] = save_state(perturbed(base_sd, 1), root / "ft_a", "st", root / "_side")
    out["ft_b"] = save_state(perturbed(base_sd, 2), root / "ft_b", "st_sharded", root / "_side")
    c = perturbed(base_sd, 3)
    if pad_model:
        g = torch.Generator().manual_seed(33)
        for n in VOCAB_NAMES:
            c[n] = torch.cat([c[n], 0.02 * torch.randn(1, c[n].shape[1], generator=g).to(dtype)])
        build_char_tokenizer(add_pad_token=True, save_dir=root / "_side_pad")
        model.config.save_pretrained(root / "_side_pad")
        set_config(root / "_side_pad", vocab_size=len(tok) + 1)
    out["ft_c"] = save_state(c, root / "ft_c", "bin", root / ("_side_pad" if pad_model else "_side"))
    return out


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        for f in sorted(Path(folder).glob("pytorch_model*.bin")):
            out.update(torch.load(f, weights_only=True))
    return out


def aligned(sd: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    return {n: pad_rows_with_mean(t, rows) if n in VOCAB_NAMES else t for n, t in sd.items()}


def assert_same(ref: dict[str, torch.Tensor], folder: Path) -> None:
    out = load_dir(folder)
    assert set(out) == set(ref)
    for n in ref:
        assert out[n].dtype == ref[n].dtype, n
        assert torch.equal(out[n], ref[n]), f"{n} differs"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("fam32"))


@pytest.fixture(scope="module")
def family_bf16(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("fambf16"), torch.bfloat16, pad_model=False)


@pytest.fixture
def small_chunks(monkeypatch):
    """Row blocks of at most 1000 elements, so every tensor bigger than that is streamed in several blocks."""
    monkeypatch.setattr(planning, "CHUNK_ELEMENTS", 1000)


def _inputs(fam, names=("ft_a", "ft_b", "ft_c")):
    rows = max(load_dir(fam[n])[VOCAB_NAMES[0]].shape[0] for n in ("base", *names))
    pre = aligned(load_dir(fam["base"]), rows)
    return pre, [aligned(load_dir(fam[n]), rows) for n in names]


# ---------------------------------------------------------------------------------------------------- exactness

CASES = {
    "average": (dict(merging_method_name="average_merging"), lambda P, F: average_merging(F)),
    "task_arithmetic": (
        dict(merging_method_name="task_arithmetic", scaling_coefficient=0.7),
        lambda P, F: task_arithmetic(P, F, 0.7),
    ),
    "ties_global": (
        dict(merging_method_name="ties_merging", param_value_mask_rate=0.6, scaling_coefficient=1.3),
        lambda P, F: ties_merging(P, F, 0.6, 1.3, "global"),
    ),
    "ties_tensor": (
        dict(merging_method_name="ties_merging", param_value_mask_rate=0.6, trim_scope="tensor"),
        lambda P, F: ties_merging(P, F, 0.6, 1.0, "tensor"),
    ),
    "dare_average": (
        dict(merging_method_name="mask_merging", mask_apply_method="average_merging", weight_mask_rates=0.9),
        lambda P, F: mask_merging(P, F, "average_merging", 0.9),
    ),
    "dare_ta_rates": (
        dict(
            merging_method_name="mask_merging", mask_apply_method="task_arithmetic", weight_mask_rates=[0.2, 0.5, 0.9],
            seed=7, scaling_coefficient=0.5,
        ),
        lambda P, F: mask_merging(P, F, "task_arithmetic", [0.2, 0.5, 0.9], seed=7, scaling_coefficient=0.5),
    ),
    "dare_ties_global": (
        dict(merging_method_name="mask_merging", mask_apply_method="ties_merging", weight_mask_rates=0.5, seed=1),
        lambda P, F: mask_merging(P, F, "ties_merging", 0.5, seed=1),
    ),
    "dare_magnitude_finetuned_weight": (
        dict(
            merging_method_name="mask_merging", mask_apply_method="task_arithmetic", weight_mask_rates=0.3,
            mask_strategy="magnitude", weight_format="finetuned_weight", use_weight_rescale=False,
        ),
        lambda P, F: mask_merging(
            P, F, "task_arithmetic", 0.3, mask_strategy="magnitude", weight_format="finetuned_weight",
            use_weight_rescale=False,
        ),
    ),
    "exclude_ta": (
        dict(
            merging_method_name="mask_merging", mask_apply_method="task_arithmetic", weight_mask_rates=0.5,
            exclude_param_names_regex=[".*norm.*", "lm_head.*"],
        ),
        lambda P, F: mask_merging(
            P, F, "task_arithmetic", 0.5, exclude_param_names_regex=[".*norm.*", "lm_head.*"]
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_stream_merge_equals_core(family, tmp_path, small_chunks, case):
    kwargs, reference = CASES[case]
    pre, fts = _inputs(family)
    manifest = stream_merge(
        str(family["base"]),
        [str(family[n]) for n in ("ft_a", "ft_b", "ft_c")],
        str(tmp_path / "out"),
        **kwargs,
    )
    assert_same(reference(pre, fts), tmp_path / "out")
    assert manifest["vocabulary"]["policy"] == "pad_mean"
    padded = {(a["model"].split()[0], a["tensor"]) for a in manifest["vocabulary"]["actions"]}
    assert ("pretrained", "lm_head.weight") in padded


def test_bf16_sharded_output_equals_core(family_bf16, tmp_path):
    pre, fts = _inputs(family_bf16)
    for kwargs, ref in [CASES["task_arithmetic"], CASES["dare_ties_global"]]:
        out = tmp_path / kwargs["merging_method_name"]
        stream_merge(
            str(family_bf16["base"]), [str(family_bf16[n]) for n in ("ft_a", "ft_b", "ft_c")], str(out),
            max_shard_size="20KB", **kwargs,
        )  # fmt: skip
        assert (
            len(list(out.glob("model-*.safetensors"))) > 1
            and (out / "model.safetensors.index.json").is_file()
        )
        expected = ref(pre, fts)
        assert all(t.dtype == torch.bfloat16 for t in expected.values())
        assert_same(expected, out)


def test_output_dtype_flag(family_bf16, tmp_path):
    """--dtype float32 on bf16 inputs: float32 math kept (no rounding to bf16 before the output)."""
    pre, fts = _inputs(family_bf16)
    stream_merge(
        str(family_bf16["base"]), [str(family_bf16[n]) for n in ("ft_a", "ft_b")], str(tmp_path / "o"),
        merging_method_name="task_arithmetic", dtype="float32",
    )  # fmt: skip
    p32 = {n: t.float() for n, t in pre.items()}
    ref = task_arithmetic(p32, [{n: t.float() for n, t in f.items()} for f in fts[:2]], 1.0)
    assert_same(ref, tmp_path / "o")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["dtype"] == "float32"


def test_stream_mask_model_equals_core(family, tmp_path, small_chunks):
    pre, fts = _inputs(family, ("ft_c",))
    for i, kw in enumerate(
        [
            dict(weight_mask_rate=0.9, seed=5),
            dict(weight_mask_rate=0.5, mask_strategy="magnitude", use_weight_rescale=False),
            dict(
                weight_mask_rate=0.7,
                exclude_param_names_regex=[".*embed.*"],
                weight_format="finetuned_weight",
            ),
        ]
    ):
        out = tmp_path / f"m{i}"
        manifest = stream_mask_model(str(family["base"]), str(family["ft_c"]), str(out), **kw)
        assert_same(mask_model_weights(fts[0], pre, **kw), out)
        assert manifest["kind"] == "dare"
    # the tokenizer and config come from the fine-tuned model (which already has the [PAD] row)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == pre[VOCAB_NAMES[0]].shape[0]
    assert "[PAD]" in json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] or any(
        t["content"] == "[PAD]" for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    )


def test_recover_from_delta(family, tmp_path):
    base, a = load_dir(family["base"]), load_dir(family["ft_a"])
    delta = {n: a[n] - base[n] for n in base}
    for n in VOCAB_NAMES:  # the released delta has the [PAD] row; the base gets its mean row before adding
        delta[n] = torch.cat([delta[n], torch.full((1, delta[n].shape[1]), 0.5)])
    save_state(delta, tmp_path / "delta", "st", family["ft_c"])
    stream_recover_from_delta(str(family["base"]), str(tmp_path / "delta"), str(tmp_path / "rec"))
    rec = load_dir(tmp_path / "rec")
    rows = delta[VOCAB_NAMES[0]].shape[0]
    for n, t in aligned(base, rows).items():
        assert torch.equal(rec[n], t + delta[n]), n
    mean = base[VOCAB_NAMES[0]].double().mean(0).float()
    torch.testing.assert_close(rec[VOCAB_NAMES[0]][-1], mean + 0.5)


# ------------------------------------------------------------------------------------------ vocabulary alignment


def test_pad_mean_rows_and_tokenizer(family, tmp_path):
    out = tmp_path / "o"
    stream_merge(
        str(family["base"]), [str(family["ft_a"]), str(family["ft_c"])], str(out),
        merging_method_name="average_merging", tokenizer_source=str(family["ft_a"]),
    )  # fmt: skip
    merged, a, c = load_dir(out), load_dir(family["ft_a"]), load_dir(family["ft_c"])
    rows = c[VOCAB_NAMES[0]].shape[0]
    for n in VOCAB_NAMES:
        assert merged[n].shape[0] == rows
        # the pad row of ft_a is the mean of its rows (independent float64 mean)
        expected = (a[n].double().mean(0) + c[n][-1].double()) / 2
        torch.testing.assert_close(merged[n][-1].double(), expected, atol=1e-6, rtol=0)
    # ft_a's tokenizer lacks the pad token: it is added (as the original does) so the tokenizer covers the rows
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == rows and tok.pad_token == "[PAD]"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == rows and cfg["pad_token_id"] == rows - 1


def test_truncate_and_error_policies(family, tmp_path):
    out = tmp_path / "t"
    manifest = stream_merge(
        str(family["base"]), [str(family["ft_a"]), str(family["ft_c"])], str(out),
        merging_method_name="task_arithmetic", vocab_policy="truncate",
    )  # fmt: skip
    base, a, c = load_dir(family["base"]), load_dir(family["ft_a"]), load_dir(family["ft_c"])
    rows = base[VOCAB_NAMES[0]].shape[0]
    ref = task_arithmetic(base, [a, {n: t[:rows] if n in VOCAB_NAMES else t for n, t in c.items()}])
    assert_same(ref, out)
    assert manifest["vocabulary"]["actions"][0]["action"] == "truncate"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    with pytest.raises(
        UserError,
        match=r"vocabulary sizes differ: tensor \S+ has 100 rows in pretrained .*101 rows in finetuned .*ft_c",
    ):
        stream_merge(
            str(family["base"]), [str(family["ft_a"]), str(family["ft_c"])], str(tmp_path / "e"),
            merging_method_name="task_arithmetic", vocab_policy="error",
        )  # fmt: skip
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------- determinism, manifest


def _tensor_bytes(folder: Path) -> dict[str, bytes]:
    return {n: t.view(-1).view(torch.uint8).numpy().tobytes() for n, t in load_dir(folder).items()}


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.glob("*.safetensors")}


def test_determinism_runs_threads_shards_blocks(family_bf16, tmp_path, monkeypatch):
    args = (str(family_bf16["base"]), [str(family_bf16[n]) for n in ("ft_a", "ft_b", "ft_c")])
    kw = dict(
        merging_method_name="mask_merging", mask_apply_method="ties_merging", weight_mask_rates=0.6, seed=11
    )
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        stream_merge(*args, str(tmp_path / "r1"), num_threads=1, **kw)
        torch.set_num_threads(2)
        stream_merge(*args, str(tmp_path / "r2"), num_threads=3, **kw)
    finally:
        torch.set_num_threads(old)
    stream_merge(*args, str(tmp_path / "r3"), **kw)
    monkeypatch.setattr(planning, "CHUNK_ELEMENTS", 700)
    stream_merge(*args, str(tmp_path / "r4"), max_shard_size="10KB", **kw)
    assert _file_bytes(tmp_path / "r1") == _file_bytes(tmp_path / "r2") == _file_bytes(tmp_path / "r3")
    assert len(_file_bytes(tmp_path / "r4")) > 2
    assert _tensor_bytes(tmp_path / "r1") == _tensor_bytes(tmp_path / "r4")
    stream_merge(*args, str(tmp_path / "r5"), **{**kw, "seed": 12})
    assert _tensor_bytes(tmp_path / "r1") != _tensor_bytes(tmp_path / "r5")


def test_manifest_and_delta_statistics(family, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="model_merging_methods.streaming")
    manifest = stream_merge(
        str(family["base"]), [str(family["ft_a"]), str(family["ft_b"])], str(tmp_path / "o"),
        merging_method_name="ties_merging", param_value_mask_rate=0.7, trim_scope="global",
    )  # fmt: skip
    on_disk = json.loads((tmp_path / "o" / "merge_manifest.json").read_text())
    assert on_disk["parameters"] == manifest["parameters"]
    assert (
        on_disk["parameters"]["param_value_mask_rate"] == 0.7
        and on_disk["parameters"]["trim_scope"] == "global"
    )
    assert [i["format"] for i in on_disk["inputs"]] == ["safetensors"] * 3
    assert len(on_disk["inputs"][2]["files"]) == 3 and all(
        f["bytes"] > 0 for f in on_disk["inputs"][2]["files"]
    )
    assert len(on_disk["method_details"]["thresholds"]) == 2 and "torch" in on_disk["versions"]
    assert on_disk["bytes_read"] > 0 and on_disk["bytes_written"] > 0 and on_disk["wall_time_s"] >= 0
    # deltas are N(0, 0.002²): 99.9th percentile ≈ 3.29 σ, max a bit above; inside DARE's regime, no warning
    for s in on_disk["delta_statistics"].values():
        assert 0.0055 < s["p99_9_abs_delta"] < 0.0078 and s["max_abs_delta"] >= s["p99_9_abs_delta"]
        assert 0.0014 < s["mean_abs_delta"] < 0.0018  # E|δ| = σ·sqrt(2/π) ≈ 0.0016
    assert on_disk["warnings"] == [] and on_disk["housekeeping"] == []
    assert on_disk["dtype"]["chosen"] == ["float32"]
    assert all(v == ["float32"] for v in on_disk["dtype"]["inputs"].values())
    # the core logs instead of printing: nothing on stdout/stderr, the lines are in the log
    assert capsys.readouterr().err == ""
    logged = caplog.text
    assert "homology:" in logged and "ties_merging: 21 tensors" in logged and "peak RSS" in logged


def test_warning_for_deltas_outside_dare_regime(family, tmp_path, caplog):
    far = perturbed(load_dir(family["base"]), 9, scale=0.03)
    save_state(far, tmp_path / "far", "st", family["base"])
    manifest = stream_mask_model(
        str(family["base"]), str(tmp_path / "far"), str(tmp_path / "o"), weight_mask_rate=0.5
    )
    assert len(manifest["warnings"]) == 1 and "outside DARE's regime" in manifest["warnings"][0]
    assert any(r.levelname == "WARNING" and "deltas of" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------------- loads, interruption


def test_merged_folder_loads_and_generates(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "m"
    stream_merge(
        str(family["base"]), [str(family["ft_a"]), str(family["ft_b"]), str(family["ft_c"])], str(out),
        merging_method_name="mask_merging", mask_apply_method="task_arithmetic", weight_mask_rates=0.5,
        max_shard_size="30KB",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    merged = load_dir(out)
    for n, p in model.state_dict().items():
        assert torch.equal(p, merged[n]), n
    ids = tok("ab", return_tensors="pt").input_ids
    gen = model.generate(
        ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id
    )
    assert gen.shape == (1, ids.shape[1] + 4) and torch.equal(gen[:, : ids.shape[1]], ids)
    assert isinstance(tok.decode(gen[0, ids.shape[1] :]), str)


def test_exception_midway_leaves_nothing(family, tmp_path, monkeypatch):
    from model_merging_methods import checkpoint_io

    calls = {"n": 0}
    original = checkpoint_io.ShardedSafetensorsWriter.write_at

    def failing(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(checkpoint_io.ShardedSafetensorsWriter, "write_at", failing)
    with pytest.raises(KeyboardInterrupt):
        stream_merge(
            str(family["base"]), [str(family["ft_a"]), str(family["ft_b"])], str(tmp_path / "o"),
            merging_method_name="task_arithmetic",
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_sigterm_leaves_no_folder(family, tmp_path):
    """A merge killed with SIGTERM mid-way leaves neither the target nor its temporary folder."""
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO_ROOT)!r})
from model_merging_methods import checkpoint_io, streaming
orig = checkpoint_io.ShardedSafetensorsWriter.write_at
def slow(self, *args):
    print("writing", flush=True); time.sleep(0.2); return orig(self, *args)
checkpoint_io.ShardedSafetensorsWriter.write_at = slow
streaming.stream_merge({str(family["base"])!r}, [{str(family["ft_a"])!r}, {str(family["ft_b"])!r}],
                       {str(tmp_path / "out")!r}, merging_method_name="average_merging")
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert "writing" in proc.stdout.readline()
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- TIES majority sign paths


def _grid_family(root: Path, side: Path, signs: str) -> list[Path]:
    """Models on a 1/1024 grid (exact arithmetic) whose TIES majority sign is -1 (``signs="neg"``, with exact
    cancellations) or 0 (``"zero"``: the second delta is minus the first everywhere)."""
    base = load_dir(side)
    g = torch.Generator().manual_seed(5)
    pre = {n: torch.round(t * 1024) / 1024 for n, t in base.items()}
    d1 = {n: -torch.randint(1, 8, t.shape, generator=g) / 1024 for n, t in pre.items()}
    if signs == "neg":
        d2 = {n: -torch.randint(1, 8, t.shape, generator=g) / 1024 for n, t in pre.items()}
        for n in d2:  # every 7th coordinate cancels exactly
            d2[n].view(-1)[::7] = -d1[n].view(-1)[::7]
    else:
        d2 = {n: -d for n, d in d1.items()}
    folders = [save_state(pre, root / f"{signs}_base", "st", side)]
    for i, d in enumerate((d1, d2)):
        folders.append(save_state({n: pre[n] + d[n] for n in pre}, root / f"{signs}_ft{i}", "st", side))
    return folders


@pytest.mark.parametrize("signs, majority", [("neg", -1.0), ("zero", 0.0)])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_majority_sign_patches(family, tmp_path, small_chunks, signs, majority, scope):
    base, *fts = _grid_family(tmp_path, family["base"], signs)
    P, F = load_dir(base), [load_dir(f) for f in fts]
    out = tmp_path / "out"
    manifest = stream_merge(
        str(base), [str(f) for f in fts], str(out), merging_method_name="ties_merging",
        param_value_mask_rate=0.3, trim_scope=scope, num_threads=2,
    )  # fmt: skip
    assert_same(ties_merging(P, F, 0.3, 1.0, scope), out)
    if scope == "global":
        assert manifest["method_details"]["majority_sign"] == majority
        assert manifest["method_details"]["cancellations"] > 0


def test_rotary_buffers_are_ignored(family, tmp_path):
    """Old LLaMA checkpoints carry rotary_emb.inv_freq buffers: never merged, not written, listed in the manifest."""
    base = load_dir(family["base"])
    base["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(8, dtype=torch.float32)
    save_state(base, tmp_path / "base_buf", "bin", family["base"])
    manifest = stream_merge(
        str(tmp_path / "base_buf"), [str(family["ft_a"]), str(family["ft_b"])], str(tmp_path / "o"),
        merging_method_name="task_arithmetic",
    )  # fmt: skip
    assert manifest["ignored_buffers"] == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_dir(tmp_path / "o")


# ------------------------------------------------------------------ core building blocks added for the engine


def test_keep_where_is_torch_where_bit_for_bit():
    from model_merging_methods.mask_weights_utils import keep_where

    for dtype, itype in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
        x = torch.tensor([1.5, -0.0, 0.0, float("nan"), float("-inf"), -2.0, 3.0, -1e-40], dtype=dtype)
        keep = torch.tensor([True, True, False, True, False, False, True, False])
        expected = torch.where(keep, x, torch.zeros((), dtype=dtype))
        assert torch.equal(keep_where(keep, x).view(itype), expected.view(itype))
        y = torch.randn(6, 5, dtype=dtype).t()  # non-contiguous
        assert torch.equal(keep_where(y > 0, y).view(itype), torch.where(y > 0, y, 0.0).view(itype))


def test_ties_both_majorities_equals_separate_calls():
    from model_merging_methods.merging_methods import (
        ties_merge_tensor,
        ties_merge_tensor_both_majorities,
        ties_sign_sum,
    )

    g = torch.Generator().manual_seed(0)
    pre = torch.randint(-50, 50, (40, 30), generator=g) / 64
    fts = [
        pre + torch.randint(-3, 4, pre.shape, generator=g) / 64 for _ in range(3)
    ]  # many exact cancellations
    th = [0.01, 0.02, 0.0]
    sign_sum, plus, idx, minus = ties_merge_tensor_both_majorities(pre, fts, th, 0.7)
    assert sign_sum == ties_sign_sum(pre, fts, th)
    assert torch.equal(plus, ties_merge_tensor(pre, fts, th, 0.7, 1.0))
    patched = plus.clone().reshape(-1)
    patched[idx] = minus
    reference = ties_merge_tensor(pre, fts, th, 0.7, -1.0)
    assert torch.equal(patched.reshape(pre.shape), reference)
    assert idx.numel() > 0 and not torch.equal(plus, reference)
