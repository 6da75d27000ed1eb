"""Hostile input checkpoints (issue 10, item 3): checked as strictly as the ``safetensors`` library checks them, each
problem one clear error — never a traceback or a hang — through ``merge_llms_instruct_math_code.py``: exit 2, one
``error:`` line, inputs byte-identical, no output and no temporary folder. Plus: mixed input dtypes warn and record
the chosen dtype; the library itself refuses the same corrupt headers we refuse (a cross-check, where it can)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import merge_llms_instruct_math_code as merge
from tests.test_hostile_paths import assert_refused, listing, run_cli, snapshot
from tests.test_streaming_merge import build_family, set_config

# ---------------------------------------------------------------------------------------------------- builders


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict | list | bytes, data: bytes, pad: bool = True) -> None:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)


def _tensor_spans(header: dict) -> list[tuple[str, list[int]]]:
    return sorted(
        ((k, v["data_offsets"]) for k, v in header.items() if k != "__metadata__"), key=lambda x: x[1][0]
    )


def overlap(h, d):
    spans = _tensor_spans(h)
    same = [(a, b) for a in spans for b in spans if a[0] < b[0] and h[a[0]]["shape"] == h[b[0]]["shape"]]
    (first, off), (second, off2) = min(same, key=lambda p: p[0][1][0])
    h[second]["data_offsets"] = list(off) if off[0] < off2[0] else h[second]["data_offsets"]
    if off[0] > off2[0]:
        h[first]["data_offsets"] = list(off2)
    return h, d


def gap_in_the_middle(h, d):
    name, (a, b) = _tensor_spans(h)[-1]
    h[name]["data_offsets"] = [a + 8, b + 8]
    return h, d[:a] + b"\0" * 8 + d[a:]


def trailing_bytes(h, d):
    return h, d + b"\0" * 16


def header_is_a_list(h, d):
    return [h], d


def metadata_is_a_list(h, d):
    return {**h, "__metadata__": ["format", "pt"]}, d


def metadata_values_not_strings(h, d):
    return {**h, "__metadata__": {"format": 1}}, d


def absurd_nesting(h, d):
    deep = b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return deep, b""


def header_not_utf8(h, d):
    return b'{"\xff\xfe": 1}', d


def duplicate_key(h, d):
    text = json.dumps(h)
    first = next(k for k in h if k != "__metadata__")
    return (text[:-1] + ", " + json.dumps(first) + ": " + json.dumps(h[first]) + "}").encode(), d


def offsets_are_floats(h, d):
    name = _tensor_spans(h)[0][0]
    h[name]["data_offsets"] = [float(x) for x in h[name]["data_offsets"]]
    return h, d


def offsets_are_booleans(h, d):
    name = next(k for k, (a, b) in _tensor_spans(h) if a == 0 and b > 1)
    h[name]["data_offsets"] = [False, True]
    return h, d


def negative_shape(h, d):
    name = _tensor_spans(h)[0][0]
    h[name]["shape"] = [-1, *h[name]["shape"][1:]]
    return h, d


def unknown_dtype(h, d):
    name = _tensor_spans(h)[0][0]
    h[name]["dtype"] = "X9"
    return h, d


def entry_not_an_object(h, d):
    return {**h, "extra": [1, 2]}, d


def wrong_byte_length(h, d):
    name = _tensor_spans(h)[0][0]
    h[name]["shape"] = [s * 2 for s in h[name]["shape"]]
    return h, d


def truncated(h, d):
    return h, d[:-40]


HEADER_CASES = {
    "overlapping_ranges": (overlap, "overlap those of another tensor"),
    "uncovered_range": (gap_in_the_middle, r"bytes \d+ to \d+ of the data .* belong to no tensor"),
    "uncovered_tail": (trailing_bytes, "the last 16 bytes of the data belong to no tensor"),
    "header_is_a_list": (header_is_a_list, "the header is not a JSON object"),
    "metadata_is_a_list": (metadata_is_a_list, "__metadata__ must be a JSON object of strings"),
    "metadata_not_strings": (metadata_values_not_strings, "__metadata__ must be a JSON object of strings"),
    "absurd_nesting": (absurd_nesting, "the header nests JSON too deeply"),
    "header_not_utf8": (header_not_utf8, "the header is not UTF-8"),
    "duplicate_tensor": (duplicate_key, "appears twice"),
    "float_offsets": (offsets_are_floats, "data_offsets that are not two non-negative integers"),
    "boolean_offsets": (offsets_are_booleans, "data_offsets that are not two non-negative integers"),
    "negative_shape": (negative_shape, "shape that is not a list of non-negative integers"),
    "unknown_dtype": (unknown_dtype, "unsupported dtype X9"),
    "entry_not_an_object": (entry_not_an_object, "the entry of tensor extra is a list, not an object"),
    "wrong_byte_length": (wrong_byte_length, "wrong byte length"),
    "truncated": (truncated, r"lies outside the file \(truncated\?\)"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile_ckpt")
    return {"root": root, **build_family(root / "models")}


@pytest.fixture
def hostile(world, tmp_path):
    """A fresh copy of ft_a to break, in ``tmp_path/bad``; on exit, base, ft_b and the broken model itself must be
    unchanged by the run (a snapshot taken by :func:`refused`)."""
    bad = tmp_path / "bad"
    shutil.copytree(world["ft_a"], bad)
    return bad


def refused(world, bad: Path, tmp_path: Path, capsys, pattern: str, *extra: str) -> None:
    """Merge base + ``bad`` + ft_b through the script: refused with one line, nothing changed or left."""
    roots = [world["base"], world["ft_b"], bad]
    before = snapshot(*roots)
    out = tmp_path / "out"
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", bad, world["ft_b"],
            "--merged_model_path", out, "--skip_evaluation", "--merging_method_name", "task_arithmetic", *extra]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert_refused(code, err, pattern)
    assert snapshot(*roots) == before
    assert not out.exists() and [p for p in listing(tmp_path) if not p.startswith(("bad", "outside"))] == []


# ----------------------------------------------------------------------------------------------- headers


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_corrupt_safetensors_header(world, hostile, tmp_path, capsys, case):
    mutate, pattern = HEADER_CASES[case]
    header, data = split_safetensors(hostile / "model.safetensors")
    new_header, new_data = mutate(header, data)
    write_raw(hostile / "model.safetensors", new_header, new_data, pad=not isinstance(new_header, bytes))
    refused(world, hostile, tmp_path, capsys, pattern)


@pytest.mark.parametrize("case", [c for c in HEADER_CASES if c not in ("unknown_dtype", "duplicate_tensor")])
def test_the_safetensors_library_refuses_them_too(world, tmp_path, case):
    """Cross-check: every header we refuse as corrupt is refused by the safetensors library as well (we are stricter
    in one case: a tensor named twice in the header, which the library silently resolves to the last entry)."""
    mutate, _ = HEADER_CASES[case]
    header, data = split_safetensors(world["ft_a"] / "model.safetensors")
    new_header, new_data = mutate(header, data)
    path = tmp_path / "x.safetensors"
    write_raw(path, new_header, new_data, pad=not isinstance(new_header, bytes))
    with pytest.raises((SafetensorError, ValueError, OSError, RuntimeError)):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                f.get_tensor(k)


def test_header_length_above_the_safetensors_limit(world, hostile, tmp_path, capsys):
    (hostile / "model.safetensors").write_bytes(struct.pack("<Q", 200_000_000) + b"{}")
    refused(world, hostile, tmp_path, capsys, "more than the safetensors limit of 100000000")


def test_file_shorter_than_8_bytes(world, hostile, tmp_path, capsys):
    (hostile / "model.safetensors").write_bytes(b"\x01\x02")
    refused(world, hostile, tmp_path, capsys, "shorter than 8 bytes")


# --------------------------------------------------------------------------------- files that are not files


@pytest.mark.timeout(60)
def test_weights_file_is_a_fifo(world, hostile, tmp_path, capsys):
    """Opening a FIFO for reading blocks until a writer appears: it must be refused, not waited on."""
    (hostile / "model.safetensors").unlink()
    os.mkfifo(hostile / "model.safetensors")
    refused(
        world, hostile, tmp_path, capsys, r"model\.safetensors is a FIFO \(named pipe\), not a regular file"
    )


def test_weights_file_is_a_device(world, hostile, tmp_path, capsys):
    (hostile / "model.safetensors").unlink()
    (hostile / "model.safetensors").symlink_to("/dev/zero")
    refused(world, hostile, tmp_path, capsys, r"model\.safetensors is a character device, not a regular file")


def test_weights_file_is_a_folder(world, hostile, tmp_path, capsys):
    (hostile / "model.safetensors").unlink()
    (hostile / "model.safetensors").mkdir()
    refused(world, hostile, tmp_path, capsys, r"model\.safetensors is a folder, not a regular file")


@pytest.mark.timeout(60)
def test_bin_weights_file_is_a_fifo(world, hostile, tmp_path, capsys):
    (hostile / "model.safetensors").unlink()
    os.mkfifo(hostile / "pytorch_model.bin")
    refused(world, hostile, tmp_path, capsys, r"pytorch_model\.bin is a FIFO")


# -------------------------------------------------------------------------------------------------- indexes


def _sharded(world, tmp_path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(world["ft_b"], bad)  # 3 shards + model.safetensors.index.json
    return bad


def _rewrite_index(bad: Path, fn) -> None:
    path = bad / "model.safetensors.index.json"
    path.write_text(json.dumps(fn(json.loads(path.read_text()))))


def _point_first_shard_to(target: str):
    def fn(index):
        first = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
        return index

    return fn


def test_index_points_to_dotdot(world, tmp_path, capsys):
    bad = _sharded(world, tmp_path)
    (tmp_path / "outside").mkdir()
    shutil.copyfile(bad / "model-00001-of-00003.safetensors", tmp_path / "outside" / "x.safetensors")
    _rewrite_index(bad, _point_first_shard_to("../outside/x.safetensors"))
    refused(world, bad, tmp_path, capsys, r"points outside its model folder: '\.\./outside/x\.safetensors'")


def test_index_points_to_an_absolute_path(world, tmp_path, capsys):
    bad = _sharded(world, tmp_path)
    (tmp_path / "outside").mkdir()
    shutil.copyfile(bad / "model-00001-of-00003.safetensors", tmp_path / "outside" / "x.safetensors")
    _rewrite_index(bad, _point_first_shard_to(str(tmp_path / "outside" / "x.safetensors")))
    refused(world, bad, tmp_path, capsys, "points outside its model folder: '/.*x.safetensors'")


def test_index_shard_is_a_symlink_out_of_the_folder(world, tmp_path, capsys):
    bad = _sharded(world, tmp_path)
    shard = bad / "model-00001-of-00003.safetensors"
    (tmp_path / "outside").mkdir()
    shutil.move(shard, tmp_path / "outside" / "elsewhere.safetensors")
    shard.symlink_to(tmp_path / "outside" / "elsewhere.safetensors")
    refused(
        world,
        bad,
        tmp_path,
        capsys,
        "leads to .*elsewhere.safetensors \\(a symbolic link out of the folder\\)",
    )


@pytest.mark.parametrize(
    "content, pattern",
    [
        (json.dumps({"weight_map": ["a"]}), "has no weight_map object"),
        (json.dumps({"weight_map": {"lm_head.weight": 3}}), "the shard of lm_head.weight is not a file name"),
        (json.dumps([1, 2]), "must hold a JSON object, not a list"),
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8 text"),
    ],
    ids=["weight_map_list", "shard_not_a_string", "index_is_a_list", "index_not_json", "index_not_utf8"],
)
def test_broken_index(world, tmp_path, capsys, content, pattern):
    bad = _sharded(world, tmp_path)
    path = bad / "model.safetensors.index.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(world, bad, tmp_path, capsys, pattern)


@pytest.mark.timeout(60)
def test_index_is_a_fifo(world, tmp_path, capsys):
    bad = _sharded(world, tmp_path)
    (bad / "model.safetensors.index.json").unlink()
    os.mkfifo(bad / "model.safetensors.index.json")
    refused(world, bad, tmp_path, capsys, "index file .* is a FIFO")


# --------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "content, pattern",
    [("[]", "must hold a JSON object, not a list"), ('"llama"', "not a string"), ("null", "not null"),
     ("1", "not a number"), (b"\xff{}", "not UTF-8 text"), ("{", "is not valid JSON"),
     ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply")],
    ids=["list", "string", "null", "number", "not_utf8", "not_json", "deep"],
)  # fmt: skip
def test_config_is_not_a_json_object(world, hostile, tmp_path, capsys, content, pattern):
    (hostile / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(world, hostile, tmp_path, capsys, rf"config.json .*{pattern}")


@pytest.mark.timeout(60)
def test_config_is_a_fifo(world, hostile, tmp_path, capsys):
    (hostile / "config.json").unlink()
    os.mkfifo(hostile / "config.json")
    refused(world, hostile, tmp_path, capsys, r"config.json .* is a FIFO")


def test_config_with_odd_field_types(world, hostile, tmp_path, capsys):
    """A model_type that is a list is a different architecture, not a crash."""
    set_config(hostile, model_type=["llama"])
    refused(world, hostile, tmp_path, capsys, "models of different architectures")


# ------------------------------------------------------------------------------------------- dtypes, results


def test_mixed_input_dtypes_warn_and_record_the_choice(world, hostile, tmp_path, capsys):
    sd = load_file(hostile / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, hostile / "model.safetensors")
    out = tmp_path / "out"
    argv = ["--pretrained_model_name", world["base"], "--finetuned_model_names", hostile, world["ft_b"],
            "--merged_model_path", out, "--skip_evaluation", "--merging_method_name", "task_arithmetic"]  # fmt: skip
    code, err = run_cli(merge.main, argv, capsys)
    assert code == 0, err
    assert any(line.startswith("warning: the input models have different dtypes") for line in err), err
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["dtype"]["chosen"] == ["float32"] and "pretrained" in manifest["dtype"]["chosen_by"]
    assert sorted(map(tuple, manifest["dtype"]["inputs"].values())) == [
        ("bfloat16",),
        ("float32",),
        ("float32",),
    ]
    assert any("different dtypes" in w for w in manifest["warnings"])
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


@pytest.mark.parametrize("coefficient", ["1e300", "1e39"])  # 1e39 is finite as a double, infinite in float32
def test_non_finite_merge_stops_before_publishing(world, hostile, tmp_path, capsys, coefficient):
    refused(
        world, hostile, tmp_path, capsys, "the result is not finite", "--scaling_coefficient", coefficient
    )


def test_overflow_of_the_output_dtype_stops_before_publishing(world, hostile, tmp_path, capsys):
    """Finite in float32, infinite once cast to float16."""
    refused(world, hostile, tmp_path, capsys, "not finite .* output dtype float16", "--scaling_coefficient", "1e7",
            "--dtype", "float16")  # fmt: skip
