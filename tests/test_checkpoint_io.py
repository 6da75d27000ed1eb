"""Checkpoint reader/writer and the atomic output folder."""

from __future__ import annotations

import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_merging_methods.checkpoint_io import (
    CheckpointReader,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    find_local_model,
    parse_size,
    resolve_model_path,
    write_side_files,
)
from model_merging_methods.paths import OWNER_MARKER, is_toolkit_output
from model_merging_methods.publish import current_umask, write_json
from tests.test_streaming_merge import save_state
from utils.cli import UserError


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(37, 8, generator=g),
        "layer.0.w": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layer.0.b": torch.randn(8, generator=g).to(torch.float16),
        "step": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "head.weight": torch.randn(5, 8, generator=g),
    }


@pytest.mark.parametrize("fmt", ["st", "st_sharded", "bin", "bin_sharded"])
def test_reader_formats(tmp_path, fmt):
    sd = _state()
    save_state(sd, tmp_path / "m", fmt)
    with CheckpointReader(tmp_path / "m") as r:
        assert r.format == ("safetensors" if fmt.startswith("st") else "bin")
        assert set(r.names()) == set(sd)
        for n, t in sd.items():
            assert r.infos[n].shape == tuple(t.shape) and r.infos[n].dtype == t.dtype
            got = r.read(n)
            assert got.dtype == t.dtype and torch.equal(got, t)
            got[...] = 0 if got.numel() else got  # a fresh, writable tensor: the file is unchanged
        assert torch.equal(r.read_flat_slice("embed.weight", 10, 20), sd["embed.weight"].reshape(-1)[10:30])
        assert torch.equal(r.read("embed.weight"), sd["embed.weight"])
        assert r.bytes_read > 0
        assert sum(f["bytes"] for f in r.file_list()) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bin_refuses_arbitrary_pickles(tmp_path):
    (tmp_path / "m").mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "m" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(UserError, match="weights_only=True"):
        CheckpointReader(tmp_path / "m")


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model weights"):
        CheckpointReader(tmp_path / "empty")
    # a truncated safetensors file
    save_file(_state(), tmp_path / "model.safetensors")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "model.safetensors").write_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:-50]
    )
    with pytest.raises(UserError, match="corrupt safetensors file .*(truncated|outside)"):
        CheckpointReader(tmp_path / "trunc")
    # an index naming a shard that is not there
    save_state(_state(), tmp_path / "sh", "st_sharded")
    (tmp_path / "sh" / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="shard model-00002-of-00003.safetensors .* is missing"):
        CheckpointReader(tmp_path / "sh")


def test_writer_shards_index_and_streaming(tmp_path):
    sd = _state()
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in sd.items()]
    w = ShardedSafetensorsWriter(tmp_path, specs, max_shard_size=700)
    # bytes are on disk as soon as they are written (nothing is buffered per shard), in any order
    w.write_at("embed.weight", 10 * 8 * 4, sd["embed.weight"][10:])
    w.write_at("embed.weight", 0, sd["embed.weight"][:10])
    fname, start, end = w.location("embed.weight")
    assert (tmp_path / fname).read_bytes()[start:end] == sd["embed.weight"].numpy().tobytes()
    with pytest.raises(ValueError, match="more data than its planned shape"):
        w.write_at("head.weight", 8, sd["head.weight"])
    with pytest.raises(ValueError, match="not in the writer's plan"):
        w.write("nope", sd["head.weight"])
    for n in reversed(list(sd)[1:]):
        w.write(n, sd[n])
    files = w.close()
    assert files[-1] == "model.safetensors.index.json" and len(files) > 2
    index = json.loads((tmp_path / files[-1]).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    loaded = {}
    for f in files[:-1]:
        with safe_open(tmp_path / f, framework="pt") as h:
            assert h.metadata() == {"format": "pt"}
        part = load_file(tmp_path / f)
        assert all(index["weight_map"][n] == f for n in part)
        data_bytes = sum(t.numel() * t.element_size() for t in part.values())
        assert data_bytes <= 700 or len(part) == 1  # a tensor over the limit gets its own shard
        loaded.update(part)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[n], sd[n]) for n in sd)


def test_writer_threads_and_checks(tmp_path):
    sd = _state(1)
    w = ShardedSafetensorsWriter(tmp_path, [(n, t.dtype, t.shape) for n, t in sd.items()], "5GB")
    with pytest.raises(ValueError, match="planned"):
        w.write("embed.weight", sd["embed.weight"].double())
    w.begin("embed.weight")
    w.write_part(sd["embed.weight"][:3])
    with pytest.raises(ValueError, match="bytes missing"):
        w.end()
    with pytest.raises(ValueError, match="incomplete"):
        w.close()
    w.write_part(sd["embed.weight"][3:])
    w.end()
    rows = [(n, r) for n in list(sd)[1:] for r in range(max(1, sd[n].shape[0] if sd[n].dim() else 1))]

    def put(item):  # one row per call, from several threads at once
        n, r = item
        t = sd[n]
        if t.dim() == 0 or t.shape[0] == 0:
            w.write(n, t)
        else:
            w.write_at(n, r * t[r].numel() * t.element_size(), t[r])

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(put, rows))
    assert w.close() == ["model.safetensors"]
    out = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(out[n], sd[n]) for n in sd)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500 and parse_size(123) == 123 and parse_size("77") == 77
    for bad in ("five", "0", "-3MB", "0.5B"):
        with pytest.raises(UserError):
            parse_size(bad)
    with pytest.raises(UserError, match="too large"):
        parse_size("9" * 400)
    with pytest.raises(UserError, match="too large"):
        parse_size("99999999999TiB")
    assert parse_size("4TiB") == 4 * 2**40


def test_atomic_output_dir(tmp_path):
    target = tmp_path / "out"
    with atomic_output_dir(target) as tmp:
        assert (
            tmp.parent == tmp_path and tmp.name.startswith(f".out.tmp-{os.getpid()}-") and not target.exists()
        )
        assert (tmp.stat().st_mode & 0o777) == 0o777 & ~current_umask()  # not mkdtemp's 0700
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1" and is_toolkit_output(target)
    with pytest.raises(UserError, match="already exists"):
        with atomic_output_dir(target):
            pass
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with atomic_output_dir(target, overwrite=True) as tmp:
                (tmp / "a").write_text("2")
                raise exc("stop")
        assert (target / "a").read_text() == "1"  # the old folder is kept when the new one fails
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == [OWNER_MARKER, "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        with atomic_output_dir(tmp_path / "file", overwrite=True):
            pass
    # a folder this toolkit did not write is never replaced, even with overwrite
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not written by this toolkit"):
        with atomic_output_dir(tmp_path / "user", overwrite=True):
            pytest.fail("the body must not run")
    assert [p.name for p in (tmp_path / "user").iterdir()] == ["notes.txt"]
    # missing parents are created with the umask's permissions and removed again when the body fails
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "a" / "b" / "c"):
            assert (tmp_path / "a" / "b").is_dir()
            raise RuntimeError
    assert not (tmp_path / "a").exists()


def test_write_json_permissions_and_errors(tmp_path):
    path = write_json(tmp_path / "sub" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert (path.stat().st_mode & 0o777) == 0o666 & ~current_umask()  # not mkstemp's 0600
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(UserError, match=r"cannot write .*dir\.json: Is a directory"):
        write_json(tmp_path / "dir.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "sub"]  # no temporary file left


def test_resolve_model_path(tmp_path, monkeypatch):
    from utils.llm_registry import hub_id

    (tmp_path / "m").mkdir()
    assert resolve_model_path(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"Llama-2-13b-hf \(meta-llama/Llama-2-13b-hf\).*HF_HUB_OFFLINE"):
        resolve_model_path("Llama-2-13b-hf", hub_id)  # the registry's names come in through name_resolver
    with pytest.raises(UserError, match=r"Llama-2-13b-hf \(Llama-2-13b-hf\).*HF_HUB_OFFLINE"):
        resolve_model_path("Llama-2-13b-hf")
    assert (
        find_local_model("Llama-2-13b-hf", hub_id) is None
        and find_local_model(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    )
    with pytest.raises(UserError, match="model folder not found: ./missing/folder"):
        resolve_model_path("./missing/folder")


def test_side_files_add_pad_token(tmp_path):
    from utils.tiny_models import build_char_tokenizer

    tok = build_char_tokenizer(save_dir=tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"vocab_size": len(tok), "model_type": "llama"}))
    (tmp_path / "o1").mkdir()
    done = write_side_files(tmp_path / "src", tmp_path / "o1", config_updates={"dtype": "bfloat16"})
    assert done["tokenizer_pad_token_added"] is None and "tokenizer.json" in done["copied"]
    assert (tmp_path / "o1" / "tokenizer.json").read_bytes() == (
        tmp_path / "src" / "tokenizer.json"
    ).read_bytes()
    (tmp_path / "o2").mkdir()
    done = write_side_files(
        tmp_path / "src", tmp_path / "o2", config_updates={"vocab_size": len(tok) + 1}, vocab_size=len(tok) + 1,
        pad_token="[PAD]",
    )  # fmt: skip
    assert done["tokenizer_pad_token_added"] == {"token": "[PAD]", "id": len(tok)}
    cfg = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert cfg["vocab_size"] == len(tok) + 1 and cfg["pad_token_id"] == len(tok)
