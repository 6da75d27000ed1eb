"""What a merge will read and write, tensor by tensor: the plan.

:func:`open_inputs` resolves and opens every model, checks homology (architectures, names, shapes, dtypes) and plans
the alignment of vocabularies; each output tensor gets a :class:`TensorPlan` (aligned shape, per-model rows and
dtypes, output dtype, whether it is excluded) and :class:`Inputs` serves aligned, upcast row blocks of any model.
Both executors (in memory and streamed) walk the same plans and the same blocks.

Vocabulary alignment (``vocab_policy``): tensors whose first dimension equals each model's ``vocab_size`` may
differ in rows across models (e.g. 32000 vs 32001 with a ``[PAD]`` row). ``pad_mean`` (the original's policy,
§6.2 of the spec) extends every smaller model to the largest vocabulary with rows equal to the mean of its own rows;
``truncate`` keeps the first rows common to all; ``error`` refuses; ``union`` builds the union of the models'
tokenizers by token string (:mod:`model_merging_methods.vocab`): each model's rows are placed at their tokens' union
rows, a token only some models added is merged from those models only. Any other shape mismatch is an error.

Fine-tuned models may be PEFT LoRA adapters (:mod:`model_merging_methods.lora`): they are read as
θ_base + s·B·A over the base model's reader (index 0), in float32 when the base is in half precision (the adapter's
delta is small: rounding θ to bfloat16 would lose much of it); their output dtype is the base tensor's.

Homology statistics: :func:`delta_statistics` samples |δ| = |θ_ft − θ_pre| of every tensor (up to 4 blocks of 4096
elements per tensor) for per-model max / 99th / 99.9th percentile |δ|, and :func:`delta_warnings` flags deltas far
outside DARE's regime (the paper: works for |δ| ≲ 0.005, fails around 0.03).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model_merging_methods.errors import MergeError
from model_merging_methods.mask_weights_utils import compute_dtype, is_excluded
from model_merging_methods.reader import CheckpointReader, NameResolver, resolve_model_path
from model_merging_methods.threads import torch_threads

CHUNK_ELEMENTS = 1 << 18  # elements per row block of one model (1 MiB in float32: stays in the CPU cache)
MEAN_BLOCK_ROWS = (
    1024  # row block of the float64 sums behind pad_mean rows (fixed, so the mean is repeatable)
)
VOCAB_POLICIES = ("pad_mean", "truncate", "error", "union", "auto")
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")
# non-parameter buffers that some checkpoints carry (never merged, not written: transformers recomputes them)
BUFFER_PATTERNS = (r".*rotary_emb\.inv_freq$",)
VOCAB_NAME_PATTERN = r".*(embed_tokens|lm_head|wte|embed_out|word_embeddings|output)\b.*"
# DARE's regime (paper, §4.4/Fig. 4): works for |δ| within ~0.005, breaks around 0.03
DELTA_OK = 0.005
DELTA_WARN = 0.015
_PROBE_BLOCKS, _PROBE_LEN, _PROBE_SAMPLES = 4, 4096, 1 << 19  # blocks/tensor, max block length, budget/model


@dataclass
class TensorPlan:
    """One output tensor: its aligned shape, which models need padding/truncation, its output dtype."""

    name: str
    shape: tuple[int, ...]  # aligned (output) shape
    rows: dict[int, int]  # model index -> rows on disk (dim 0)
    dtypes: dict[int, torch.dtype]
    out_dtype: torch.dtype
    is_float: bool
    vocab: bool = False
    excluded: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_size(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def blocks(self, whole: bool = False) -> list[tuple[int, int]]:
        """Row ranges of at most :data:`CHUNK_ELEMENTS` elements (one range when ``whole`` or 0-dim)."""
        if not self.shape:
            return [(0, 1)]
        rows = self.shape[0]
        if whole or rows == 0:
            return [(0, rows)]
        step = max(1, CHUNK_ELEMENTS // max(1, self.row_size))
        return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _row_sum_f64(blocks: Iterator[torch.Tensor]) -> torch.Tensor:
    """Σ over rows in float64, one fixed block of rows at a time on one thread (repeatable to the bit)."""
    total = None
    with torch_threads(1):
        for block in blocks:
            s = block.to(torch.float64).sum(0)
            total = s if total is None else total + s
    return total


def mean_row(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor's rows (float64 sums over blocks of :data:`MEAN_BLOCK_ROWS` rows), in its dtype."""
    rows = tensor.shape[0]
    total = _row_sum_f64(tensor[r : r + MEAN_BLOCK_ROWS] for r in range(0, rows, MEAN_BLOCK_ROWS))
    return (total / rows).to(torch.float32).to(tensor.dtype)


def pad_rows_with_mean(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The original's vocabulary resize (§6.2): append rows equal to the mean of the existing rows up to ``rows``."""
    if rows <= tensor.shape[0]:
        return tensor[:rows]
    extra = mean_row(tensor).unsqueeze(0).expand(rows - tensor.shape[0], *tensor.shape[1:])
    return torch.cat([tensor, extra], 0)


@dataclass
class Inputs:
    """Opened, checked and aligned input models. Index 0 is the reference model (pretrained / base)."""

    readers: list[CheckpointReader]
    labels: list[str]
    plans: dict[str, TensorPlan]
    vocab_policy: str
    vocab_actions: list[dict[str, Any]] = field(default_factory=list)
    ignored_buffers: list[str] = field(default_factory=list)
    union: Any = None  # model_merging_methods.vocab.UnionVocab with vocab_policy "union"
    _mean_rows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    _checked: set[tuple[int, str]] = field(default_factory=set)

    @property
    def vocab_rows(self) -> int | None:
        rows = {p.shape[0] for p in self.plans.values() if p.vocab}
        return max(rows) if rows else None

    def model_vocab_rows(self, m: int) -> int | None:
        rows = [p.rows[m] for p in self.plans.values() if p.vocab]
        return max(rows) if rows else None

    # -- data -------------------------------------------------------------------------------------------------
    def _mean_row(self, m: int, plan: TensorPlan) -> torch.Tensor:
        key = (m, plan.name)
        if key not in self._mean_rows:
            reader, rows, rs = self.readers[m], plan.rows[m], plan.row_size
            blocks = (
                reader.read_flat_slice(plan.name, r * rs, min(MEAN_BLOCK_ROWS, rows - r) * rs).reshape(
                    -1, *plan.shape[1:]
                )
                for r in range(0, rows, MEAN_BLOCK_ROWS)
            )
            total = _row_sum_f64(blocks)
            self._mean_rows[key] = (total / rows).to(torch.float32).to(plan.dtypes[m])
        return self._mean_rows[key]

    def block(self, m: int, plan: TensorPlan, r0: int, r1: int, upcast: bool = True) -> torch.Tensor:
        """Rows [r0, r1) of model m's tensor, aligned to the output vocabulary, upcast to the compute dtype."""
        reader, name = self.readers[m], plan.name
        if not plan.shape:
            x = reader.read(name)
        elif plan.vocab and self.union is not None:
            x = self.union_blocks(plan, r0, r1, [m])[0][m]
        else:
            have = plan.rows[m]
            rs = plan.row_size
            stored = max(0, min(r1, have) - r0)
            x = reader.read_flat_slice(name, r0 * rs, stored * rs).reshape(stored, *plan.shape[1:])
            if stored < r1 - r0:  # rows beyond this model's vocabulary: the mean row (pad_mean)
                pad = self._mean_row(m, plan).unsqueeze(0).expand(r1 - r0 - stored, *plan.shape[1:])
                x = torch.cat([x, pad], 0)
        if plan.is_float and (m, name) not in self._checked:
            # NaN and Inf propagate through a sum; only a non-finite sum needs the exact (slow) element check
            if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
                raise MergeError(f"tensor {name} of {self.labels[m]} contains NaN or Inf")
            if r1 >= (plan.shape[0] if plan.shape else 1):
                self._checked.add((m, name))
        if plan.is_float and upcast:
            x = x.to(compute_dtype(x.dtype))
        return x

    def union_blocks(self, plan: TensorPlan, r0: int, r1: int, models: Sequence[int] | None = None):
        """(blocks, fixed) of a vocabulary tensor under the union vocabulary (see
        :meth:`~model_merging_methods.vocab.UnionVocab.aligned_rows`): model rows at their union rows, and the rows
        whose merged value is fixed (new tokens: their owners' mean; padding: the base's mean row)."""
        rs, tail = plan.row_size, plan.shape[1:]

        def read_rows(m: int, a: int, b: int) -> torch.Tensor:
            return self.readers[m].read_flat_slice(plan.name, a * rs, (b - a) * rs).reshape(b - a, *tail)

        return self.union.aligned_rows(r0, r1, read_rows, lambda m: self._mean_row(m, plan), models)

    def fixed_rows(self, plan: TensorPlan, r0: int, r1: int):
        """None, or (mask, float32 values) of the rows [r0, r1) whose merged value is fixed (union vocabulary)."""
        if self.union is None or not plan.vocab:
            return None
        return self.union_blocks(plan, r0, r1, [])[1]

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _config_vocab(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    if isinstance(config.get("vocab_size"), int) and not isinstance(config["vocab_size"], bool):
        return config["vocab_size"]
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("vocab_size"), int):
        return text["vocab_size"]
    return None


def resolve_vocab_policy(policy: str, readers: Sequence[CheckpointReader]) -> str:
    """``auto`` → ``pad_mean`` for LLaMA-family models (the original's policy), ``error`` otherwise."""
    if policy not in VOCAB_POLICIES:
        raise MergeError(f"vocab_policy must be one of {', '.join(VOCAB_POLICIES)}; got {policy!r}")
    if policy != "auto":
        return policy
    types = {str((r.config or {}).get("model_type")) for r in readers}
    return "pad_mean" if types and all(t in LLAMA_FAMILY for t in types) else "error"


def open_inputs(
    paths: Sequence[str],
    labels: Sequence[str],
    vocab_policy: str,
    exclude_param_names_regex: Sequence[str] = (),
    out_dtype: torch.dtype | None = None,
    dtype_from: int = 0,
    name_resolver: NameResolver | None = None,
    pad_to_multiple_of: int | None = None,
) -> Inputs:
    """Resolve and open every model, check homology (architectures, names, shapes) and plan the alignment.

    ``dtype_from`` is the model whose dtype each output tensor keeps when ``out_dtype`` is None (the model the
    core would cast back to: the pretrained model for task arithmetic/TIES, the first model for averaging).
    ``name_resolver`` maps short model names to hub ids (see :func:`resolve_model_path`). Models after the first
    may be PEFT LoRA adapters of the first. ``pad_to_multiple_of`` rounds the union vocabulary's rows up.
    """
    readers: list[CheckpointReader] = []
    try:
        for m, (p, label) in enumerate(zip(paths, labels)):
            folder = resolve_model_path(str(p), name_resolver)
            if m > 0 and _is_adapter(folder):
                from model_merging_methods.lora import open_model_or_adapter

                base = readers[0]
                half = any(i.dtype in (torch.float16, torch.bfloat16) for i in base.infos.values())
                reader = open_model_or_adapter(
                    folder, base, label, name_resolver=name_resolver, dtype=torch.float32 if half else None
                )
            else:
                reader = CheckpointReader(folder, label)
            if reader.config is None:
                raise MergeError(f"no config.json in {folder} ({label})")
            readers.append(reader)
        return _plan_inputs(
            readers, list(labels), vocab_policy, exclude_param_names_regex, out_dtype, dtype_from,
            pad_to_multiple_of,
        )  # fmt: skip
    except BaseException:
        for r in readers:
            r.close()
        raise


def _is_adapter(folder) -> bool:
    from model_merging_methods.lora import is_lora_folder

    return is_lora_folder(folder)


def natural_dtype(reader, name: str) -> torch.dtype:
    """The dtype a model's tensor has as a checkpoint (an adapter presented in float32: its base's)."""
    natural = getattr(reader, "natural_dtype", None)
    return natural(name) if natural is not None else reader.infos[name].dtype


def _tokenizer_folder(reader):
    return getattr(reader, "tokenizer_folder", None) or reader.folder


def _union_vocab(readers, labels, vocab_sizes, pad_to_multiple_of):
    """The union vocabulary of the models' tokenizers (:func:`~model_merging_methods.vocab.build_union_vocab`)."""
    from model_merging_methods.vocab import build_union_vocab, check_tied_embeddings

    check_tied_embeddings([r.config for r in readers], labels)
    return build_union_vocab(
        [_tokenizer_folder(r) for r in readers], labels, embedding_rows=vocab_sizes,
        pad_to_multiple_of=pad_to_multiple_of,
    )  # fmt: skip


def _plan_inputs(
    readers: list[CheckpointReader],
    labels: list[str],
    vocab_policy: str,
    exclude: Sequence[str],
    out_dtype: torch.dtype | None,
    dtype_from: int,
    pad_to_multiple_of: int | None = None,
) -> Inputs:
    # architectures
    ref_cfg = readers[0].config or {}
    for r, label in zip(readers[1:], labels[1:]):
        cfg = r.config or {}
        for key in ("model_type", "architectures"):
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise MergeError(
                    f"models of different architectures: {labels[0]} has {key}={ref_cfg[key]} but {label} has "
                    f"{key}={cfg[key]}"
                )
    policy = resolve_vocab_policy(vocab_policy, readers)
    vocab_sizes = [_config_vocab(r.config) for r in readers]
    if pad_to_multiple_of is not None and policy != "union":
        raise MergeError("pad_to_multiple_of needs vocab_policy union")
    union = _union_vocab(readers, labels, vocab_sizes, pad_to_multiple_of) if policy == "union" else None
    ignored: set[str] = set()
    names_per_model = []
    for r in readers:
        names = [n for n in r.names() if not any(re.match(p, n) for p in BUFFER_PATTERNS)]
        ignored |= set(r.names()) - set(names)
        names_per_model.append(names)
    ref_names = names_per_model[0]
    ref_set = set(ref_names)
    for names, label in zip(names_per_model[1:], labels[1:]):
        missing = sorted(ref_set - set(names))
        extra = sorted(set(names) - ref_set)
        if missing:
            raise MergeError(f"tensor {missing[0]} is in {labels[0]} but missing in {label}")
        if extra:
            raise MergeError(f"tensor {extra[0]} is in {label} but missing in {labels[0]}")
    plans: dict[str, TensorPlan] = {}
    actions: list[dict[str, Any]] = []
    for name in ref_names:
        infos = [r.infos[name] for r in readers]
        shapes = [i.shape for i in infos]
        dtypes = {m: i.dtype for m, i in enumerate(infos)}
        is_float = all(d.is_floating_point for d in dtypes.values())
        if not is_float and len(set(dtypes.values())) > 1:
            raise MergeError(
                f"tensor {name} has dtypes {sorted({str(d) for d in dtypes.values()})} across the models"
            )
        shape = shapes[0]
        vocab = False
        union_rows = union is not None and _is_vocab_tensor(name, shapes, vocab_sizes) and is_float
        if union_rows:
            shape = (union.size, *shapes[0][1:])
            vocab = True
        elif len(set(shapes)) > 1:
            same_tail = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
            rows_match_config = all(v is None or s[0] == v for s, v in zip(shapes, vocab_sizes))
            known = any(v is not None for v in vocab_sizes) or re.match(VOCAB_NAME_PATTERN, name)
            if not (same_tail and rows_match_config and known and is_float):
                a, b = next(
                    (i, j) for i in range(len(shapes)) for j in range(len(shapes)) if shapes[i] != shapes[j]
                )
                raise MergeError(
                    f"tensor {name} has shape {tuple(shapes[a])} in {labels[a]} but {tuple(shapes[b])} in {labels[b]}"
                )
            if policy == "error":
                rows = ", ".join(f"{s[0]} rows in {label}" for s, label in zip(shapes, labels))
                raise MergeError(
                    f"vocabulary sizes differ: tensor {name} has {rows} "
                    "(use --vocab_policy pad_mean or truncate to align them)"
                )
            target = max(s[0] for s in shapes) if policy == "pad_mean" else min(s[0] for s in shapes)
            shape = (target, *shapes[0][1:])
            vocab = True
            for m, s in enumerate(shapes):
                if s[0] != target:
                    actions.append(
                        {
                            "model": labels[m],
                            "tensor": name,
                            "rows": s[0],
                            "to_rows": target,
                            "action": "pad_mean" if s[0] < target else "truncate",
                        }  # fmt: skip
                    )
        od = (out_dtype or natural_dtype(readers[dtype_from], name)) if is_float else dtypes[0]
        plans[name] = TensorPlan(
            name=name,
            shape=tuple(shape),
            rows={m: (s[0] if s else 1) for m, s in enumerate(shapes)},
            dtypes=dtypes,
            out_dtype=od,
            is_float=is_float,
            vocab=vocab,
            excluded=is_excluded(name, exclude),
        )
    if union is not None:
        if not any(p.vocab for p in plans.values()):
            raise MergeError(
                "vocab_policy union: no tensor has a row per token (config vocab_size) in every model"
            )
        actions.append(union.manifest())
    return Inputs(readers, labels, plans, policy, actions, sorted(ignored), union)


def _is_vocab_tensor(name: str, shapes: Sequence[tuple[int, ...]], vocab_sizes: Sequence[int | None]) -> bool:
    """A tensor with one row per token: a vocabulary-like name and, in every model, as many rows as its config's
    vocab_size (or, where a config has none, a row count that differs between models)."""
    if not re.match(VOCAB_NAME_PATTERN, name) or any(len(s) < 2 for s in shapes):
        return False
    if len({s[1:] for s in shapes}) != 1:
        return False
    if all(v is not None for v in vocab_sizes):
        return all(s[0] == v for s, v in zip(shapes, vocab_sizes))
    return len({s[0] for s in shapes}) > 1


def delta_statistics(inputs: Inputs, base: int = 0, models: Sequence[int] | None = None) -> dict[str, Any]:
    """Sampled |δ| statistics of each model against model ``base``: 4 evenly spaced blocks per tensor (inside the
    rows all models share; about 2^19 samples per model in all): max, 99th and 99.9th percentile, mean and the
    fraction of exact zeros."""
    models = [m for m in range(len(inputs.readers)) if m != base] if models is None else list(models)
    samples: dict[int, list[torch.Tensor]] = {m: [] for m in models}
    probed = [p for p in inputs.plans.values() if p.is_float and not p.excluded]
    # a fixed budget of samples per model, so memory does not grow with the number of tensors
    length = max(64, min(_PROBE_LEN, _PROBE_SAMPLES // max(1, _PROBE_BLOCKS * len(probed))))
    for plan in probed:
        common = min(plan.rows.values()) * plan.row_size if plan.shape else 1
        if common == 0:
            continue
        if common <= _PROBE_BLOCKS * length:
            spans = [(0, common)]
        else:
            spans = [((common - length) * j // (_PROBE_BLOCKS - 1), length) for j in range(_PROBE_BLOCKS)]
        base_parts = [
            inputs.readers[base].read_flat_slice(plan.name, a, n).to(torch.float32) for a, n in spans
        ]
        for m in models:
            for (a, n), b in zip(spans, base_parts):
                x = inputs.readers[m].read_flat_slice(plan.name, a, n).to(torch.float32)
                samples[m].append((x - b).abs())
    out: dict[str, Any] = {}
    for m in models:
        d = torch.cat(samples[m]) if samples[m] else torch.zeros(1)
        d = d[torch.isfinite(d)] if not bool(torch.isfinite(d).all()) else d
        d = d if d.numel() else torch.zeros(1)

        def q(p: float, d=d) -> float:
            return float(d.kthvalue(max(1, math.ceil(p * d.numel()))).values)

        out[inputs.labels[m]] = {
            "sampled_elements": int(d.numel()),
            "max_abs_delta": float(d.max()),
            "p99_abs_delta": q(0.99),
            "p99_9_abs_delta": q(0.999),
            "mean_abs_delta": float(d.mean()),
            "zero_fraction": float((d == 0).float().mean()),
        }
    return out


def delta_warnings(stats: dict[str, Any], base_label: str) -> list[str]:
    """Warnings for deltas far outside DARE's regime, and for models identical to the base on every sample."""
    warnings = []
    for label, s in stats.items():
        if s["max_abs_delta"] == 0.0:
            warnings.append(f"{label} equals {base_label} on every sampled entry (delta is zero)")
        elif s["p99_9_abs_delta"] > DELTA_WARN:
            warnings.append(
                f"deltas of {label} against {base_label} are far outside DARE's regime: 99.9th percentile "
                f"|delta| = {s['p99_9_abs_delta']:.4g}, max {s['max_abs_delta']:.4g} (DARE works for |delta| within "
                f"~{DELTA_OK}, fails around 0.03); is {base_label} really the model it was fine-tuned from?"
            )
    return warnings
