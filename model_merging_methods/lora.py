"""LoRA adapters (PEFT) as inputs and outputs of out-of-core merging.

Input: :class:`LoraModelReader` presents a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``)
on top of a :class:`~model_merging_methods.checkpoint_io.CheckpointReader` of its base model as the *fine-tuned model*
θ = θ_base + s·B·A, with the reader interface of a checkpoint (``names()``, ``infos``, ``config``, ``read``,
``read_flat_slice``, ``bytes_read``, ``close``), so DARE, every merging method and the delta analysis work on an
adapter exactly as on a full fine-tune. Nothing is materialised: ``read_flat_slice`` computes only the rows of B·A it
returns (B's rows times A, accumulated rank by rank, so that every row has the same bytes however the tensor is
sliced), so memory stays at one row block plus a small cache of A factors.

What an adapter tensor means (keys after PEFT's ``base_model.model.`` prefix; the config is read with ``peft``):

* ``<m>.lora_A.weight`` [r, in] and ``<m>.lora_B.weight`` [out, r]: δ(<m>.weight) = s·B·A, transposed with
  ``fan_in_fan_out`` (GPT-2's Conv1D stores [in, out]); s = lora_alpha / r, or lora_alpha / √r with ``use_rslora``,
  with r and lora_alpha per module from ``rank_pattern`` / ``alpha_pattern`` (PEFT's own pattern matching);
* ``<m>.lora_embedding_A`` [r, V] and ``<m>.lora_embedding_B`` [d, r] (LoRA on an embedding): δ = s·(B·A)ᵀ;
* ``<m>.lora_B.bias`` (``lora_bias=True``): δ(<m>.bias) = s·bias;
* ``<m>.base_layer.<p>`` (saved embedding layers, ``bias="lora_only"``) and ``<m>.<p>`` (``modules_to_save`` copies,
  biases trained with ``bias="all"``; also ``<m>.modules_to_save.<p>``, which PEFT saves next to ``<m>.<p>`` when
  the vocabulary was resized): the tensor replaces the base's ``<m>.<p>`` (a full delta). ``<m>.original_module.<p>``
  (the base side of a ``modules_to_save`` wrapper) counts only when the module has no trained copy. A replaced
  vocabulary tensor may have more rows than the base (a resized vocabulary; ``config["vocab_size"]`` follows);
* ``<m>.token_adapter.trainable_tokens_delta`` (``trainable_token_indices``): the rows at those indices replace the
  base's rows (PEFT's ``index_copy``).

Refused with a :class:`~model_merging_methods.errors.MergeError`: other PEFT types, the LoRA variants whose merged
weight is not θ_base + s·B·A (DoRA, aLoRA, KaSA, MonteCLoRA, BD-LoRA, Arrow, QA-LoRA), ``target_parameters``,
``layer_replication``, convolutions, an adapter key that names no base parameter, ranks that contradict the config,
and LoRA on a tensor the base checkpoint does not store (e.g. a tied ``lm_head``).

Arithmetic: B·A in float32 (float64 for float64 bases), times s; a half-precision adapter's product is rounded to its
dtype first, as PEFT's ``get_delta_weight`` does on the CPU; the sum is formed in float32 and rounded once to the
presented dtype (the base tensor's, as ``merge_and_unload()`` gives, unless ``dtype`` asks for another).

Output: :class:`LoraAdapterWriter` receives a model's tensors (whole, or consecutive row blocks via ``write_at``, the
sink interface of the sharded writer) and writes the difference to the base as a PEFT LoRA adapter of rank r:
a truncated SVD of δ per linear module (like PEFT's ``*_svd`` combinations; B = U√S, A = √S Vᵀ, lora_alpha = r so
s = 1), ``modules_to_save`` copies of every other module whose float tensors changed (embeddings, norms, a changed
bias of a module without a LoRA weight), ``base_layer.bias`` (with ``bias="lora_only"``) for a changed bias of a
LoRA module. Modules whose δ is exactly zero are left out. Shapes must equal the base's (an adapter cannot resize
the vocabulary) and integer tensors must be unchanged; otherwise the writer refuses. :func:`extract_lora` uses it to
extract an adapter from a full fine-tune, module by module, and reports the relative Frobenius error of each module.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.checkpoint_io import (
    TOKENIZER_FILES,
    CheckpointReader,
    NameResolver,
    ShardedSafetensorsWriter,
    TensorInfo,
    read_json_object,
    resolve_model_path,
    torch_dtype_name,
)
from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import tensor_generator

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "LoraAdapter",
    "LoraAdapterWriter",
    "LoraModelReader",
    "adapter_base_name",
    "extract_lora",
    "is_lora_folder",
    "open_model_or_adapter",
    "resolve_base_model",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
REPORT_FILE = "lora_report.json"
FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")  # fmt: skip
# LRU cache of whole factors (A, and B of embeddings) per reader: a tensor's row blocks come one after another (one
# tensor per worker thread), so a few entries are enough; the bytes bound the largest factors
A_CACHE_BYTES = 64 << 20
A_CACHE_ENTRIES = 8
ROW_BLOCK_ELEMENTS = 1 << 20  # elements per row block when the writer is fed from a reader
# LoRA variants PEFT marks as such (``is_lora_variant``) whose merged weight is *not* θ + s·B·A; VeLoRA only changes
# the backward pass and merges like plain LoRA.
_MERGE_CHANGING_VARIANTS = {
    "use_dora": "DoRA",
    "alora_invocation_tokens": "aLoRA (activated LoRA cannot be merged)",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA",
}
_VOCAB_NAME = re.compile(r".*(embed_tokens|lm_head|wte|embed_out|word_embeddings|output)\b.*")


def _peft():
    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a requirement
        raise MergeError(
            "reading or writing LoRA adapters needs the peft package (pip install peft)"
        ) from exc
    return peft


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


OUTPUT_FORMATS = ("model", "lora")


def check_output_format(output_format: str, lora_rank: int | None) -> bool:
    """True for a LoRA output (``output_format="lora"``, which needs a positive ``lora_rank``); MergeError for
    anything else than ``model`` or ``lora``, and for a rank given to a full-model output."""
    if output_format not in OUTPUT_FORMATS:
        raise MergeError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}; got {output_format!r}")
    if output_format != "lora":
        if lora_rank is not None:
            raise MergeError("lora_rank needs output_format lora")
        return False
    if lora_rank is None or isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise MergeError(f"output_format lora needs lora_rank, a positive integer (got {lora_rank!r})")
    return True


def is_lora_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a PEFT adapter (``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and _exists(p / ADAPTER_CONFIG)


def adapter_base_name(folder: str | os.PathLike) -> str | None:
    """The adapter's ``base_model_name_or_path`` (None when it has none); reads only ``adapter_config.json``."""
    raw = read_json_object(Path(folder) / ADAPTER_CONFIG, "adapter config")
    value = raw.get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------------------------------------


class _AdapterFile(CheckpointReader):
    """The adapter's tensors (``adapter_model.safetensors``, or ``adapter_model.bin`` loaded with
    ``weights_only=True``), read lazily with the checkpoint reader's checks."""

    def _find_weight_files(self) -> list[str]:
        self._index_map = {}
        if _exists(self.folder / ADAPTER_WEIGHTS):
            return [ADAPTER_WEIGHTS]
        if _exists(self.folder / ADAPTER_BIN):
            return [ADAPTER_BIN]
        raise MergeError(f"LoRA folder {self.folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: δ(``param``) = scaling · B·A (transposed for embeddings and ``fan_in_fan_out``)."""

    module: str
    param: str  # the base parameter it updates (``<module>.weight``)
    kind: str  # "linear" (A [r, in], B [out, r]) or "embedding" (A [r, V], B [d, r])
    a: str  # adapter tensor names
    b: str
    rank: int
    alpha: float
    scaling: float
    transposed: bool  # δ = (B·A)ᵀ: embeddings and fan_in_fan_out layers


@dataclass
class _Parsed:
    modules: dict[str, LoraModule] = field(default_factory=dict)  # base param -> update
    replacements: dict[str, str] = field(default_factory=dict)  # base param -> adapter tensor
    lora_biases: dict[str, tuple[str, float]] = field(
        default_factory=dict
    )  # base bias -> (adapter tensor, s)
    token_rows: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # base param -> (tensor, rows)


@dataclass(frozen=True)
class LoraSettings:
    """What of an adapter's config decides its merged weight (PEFT's ``LoraConfig`` fields of the same names)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    trainable_token_indices: list | dict | None
    base_model_name_or_path: str | None


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """The first key of ``patterns`` matching ``module`` as PEFT's ``get_pattern_key`` matches (the key as a
    regular expression for the whole name or a dotted suffix of it); ``module`` itself when none does."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error as exc:
            raise MergeError(
                f"rank_pattern/alpha_pattern key {key!r} is not a regular expression: {exc}"
            ) from exc
    return module


class LoraAdapter:
    """A PEFT LoRA adapter folder: its config (read with ``peft``), its tensors (lazily) and what each one updates.
    Refuses what it cannot represent as θ_base + s·B·A (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, label: str | None = None):
        self.folder = Path(folder)
        self.label = label or str(folder)
        if not is_lora_folder(self.folder):
            raise MergeError(f"{self.folder} is not a PEFT adapter folder (no {ADAPTER_CONFIG})")
        self.raw_config = read_json_object(self.folder / ADAPTER_CONFIG, "adapter config")
        peft_type = str(self.raw_config.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise MergeError(
                f"adapter {self.label} is a {peft_type or 'untyped'} adapter; only LoRA adapters (peft_type LORA) "
                "can be read"
            )
        self._check_variants()
        self.config = self._load_config()
        self.base_model_name_or_path = self.config.base_model_name_or_path or None
        self.tensors = _AdapterFile(self.folder, f"adapter {self.label}")
        try:
            self.parsed = self._parse()
        except BaseException:
            self.tensors.close()
            raise

    # -- config -------------------------------------------------------------------------------------------------
    def _check_variants(self) -> None:
        raw = self.raw_config
        for key, what in _MERGE_CHANGING_VARIANTS.items():
            if raw.get(key):
                raise MergeError(
                    f"adapter {self.label} uses {what} ({key}); its merged weight is not base + s*B*A, which is "
                    "all this toolkit can read"
                )
        if raw.get("target_parameters"):
            raise MergeError(
                f"adapter {self.label} uses target_parameters (LoRA on raw parameters), not supported"
            )
        if raw.get("layer_replication"):
            raise MergeError(f"adapter {self.label} uses layer_replication (it changes the model's layers)")
        bias = raw.get("bias", "none")
        if bias not in ("none", "all", "lora_only"):
            raise MergeError(f"adapter {self.label} has bias={bias!r} (expected none, all or lora_only)")

    def _load_config(self) -> LoraSettings:
        """The fields of ``adapter_config.json`` that decide the merged weight, checked as PEFT's ``LoraConfig``
        would type them. Read without importing ``peft`` (whose import costs about 170 MiB of resident memory and
        seconds; tests check the result against ``peft.LoraConfig``)."""
        raw, label = self.raw_config, self.label

        def number(key: str, default, integer: bool = False):
            value = raw.get(key, default)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (integer and int(value) != value) or value <= 0:
                kind = "a positive integer" if integer else "a positive number"
                raise MergeError(f"adapter {label}: {key} in {ADAPTER_CONFIG} must be {kind}, got {value!r}")
            return int(value) if integer else float(value)

        def pattern(key: str, integer: bool) -> dict[str, float]:
            value = raw.get(key) or {}
            if not isinstance(value, dict):
                raise MergeError(f"adapter {label}: {key} in {ADAPTER_CONFIG} must be an object")
            out = {}
            for k, v in value.items():
                ok = (
                    isinstance(v, int | float)
                    and not isinstance(v, bool)
                    and v > 0
                    and (not integer or int(v) == v)
                )
                if not ok:
                    raise MergeError(
                        f"adapter {label}: {key}[{k!r}] in {ADAPTER_CONFIG} must be positive, got {v!r}"
                    )
                out[k] = int(v) if integer else float(v)
            return out

        def flag(key: str) -> bool:
            value = raw.get(key, False)
            if value not in (True, False, None):
                raise MergeError(
                    f"adapter {label}: {key} in {ADAPTER_CONFIG} must be true or false, got {value!r}"
                )
            return bool(value)

        tokens = raw.get("trainable_token_indices")
        if tokens is not None and not isinstance(tokens, list | dict):
            raise MergeError(f"adapter {label}: trainable_token_indices must be a list or an object")
        base = raw.get("base_model_name_or_path")
        return LoraSettings(
            r=number("r", 8, integer=True), lora_alpha=number("lora_alpha", 8), use_rslora=flag("use_rslora"),
            rank_pattern=pattern("rank_pattern", True), alpha_pattern=pattern("alpha_pattern", False),
            fan_in_fan_out=flag("fan_in_fan_out"), trainable_token_indices=tokens,
            base_model_name_or_path=base if isinstance(base, str) and base else None,
        )  # fmt: skip

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of ``module``: ``rank_pattern``/``alpha_pattern`` matched as PEFT matches them."""
        cfg = self.config
        r = cfg.rank_pattern.get(pattern_key(cfg.rank_pattern, module), cfg.r)
        alpha = cfg.alpha_pattern.get(pattern_key(cfg.alpha_pattern, module), cfg.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.config.use_rslora else alpha / rank

    # -- tensors ------------------------------------------------------------------------------------------------
    def _token_indices(self, module: str) -> list[int]:
        spec = self.config.trainable_token_indices
        if isinstance(spec, dict):
            for key, rows in spec.items():
                if module == key or module.endswith("." + key):
                    return [int(i) for i in rows]
            raise MergeError(f"adapter {self.label}: no trainable_token_indices entry for {module}")
        if isinstance(spec, list | tuple):
            return [int(i) for i in spec]
        raise MergeError(
            f"adapter {self.label} has trainable tokens for {module} but no trainable_token_indices"
        )

    def _parse(self) -> _Parsed:
        out = _Parsed()
        factors: dict[str, dict[str, str]] = {}
        copies: dict[str, str] = {}
        originals: dict[str, str] = {}
        fan_in_fan_out = bool(self.config.fan_in_fan_out)
        for key in self.tensors.names():
            if not key.startswith(PEFT_PREFIX):
                raise MergeError(
                    f"adapter {self.label}: tensor {key} does not start with {PEFT_PREFIX!r} (not a PEFT LoRA "
                    "checkpoint of a transformers model)"
                )
            name = key[len(PEFT_PREFIX) :]
            for suffix, role in (
                (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "EA"),
                (".lora_embedding_B", "EB"), (".lora_B.bias", "bias"),
                (".token_adapter.trainable_tokens_delta", "tokens"),
            ):  # fmt: skip
                if name.endswith(suffix):
                    factors.setdefault(name[: -len(suffix)], {})[role] = key
                    break
            else:
                if re.search(r"\.lora_[A-Za-z_]+(\.|$)", name) or ".token_adapter." in name:
                    raise MergeError(
                        f"adapter {self.label}: tensor {key} is not understood (unsupported LoRA variant)"
                    )
                if ".original_module." in name:  # the base side of a modules_to_save wrapper
                    originals[name.replace(".original_module.", ".")] = key
                elif ".modules_to_save." in name:  # the trained copy (saved by PEFT next to <m>.<p>)
                    copies[name.replace(".modules_to_save.", ".")] = key
                else:
                    out.replacements[name.replace(".base_layer.", ".")] = key
        for name, key in copies.items():
            out.replacements.setdefault(name, key)
        for name, key in originals.items():
            out.replacements.setdefault(name, key)
        for module, roles in factors.items():
            if "tokens" in roles:
                out.token_rows[module + ".weight"] = (roles.pop("tokens"), self._token_indices(module))
            if not roles:
                continue
            linear = {"A", "B"} & roles.keys()
            embed = {"EA", "EB"} & roles.keys()
            if linear and embed:
                raise MergeError(
                    f"adapter {self.label}: module {module} has both linear and embedding LoRA factors"
                )
            a_role, b_role = ("A", "B") if not embed else ("EA", "EB")
            if "bias" in roles and b_role not in roles:
                raise MergeError(
                    f"adapter {self.label}: module {module} has lora_B.bias but no lora_B.weight"
                )
            if (a_role in roles) != (b_role in roles):
                missing = a_role if a_role not in roles else b_role
                raise MergeError(
                    f"adapter {self.label}: module {module} lacks its {missing.replace('E', 'embedding ')} factor"
                )
            a_info, b_info = self.tensors.infos[roles[a_role]], self.tensors.infos[roles[b_role]]
            if len(a_info.shape) != 2 or len(b_info.shape) != 2:
                raise MergeError(
                    f"adapter {self.label}: module {module} has factors of shapes {a_info.shape} and {b_info.shape}; "
                    "only linear and embedding layers are supported (not convolutions)"
                )
            rank = a_info.shape[0]
            if b_info.shape[1] != rank:
                raise MergeError(
                    f"adapter {self.label}: module {module} has lora_A of rank {rank} but lora_B of rank {b_info.shape[1]}"
                )
            r_cfg, alpha = self.rank_and_alpha(module)
            if r_cfg != rank:
                raise MergeError(
                    f"adapter {self.label}: module {module} has rank {rank} in the weights but r={r_cfg} in "
                    f"{ADAPTER_CONFIG} (rank_pattern)"
                )
            s = self.scaling(rank, alpha)
            out.modules[module + ".weight"] = LoraModule(
                module=module, param=module + ".weight", kind="embedding" if embed else "linear",
                a=roles[a_role], b=roles[b_role], rank=rank, alpha=alpha, scaling=s,
                transposed=bool(embed) or fan_in_fan_out,
            )  # fmt: skip
            if "bias" in roles:
                out.lora_biases[module + ".bias"] = (roles["bias"], s)
        return out

    def close(self) -> None:
        self.tensors.close()


# ----------------------------------------------------------------------------------------------------------------
# the fine-tuned model an adapter stands for
# ----------------------------------------------------------------------------------------------------------------


class _FactorCache:
    """A small thread-safe LRU cache of whole factors, bounded in entries and in bytes."""

    def __init__(self, limit: int = A_CACHE_BYTES, entries: int = A_CACHE_ENTRIES):
        self.limit, self.entries, self.size, self.lock = limit, entries, 0, threading.Lock()
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str, load: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()
        nbytes = value.numel() * value.element_size()
        with self.lock:
            if key not in self.items and nbytes <= self.limit:
                self.items[key] = value
                self.size += nbytes
                while self.size > self.limit or len(self.items) > self.entries:
                    _, old = self.items.popitem(last=False)
                    self.size -= old.numel() * old.element_size()
        return value


def _work_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


class LoraModelReader:
    """The fine-tuned model θ = θ_base + s·B·A that a LoRA adapter stands for, with the interface of
    :class:`~model_merging_methods.checkpoint_io.CheckpointReader` (see the module docstring).

    ``base`` is the base model's reader; it is shared (e.g. with the pretrained input of a merge) and closed by
    :meth:`close` only when ``close_base``. ``dtype`` (a float dtype) presents every float tensor in that dtype
    instead of the base's (e.g. float32, to keep an adapter's small delta exact on a bfloat16 base).
    """

    format = "peft-lora"

    def __init__(
        self,
        adapter: LoraAdapter | str | os.PathLike,
        base: CheckpointReader,
        label: str | None = None,
        *,
        dtype: torch.dtype | None = None,
        close_base: bool = False,
    ):
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter, label)
        self.base, self.close_base = base, close_base
        self.folder = self.adapter.folder
        self.label = label or self.adapter.label
        self.weight_files = list(self.adapter.tensors.weight_files)
        if dtype is not None and not dtype.is_floating_point:
            raise MergeError(f"an adapter can only be presented in a float dtype, not {dtype}")
        self._cache = _FactorCache()
        self.warnings: list[str] = []
        try:
            self.infos, self.config = self._plan(dtype)
        except BaseException:
            self.adapter.close()
            raise

    # -- plan ---------------------------------------------------------------------------------------------------
    def _plan(self, dtype: torch.dtype | None) -> tuple[dict[str, TensorInfo], dict[str, Any] | None]:
        p, base, label = self.adapter.parsed, self.base, self.label
        touched = [*p.modules, *p.replacements, *p.lora_biases, *p.token_rows]
        for name in touched:
            if name not in base.infos:
                tied = (
                    " (the base ties it to the input embedding and does not store it)"
                    if _VOCAB_NAME.match(name) else ""
                )  # fmt: skip
                raise MergeError(
                    f"adapter {label} changes {name}, which the base model {base.label} does not have{tied}"
                )
        shapes: dict[str, tuple[int, ...]] = {}
        cfg = dict(base.config) if base.config is not None else None
        base_vocab = cfg.get("vocab_size") if cfg else None
        for name, key in p.replacements.items():
            want, got = base.infos[name].shape, self.adapter.tensors.infos[key].shape
            if got != want:
                vocab_like = len(got) == len(want) and got[1:] == want[1:] and len(got) >= 1 and (
                    want[0] == base_vocab or _VOCAB_NAME.match(name)
                )  # fmt: skip
                if not vocab_like:
                    raise MergeError(
                        f"adapter {label}: tensor {key} has shape {tuple(got)} but {name} of the base has {tuple(want)}"
                    )
                shapes[name] = got
        new_vocab = {s[0] for s in shapes.values()}
        if len(new_vocab) > 1:
            raise MergeError(f"adapter {label} resizes the vocabulary to different sizes {sorted(new_vocab)}")
        if new_vocab and cfg is not None:
            cfg["vocab_size"] = next(iter(new_vocab))
            self.warnings.append(
                f"adapter {label} resizes the vocabulary from {base_vocab} to {cfg['vocab_size']} rows"
            )
        for name, mod in p.modules.items():
            shape = shapes.get(name, base.infos[name].shape)
            a, b = (self.adapter.tensors.infos[k].shape for k in (mod.a, mod.b))
            expect = (a[1], b[0]) if mod.transposed else (b[0], a[1])
            if len(shape) != 2 or tuple(shape) != expect:
                raise MergeError(
                    f"adapter {label}: the LoRA factors of {mod.module} give a delta of shape {expect}, but {name} "
                    f"has shape {tuple(shape)}"
                    + (" (fan_in_fan_out?)" if len(shape) == 2 and tuple(shape) == expect[::-1] else "")
                )
        for name, (key, _) in p.lora_biases.items():
            if base.infos[name].shape != self.adapter.tensors.infos[key].shape:
                raise MergeError(f"adapter {label}: {key} does not match the shape of {name}")
        for name, (key, rows) in p.token_rows.items():
            shape = shapes.get(name, base.infos[name].shape)
            got = self.adapter.tensors.infos[key].shape
            if (
                len(shape) != 2
                or tuple(got) != (len(rows), shape[1])
                or any(not 0 <= i < shape[0] for i in rows)
            ):
                raise MergeError(
                    f"adapter {label}: trainable tokens {key} do not fit {name} of shape {tuple(shape)}"
                )
        infos: dict[str, TensorInfo] = {}
        for name, info in base.infos.items():
            shape = shapes.get(name, info.shape)
            out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            source = (
                self.adapter.tensors.infos[p.replacements[name]].file if name in p.replacements else info.file
            )
            infos[name] = TensorInfo(name, out_dtype, tuple(shape), source)
        return infos, cfg

    # -- metadata -----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.infos)

    def natural_dtype(self, name: str) -> torch.dtype:
        """The dtype of tensor ``name`` in the merged model PEFT would give (the base's), whatever the presentation."""
        info = self.base.infos.get(name)
        return info.dtype if info is not None else self.infos[name].dtype

    def changed(self, name: str) -> bool:
        """Whether the adapter touches tensor ``name`` (every other tensor is the base's)."""
        p = self.adapter.parsed
        return name in p.modules or name in p.replacements or name in p.lora_biases or name in p.token_rows

    def low_rank(self, name: str) -> LoraModule | None:
        return self.adapter.parsed.modules.get(name)

    @property
    def bytes_read(self) -> int:
        return self.adapter.tensors.bytes_read + self.base.bytes_read

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    @property
    def tokenizer_folder(self) -> Path:
        """The adapter folder when it holds tokenizer files (a tokenizer saved with the adapter), else the base's."""
        if any((self.folder / f).is_file() for f in TOKENIZER_FILES):
            return self.folder
        return self.base.folder

    @property
    def side_folder(self) -> Path:
        """Where the merged model's config comes from: the base model's folder (an adapter has no config.json)."""
        return self.base.folder

    def file_list(self) -> list[dict[str, Any]]:
        files = [
            {"file": f, "bytes": (self.folder / f).stat().st_size}
            for f in [ADAPTER_CONFIG, *self.weight_files]
        ]
        return files + [{"file": f"base: {e['file']}", "bytes": e["bytes"]} for e in self.base.file_list()]

    def input_files(self) -> dict[str, Path]:
        """Every file this reader reads (for the output-path guard), by real location."""
        out = {
            f"{self.label} ({f})": Path(os.path.realpath(self.folder / f))
            for f in [ADAPTER_CONFIG, *self.weight_files]
        }
        for f in self.base.weight_files:
            out[f"{self.base.label} ({f})"] = Path(os.path.realpath(self.base.folder / f))
        return out

    # -- data ---------------------------------------------------------------------------------------------------
    def _factor(self, key: str, transposed: bool = False) -> torch.Tensor:
        """A whole factor (cached), or its transpose made contiguous."""
        if transposed:
            return self._cache.get(key + ".T", lambda: self.adapter.tensors.read(key).T.contiguous())
        return self._cache.get(key, lambda: self.adapter.tensors.read(key))

    def delta_rows(
        self, mod: LoraModule, r0: int, r1: int, work: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows [r0, r1) of δ = s·B·A in the layout of the base tensor (``work`` dtype).

        The product is accumulated rank by rank with element-wise multiply-adds (Σ_k b_k ⊗ a_k in k order), so a
        row's bytes depend only on that row's factors: any slice of the tensor gives the bytes of the whole (a
        matrix product's rounding may change with the number of rows), and a small read computes only its rows."""
        t = self.adapter.tensors
        lora_dtype = t.infos[mod.b].dtype
        if not mod.transposed:  # row i = Σ_k B[i, k] · A[k, :]
            left = t.read_flat_slice(mod.b, r0 * mod.rank, (r1 - r0) * mod.rank).reshape(r1 - r0, mod.rank)
            right = self._factor(mod.a)
        else:  # row i of (B·A)ᵀ = Σ_k A[k, i] · B[:, k]
            left = self._factor(mod.a)[:, r0:r1].T
            right = self._factor(mod.b, transposed=True)
        left, right = left.to(work), right.to(work)
        d = left[:, 0:1] * right[0]
        for k in range(1, mod.rank):
            d.addcmul_(left[:, k : k + 1], right[k])
        d.mul_(mod.scaling)
        if lora_dtype in (torch.float16, torch.bfloat16):  # PEFT rounds the delta to the adapter's dtype
            d = d.to(lora_dtype).to(work)
        return d

    def _stored(self, name: str, start: int, length: int) -> torch.Tensor:
        """Elements of the tensor θ_base (or its replacement) before the low-rank update."""
        key = self.adapter.parsed.replacements.get(name)
        if key is not None:
            return self.adapter.tensors.read_flat_slice(key, start, length)
        return self.base.read_flat_slice(name, start, length)

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self.read_flat_slice(name, 0, info.numel).reshape(info.shape)

    def read_flat_slice(self, name: str, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start+length)`` of the flattened θ (a fresh 1-D tensor in ``infos[name].dtype``)."""
        info = self.infos[name]
        start = max(0, int(start))
        length = max(0, min(int(length), info.numel - start))
        p = self.adapter.parsed
        x = self._stored(name, start, length)
        computed = name in p.modules or name in p.token_rows or name in p.lora_biases
        if not computed or length == 0:
            return x.to(info.dtype)
        work = _work_dtype(x.dtype, info.dtype)
        row = math.prod(info.shape[1:]) if len(info.shape) > 1 else 1
        r0, r1 = start // row, -(-(start + length) // row)
        if name in p.token_rows:
            key, rows = p.token_rows[name]
            x = self._token_block(key, rows, r0, r1, row, x, start)
        mod = p.modules.get(name)
        if mod is not None and name not in p.lora_biases:  # the common case, with one temporary: δ += θ_base
            d = self.delta_rows(mod, r0, r1, work).reshape(-1)
            off = start - r0 * row
            return d[off : off + length].add_(x).to(info.dtype)
        y = x.to(work)
        if name in p.lora_biases:
            key, s = p.lora_biases[name]
            b = self.adapter.tensors.read_flat_slice(key, start, length).to(work) * s
            if self.adapter.tensors.infos[key].dtype in (torch.float16, torch.bfloat16):
                b = b.to(self.adapter.tensors.infos[key].dtype).to(work)
            y = y + b
        mod = p.modules.get(name)
        if mod is not None:
            d = self.delta_rows(mod, r0, r1, work).reshape(-1)
            off = start - r0 * row
            y = y + d[off : off + length]
        return y.to(info.dtype)

    def _token_block(self, key, rows, r0, r1, row, x, start) -> torch.Tensor:
        """``x`` (elements from ``start``) with the trainable-token rows inside [r0, r1) replaced."""
        x = x.clone()
        for j, i in enumerate(rows):  # PEFT's index_copy: the last value for a repeated index wins
            if r0 <= i < r1:
                a, b = max(i * row, start), min((i + 1) * row, start + x.numel())
                if a < b:
                    vals = self.adapter.tensors.read_flat_slice(key, j * row + (a - i * row), b - a)
                    x[a - start : b - start] = vals.to(x.dtype)
        return x

    def close(self) -> None:
        self.adapter.close()
        self._cache = _FactorCache()
        if self.close_base:
            self.base.close()

    def __enter__(self) -> LoraModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def copy_adapter_tokenizer(reader, out_dir: str | os.PathLike, side: dict[str, Any]) -> None:
    """When ``reader`` is an adapter saved with its own tokenizer (e.g. with added tokens), replace the tokenizer
    files copied from its base in ``out_dir`` by the adapter's (``side``: the side-file record, updated)."""
    if not isinstance(reader, LoraModelReader) or reader.tokenizer_folder != reader.folder:
        return
    out_dir = Path(out_dir)
    for f in TOKENIZER_FILES:
        if (out_dir / f).is_file():
            (out_dir / f).unlink()
    copied = [f for f in TOKENIZER_FILES if (reader.folder / f).is_file()]
    for f in copied:
        shutil.copyfile(reader.folder / f, out_dir / f)
    side["copied"] = [f for f in side.get("copied", []) if f not in TOKENIZER_FILES] + copied
    side["tokenizer_source"] = str(reader.folder)


def resolve_base_model(
    pretrained: str | None,
    finetuned: Sequence[str],
    name_resolver: NameResolver | None = None,
) -> str:
    """The base model for a set of fine-tuned models or adapters: ``pretrained`` when given, else the
    ``base_model_name_or_path`` shared by every adapter among ``finetuned`` (a MergeError when there is none, or
    when adapters name different bases)."""
    if pretrained:
        return pretrained
    bases: dict[str, str] = {}
    for f in finetuned:
        try:
            folder = resolve_model_path(str(f), name_resolver)
        except MergeError:
            continue
        if is_lora_folder(folder):
            name = adapter_base_name(folder)
            if name is None:
                raise MergeError(
                    f"adapter {f} names no base model (base_model_name_or_path); give --pretrained_model_name"
                )
            bases[f] = name
    if not bases:
        raise MergeError(
            "no pretrained model given (--pretrained_model_name), and no adapter names its base model"
        )
    if len(set(bases.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in bases.items())
        raise MergeError(f"the adapters name different base models ({shown}); give --pretrained_model_name")
    return next(iter(bases.values()))


def open_model_or_adapter(
    name_or_path: str | os.PathLike,
    base: CheckpointReader | None,
    label: str | None = None,
    *,
    name_resolver: NameResolver | None = None,
    dtype: torch.dtype | None = None,
) -> CheckpointReader | LoraModelReader:
    """Open a fine-tuned model: a PEFT LoRA folder as a :class:`LoraModelReader` over ``base`` (which stays open
    when the reader closes), any other model folder as a :class:`CheckpointReader`."""
    folder = resolve_model_path(str(name_or_path), name_resolver)
    label = label or str(name_or_path)
    if is_lora_folder(folder):
        full = [f for f in FULL_WEIGHT_FILES if _exists(folder / f)]
        if full:
            raise MergeError(
                f"{folder} holds both a LoRA adapter ({ADAPTER_CONFIG}) and full model weights ({full[0]}); "
                "move one of them to its own folder"
            )
        if base is None:
            raise MergeError(f"{label} is a LoRA adapter; reading it needs its base model")
        reader = LoraModelReader(folder, base, label, dtype=dtype)
        named = reader.adapter.base_model_name_or_path
        if named:
            try:
                named_folder = resolve_model_path(named, name_resolver)
            except MergeError:
                named_folder = None
            if named_folder is not None and named_folder.resolve() != Path(base.folder).resolve():
                reader.warnings.append(
                    f"adapter {label} names {named} as its base, but {base.label} is used as the base"
                )
        return reader
    return CheckpointReader(folder, label)


# ----------------------------------------------------------------------------------------------------------------
# writing adapters
# ----------------------------------------------------------------------------------------------------------------


def module_kinds(config: dict[str, Any] | None, names: Iterable[str]) -> dict[str, str]:
    """``{module name: kind}`` (``linear``, ``embedding``, ``conv1d`` or ``other``) for the modules owning ``names``.

    The model class is built from ``config`` on the ``meta`` device (no memory, no weights) and its modules'
    types are read; when that is not possible (unknown architecture), a 2-D ``.weight`` is taken for a linear layer
    unless its name looks like an embedding."""
    modules = {n.rsplit(".", 1)[0] for n in names if "." in n}
    kinds: dict[str, str] = {}
    try:
        import transformers

        archs = (config or {}).get("architectures") or []
        cls = getattr(transformers, archs[0]) if archs else None
        model_config = transformers.AutoConfig.for_model(**config) if cls is not None else None
        if cls is not None:
            with torch.device("meta"):
                model = cls(model_config)
            from transformers.pytorch_utils import Conv1D

            for mname, mod in model.named_modules():
                if isinstance(mod, torch.nn.Embedding):
                    kinds[mname] = "embedding"
                elif isinstance(mod, Conv1D):
                    kinds[mname] = "conv1d"
                elif isinstance(mod, torch.nn.Linear):
                    kinds[mname] = "linear"
                else:
                    kinds[mname] = "other"
    except Exception:  # noqa: BLE001 - any failure falls back to the name rule below
        kinds = {}
    out = {}
    for m in modules:
        if m in kinds:
            out[m] = kinds[m]
        else:
            out[m] = "embedding" if re.search(r"(embed|wte|wpe|word_embeddings)", m) else "linear?"
    return out


def _matches_target(module: str, entry: str) -> bool:
    return module == entry or module.endswith("." + entry)


def _compress(chosen: set[str], all_modules: Iterable[str], plain_endswith: bool) -> list[str]:
    """A short list of PEFT module names selecting exactly ``chosen`` among ``all_modules``: a module's last name
    component when it selects no other module, else the full name. ``plain_endswith`` uses the ``modules_to_save``
    rule (``key.endswith(name)``) instead of the ``target_modules`` rule (exact or ``.name`` suffix)."""
    all_modules = set(all_modules) | chosen
    out: list[str] = []
    done: set[str] = set()
    for m in sorted(chosen):
        if m in done:
            continue
        short = m.rsplit(".", 1)[-1]
        hit = {x for x in all_modules if (x.endswith(short) if plain_endswith else _matches_target(x, short))}
        if hit <= chosen:
            out.append(short)
            done |= hit
        else:
            out.append(m)
            done.add(m)
    return sorted(set(out))


@dataclass
class _Pending:
    buffer: torch.Tensor | None  # whole tensor (LoRA targets)
    done: int = 0  # bytes received
    changed: bool = False  # non-targets: differs from the base somewhere


class LoraAdapterWriter:
    """Write a model's difference to ``base`` as a PEFT LoRA adapter (see the module docstring).

    ``specs`` lists every tensor as (name, dtype, shape), like
    :class:`~model_merging_methods.checkpoint_io.ShardedSafetensorsWriter`; tensors then arrive whole
    (:meth:`write`) or as consecutive parts (:meth:`write_at`, any thread, each tensor's parts in order). A LoRA
    module's tensor is buffered until complete and factorised at once (memory: one tensor per tensor in flight plus
    the SVD's work space); every other tensor is compared with the base as it arrives and spilled to a temporary file
    in ``out_dir``, from which :meth:`close` copies the changed modules (``modules_to_save``). A ``deferred`` writer
    spills every tensor (any order, :meth:`read_at` / :meth:`overwrite_at` allowed, as the streamed TIES needs) and
    factorises in :meth:`close`, one tensor at a time (disk: one model's size, temporarily). Give float32 specs
    for the most accurate factors.

    ``rank``: the LoRA rank (each module gets min(rank, out, in)); ``svd``: ``full`` (exact truncated SVD),
    ``randomized`` (a seeded randomized range finder with 4 power iterations, fast for r ≪ the dimensions) or
    ``auto`` (randomized when 4·(r + 10) ≤ min(out, in) and min(out, in) > 1024, full otherwise); ``full_modules``:
    regular expressions of modules to save whole (``modules_to_save``) instead of factorising; ``adapter_dtype``:
    the dtype of the saved factors (default float32).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        base: CheckpointReader,
        rank: int,
        *,
        svd: str = "auto",
        seed: int = 0,
        full_modules: Sequence[str] = (),
        adapter_dtype: torch.dtype = torch.float32,
        base_model_name_or_path: str | None = None,
        kinds: dict[str, str] | None = None,
        deferred: bool = False,
    ):
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise MergeError(f"lora_rank must be a positive integer, got {rank!r}")
        if svd not in ("auto", "full", "randomized"):
            raise MergeError(f"svd must be auto, full or randomized; got {svd!r}")
        self.out_dir, self.base, self.rank, self.svd, self.seed = Path(out_dir), base, rank, svd, int(seed)
        self.adapter_dtype = adapter_dtype
        self.base_model_name_or_path = base_model_name_or_path
        self.specs = {n: (d, tuple(int(s) for s in shape)) for n, d, shape in specs}
        self.bytes_written = 0
        for name, (_dtype, shape) in self.specs.items():
            info = base.infos.get(name)
            if info is None:
                raise MergeError(
                    f"tensor {name} is not in the base model {base.label}; an adapter cannot add tensors"
                )
            if tuple(info.shape) != shape:
                raise MergeError(
                    f"tensor {name} has shape {shape} but {tuple(info.shape)} in the base model {base.label}; a LoRA "
                    "adapter cannot change shapes (e.g. the vocabulary size): write a full model instead"
                )
        missing = sorted(
            set(base.infos) - set(self.specs) - {n for n in base.infos if n.endswith("inv_freq")}
        )
        if missing:
            raise MergeError(f"tensor {missing[0]} of the base model is missing from the model to write")
        self.kinds = kinds if kinds is not None else module_kinds(base.config, self.specs)
        full_res = [re.compile(p) for p in full_modules]
        conv = any(k == "conv1d" for k in self.kinds.values())
        self.fan_in_fan_out = conv
        self.targets: set[str] = set()
        for name, (dtype, shape) in self.specs.items():
            module, _, param = name.rpartition(".")
            kind = self.kinds.get(module, "other")
            want = "conv1d" if conv else "linear"
            if (
                param == "weight" and len(shape) == 2 and dtype.is_floating_point
                and kind in (want, "linear?" if not conv else want)
                and not any(r.search(module) for r in full_res)
            ):  # fmt: skip
                self.targets.add(name)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B)
        self.report: dict[str, dict[str, Any]] = {}
        self.unchanged: set[str] = set()
        self.deferred = bool(deferred)
        spill = [(n, d, s) for n, (d, s) in self.specs.items() if self.deferred or n not in self.targets]
        self._spill_dir = self.out_dir / ".lora_spill.tmp"
        self._spill = (
            ShardedSafetensorsWriter(self._spill_dir, spill, max_shard_size=1 << 62) if spill else None
        )

    # -- receiving ----------------------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name}: got {tensor.dtype} {tuple(tensor.shape)}, planned {dtype} {shape}"
            )
        self.write_at(name, 0, tensor)

    def write_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        """Receive ``part`` (row-major elements of ``name`` in its planned dtype) at ``byte_offset``. Unless the
        writer is ``deferred``, a tensor's parts must come in order (the streaming executor writes them so)."""
        if name not in self.specs:
            raise ValueError(f"tensor {name} is not in the writer's plan")
        dtype, shape = self.specs[name]
        if part.dtype != dtype:
            raise ValueError(f"tensor {name}: part has dtype {part.dtype}, planned {dtype}")
        item = part.element_size()
        total = math.prod(shape) * item
        n = part.numel()
        if byte_offset < 0 or byte_offset + n * item > total:
            raise ValueError(f"tensor {name}: more data than its planned shape")
        flat = part.detach().reshape(-1)
        if self.deferred:  # everything goes to the spill file; factorised and compared in close()
            self._spill.write_at(name, byte_offset, flat)
            with self._lock:
                pend = self._pending.setdefault(name, _Pending(None))
                pend.done += n * item
                self.bytes_written += n * item
            return
        with self._lock:
            pend = self._pending.get(name)
            if pend is None:
                buf = torch.empty(shape, dtype=dtype) if name in self.targets else None
                pend = self._pending[name] = _Pending(buf)
        if byte_offset != pend.done:
            raise ValueError(
                f"tensor {name}: parts must arrive in order (got offset {byte_offset}, expected {pend.done})"
            )
        start = byte_offset // item
        if pend.buffer is not None:
            pend.buffer.view(-1)[start : start + n] = flat
        else:
            if not pend.changed and self._differs(name, start, flat):
                pend.changed = True
            self._spill.write_at(name, byte_offset, flat)
        pend.done += n * item
        self.bytes_written += n * item
        if pend.done == total:
            if pend.buffer is not None:
                self._factorise(name, pend.buffer)
            with self._lock:
                self._pending[name] = _Pending(None, total, pend.changed or pend.buffer is not None)

    def _differs(self, name: str, start: int, flat: torch.Tensor) -> bool:
        base = self.base.read_flat_slice(name, start, flat.numel())
        if torch.equal(base.to(flat.dtype), flat):
            return False
        if not flat.dtype.is_floating_point:
            raise MergeError(
                f"tensor {name} ({torch_dtype_name(flat.dtype)}) differs from the base model; a LoRA adapter can "
                "only change float tensors"
            )
        return True

    def read_at(self, name: str, byte_offset: int, nbytes: int) -> bytearray:
        """Read back bytes written so far (``deferred`` writers only: the streaming TIES patches its results)."""
        if not self.deferred:
            raise ValueError("read_at needs a deferred LoraAdapterWriter")
        return self._spill.read_at(name, byte_offset, nbytes)

    def overwrite_at(self, name: str, byte_offset: int, part: torch.Tensor) -> None:
        """Replace bytes already written (``deferred`` writers only)."""
        if not self.deferred:
            raise ValueError("overwrite_at needs a deferred LoraAdapterWriter")
        self._spill.overwrite_at(name, byte_offset, part)

    # -- factorising --------------------------------------------------------------------------------------------
    def _factorise(self, name: str, theta: torch.Tensor) -> None:
        module = name.rsplit(".", 1)[0]
        work = _work_dtype(theta.dtype, self.base.infos[name].dtype)
        delta = theta.to(work) - self.base.read(name).to(work)
        if self.fan_in_fan_out:
            delta = delta.T
        out_f, in_f = delta.shape
        norm = float(torch.linalg.matrix_norm(delta))
        if norm == 0.0:
            with self._lock:
                self.unchanged.add(name)
                self.report[module] = {
                    "kind": "unchanged",
                    "shape": [out_f, in_f],
                    "rank": 0,
                    "relative_error": 0.0,
                }
            return
        k = min(self.rank, out_f, in_f)
        u, s, vh, how = self._svd(name, delta, k)
        root = s.sqrt()
        b = u * root
        a = root[:, None] * vh
        err = float(torch.linalg.matrix_norm(delta - b @ a)) / norm
        with self._lock:
            self.factors[module] = (
                a.to(self.adapter_dtype).contiguous(),
                b.to(self.adapter_dtype).contiguous(),
            )
            self.report[module] = {
                "kind": "lora", "shape": [out_f, in_f], "rank": k, "svd": how, "relative_error": err,
                "delta_frobenius_norm": norm,
            }  # fmt: skip

    def _svd(self, name: str, delta: torch.Tensor, k: int):
        m = min(delta.shape)
        randomized = self.svd == "randomized" or (self.svd == "auto" and 4 * (k + 10) <= m and m > 1024)
        if randomized and k + 10 < m:
            u, s, vh = randomized_svd(
                delta, k, tensor_generator(self.seed, name), oversample=10, power_iterations=4
            )
            return u, s, vh, "randomized"
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        return u[:, :k], s[:k], vh[:k], "full"

    # -- finishing ----------------------------------------------------------------------------------------------
    def _task_type(self) -> str | None:
        archs = (self.base.config or {}).get("architectures") or []
        arch = archs[0] if archs else ""
        for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                             ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):  # fmt: skip
            if arch.endswith(suffix):
                return task
        return None

    def close(self) -> dict[str, Any]:
        """Check that every tensor arrived, write ``adapter_model.safetensors`` and ``adapter_config.json``; return
        the report (per module: kind, shape, rank, relative Frobenius error)."""
        incomplete = [
            n for n, (d, s) in self.specs.items() if self._done_bytes(n) != math.prod(s) * _itemsize(d)
        ]
        if incomplete:
            raise ValueError(
                f"adapter writer closed with {len(incomplete)} tensors incomplete (first: {incomplete[0]})"
            )
        if self._spill is not None:
            self._spill.close()
            self._spilled = CheckpointReader(self._spill_dir, "spilled tensors")
        try:
            if self.deferred:
                self._finish_deferred()
            return self._finish()
        finally:
            if self._spilled is not None:
                self._spilled.close()
            shutil.rmtree(self._spill_dir, ignore_errors=True)

    def _finish_deferred(self) -> None:
        """Factorise the spilled LoRA modules and find the changed other tensors (one tensor in memory at a time)."""
        for name in self.specs:
            if name in self.targets:
                self._factorise(name, self._spilled.read(name))
                self._pending[name].changed = True
                continue
            numel = math.prod(self.specs[name][1])
            for start in range(0, numel, ROW_BLOCK_ELEMENTS):
                part = self._spilled.read_flat_slice(name, start, min(ROW_BLOCK_ELEMENTS, numel - start))
                if self._differs(name, start, part):
                    self._pending[name].changed = True
                    break

    def _done_bytes(self, name: str) -> int:
        pend = self._pending.get(name)
        return pend.done if pend is not None else 0

    def _finish(self) -> dict[str, Any]:
        peft = _peft()
        changed = {n for n, p in self._pending.items() if p.changed and n not in self.targets}
        target_modules = set(self.factors)
        base_bias: list[str] = []
        save_modules: set[str] = set()
        for name in sorted(changed):
            module, _, param = name.rpartition(".")
            if module in target_modules and param == "bias":
                base_bias.append(name)
            elif module in target_modules:
                raise MergeError(
                    f"tensor {name} changed, but its module {module} is a LoRA module (only its bias may)"
                )
            else:
                save_modules.add(module)
        all_modules = {n.rsplit(".", 1)[0] for n in self.specs}
        # tensors of the adapter file, in PEFT's naming
        tensors: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], Any]]] = []
        for module in sorted(target_modules):
            a, b = self.factors[module]
            tensors.append((f"{PEFT_PREFIX}{module}.lora_A.weight", a.dtype, tuple(a.shape), lambda a=a: a))
            tensors.append((f"{PEFT_PREFIX}{module}.lora_B.weight", b.dtype, tuple(b.shape), lambda b=b: b))
        copies = [n for n in self.specs if n.rpartition(".")[0] in save_modules]
        for name in sorted(copies) + base_bias:
            module, _, param = name.rpartition(".")
            key = f"{PEFT_PREFIX}{module}.base_layer.{param}" if name in base_bias else f"{PEFT_PREFIX}{name}"
            dtype, shape = self.specs[name]
            tensors.append((key, dtype, shape, lambda name=name: name))
            report_kind = "base_layer.bias" if name in base_bias else "modules_to_save"
            self.report.setdefault(module, {"kind": report_kind, "tensors": []}).setdefault(
                "tensors", []
            ).append(name)
        if not tensors:
            raise MergeError("the model equals the base model: there is nothing to write as an adapter")
        writer = ShardedSafetensorsWriter(
            self.out_dir, [(k, d, s) for k, d, s, _ in tensors], max_shard_size=1 << 62
        )
        try:
            for key, dtype, shape, get in tensors:
                value = get()
                if isinstance(value, torch.Tensor):
                    writer.write(key, value)
                else:  # copy from the spill file in row blocks
                    self._copy_spilled(writer, key, value, dtype, shape)
        except BaseException:
            writer.abort()
            raise
        files = writer.close()
        os.replace(self.out_dir / files[0], self.out_dir / ADAPTER_WEIGHTS)
        saved = _compress(save_modules, all_modules, True)
        if any(re.match(rf"(^|.*\.){m}($|\..*)", t) for m in saved for t in target_modules):
            saved = sorted(
                save_modules
            )  # PEFT would exclude a LoRA module matching a short name: be explicit
        ranks = {m: int(self.factors[m][0].shape[0]) for m in target_modules}
        rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != self.rank}
        config = peft.LoraConfig(
            r=self.rank, lora_alpha=self.rank, target_modules=_compress(target_modules, all_modules, False) or None,
            rank_pattern=rank_pattern, alpha_pattern=dict(rank_pattern), fan_in_fan_out=self.fan_in_fan_out,
            bias="lora_only" if base_bias else "none",
            modules_to_save=saved or None, lora_dropout=0.0,
            base_model_name_or_path=self.base_model_name_or_path, task_type=self._task_type(),
            init_lora_weights=True,
        )  # fmt: skip
        if not target_modules:
            config.target_modules = []
        config.inference_mode = True
        config.save_pretrained(str(self.out_dir))
        return {
            "rank": self.rank, "lora_modules": len(target_modules), "modules_to_save": sorted(save_modules),
            "base_layer_biases": base_bias, "unchanged_modules": sorted(m.rsplit(".", 1)[0] for m in self.unchanged),
            "fan_in_fan_out": self.fan_in_fan_out, "modules": dict(sorted(self.report.items())),
            "bytes_adapter": (self.out_dir / ADAPTER_WEIGHTS).stat().st_size,
        }  # fmt: skip

    def _copy_spilled(self, writer: ShardedSafetensorsWriter, key: str, name: str, dtype, shape) -> None:
        numel = math.prod(shape)
        offset = 0
        for start in range(0, numel, ROW_BLOCK_ELEMENTS):
            part = self._spilled.read_flat_slice(name, start, min(ROW_BLOCK_ELEMENTS, numel - start))
            writer.write_at(key, offset, part)
            offset += part.numel() * part.element_size()

    def abort(self) -> None:
        """Close the spill file (like the sharded writer's ``abort``: the caller removes the output folder, and
        :meth:`close` may still follow)."""
        if self._spill is not None:
            self._spill.abort()


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def randomized_svd(
    m: torch.Tensor, k: int, generator: torch.Generator, oversample: int = 10, power_iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets of ``m`` by a randomized range finder (Halko, Martinsson & Tropp 2011,
    Alg. 4.4: Gaussian test matrix from ``generator``, re-orthonormalised power iterations)."""
    rows, cols = m.shape
    q = min(k + oversample, rows, cols)
    omega = torch.randn(cols, q, generator=generator, dtype=m.dtype)
    basis, _ = torch.linalg.qr(m @ omega)
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(m.T @ basis)
        basis, _ = torch.linalg.qr(m @ z)
    ub, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


# ----------------------------------------------------------------------------------------------------------------
# extraction
# ----------------------------------------------------------------------------------------------------------------


def feed_reader(
    writer: LoraAdapterWriter, reader, names: Iterable[str], dtype: torch.dtype | None = None
) -> None:
    """Send ``reader``'s tensors to ``writer`` in row blocks (cast to the writer's planned dtypes)."""
    for name in names:
        want, shape = writer.specs[name]
        numel = math.prod(shape)
        row = math.prod(shape[1:]) if len(shape) > 1 else 1
        step = max(row, (ROW_BLOCK_ELEMENTS // row) * row)
        offset = 0
        for start in range(0, numel, step):
            part = reader.read_flat_slice(name, start, min(step, numel - start)).to(want)
            writer.write_at(name, offset, part)
            offset += part.numel() * part.element_size()


def extract_lora(
    pretrained: str,
    finetuned: str,
    output_path: str,
    rank: int,
    *,
    svd: str = "auto",
    seed: int = 0,
    full_modules: Sequence[str] = (),
    adapter_dtype: str = "float32",
    overwrite: bool = False,
    name_resolver: NameResolver | None = None,
) -> dict[str, Any]:
    """Extract a rank-``rank`` LoRA adapter of ``finetuned`` (a full model, or an adapter to re-factorise) against
    ``pretrained``, module by module, into a new adapter folder at ``output_path`` (published atomically; refused
    when it overlaps an input). Returns the report (also written to ``lora_report.json`` in the folder)."""
    import time

    from model_merging_methods.checkpoint_io import DTYPES_BY_NAME
    from model_merging_methods.paths import guard_outputs
    from model_merging_methods.publish import atomic_output_dir, check_output_path, write_json

    start = time.time()
    if adapter_dtype not in DTYPES_BY_NAME:
        raise MergeError(f"adapter dtype must be one of {', '.join(DTYPES_BY_NAME)}; got {adapter_dtype!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeError(f"lora_rank must be a positive integer, got {rank!r}")
    base_folder = resolve_model_path(str(pretrained), name_resolver)
    ft_folder = resolve_model_path(str(finetuned), name_resolver)
    guard_outputs({"--output_path": output_path}, {"pretrained": base_folder, "finetuned": ft_folder})
    target = check_output_path(output_path, overwrite)
    base = CheckpointReader(base_folder, f"pretrained {pretrained}")
    try:
        ft = open_model_or_adapter(ft_folder, base, f"finetuned {finetuned}", dtype=torch.float32)
        try:
            files = {f"pretrained ({f})": base_folder / f for f in base.weight_files}
            files.update(ft.input_files() if isinstance(ft, LoraModelReader) else
                         {f"finetuned ({f})": ft_folder / f for f in ft.weight_files})  # fmt: skip
            guard_outputs({"--output_path": target}, {k: Path(os.path.realpath(v)) for k, v in files.items()})
            names = [n for n in base.names() if not n.endswith("rotary_emb.inv_freq")]
            for n in names:
                if n not in ft.infos:
                    raise MergeError(f"tensor {n} is in the base model but not in {finetuned}")
            extra = sorted(set(ft.infos) - set(base.infos))
            extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]
            if extra:
                raise MergeError(f"tensor {extra[0]} is in {finetuned} but not in the base model")
            specs = [
                (
                    n,
                    torch.float32 if base.infos[n].dtype.is_floating_point else base.infos[n].dtype,
                    ft.infos[n].shape,
                )
                for n in names
            ]
            with atomic_output_dir(target, overwrite, kind="LoRA adapter (extract_lora)") as tmp:
                writer = LoraAdapterWriter(
                    tmp, specs, base, rank, svd=svd, seed=seed, full_modules=full_modules,
                    adapter_dtype=DTYPES_BY_NAME[adapter_dtype], base_model_name_or_path=str(pretrained),
                )  # fmt: skip
                try:
                    feed_reader(writer, ft, names)
                    summary = writer.close()
                except BaseException:
                    writer.abort()
                    raise
                report = {
                    "tool": "dare-merging-toolkit extract_lora",
                    "pretrained": str(pretrained), "finetuned": str(finetuned), "svd": svd, "seed": int(seed),
                    "adapter_dtype": adapter_dtype, "full_modules": list(full_modules), **summary,
                    "bytes_read": base.bytes_read + (ft.adapter.tensors.bytes_read if isinstance(ft, LoraModelReader)
                                                     else ft.bytes_read),
                    "wall_time_s": round(time.time() - start, 3),
                }  # fmt: skip
                write_json(tmp / REPORT_FILE, report)
        finally:
            ft.close()
    finally:
        base.close()
    report["output_path"] = str(target)
    return report
