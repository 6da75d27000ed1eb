"""Checkpoint I/O for out-of-core merging: read Hugging Face model folders one tensor at a time, write sharded
safetensors one tensor at a time, and publish the output folder atomically.

Reading
    :class:`CheckpointReader` opens a model folder holding ``model.safetensors``, sharded
    ``model-*.safetensors`` + ``model.safetensors.index.json``, ``pytorch_model.bin`` or sharded
    ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``. Safetensors headers are parsed directly (no
    tensor data is touched to list names, dtypes and shapes); a tensor is read with one positioned ``readinto``
    into a fresh tensor, so nothing stays memory-mapped and the process's resident memory holds only the
    tensors in use. ``.bin`` files are opened with ``torch.load(weights_only=True, mmap=True)``: arbitrary
    pickled objects are refused, and tensor data is paged in only when a tensor is read.

Writing
    :class:`ShardedSafetensorsWriter` is given the full list of (name, dtype, shape) up front, so it assigns
    tensors to shards and computes every shard's header before any data is written; tensors are then written
    one at a time straight to the open shard file (the writer never holds a shard in memory). Shards follow
    the Hugging Face naming (``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``).

Publishing
    :func:`atomic_output_dir` yields a temporary folder next to the target and renames it into place only when
    the body completes; on any exception, Ctrl-C or SIGTERM the temporary folder is removed and nothing
    appears at the target path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.errors import MergeError as UserError

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

# files copied from the chosen source model into the output folder (besides weights)
MODEL_SIDE_FILES: tuple[str, ...] = ("config.json", "generation_config.json")
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

_MAX_READ = 1 << 30  # bytes per read() call (Linux caps a single read at ~2 GiB)


def torch_dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_size(size: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count into bytes.

    Units follow Hugging Face: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2; a bare number is
    bytes. The result must be positive.
    """
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise UserError(
                f"cannot parse size {size!r} (expected e.g. 5GB, 500MB, 2GiB or a number of bytes)"
            )
        number, unit = float(m.group(1)), (m.group(2) or "B").upper()
        powers = {"K": 1, "M": 2, "G": 3, "T": 4}
        if unit == "B":
            factor = 1
        elif unit.endswith("IB"):
            factor = 1024 ** powers[unit[0]]
        else:
            factor = 1000 ** powers[unit[0]]
        value = int(number * factor)
    if value <= 0:
        raise UserError(f"size must be positive, got {size!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# model resolution
# ----------------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> Path:
    """A local model folder for ``name_or_path``.

    Order: an existing local folder; otherwise a registry short name (``utils.llm_registry.hub_id``) or a hub id,
    resolved through the Hugging Face cache (``snapshot_download(local_files_only=True)``); when that misses and
    the hub is reachable (``HF_HUB_OFFLINE`` unset) the weights, config and tokenizer files are downloaded. A
    ``UserError`` names the model when none of this works.
    """
    from utils.llm_registry import hub_id

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"model path {name_or_path} is not a folder")
    repo_id = hub_id(name_or_path)
    looks_local = (
        name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    )
    if looks_local or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", repo_id):
        raise UserError(f"model folder not found: {name_or_path}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub ships with transformers
        raise UserError(f"model folder not found: {name_or_path} (huggingface_hub is not installed)") from exc
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss falls through to the online attempt below
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        raise UserError(
            f"model {name_or_path} ({repo_id}) is neither a local folder nor in the Hugging Face cache, "
            "and HF_HUB_OFFLINE is set"
        )
    try:
        from huggingface_hub import HfApi

        files = HfApi().list_repo_files(repo_id)
        patterns = ["*.json", "tokenizer.model", "*.txt", "*.jinja"]
        patterns += ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network/auth/repo errors become one readable line
        raise UserError(
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


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; returns (header dict, data start offset). Validates offsets against the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise UserError(f"corrupt safetensors file {path}: shorter than 8 bytes")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise UserError(f"corrupt safetensors file {path}: header length {n} does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"corrupt safetensors file {path}: unreadable header ({exc})") from exc
    data_start = 8 + n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            dtype, shape = entry["dtype"], [int(s) for s in entry["shape"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"corrupt safetensors file {path}: bad entry for {name}") from exc
        if dtype not in _ST_TO_TORCH:
            raise UserError(f"tensor {name} in {path} has unsupported dtype {dtype}")
        if not (0 <= begin <= end and data_start + end <= size):
            raise UserError(
                f"corrupt safetensors file {path}: tensor {name} lies outside the file (truncated?)"
            )
        if end - begin != math.prod(shape) * _itemsize(_ST_TO_TORCH[dtype]):
            raise UserError(f"corrupt safetensors file {path}: tensor {name} has a wrong byte length")
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
            raise UserError(f"model folder not found: {self.folder} ({self.label})")
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._handles: dict[str, int] = {}
        self._bin_dicts: dict[str, dict[str, torch.Tensor]] = {}
        self.config: dict[str, Any] | None = None
        cfg = self.folder / "config.json"
        if cfg.is_file():
            try:
                self.config = json.loads(cfg.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"unreadable config.json in {self.folder}: {exc}") from exc
        self.weight_files = self._find_weight_files()
        self.format = "safetensors" if self.weight_files[0].endswith(".safetensors") else "bin"
        self.infos: dict[str, TensorInfo] = {}
        if self.format == "safetensors":
            self._scan_safetensors()
        else:
            self._scan_bin()

    # -- discovery --------------------------------------------------------------------------------------------
    def _index_files(self, index_name: str) -> list[str]:
        index_path = self.folder / index_name
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"unreadable index file {index_path}: {exc}") from exc
        self._index_map: dict[str, str] = dict(weight_map)
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:
            if not (self.folder / f).is_file():
                raise UserError(f"shard {f} listed in {index_path} is missing ({self.label})")
        return sorted(files)

    def _find_weight_files(self) -> list[str]:
        self._index_map = {}
        if (self.folder / SAFETENSORS_INDEX).is_file():
            return self._index_files(SAFETENSORS_INDEX)
        sts = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if "model.safetensors" in sts:
            return ["model.safetensors"]
        if len(sts) == 1:
            return sts
        if len(sts) > 1:
            raise UserError(f"{self.folder} holds several .safetensors files but no {SAFETENSORS_INDEX}")
        if (self.folder / BIN_INDEX).is_file():
            return self._index_files(BIN_INDEX)
        if (self.folder / "pytorch_model.bin").is_file():
            return ["pytorch_model.bin"]
        bins = sorted(p.name for p in self.folder.glob("pytorch_model*.bin"))
        if len(bins) == 1:
            return bins
        if bins:
            raise UserError(f"{self.folder} holds several pytorch_model*.bin files but no {BIN_INDEX}")
        raise UserError(
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
            try:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:  # legacy (non-zip) format cannot be memory-mapped
                    if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - weights_only refusals, corrupt zips, ...
                raise UserError(
                    f"cannot load {path} with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                ) from exc
            if not isinstance(sd, dict):
                raise UserError(f"{path} does not hold a state dict")
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
                raise UserError(f"tensor {info.name} appears twice in {self.folder}")
            self.infos[info.name] = info
        missing = set(self._index_map) - set(self.infos)
        if missing:
            raise UserError(
                f"tensor {sorted(missing)[0]} is listed in the index of {self.folder} but missing from its shard"
            )
        if not self.infos:
            raise UserError(f"no tensors in {self.folder} ({self.label})")

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
                    fd = self._handles[fname] = os.open(self.folder / fname, os.O_RDONLY)
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
            got = os.preadv(fd, [buf[done : min(n, done + _MAX_READ)]], offset + done)
            if not got:
                raise UserError(
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


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (positioned writes may be partial)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done : done + _MAX_READ]], offset + done)


@dataclass
class _Shard:
    file: str
    names: list[str] = field(default_factory=list)
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)  # absolute byte ranges in the file
    size: int = 0  # total file size


class ShardedSafetensorsWriter:
    """Write tensors into Hugging Face-style sharded safetensors, straight to disk, from one or several threads.

    ``specs`` lists every output tensor as (name, dtype, shape). Shards are filled greedily in that order: a new
    shard starts when adding a tensor would pass ``max_shard_size`` bytes (a tensor larger than the limit gets its
    own shard). Every shard's header and every tensor's byte range are computed up front and the shard files are
    created at their final size, so tensor data is written at its place with positioned writes (``os.pwritev``):
    in any order, in parts (:meth:`write_at`), from several threads; nothing is buffered per shard. Inside a shard,
    tensors are laid out by descending element size (stable), which keeps every tensor aligned.
    :meth:`close` checks that every byte of every tensor was written and writes the index of a sharded output.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        max_shard_size: int | str = "5GB",
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.specs = {name: (dtype, tuple(int(s) for s in shape)) for name, dtype, shape in specs}
        if len(self.specs) != len(specs):
            raise ValueError("duplicate tensor names in the writer specs")
        self.order = [s[0] for s in specs]
        self.bytes_written = 0
        self._shards = self._plan()
        self._where = {name: i for i, sh in enumerate(self._shards) for name in sh.names}
        self._done: dict[str, int] = dict.fromkeys(self.order, 0)  # bytes written per tensor
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._cursor: tuple[str, int] | None = None  # for begin / write_part / end
        try:
            for sh in self._shards:
                fd = os.open(self.out_dir / sh.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _pwrite_all(fd, sh.header, 0)
                os.ftruncate(fd, sh.size)  # final size; data is written at its offsets
        except BaseException:
            self.abort()
            raise

    def _nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return math.prod(shape) * _itemsize(dtype)

    def _plan(self) -> list[_Shard]:
        groups: list[list[str]] = []
        size = 0
        for name in self.order:
            nb = self._nbytes(name)
            if not groups or (groups[-1] and size + nb > self.max_shard_size):
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += nb
        if not groups:
            groups = [[]]
        n = len(groups)
        shards = []
        for i, names in enumerate(groups):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            layout = sorted(names, key=lambda nm: -_itemsize(self.specs[nm][0]))  # stable
            header: dict[str, Any] = {"__metadata__": self.metadata}
            pos = 0
            rel: dict[str, tuple[int, int]] = {}
            for nm in layout:
                dtype, shape = self.specs[nm]
                nb = self._nbytes(nm)
                header[nm] = {
                    "dtype": _TORCH_TO_ST[dtype],
                    "shape": list(shape),
                    "data_offsets": [pos, pos + nb],
                }
                rel[nm] = (pos, pos + nb)
                pos += nb
            hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
            hb += b" " * (-len(hb) % 8)
            head = len(hb).to_bytes(8, "little") + hb
            sh = _Shard(
                fname, list(names), head, {k: (len(head) + a, len(head) + b) for k, (a, b) in rel.items()}
            )
            sh.size = len(head) + pos
            shards.append(sh)
        return shards

    @property
    def shard_files(self) -> list[str]:
        return [s.file for s in self._shards]

    def location(self, name: str) -> tuple[str, int, int]:
        """(file, start, end) of a tensor's bytes in the output."""
        sh = self._shards[self._where[name]]
        return (sh.file, *sh.offsets[name])

    def write_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        """Write ``part`` (row-major elements of tensor ``name``, its planned dtype) at ``byte_offset`` bytes into
        the tensor's data. Thread-safe; parts may come in any order."""
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not in the writer's plan")
        dtype, _ = self.specs[name]
        if part.dtype != dtype:
            raise ValueError(f"tensor {name}: part has dtype {part.dtype}, planned {dtype}")
        i = self._where[name]
        start, end = self._shards[i].offsets[name]
        nbytes = part.numel() * part.element_size()
        if byte_offset < 0 or start + byte_offset + nbytes > end:
            raise ValueError(f"tensor {name}: more data than its planned shape")
        if nbytes:
            data = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            _pwrite_all(self._fds[i], memoryview(data), start + byte_offset)
        with self._lock:
            self._done[name] += nbytes
            self.bytes_written += nbytes

    def read_at(self, name: str, byte_offset: int, nbytes: int) -> bytearray:
        """Read back ``nbytes`` bytes of tensor ``name`` written so far, from ``byte_offset`` into its data."""
        i = self._where[name]
        start, end = self._shards[i].offsets[name]
        if byte_offset < 0 or start + byte_offset + nbytes > end:
            raise ValueError(f"tensor {name}: read outside its data")
        buf = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            got = os.preadv(self._fds[i], [view[done:]], start + byte_offset + done)
            if not got:
                raise OSError(f"short read from {self._shards[i].file}")
            done += got
        return buf

    def overwrite_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        """Replace bytes already written (same checks as :meth:`write_at`; not counted again)."""
        dtype, _ = self.specs[name]
        i = self._where[name]
        start, end = self._shards[i].offsets[name]
        nbytes = part.numel() * part.element_size()
        if part.dtype != dtype or byte_offset < 0 or start + byte_offset + nbytes > end:
            raise ValueError(f"tensor {name}: overwrite does not fit its planned dtype and shape")
        if nbytes:
            _pwrite_all(self._fds[i], memoryview(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()),
                        start + byte_offset)  # fmt: skip

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (its dtype and shape must match the plan)."""
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not in the writer's plan")
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )
        self.write_at(name, 0, tensor)

    def begin(self, name: str) -> None:
        """Start writing a tensor sequentially: its data then comes in row-major parts via :meth:`write_part`."""
        if self._cursor is not None:
            raise ValueError(f"tensor {self._cursor[0]} is not finished")
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not in the writer's plan")
        self._cursor = (name, 0)

    def write_part(self, part: torch.Tensor) -> None:
        """Append the next consecutive elements of the tensor started with :meth:`begin`."""
        if self._cursor is None:
            raise ValueError("write_part without begin")
        name, pos = self._cursor
        self.write_at(name, pos, part)
        self._cursor = (name, pos + part.numel() * part.element_size())

    def end(self) -> None:
        """Finish the tensor started with :meth:`begin` (all of its bytes must have been written)."""
        name, pos = self._cursor
        if pos != self._nbytes(name):
            raise ValueError(f"tensor {name}: {self._nbytes(name) - pos} bytes missing")
        self._cursor = None

    def close(self) -> list[str]:
        """Finish: check that every tensor was fully written, write the index (sharded output). Returns the files."""
        missing = [n for n in self.order if self._done[n] != self._nbytes(n)]
        if missing:
            raise ValueError(
                f"writer closed with {len(missing)} of {len(self.order)} tensors incomplete (first: {missing[0]})"
            )
        self.abort()
        files = self.shard_files
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(self._nbytes(n) for n in self.order)},
                "weight_map": {n: self._shards[self._where[n]].file for n in sorted(self.order)},
            }
            (self.out_dir / SAFETENSORS_INDEX).write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
            files = [*files, SAFETENSORS_INDEX]
        return files

    def abort(self) -> None:
        """Close the shard files (the caller removes the folder)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# atomic output folder
# ----------------------------------------------------------------------------------------------------------------


def check_output_path(target: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output path unless ``overwrite`` (and always refuse an existing non-folder)."""
    target = Path(target).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise UserError(f"output path {target} exists and is not a folder")
        if not overwrite:
            raise UserError(f"output path {target} already exists (pass --overwrite to replace it)")
    return target


def _raise_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt(f"terminated by signal {signum}")


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``target``; on success rename it to ``target``.

    An existing ``target`` is refused unless ``overwrite`` (then it is replaced only after the new folder is
    complete). On any exception, ``KeyboardInterrupt`` or SIGTERM (turned into ``KeyboardInterrupt`` while the
    body runs in the main thread) the temporary folder is removed and the target is left untouched.
    """
    target = check_output_path(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main else None
    try:
        yield tmp
        check_output_path(target, overwrite)
        if target.exists():
            trash = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, trash)
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)


# ----------------------------------------------------------------------------------------------------------------
# side files: config, generation config, tokenizer
# ----------------------------------------------------------------------------------------------------------------


def write_side_files(
    source: str | Path,
    out_dir: str | Path,
    *,
    config_updates: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    pad_token: str | None = None,
) -> dict[str, Any]:
    """Copy ``config.json``, ``generation_config.json`` and the tokenizer files from ``source`` to ``out_dir``.

    ``config_updates`` are applied to config.json (e.g. ``vocab_size``, ``dtype``). When ``vocab_size`` is given,
    the source has a tokenizer with fewer tokens than that and ``pad_token`` is given, the pad token is added to
    the tokenizer (as the original's ``smart_tokenizer_and_embedding_resize`` does) and the tokenizer is saved with
    ``save_pretrained``; otherwise tokenizer files are copied byte for byte. Returns what was done.
    """
    source, out_dir = Path(source), Path(out_dir)
    done: dict[str, Any] = {"source": str(source), "copied": [], "tokenizer_pad_token_added": None}
    cfg_path = source / "config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg.update(config_updates or {})
        (out_dir / "config.json").write_text(
            json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        done["copied"].append("config.json")
    gen = source / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out_dir / gen.name)
        done["copied"].append(gen.name)
    tok_files = [f for f in TOKENIZER_FILES if (source / f).is_file()]
    if not tok_files:
        return done
    n_tokens = _tokenizer_length(source)
    if vocab_size is not None and pad_token and n_tokens is not None and n_tokens < vocab_size:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source))
        if pad_token not in tok.get_vocab():
            tok.add_special_tokens({"pad_token": pad_token})
            done["tokenizer_pad_token_added"] = {
                "token": pad_token,
                "id": tok.convert_tokens_to_ids(pad_token),
            }
        tok.save_pretrained(str(out_dir))
        done["copied"].append("tokenizer (re-saved with the pad token)")
        if "config.json" in done["copied"] and done["tokenizer_pad_token_added"]:
            cfg = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
            if cfg.get("pad_token_id") is None:
                cfg["pad_token_id"] = done["tokenizer_pad_token_added"]["id"]
                (out_dir / "config.json").write_text(
                    json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8"
                )
        return done
    for f in tok_files:
        shutil.copyfile(source / f, out_dir / f)
        done["copied"].append(f)
    return done


def _tokenizer_length(folder: Path) -> int | None:
    """Number of tokens (base vocabulary + added tokens) from ``tokenizer.json`` without importing transformers;
    None when it cannot be told cheaply."""
    tj = folder / "tokenizer.json"
    if not tj.is_file():
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids |= {t["id"] for t in data.get("added_tokens", [])}
        return max(ids) + 1 if ids else 0
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        return None
