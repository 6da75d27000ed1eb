"""Writing sharded safetensors one tensor (or one block of rows) at a time, and the side files of a model folder.

:class:`ShardedSafetensorsWriter` is given the full list of (name, dtype, shape) up front, so it assigns tensors to
shards and computes every shard's header before any data is written; tensors are then written straight to the open
shard file at their byte offsets (the writer never holds a shard in memory), from several threads if needed. Shards
follow the Hugging Face naming (``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` plus
``model.safetensors.index.json``). :func:`write_side_files` copies config, generation config and tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.publish import os_error_message
from model_merging_methods.reader import (
    _MAX_READ,
    _TORCH_TO_ST,
    SAFETENSORS_INDEX,
    _itemsize,
    read_json_object,
    torch_dtype_name,
)

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

MAX_SIZE = 1 << 62  # largest --max_shard_size accepted


def parse_size(size: str | int) -> int:
    """Parse a shard size like ``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count into bytes.

    Units follow Hugging Face: KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2; a bare number is
    bytes. The result must be positive and at most 2**62 bytes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = Decimal(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not m:
            raise MergeError(
                f"cannot parse size {str(size)[:60]!r} (expected e.g. 5GB, 500MB, 2GiB or a number of bytes)"
            )
        try:
            number = Decimal(m.group(1))
        except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimal numbers
            raise MergeError(f"cannot parse size {str(size)[:60]!r}") from exc
        unit = (m.group(2) or "B").upper()
        powers = {"K": 1, "M": 2, "G": 3, "T": 4}
        if unit == "B":
            factor = 1
        elif unit.endswith("IB"):
            factor = 1024 ** powers[unit[0]]
        else:
            factor = 1000 ** powers[unit[0]]
        value = number * factor
    if value > MAX_SIZE:
        shown = str(size) if len(str(size)) <= 40 else str(size)[:20] + f"... ({len(str(size))} characters)"
        raise MergeError(f"size {shown} is too large (at most {MAX_SIZE} bytes)")
    value = int(value)
    if value <= 0:
        raise MergeError(f"size must be positive, got {size!r}")
    return value


# ----------------------------------------------------------------------------------------------------------------
# checked opening of input files
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------------


def _pwrite_all(fd: int, data, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (positioned writes may be partial)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done : done + _MAX_READ]], offset + done)


def _all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite (NaN and Inf propagate through a sum; only a non-finite sum, which may
    also be an overflow of finite values, needs the element check)."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


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
        check_finite: bool = False,
    ):
        self.out_dir = Path(out_dir)
        self.check_finite = bool(check_finite)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MergeError(os_error_message(exc, self.out_dir)) from exc
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
                try:  # 0o666 minus the umask, like any other file
                    fd = os.open(self.out_dir / sh.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
                    self._fds.append(fd)
                    _pwrite_all(fd, sh.header, 0)
                    os.ftruncate(fd, sh.size)  # final size; data is written at its offsets
                except OSError as exc:
                    raise MergeError(os_error_message(exc, self.out_dir / sh.file)) from exc
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
            self._check_finite(name, part)
            data = part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._pwrite(i, memoryview(data), start + byte_offset)
        with self._lock:
            self._done[name] += nbytes
            self.bytes_written += nbytes

    def _check_finite(self, name: str, part: torch.Tensor) -> None:
        if self.check_finite and part.is_floating_point() and not _all_finite(part):
            raise MergeError(
                f"the result is not finite (NaN or Inf) in tensor {name}, e.g. from a huge scaling coefficient or an "
                f"overflow of the output dtype {torch_dtype_name(part.dtype)}; nothing was written"
            )

    def _pwrite(self, i: int, data, offset: int) -> None:
        try:
            _pwrite_all(self._fds[i], data, offset)
        except OSError as exc:
            raise MergeError(os_error_message(exc, self.out_dir / self._shards[i].file)) from exc

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
            self._check_finite(name, part)
            self._pwrite(i, memoryview(part.detach().contiguous().reshape(-1).view(torch.uint8).numpy()),
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
            try:
                (self.out_dir / SAFETENSORS_INDEX).write_text(
                    json.dumps(index, indent=2) + "\n", encoding="utf-8"
                )
            except OSError as exc:
                raise MergeError(os_error_message(exc, self.out_dir / SAFETENSORS_INDEX)) from exc
            files = [*files, SAFETENSORS_INDEX]
        return files

    def abort(self) -> None:
        """Close the shard files (the caller removes the folder)."""
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


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
    if os.path.lexists(cfg_path):
        cfg = read_json_object(cfg_path, "config.json")
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

        try:
            tok = AutoTokenizer.from_pretrained(str(source))
        except Exception as exc:  # noqa: BLE001 - a broken tokenizer of the user's is one readable line
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise MergeError(f"cannot load the tokenizer in {source} to add the pad token: {first}") from exc
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
        data = read_json_object(tj, "tokenizer.json")
        vocab = data["model"]["vocab"]
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids |= {t["id"] for t in data.get("added_tokens", [])}
        return int(max(ids)) + 1 if ids else 0
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, OSError):
        return None
