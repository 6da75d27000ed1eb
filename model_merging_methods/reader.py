"""Reading Hugging Face model folders one tensor at a time, and checking them as strictly as the ``safetensors``
library does.

Reading
    :class:`CheckpointReader` opens a model folder holding ``model.safetensors``, sharded
    ``model-*.safetensors`` + ``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded
    ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``. Safetensors headers are parsed directly (no
    tensor data is touched to list names, dtypes and shapes); a tensor is read with one positioned ``readinto``
    into a fresh tensor, so nothing stays memory-mapped and the process's resident memory holds only the
    tensors in use. ``.bin`` files are opened with ``torch.load(weights_only=True, mmap=True)``: arbitrary
    pickled objects are refused, and tensor data is paged in only when a tensor is read.

Checking
    Inputs are checked as strictly as the ``safetensors`` library checks them: the header must be a UTF-8 JSON
    object of at most 100 MB (``__metadata__`` an object of strings, every entry an object with a known dtype,
    a shape of non-negative integers and two integer offsets), and the tensors' byte ranges must cover the data
    exactly, without overlaps or gaps. Weight, index and config files must be regular files (a FIFO, a device or
    a folder in their place is refused without being opened for reading); an index must name files inside its
    model folder (no absolute paths, no ``..``, no symbolic links leading out, except the Hugging Face cache's
    links into its ``blobs`` folder); ``config.json`` must hold a JSON object. Each problem is one
    :class:`~model_merging_methods.errors.MergeError` line.

Resolving
    :func:`resolve_model_path` turns a local folder, a hub id or (through an injected ``name_resolver``) a short
    name into a local folder, from the Hugging Face cache or the hub.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.publish import os_error_message

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"

# safetensors dtype code <-> torch dtype
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):  # fmt: skip
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_code] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}

DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


_MAX_READ = 1 << 30  # bytes per read() call (Linux caps a single read at ~2 GiB)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit on a header
MAX_JSON_BYTES = 1 << 28  # config, index and tokenizer JSON files larger than this are refused


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular_file(path: str | Path, what: str) -> int:
    """An ``os.open`` descriptor of ``path`` for reading, refusing anything but a regular file. The file is opened
    non-blocking and checked with ``fstat`` before any read, so a FIFO or a device never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise MergeError(os_error_message(exc, path, action="read")) from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise MergeError(f"{what} {path} is {_file_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.pread(fd, min(n - len(out), _MAX_READ), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} appears twice")
        out[k] = v
    return out


def read_json_object(path: str | Path, what: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """The JSON object in ``path`` (a regular UTF-8 file of at most ``limit`` bytes); anything else — another JSON
    type, bad UTF-8, absurd nesting, a FIFO — is one ``MergeError`` naming the file."""
    fd = open_regular_file(path, what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise MergeError(f"{what} {path} is {size} bytes, more than the {limit} accepted")
        raw = _pread_exact(fd, size, 0)
    except OSError as exc:
        raise MergeError(os_error_message(exc, path, action="read")) from exc
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MergeError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise MergeError(f"{what} {path} nests JSON too deeply") from exc
    except json.JSONDecodeError as exc:
        raise MergeError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise MergeError(f"{what} {path} must hold a JSON object, not {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )  # fmt: skip


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------------------------
# model resolution
# ----------------------------------------------------------------------------------------------------------------


NameResolver = Callable[[str], str]


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _hub_repo_id(name_or_path: str, name_resolver: NameResolver | None) -> str | None:
    """The hub id ``name_or_path`` stands for, or None when it can only be a local path."""
    repo_id = name_resolver(name_or_path) if name_resolver is not None else name_or_path
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    if looks_local or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
        return None
    return repo_id


def _cached_snapshot(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss
        return None


def find_local_model(name_or_path: str, name_resolver: NameResolver | None = None) -> Path | None:
    """The local folder ``name_or_path`` refers to without any download: an existing folder, or the Hugging Face
    cache's snapshot of the hub id (``name_resolver`` maps short names such as registry names to hub ids).
    None when there is none (the output-path guard compares outputs with these folders)."""
    if not str(name_or_path).strip():
        return None
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            return path.resolve()
        if os.path.lexists(path):
            return None
    except OSError:  # e.g. a name too long for the file system: not a local folder
        return None
    repo_id = _hub_repo_id(name_or_path, name_resolver)
    return _cached_snapshot(repo_id) if repo_id is not None else None


def hub_cache_repo(folder: str | Path) -> Path | None:
    """The Hugging Face cache repository folder (``.../models--org--name``) of a snapshot folder
    (``.../snapshots/<revision>``), whose ``blobs`` hold the snapshot's files; None for any other folder. The
    output-path guard treats the whole repository folder as the input."""
    folder = Path(folder)
    repo = folder.parent.parent
    if folder.parent.name == "snapshots" and repo.name.startswith(("models--", "datasets--")):
        return repo
    return None


def resolve_model_path(name_or_path: str, name_resolver: NameResolver | None = None) -> Path:
    """A local model folder for ``name_or_path``.

    Order: an existing local folder; otherwise a hub id (``name_resolver`` turns a short name, e.g. a registry
    name, into one; the scripts pass ``utils.llm_registry.hub_id``), resolved through the Hugging Face cache
    (``snapshot_download(local_files_only=True)``); when that misses and the hub is reachable (``HF_HUB_OFFLINE``
    unset) the weights, config and tokenizer files are downloaded. A ``MergeError`` names the model when none of
    this works.
    """
    if not str(name_or_path).strip():
        raise MergeError("a model name or path is empty")
    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir():
            return path.resolve()
        exists = os.path.lexists(path)
    except OSError as exc:
        shown = (
            name_or_path
            if len(name_or_path) <= 80
            else name_or_path[:60] + f"... ({len(name_or_path)} characters)"
        )
        raise MergeError(f"model path {shown}: {exc.strerror or exc}") from exc
    if exists:
        raise MergeError(f"model path {name_or_path} is not a folder")
    repo_id = _hub_repo_id(name_or_path, name_resolver)
    if repo_id is None:
        raise MergeError(f"model folder not found: {name_or_path}")
    try:
        import huggingface_hub  # noqa: F401
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise MergeError(
            f"model folder not found: {name_or_path} (huggingface_hub is not installed)"
        ) from exc
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    if _is_offline():
        raise MergeError(
            f"model {name_or_path} ({repo_id}) is neither a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set"
        )
    try:
        from huggingface_hub import HfApi, snapshot_download

        files = HfApi().list_repo_files(repo_id)
        patterns = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]
        patterns += ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network/auth/repo errors become one readable line
        raise MergeError(
            f"cannot find model {name_or_path} ({repo_id}) locally or on the hub: {type(exc).__name__}: {exc}"
        ) from exc


# ----------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file and, for safetensors, the absolute byte range of its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str  # file name inside the model folder
    start: int = -1  # absolute byte offset (safetensors only)
    end: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """Parse and check a safetensors header as strictly as the ``safetensors`` library does; returns (header dict,
    data start offset). See the module docstring for the checks; each failure is one ``MergeError``."""
    path = Path(path)

    def corrupt(why: str) -> MergeError:
        return MergeError(f"corrupt safetensors file {path}: {why}")

    fd = open_regular_file(path, "safetensors file")
    try:
        size = os.fstat(fd).st_size
        raw = _pread_exact(fd, 8, 0)
        if len(raw) < 8:
            raise corrupt("shorter than 8 bytes")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES:
            raise corrupt(f"a header of {n} bytes is more than the safetensors limit of {MAX_HEADER_BYTES}")
        if n == 0 or 8 + n > size:
            raise corrupt(f"header length {n} does not fit the file of {size} bytes (truncated?)")
        head = _pread_exact(fd, n, 8)
    except OSError as exc:
        raise MergeError(os_error_message(exc, path, action="read")) from exc
    finally:
        os.close(fd)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise corrupt(f"the header is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not text.startswith("{"):
        raise corrupt("the header is not a JSON object")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError as exc:
        raise corrupt("the header nests JSON too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, _DuplicateKey
        raise corrupt(f"unreadable header ({exc})") from exc
    if not isinstance(header, dict):
        raise corrupt(f"the header is {_json_type(header)}, not a JSON object")
    if "__metadata__" in header:
        meta = header["__metadata__"]
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise corrupt("__metadata__ must be a JSON object of strings")
    data_start, data_len = 8 + n, size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise corrupt(f"the entry of tensor {name} is {_json_type(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise corrupt(f"tensor {name} has no dtype string")
        if not (isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape)):
            raise corrupt(f"tensor {name} has a shape that is not a list of non-negative integers")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) and x >= 0 for x in offsets)
        ):
            raise corrupt(f"tensor {name} has data_offsets that are not two non-negative integers")
        if dtype not in _ST_TO_TORCH:
            raise MergeError(f"tensor {name} in {path} has unsupported dtype {dtype}")
        begin, end = offsets
        if end < begin:
            raise corrupt(f"tensor {name} ends before it begins")
        if end - begin != math.prod(shape) * _itemsize(_ST_TO_TORCH[dtype]):
            raise corrupt(f"tensor {name} has a wrong byte length for its dtype and shape")
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise corrupt(f"the bytes of tensor {name} overlap those of another tensor")
        if begin > pos:
            raise corrupt(f"bytes {pos} to {begin} of the data (before tensor {name}) belong to no tensor")
        if end > data_len:
            raise corrupt(f"tensor {name} lies outside the file (truncated?)")
        pos = end
    if pos != data_len:
        raise corrupt(f"the last {data_len - pos} bytes of the data belong to no tensor")
    return header, data_start


class CheckpointReader:
    """Read-only access to one model folder, one tensor at a time.

    ``infos`` maps tensor name -> :class:`TensorInfo` in on-disk order (file order, then offset), which is the
    order that reads the files sequentially. ``bytes_read`` counts tensor bytes read so far.
    """

    def __init__(self, folder: str | Path, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not self.folder.is_dir():
            raise MergeError(f"model folder not found: {self.folder} ({self.label})")
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._handles: dict[str, int] = {}
        self._bin_dicts: dict[str, dict[str, torch.Tensor]] = {}
        self.config: dict[str, Any] | None = None
        cfg = self.folder / "config.json"
        if os.path.lexists(cfg):
            self.config = read_json_object(cfg, "config.json")
        self.weight_files = self._find_weight_files()
        self.format = "safetensors" if self.weight_files[0].endswith(".safetensors") else "bin"
        self.infos: dict[str, TensorInfo] = {}
        if self.format == "safetensors":
            self._scan_safetensors()
        else:
            self._scan_bin()

    # -- discovery --------------------------------------------------------------------------------------------
    def _check_inside(self, fname: str, index_path: Path) -> None:
        """An index entry must name a file inside the model folder: a relative path without ``..`` whose real
        location (symbolic links followed) stays inside the folder — or, for a Hugging Face cache snapshot, inside
        the repository's ``blobs`` folder, where the cache's own links lead."""
        pure = PurePosixPath(fname)
        if not fname or pure.is_absolute() or "\\" in fname or any(p in ("..", "") for p in fname.split("/")):
            raise MergeError(
                f"index file {index_path} points outside its model folder: {fname!r} (entries must be file names "
                "inside the folder)"
            )
        root = Path(os.path.realpath(self.folder))
        real = Path(os.path.realpath(self.folder / fname))
        if root in real.parents:
            return
        if (
            self.folder.parent.name == "snapshots"
        ):  # huggingface_hub cache: snapshots/<rev>/<file> -> ../../blobs/x
            blobs = Path(os.path.realpath(self.folder.parent.parent / "blobs"))
            if blobs in real.parents:
                return
        raise MergeError(
            f"index file {index_path} points outside its model folder: {fname} leads to {real} (a symbolic link "
            "out of the folder)"
        )

    def _index_files(self, index_name: str) -> list[str]:
        index_path = self.folder / index_name
        data = read_json_object(index_path, "index file")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise MergeError(f"index file {index_path} has no weight_map object naming the shards")
        bad = next((k for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise MergeError(f"index file {index_path}: the shard of {bad} is not a file name")
        self._index_map: dict[str, str] = dict(weight_map)
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            self._check_inside(f, index_path)
            if not os.path.lexists(self.folder / f):
                raise MergeError(f"shard {f} listed in {index_path} is missing ({self.label})")
        return sorted(files)

    def _find_weight_files(self) -> list[str]:
        self._index_map = {}
        if os.path.lexists(self.folder / SAFETENSORS_INDEX):
            return self._index_files(SAFETENSORS_INDEX)
        sts = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if "model.safetensors" in sts:
            return ["model.safetensors"]
        if len(sts) == 1:
            return sts
        if len(sts) > 1:
            raise MergeError(f"{self.folder} holds several .safetensors files but no {SAFETENSORS_INDEX}")
        if os.path.lexists(self.folder / BIN_INDEX):
            return self._index_files(BIN_INDEX)
        if os.path.lexists(self.folder / "pytorch_model.bin"):
            return ["pytorch_model.bin"]
        bins = sorted(p.name for p in self.folder.glob("pytorch_model*.bin"))
        if len(bins) == 1:
            return bins
        if bins:
            raise MergeError(f"{self.folder} holds several pytorch_model*.bin files but no {BIN_INDEX}")
        raise MergeError(
            f"no model weights (*.safetensors or pytorch_model*.bin) in {self.folder} ({self.label})"
        )

    def _scan_safetensors(self) -> None:
        found: list[TensorInfo] = []
        for fname in self.weight_files:
            header, data_start = read_safetensors_header(self.folder / fname)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if self._index_map and self._index_map.get(name, fname) != fname:
                    continue  # the index assigns this name to another shard
                begin, end = e["data_offsets"]
                found.append(
                    TensorInfo(
                        name,
                        _ST_TO_TORCH[e["dtype"]],
                        tuple(int(s) for s in e["shape"]),
                        fname,
                        data_start + int(begin),
                        data_start + int(end),
                    )  # fmt: skip
                )
        order = {f: i for i, f in enumerate(self.weight_files)}
        found.sort(key=lambda t: (order[t.file], t.start))
        self._set_infos(found)

    def _load_bin(self, fname: str) -> dict[str, torch.Tensor]:
        with self._lock:
            return self._load_bin_locked(fname)

    def _load_bin_locked(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._bin_dicts:
            path = self.folder / fname
            os.close(open_regular_file(path, "weights file"))  # a FIFO or device must not reach torch.load
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
                    if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - weights_only refusals, corrupt zips, ...
                raise MergeError(
                    f"cannot load {path} with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                ) from exc
            if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
                raise MergeError(f"{path} does not hold a state dict")
            self._bin_dicts[fname] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return self._bin_dicts[fname]

    def _scan_bin(self) -> None:
        found: list[TensorInfo] = []
        for fname in self.weight_files:
            for name, t in self._load_bin(fname).items():
                if self._index_map and self._index_map.get(name, fname) != fname:
                    continue
                found.append(TensorInfo(name, t.dtype, tuple(t.shape), fname))
        self._set_infos(found)

    def _set_infos(self, found: list[TensorInfo]) -> None:
        for info in found:
            if info.name in self.infos:
                raise MergeError(f"tensor {info.name} appears twice in {self.folder}")
            self.infos[info.name] = info
        missing = set(self._index_map) - set(self.infos)
        if missing:
            raise MergeError(
                f"tensor {sorted(missing)[0]} is listed in the index of {self.folder} but missing from its shard"
            )
        if not self.infos:
            raise MergeError(f"no tensors in {self.folder} ({self.label})")

    # -- metadata ---------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def file_list(self) -> list[dict[str, Any]]:
        """The weight files with their sizes in bytes (for the manifest)."""
        return [{"file": f, "bytes": (self.folder / f).stat().st_size} for f in self.weight_files]

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    # -- data -------------------------------------------------------------------------------------------------
    def _fd(self, fname: str) -> int:
        fd = self._handles.get(fname)
        if fd is None:
            with self._lock:
                fd = self._handles.get(fname)
                if fd is None:
                    fd = self._handles[fname] = open_regular_file(self.folder / fname, "weights file")
        return fd

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    def read(self, name: str) -> torch.Tensor:
        """A fresh, contiguous, writable CPU tensor with the stored dtype and shape."""
        info = self.infos[name]
        if self.format == "bin":
            out = self._load_bin(info.file)[name].clone(memory_format=torch.contiguous_format)
        else:
            out = torch.empty(info.shape, dtype=info.dtype)
            self._read_into(info, info.start, out)
        self._count(info.nbytes)
        return out

    def read_flat_slice(self, name: str, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start+length)`` of the flattened tensor (a fresh 1-D tensor)."""
        info = self.infos[name]
        length = max(0, min(length, info.numel - start))
        if self.format == "bin":
            out = self._load_bin(info.file)[name].reshape(-1)[start : start + length].clone()
        else:
            out = torch.empty(length, dtype=info.dtype)
            self._read_into(info, info.start + start * _itemsize(info.dtype), out)
        self._count(length * _itemsize(info.dtype))
        return out

    def _read_into(self, info: TensorInfo, offset: int, out: torch.Tensor) -> None:
        """Positioned reads (``os.preadv``): safe to call from several threads at once."""
        n = out.numel() * out.element_size()
        if n == 0:
            return
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = self._fd(info.file)
        done = 0
        while done < n:
            try:
                got = os.preadv(fd, [buf[done : min(n, done + _MAX_READ)]], offset + done)
            except OSError as exc:
                raise MergeError(os_error_message(exc, self.folder / info.file, action="read")) from exc
            if not got:
                raise MergeError(
                    f"unexpected end of file while reading {info.name} from {self.folder / info.file}"
                )
            done += got

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._bin_dicts.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
