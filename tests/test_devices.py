"""Device plumbing (checked on the CPU: CI has no GPU) and the counter-based DARE masks: device names, a clear error
for CUDA without CUDA, ``device="cpu"`` giving the default bytes, the tensor-op generator path (the one CUDA runs)
equal to NumPy's, DARE masks independent of block size, order and chunking, the manifest's generator record."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from model_merging_methods import rng
from model_merging_methods.devices import resolve_device
from model_merging_methods.engine import (
    DEVICE_BLOCK_ELEMENTS,
    Dare,
    DictSink,
    DictSource,
    Executor,
    MaskedBlocks,
)
from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import mask_model_weights, random_mask
from model_merging_methods.merging_methods import mask_merging

NO_CUDA = not torch.cuda.is_available()


def write_model_folder(folder, state):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return folder


def test_device_names():
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(MergeError, match="not a device name"):
        resolve_device("banana")
    with pytest.raises(MergeError, match="not available"):
        resolve_device("meta")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_clear_error():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(MergeError, match="CUDA is not available"):
            resolve_device(name)
    pre = {"w": torch.randn(4, 4)}
    with pytest.raises(MergeError, match="CUDA is not available"):
        mask_model_weights({"w": torch.randn(4, 4)}, pre, weight_mask_rate=0.5, device="cuda")
    with pytest.raises(MergeError, match="CUDA is not available"):
        mask_merging(pre, [pre, pre], "task_arithmetic", 0.5, device="cuda")


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_tensor_op_generator_path_equals_numpy(p):
    """keep_bits' torch path (the one every non-CPU device runs) gives NumPy's bits, here on the CPU."""
    key = rng.stream_key(5, "model.layers.0.mlp.up_proj.weight", 2)
    threshold = rng.drop_threshold(p)
    for start, count in [(0, 1), (3, 1000), (8, 4096), (123457, 999)]:
        expected = rng.keep_bits(5, "model.layers.0.mlp.up_proj.weight", 2, start, count, p)
        if 0 < threshold < 1 << 32:
            got = rng._keep_bits_torch(key, start, count, threshold, torch.device("cpu"), torch.int32)
            assert torch.equal(got, expected)
        assert torch.equal(
            expected == -1, rng.keep_mask(5, "model.layers.0.mlp.up_proj.weight", 2, start, count, p)
        )
        assert set(expected.unique().tolist()) <= {0, -1}


def test_random_mask_is_where_then_ieee_division_and_chunk_independent(monkeypatch):
    from model_merging_methods import mask_weights_utils

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 7, generator=g)
    x[0, :3] = torch.tensor([-0.0, 0.0, 1e-42])
    stream = rng.Stream(4, "w", 1)
    keep = rng.keep_mask(4, "w", 1, 0, x.numel(), 0.7).reshape(x.shape)
    expected = np.where(keep.numpy(), x.numpy(), np.float32(0.0)) / np.float32(1.0 - 0.7)
    out = random_mask(x, 0.7, True, stream)
    assert out.numpy().tobytes() == expected.astype(np.float32).tobytes()
    x64 = x.double()
    out64 = random_mask(x64, 0.7, False, stream)
    assert torch.equal(out64, torch.where(keep, x64, torch.zeros((), dtype=torch.float64)))
    monkeypatch.setattr(mask_weights_utils, "RANDOM_CHUNK_ELEMENTS", 1000)
    assert torch.equal(random_mask(x, 0.7, True, stream).view(torch.int32), out.view(torch.int32))
    # a block of rows drawn at its flat position equals the same rows of the whole tensor
    part = random_mask(x[100:250], 0.7, True, rng.Stream(4, "w", 1, start=100 * 7))
    assert torch.equal(part.view(torch.int32), out[100:250].view(torch.int32))
    inplace = x.clone()
    assert random_mask(inplace, 0.7, True, stream, in_place=True).data_ptr() == inplace.data_ptr()
    assert torch.equal(inplace.view(torch.int32), out.view(torch.int32))


def _models(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (300, 16), "w": (16, 16), "b": (16,), "scalar": ()}
    pre = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    fts = [{n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in pre.items()} for _ in range(3)]
    return pre, fts


def test_dare_blocks_in_any_order_and_size_give_the_same_bytes():
    pre, fts = _models()
    dare = Dare.for_models([0.6, 0.6, 0.6], True, "random", "delta_weight", 3)
    source = DictSource([pre, *fts], ["pre", "a", "b", "c"])
    executor = Executor(source, DictSink(source, 0), base=0, show_progress=False)
    plan = source.plans["emb"]
    whole = torch.cat([xs[1] for _, _, xs in executor.blocks_for(plan, [0, 1], dare, whole=True)])
    rows = [(250, 300), (0, 17), (17, 250)]  # out of order, uneven
    parts = {r0: xs[1] for r0, _, xs in executor.blocks_for(plan, [0, 1], dare, rows=rows)}
    assert torch.equal(
        torch.cat([parts[0], parts[17], parts[250]]).view(torch.int32), whole.view(torch.int32)
    )
    assert MaskedBlocks(dare, 0, plan).whole() is False
    assert executor.row_blocks(plan) == plan.blocks()  # the CPU keeps the plan's blocks
    assert DEVICE_BLOCK_ELEMENTS >= 1 << 20


def test_explicit_cpu_device_gives_the_default_bytes():
    pre, fts = _models(1)
    a = mask_merging(pre, fts, "ties_merging", [0.3, 0.6, 0.9], seed=2, param_value_mask_rate=0.5)
    b = mask_merging(
        pre, fts, "ties_merging", [0.3, 0.6, 0.9], seed=2, param_value_mask_rate=0.5, device="cpu"
    )
    assert all(torch.equal(a[n].view(torch.int32), b[n].view(torch.int32)) for n in a if n != "scalar")
    m1 = mask_model_weights(fts[0], pre, weight_mask_rate=0.9, seed=4)
    m2 = mask_model_weights(fts[0], pre, weight_mask_rate=0.9, seed=4, device="cpu")
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    # p = 0.9: the drop fraction over all elements is binomial
    n = sum(t.numel() for t in pre.values())
    dropped = sum(int((m1[k] == pre[k]).sum()) for k in pre)
    assert abs(dropped - 0.9 * n) < 5 * math.sqrt(n * 0.9 * 0.1) + 5


def test_streamed_dare_device_flag_and_manifest(tmp_path):
    from model_merging_methods.streaming import stream_mask_model, stream_merge

    pre, fts = _models(2)
    folders = [write_model_folder(tmp_path / name, sd) for name, sd in zip("pabc", [pre, *fts])]
    kw = dict(weight_mask_rate=0.5, use_weight_rescale=True, seed=9)
    m_default = stream_mask_model(str(folders[0]), str(folders[1]), str(tmp_path / "d0"), **kw)
    m_cpu = stream_mask_model(str(folders[0]), str(folders[1]), str(tmp_path / "d1"), device="cpu", **kw)
    a = (tmp_path / "d0" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "d1" / "model.safetensors").read_bytes()
    on_disk = json.loads((tmp_path / "d1" / "merge_manifest.json").read_text())
    assert (
        on_disk["random_generator"]
        == {"name": "philox4x64-10", "version": 1}
        == m_default["random_generator"]
    )
    assert on_disk["device"] == "cpu" and m_cpu["device"] == "cpu"
    expected = mask_model_weights(fts[0], pre, weight_mask_rate=0.5, seed=9)
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "d1" / "model.safetensors"))
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    if NO_CUDA:
        with pytest.raises(MergeError, match="CUDA is not available"):
            stream_merge(
                str(folders[0]), [str(f) for f in folders[1:]], str(tmp_path / "m"), merging_method_name="mask_merging",
                mask_apply_method="task_arithmetic", weight_mask_rates=0.5, device="cuda",
            )  # fmt: skip
        assert not (tmp_path / "m").exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_scripts_refuse_cuda_without_cuda_before_reading(tmp_path, capsys):
    import merge_llms_instruct_math_code as merge_script
    from utils.cli import run_main

    out = tmp_path / "merged"
    argv = ["--pretrained_model_name", str(tmp_path / "nowhere"), "--finetuned_model_names", "a", "b",
            "--merged_model_path", str(out), "--skip_evaluation", "--device", "cuda",
            "--merging_method_name", "task_arithmetic"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_main(lambda: merge_script.main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device") and "CUDA is not available" in err[0]
    assert not out.exists()
