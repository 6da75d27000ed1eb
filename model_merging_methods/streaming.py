"""Out-of-core merging and DARE of LLM checkpoints: one tensor (one block of rows) at a time, disk to disk.

The engine reads aligned row blocks of every input tensor (:mod:`model_merging_methods.checkpoint_io`), applies
the functional core's per-tensor functions to them in float32, and writes each result straight into the output
shard. Memory is bounded by a block of :data:`CHUNK_ELEMENTS` elements per model, whatever the model size.

Exactness: the results are byte-identical to the in-memory core (``mask_model_weights``, ``average_merging``,
``task_arithmetic``, ``ties_merging``, ``mask_merging``) on the same (vocabulary-aligned) inputs:

* average / task arithmetic / TIES with known thresholds and majority sign are element-wise, so row blocks give
  the same bytes as whole tensors;
* DARE (random) draws each tensor's uniforms from its own ``tensor_generator(seed, name, model_index)``; CPU
  ``torch.rand`` fills elements serially, so drawing the blocks one after another from one generator gives the
  same numbers as drawing the whole tensor (checked at run time by :func:`rand_is_block_consistent`; tensors are
  processed whole otherwise). Magnitude DARE needs a per-tensor k-th value and always runs on whole tensors;
* TIES with ``trim_scope="global"`` computes each model's exact threshold with the core's ``kth_smallest_abs``
  over streamed blocks (two passes over the inputs per model), then the majority sign with ``ties_sign_sum``
  (one pass), then merges (one pass). ``trim_scope="tensor"`` does the same per tensor.

Vocabulary alignment (``vocab_policy``): tensors whose first dimension equals each model's ``vocab_size`` may
differ in rows across models (e.g. 32000 vs 32001 with a ``[PAD]`` row). ``pad_mean`` (the original's policy,
§6.2 of the spec) extends every smaller model to the largest vocabulary with rows equal to the mean of its own rows;
``truncate`` keeps the first rows common to all; ``error`` refuses. Any other shape mismatch is an error.

Before merging, a homology check compares names, shapes and architectures, and samples |δ| = |θ_ft − θ_pre| of every
tensor (up to 4 blocks of 4096 elements per tensor) to report per-model max / 99th / 99.9th percentile |δ|, with a
warning when the deltas are far outside DARE's regime (the paper: works for |δ| ≲ 0.005, fails around 0.03).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import os
import platform
import queue
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model_merging_methods.checkpoint_io import (
    DTYPES_BY_NAME,
    TOKENIZER_FILES,
    CheckpointReader,
    NameResolver,
    ShardedSafetensorsWriter,
    hub_cache_repo,
    parse_size,
    resolve_model_path,
    torch_dtype_name,
    write_side_files,
)
from model_merging_methods.errors import MergeError as UserError
from model_merging_methods.errors import check_rate
from model_merging_methods.mask_weights_utils import (
    MASK_STRATEGIES,
    WEIGHT_FORMATS,
    compute_dtype,
    is_excluded,
    mask_input_with_mask_rate,
    mask_tensor,
    tensor_generator,
)
from model_merging_methods.merging_methods import (
    TRIM_SCOPES,
    average_tensor,
    task_arithmetic_tensor,
    ties_merge_tensor,
    ties_merge_tensor_both_majorities,
    ties_trim_threshold,
)
from model_merging_methods.paths import guard_outputs
from model_merging_methods.publish import (
    atomic_output_dir,
    check_output_path,
    remove_stale_temporaries,
    write_json,
)

__all__ = [
    "resolve_model_path",
    "summary_line",
    "stream_mask_model",
    "stream_recover_from_delta",
    "stream_merge",
    "pad_rows_with_mean",
    "VOCAB_POLICIES",
    "STREAM_MERGING_METHODS",
]

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 1 << 18  # elements per row block of one model (1 MiB in float32: stays in the CPU cache)
TENSOR_CACHE_ELEMENTS = 1 << 22  # per-tensor TIES keeps tensors up to this size in memory across its passes
MEAN_BLOCK_ROWS = (
    1024  # row block of the float64 sums behind pad_mean rows (fixed, so the mean is repeatable)
)
VOCAB_POLICIES = ("pad_mean", "truncate", "error", "auto")
LLAMA_FAMILY = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")
STREAM_MERGING_METHODS = ("average_merging", "task_arithmetic", "ties_merging", "mask_merging")
MASK_APPLY_METHODS = ("average_merging", "task_arithmetic", "ties_merging")
# non-parameter buffers that some checkpoints carry (never merged, not written: transformers recomputes them)
BUFFER_PATTERNS = (r".*rotary_emb\.inv_freq$",)
VOCAB_NAME_PATTERN = r".*(embed_tokens|lm_head|wte|embed_out|word_embeddings|output)\b.*"
# DARE's regime (paper, §4.4/Fig. 4): works for |δ| within ~0.005, breaks around 0.03
DELTA_OK = 0.005
DELTA_WARN = 0.015
_PROBE_BLOCKS, _PROBE_LEN, _PROBE_SAMPLES = 4, 4096, 1 << 19  # blocks/tensor, max block length, budget/model


# ----------------------------------------------------------------------------------------------------------------
# small pure helpers
# ----------------------------------------------------------------------------------------------------------------


def rand_is_block_consistent() -> bool:
    """True when CPU ``torch.rand`` drawn in consecutive blocks from one generator equals one whole draw."""
    g = torch.Generator().manual_seed(12345)
    whole = torch.rand(1000, generator=g)
    g = torch.Generator().manual_seed(12345)
    parts = torch.cat([torch.rand(n, generator=g) for n in (1, 16, 17, 333, 633)])
    return torch.equal(whole, parts)


def _row_sum_f64(blocks: Iterator[torch.Tensor]) -> torch.Tensor:
    """Σ over rows in float64, one fixed block of rows at a time on one thread (repeatable to the bit)."""
    total = None
    with _torch_threads(1):
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


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    if old != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if old != n:
            torch.set_num_threads(old)


def default_workers() -> int:
    """Worker threads when none are asked for: the usable CPUs, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "safetensors", "transformers", "huggingface_hub", "numpy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_coefficient(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"scaling_coefficient must be a number, got {value!r}") from exc
    if not math.isfinite(v) or v < 0:
        raise UserError(f"scaling_coefficient must be finite and non-negative, got {value}")
    return v


def _out_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES_BY_NAME:
        raise UserError(f"dtype must be one of auto, {', '.join(DTYPES_BY_NAME)}; got {dtype!r}")
    return DTYPES_BY_NAME[dtype]


# ----------------------------------------------------------------------------------------------------------------
# the plan: homology check and vocabulary alignment
# ----------------------------------------------------------------------------------------------------------------


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


@dataclass
class Inputs:
    """Opened, checked and aligned input models. Index 0 is the reference model (pretrained / base)."""

    readers: list[CheckpointReader]
    labels: list[str]
    plans: dict[str, TensorPlan]
    vocab_policy: str
    vocab_actions: list[dict[str, Any]] = field(default_factory=list)
    ignored_buffers: list[str] = field(default_factory=list)
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
                raise UserError(f"tensor {name} of {self.labels[m]} contains NaN or Inf")
            if r1 >= (plan.shape[0] if plan.shape else 1):
                self._checked.add((m, name))
        if plan.is_float and upcast:
            x = x.to(compute_dtype(x.dtype))
        return x

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
        raise UserError(f"vocab_policy must be one of {', '.join(VOCAB_POLICIES)}; got {policy!r}")
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
) -> Inputs:
    """Resolve and open every model, check homology (architectures, names, shapes) and plan the alignment.

    ``dtype_from`` is the model whose dtype each output tensor keeps when ``out_dtype`` is None (the model the
    core would cast back to: the pretrained model for task arithmetic/TIES, the first model for averaging).
    ``name_resolver`` maps short model names to hub ids (see :func:`resolve_model_path`).
    """
    readers: list[CheckpointReader] = []
    try:
        for p, label in zip(paths, labels):
            folder = resolve_model_path(str(p), name_resolver)
            reader = CheckpointReader(folder, label)
            if reader.config is None:
                raise UserError(f"no config.json in {folder} ({label})")
            readers.append(reader)
        return _plan_inputs(
            readers, list(labels), vocab_policy, exclude_param_names_regex, out_dtype, dtype_from
        )
    except BaseException:
        for r in readers:
            r.close()
        raise


def _plan_inputs(
    readers: list[CheckpointReader],
    labels: list[str],
    vocab_policy: str,
    exclude: Sequence[str],
    out_dtype: torch.dtype | None,
    dtype_from: int,
) -> Inputs:
    # architectures
    ref_cfg = readers[0].config or {}
    for r, label in zip(readers[1:], labels[1:]):
        cfg = r.config or {}
        for key in ("model_type", "architectures"):
            if key in ref_cfg and key in cfg and ref_cfg[key] != cfg[key]:
                raise UserError(
                    f"models of different architectures: {labels[0]} has {key}={ref_cfg[key]} but {label} has "
                    f"{key}={cfg[key]}"
                )
    policy = resolve_vocab_policy(vocab_policy, readers)
    vocab_sizes = [_config_vocab(r.config) for r in readers]
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
            raise UserError(f"tensor {missing[0]} is in {labels[0]} but missing in {label}")
        if extra:
            raise UserError(f"tensor {extra[0]} is in {label} but missing in {labels[0]}")
    plans: dict[str, TensorPlan] = {}
    actions: list[dict[str, Any]] = []
    for name in ref_names:
        infos = [r.infos[name] for r in readers]
        shapes = [i.shape for i in infos]
        dtypes = {m: i.dtype for m, i in enumerate(infos)}
        is_float = all(d.is_floating_point for d in dtypes.values())
        if not is_float and len(set(dtypes.values())) > 1:
            raise UserError(
                f"tensor {name} has dtypes {sorted({str(d) for d in dtypes.values()})} across the models"
            )
        shape = shapes[0]
        vocab = False
        if len(set(shapes)) > 1:
            same_tail = len({s[1:] for s in shapes}) == 1 and all(len(s) >= 1 for s in shapes)
            rows_match_config = all(v is None or s[0] == v for s, v in zip(shapes, vocab_sizes))
            known = any(v is not None for v in vocab_sizes) or re.match(VOCAB_NAME_PATTERN, name)
            if not (same_tail and rows_match_config and known and is_float):
                a, b = next(
                    (i, j) for i in range(len(shapes)) for j in range(len(shapes)) if shapes[i] != shapes[j]
                )
                raise UserError(
                    f"tensor {name} has shape {tuple(shapes[a])} in {labels[a]} but {tuple(shapes[b])} in {labels[b]}"
                )
            if policy == "error":
                rows = ", ".join(f"{s[0]} rows in {label}" for s, label in zip(shapes, labels))
                raise UserError(
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
        od = (out_dtype or dtypes[dtype_from]) if is_float else dtypes[0]
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
    return Inputs(readers, labels, plans, policy, actions, sorted(ignored))


# ----------------------------------------------------------------------------------------------------------------
# homology statistics
# ----------------------------------------------------------------------------------------------------------------


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


def _report_statistics(stats: dict[str, Any], base_label: str) -> list[str]:
    """Log the homology statistics (INFO) and their warnings (WARNING); returns the warnings for the manifest."""
    for label, s in stats.items():
        logger.info(
            "homology: %s: max |delta| %.4g, 99.9th pct %.4g, 99th pct %.4g, mean %.4g (sampled %d entries)",
            label, s["max_abs_delta"], s["p99_9_abs_delta"], s["p99_abs_delta"], s["mean_abs_delta"],
            s["sampled_elements"],
        )  # fmt: skip
    warnings = delta_warnings(stats, base_label)
    for w in warnings:
        logger.warning(w)
    return warnings


# ----------------------------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------------------------


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=None, leave=False)


@dataclass
class _Dare:
    """DARE settings for the models being masked (model index in the engine → core model_index)."""

    rates: dict[int, float]
    use_rescale: bool
    strategy: str
    weight_format: str
    seed: int
    model_index: dict[int, int | None]

    def active(self, m: int) -> bool:
        return self.rates.get(m, 0.0) != 0.0


class _MaskedBlocks:
    """Row blocks of a model after DARE (as ``mask_merging`` stores them: cast back to the model's dtype and
    upcast again for the method that follows), drawing the random mask block after block from one generator."""

    def __init__(self, inputs: Inputs, dare: _Dare | None, base: int, plan: TensorPlan):
        self.inputs, self.dare, self.base, self.plan = inputs, dare, base, plan
        self.generators: dict[int, torch.Generator] = {}

    def whole(self) -> bool:
        """Magnitude DARE needs the whole tensor; so does random DARE if rand is not block-consistent."""
        d = self.dare
        if d is None or self.plan.excluded or not any(d.active(m) for m in d.rates):
            return False
        return d.strategy == "magnitude" or not _RAND_BLOCKS_OK

    def get(self, m: int, x: torch.Tensor, pre: torch.Tensor | None) -> torch.Tensor:
        """Model m's block after DARE; ``x`` and ``pre`` are the upcast blocks of model m and the base."""
        d, plan = self.dare, self.plan
        if d is None or plan.excluded or not d.active(m):
            return x
        stored = plan.dtypes[m]
        if d.strategy == "magnitude" or not _RAND_BLOCKS_OK:  # whole tensor: call the core directly
            out = mask_tensor(
                plan.name, x.to(stored), None if pre is None else pre.to(plan.dtypes[self.base]),
                weight_format=d.weight_format, weight_mask_rate=d.rates[m], use_weight_rescale=d.use_rescale,
                mask_strategy=d.strategy, seed=d.seed, model_index=d.model_index[m],
            )  # fmt: skip
            return out.to(compute_dtype(stored))
        g = self.generators.get(m)
        if g is None:
            g = self.generators[m] = tensor_generator(d.seed, plan.name, d.model_index[m])
        # the body of mask_tensor, with the generator carried over from the previous block
        if d.weight_format == "finetuned_weight":
            out = mask_input_with_mask_rate(x, d.rates[m], d.use_rescale, "random", g)
        else:
            out = pre + mask_input_with_mask_rate(x - pre, d.rates[m], d.use_rescale, "random", g)
        return out.to(stored).to(compute_dtype(stored))


_RAND_BLOCKS_OK = rand_is_block_consistent()


class _Cancelled(Exception):
    """Raised in a worker when another worker failed (never reaches the user: the first error does)."""


class _Engine:
    """Runs passes over the aligned inputs and writes the output tensors.

    Work is spread over ``workers`` threads one whole tensor at a time (every torch op runs on one thread; the
    ops release the GIL). A tensor's blocks are always processed in order by one thread, so the DARE generators
    and therefore the bytes do not depend on the number of workers; results go straight to their final place in
    the output file.
    """

    def __init__(self, inputs: Inputs, writer: ShardedSafetensorsWriter | None, base: int, workers: int = 1):
        self.inputs, self.writer, self.base, self.workers = inputs, writer, base, max(1, int(workers))
        self.stop = threading.Event()  # set when one worker fails or the run is interrupted: the others stop

    def blocks_for(self, plan: TensorPlan, models: Sequence[int], dare: _Dare | None) -> Iterator[list]:
        """For each row block: the list of upcast (and DARE-masked where set) blocks of ``models``."""
        masked = _MaskedBlocks(self.inputs, dare, self.base, plan)
        need_base = self.base in models or (
            dare is not None
            and dare.weight_format == "delta_weight"
            and not plan.excluded
            and any(dare.active(m) for m in models)
        )
        wanted = list(dict.fromkeys([self.base, *models] if need_base else models))
        for r0, r1 in plan.blocks(whole=masked.whole()):
            if self.stop.is_set():
                raise _Cancelled
            xs = {m: self.inputs.block(m, plan, r0, r1) for m in wanted}
            pre = xs.get(self.base)
            yield [xs[m] if m == self.base else masked.get(m, xs[m], pre) for m in models]

    def map_tensors(
        self, plans: Sequence[TensorPlan], fn: Callable[[TensorPlan], Any], desc: str
    ) -> list[Any]:
        """``[fn(plan) for plan in plans]`` on the worker threads (results in order; first error re-raised)."""
        with _progress(len(plans), desc) as bar:
            if self.workers == 1 or len(plans) < 2:
                out = []
                for plan in plans:
                    out.append(fn(plan))
                    bar.update(1)
                return out
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="merge") as pool:
                futures = [pool.submit(fn, plan) for plan in plans]
                try:
                    for f in as_completed(futures):
                        f.result()
                        bar.update(1)
                except BaseException:
                    self.stop.set()
                    for f in futures:
                        f.cancel()
                    raise
                return [f.result() for f in futures]

    def stream_unordered(
        self, plans: Sequence[TensorPlan], produce: Callable[[TensorPlan], Iterator[torch.Tensor]]
    ) -> Iterator[torch.Tensor]:
        """Every block ``produce(plan)`` yields, for all plans, computed on the worker threads and yielded in
        completion order (for order-independent consumers such as the k-th value histogram)."""
        if self.workers == 1:
            for plan in plans:
                yield from produce(plan)
            return
        results: queue.Queue = queue.Queue(maxsize=2 * self.workers)
        stop = threading.Event()
        todo = iter(plans)
        todo_lock = threading.Lock()
        done_marker = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def worker() -> None:
            try:
                while not stop.is_set():
                    with todo_lock:
                        plan = next(todo, None)
                    if plan is None:
                        break
                    for block in produce(plan):
                        if not put(block):
                            return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(exc)
            finally:
                put(done_marker)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            finished = 0
            while finished < len(threads):
                item = results.get()
                if item is done_marker:
                    finished += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            stop.set()
            for t in threads:
                t.join()

    def write_blocks(self, plan: TensorPlan, blocks: Iterator[torch.Tensor]) -> None:
        """Write a tensor's consecutive row blocks (cast to the output dtype) at their place in the output."""
        offset = 0
        for out in blocks:
            out = out.to(plan.out_dtype)
            self.writer.write_at(plan.name, offset, out)
            offset += out.numel() * out.element_size()

    def copy(self, plan: TensorPlan, source: int) -> None:
        """Write model ``source``'s tensor unchanged (excluded or non-float tensors), cast to the output dtype."""
        self.write_blocks(
            plan, (self.inputs.block(source, plan, r0, r1, upcast=False) for r0, r1 in plan.blocks())
        )

    def elementwise(
        self,
        models: Sequence[int],
        fn: Callable[[TensorPlan, list[torch.Tensor]], torch.Tensor],
        dare: _Dare | None,
        copy_from: int,
        desc: str,
    ) -> None:
        """One pass: out = fn(blocks of ``models``) for every tensor; excluded/non-float tensors from ``copy_from``."""

        def one(plan: TensorPlan) -> None:
            if plan.excluded or not plan.is_float:
                self.copy(plan, copy_from)
            else:
                self.write_blocks(plan, (fn(plan, xs) for xs in self.blocks_for(plan, models, dare)))

        self.map_tensors(list(self.inputs.plans.values()), one, desc)


def _majority(total: int) -> float:
    return float(math.copysign(1.0, total)) if total != 0 else 0.0


class _MinusPatches:
    """Where the TIES result under majority sign −1 differs (bitwise) from the one written under +1.

    The majority sign m = sign(Σ_coords sign(Σ_i τ̂_i)) is known only after every coordinate is seen, but it
    changes the result only at exact cancellations (Σ_i τ̂_i = 0 with some τ̂_i ≠ 0). So the merge pass writes the
    core's result for m = +1 and records the positions where the core's result for m = −1 differs; when the
    majority turns out to be −1 those few values are patched in place (m = 0 is handled by a second pass). This
    saves the separate sign-election pass. Records go to a file when ``path`` is given (global scope), else memory.
    """

    def __init__(self, path: Path | None = None):
        self.path, self.lock, self.records = path, threading.Lock(), []
        self.fh = open(path, "w+b") if path is not None else None  # noqa: SIM115 - closed in close()

    def add(self, name: str, byte_offset: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        """Record the m = −1 ``values`` at flat positions ``idx`` of the block written at ``byte_offset``."""
        if idx.numel() == 0:
            return
        values = values.contiguous()
        with self.lock:
            if self.fh is None:
                self.records.append((name, byte_offset, idx, values))
            else:
                pos = self.fh.seek(0, 2)
                self.fh.write(idx.to(torch.int64).numpy().tobytes())
                self.fh.write(values.view(torch.uint8).numpy().tobytes())
                self.records.append((name, byte_offset, pos, idx.numel(), values.dtype))

    def __len__(self) -> int:
        return sum(r[2].numel() if self.fh is None else r[3] for r in self.records)

    def apply(self, writer: ShardedSafetensorsWriter) -> None:
        """Write the recorded m = −1 values over the m = +1 results."""
        for rec in self.records:
            if self.fh is None:
                name, byte_offset, idx, values = rec
            else:
                name, byte_offset, pos, n, dtype = rec
                self.fh.seek(pos)
                idx = torch.frombuffer(bytearray(self.fh.read(8 * n)), dtype=torch.int64)
                item = _itemsize_of(dtype)
                values = torch.frombuffer(bytearray(self.fh.read(item * n)), dtype=dtype)
            span = int(idx.max()) + 1
            item = values.element_size()
            current = torch.frombuffer(writer.read_at(name, byte_offset, span * item), dtype=values.dtype)
            current[idx] = values
            writer.overwrite_at(name, byte_offset, current)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.path.unlink(missing_ok=True)
            self.fh = None


def _itemsize_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _ties_merge_optimistic(
    engine: _Engine,
    plan: TensorPlan,
    blocks: Iterator[list[torch.Tensor]],
    thresholds: list[float],
    lam: float,
    patches: _MinusPatches,
) -> int:
    """Write the TIES result of one tensor for majority sign +1, record where −1 differs; return Σ sign(Σ τ̂)."""
    total, offset = 0, 0
    for pre, *xs in blocks:
        sign_sum, plus, idx, minus = ties_merge_tensor_both_majorities(pre, xs, thresholds, lam)
        total += sign_sum
        plus = plus.to(plan.out_dtype)
        engine.writer.write_at(plan.name, offset, plus)
        patches.add(plan.name, offset, idx, minus.to(plan.out_dtype))
        offset += plus.numel() * plus.element_size()
    return total


def _ties_pass(
    engine: _Engine,
    fts: list[int],
    dare: _Dare | None,
    rate: float,
    lam: float,
    trim_scope: str,
    copy_from: int,
) -> dict[str, Any]:
    """TIES over the stream: thresholds (global or per tensor), then one merge pass that also elects the majority
    sign (see :class:`_MinusPatches`). Returns the thresholds and sign statistics for the manifest."""
    inputs, base = engine.inputs, engine.base
    plans = list(inputs.plans.values())
    kept = [p for p in plans if p.is_float and not p.excluded]
    info: dict[str, Any] = {"trim_scope": trim_scope}

    def tau_blocks(plan: TensorPlan, m: int) -> Iterator[torch.Tensor]:
        for pre, x in engine.blocks_for(plan, [base, m], dare):
            yield x - pre

    def merge_with(plan: TensorPlan, blocks, thresholds, majority) -> None:
        for pre, *xs in blocks:
            yield ties_merge_tensor(pre, xs, thresholds, lam, majority)

    if trim_scope == "global":
        numel = sum(p.numel for p in kept)
        thresholds = []
        for idx, m in enumerate(fts):
            with _progress(2, f"TIES threshold {idx + 1}/{len(fts)} (passes)") as bar:

                def factory(m=m, bar=bar):
                    bar.update(1)
                    return engine.stream_unordered(kept, lambda plan: tau_blocks(plan, m))

                thresholds.append(ties_trim_threshold(numel, rate, factory))
        patches = _MinusPatches(engine.writer.out_dir / ".ties_majority_patches.tmp")
        try:

            def one(plan: TensorPlan) -> int:
                if plan.excluded or not plan.is_float:
                    engine.copy(plan, copy_from)
                    return 0
                blocks = engine.blocks_for(plan, [base, *fts], dare)
                return _ties_merge_optimistic(engine, plan, blocks, thresholds, lam, patches)

            total = sum(engine.map_tensors(plans, one, "TIES merge"))
            majority = _majority(total)
            info.update(
                thresholds=thresholds, sign_sum=total, majority_sign=majority, cancellations=len(patches)
            )
            if majority < 0:
                patches.apply(engine.writer)
            elif majority == 0:  # every elected sign cancels out: redo the merge with m = 0 (rare)

                def redo(plan: TensorPlan) -> None:
                    offset = 0
                    blocks = engine.blocks_for(plan, [base, *fts], dare)
                    for out in merge_with(plan, blocks, thresholds, 0.0):
                        out = out.to(plan.out_dtype)
                        engine.writer.overwrite_at(plan.name, offset, out)
                        offset += out.numel() * out.element_size()

                engine.map_tensors(kept, redo, "TIES merge (majority sign 0)")
        finally:
            patches.close()
        return info

    def one(plan: TensorPlan) -> None:
        if plan.excluded or not plan.is_float:
            engine.copy(plan, copy_from)
            return
        if plan.numel <= TENSOR_CACHE_ELEMENTS:  # keep the (masked) inputs in memory for every pass
            cached = list(engine.blocks_for(plan, [base, *fts], dare))

            def passes():
                return iter(cached)

            def factory(idx):
                return lambda: (blk[idx + 1] - blk[0] for blk in cached)
        else:

            def passes():
                return engine.blocks_for(plan, [base, *fts], dare)

            def factory(idx):
                return lambda: tau_blocks(plan, fts[idx])

        thresholds = [ties_trim_threshold(plan.numel, rate, factory(i)) for i in range(len(fts))]
        patches = _MinusPatches()
        majority = _majority(_ties_merge_optimistic(engine, plan, passes(), thresholds, lam, patches))
        if majority < 0:
            patches.apply(engine.writer)
        elif majority == 0:
            offset = 0
            for out in merge_with(plan, passes(), thresholds, 0.0):
                out = out.to(plan.out_dtype)
                engine.writer.overwrite_at(plan.name, offset, out)
                offset += out.numel() * out.element_size()

    engine.map_tensors(plans, one, "TIES (per-tensor trim)")
    return info


# ----------------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------------


def _pick_side_source(inputs: Inputs, candidates: Sequence[int]) -> int:
    """The first candidate model whose vocabulary rows equal the output's (else the first candidate)."""
    target = inputs.vocab_rows
    for m in candidates:
        if target is None or inputs.model_vocab_rows(m) == target:
            return m
    return candidates[0]


def _side_source_index(
    inputs: Inputs, tokenizer_folder: Path | None, candidates: Sequence[int]
) -> tuple[Path, int | None]:
    if tokenizer_folder is None:
        m = _pick_side_source(inputs, candidates)
        return inputs.readers[m].folder, m
    for m, r in enumerate(inputs.readers):
        if r.folder.resolve() == tokenizer_folder.resolve():
            return tokenizer_folder, m
    return tokenizer_folder, None


def _input_files(inputs: Inputs, tokenizer_folder: Path | None) -> dict[str, Path]:
    """Every file the run reads, by real location (weights may be symbolic links, e.g. into the HF cache)."""
    files: dict[str, Path] = {}
    folders = [(r.label, r.folder, r.weight_files) for r in inputs.readers]
    if tokenizer_folder is not None:
        folders.append(("tokenizer source", tokenizer_folder, []))
    for label, folder, weights in folders:
        for name in [*weights, "config.json", "generation_config.json", *TOKENIZER_FILES]:
            path = folder / name
            if os.path.lexists(path):
                files[f"{label} ({name})"] = Path(os.path.realpath(path))
    return files


def _dtype_report(
    inputs: Inputs, out_dtype: torch.dtype | None, dtype_from: int
) -> tuple[dict[str, Any], list[str]]:
    """The chosen output dtype(s), why, and each input's float dtypes; a warning when the inputs' dtypes differ."""
    per_model = {
        label: sorted({torch_dtype_name(i.dtype) for i in r.infos.values() if i.dtype.is_floating_point})
        for label, r in zip(inputs.labels, inputs.readers)
    }
    chosen = sorted({torch_dtype_name(p.out_dtype) for p in inputs.plans.values() if p.is_float})
    reason = "the dtype flag" if out_dtype is not None else f"the dtype of {inputs.labels[dtype_from]}"
    report = {
        "chosen": chosen,
        "chosen_by": reason,
        "inputs": per_model,
        "compute": "float32 (float64 for float64)",
    }
    warnings = []
    if len({tuple(v) for v in per_model.values()}) > 1:
        shown = "; ".join(f"{label}: {', '.join(v) or 'none'}" for label, v in per_model.items())
        warnings.append(
            f"the input models have different dtypes ({shown}); the output is {', '.join(chosen)} ({reason}), "
            "computed in float32"
        )
    return report, warnings


def _run(
    *,
    kind: str,
    paths: list[str],
    labels: list[str],
    output_path: str,
    parameters: dict[str, Any],
    dtype: str | None,
    max_shard_size: str,
    vocab_policy: str,
    pad_token: str,
    tokenizer_source: str | None,
    side_candidates: list[int],
    overwrite: bool,
    exclude: Sequence[str],
    dtype_from: int,
    stats_models: list[int] | None,
    body: Callable[[_Engine], dict[str, Any]],
    num_threads: int | None = None,
    name_resolver: NameResolver | None = None,
) -> dict[str, Any]:
    """Check everything, open the inputs, run ``body`` on an engine writing into a temporary folder, add the side
    files and the manifest, and publish the folder at ``output_path`` (see :mod:`model_merging_methods.publish`).

    The output path is refused before any model is read when it equals, contains or lies inside an input (model
    folders after resolving names to folders, and every file read, symbolic links followed), when it exists
    without ``overwrite``, or when it exists and was not written by this toolkit."""
    start = time.time()
    if num_threads is not None and int(num_threads) < 1:
        raise UserError(f"num_threads must be >= 1, got {num_threads}")
    out_dtype = _out_dtype(dtype)
    shard_bytes = parse_size(max_shard_size)
    folders = [resolve_model_path(str(p), name_resolver) for p in paths]
    tokenizer_folder = (
        resolve_model_path(str(tokenizer_source), name_resolver) if tokenizer_source is not None else None
    )
    model_inputs: dict[str, Path] = {}
    for label, folder in [*zip(labels, folders), ("tokenizer source", tokenizer_folder)]:
        if folder is not None:
            model_inputs[label] = hub_cache_repo(folder) or folder  # a cached snapshot: its whole repository
    guard_outputs({"path": output_path}, model_inputs)
    housekeeping = remove_stale_temporaries(Path(os.path.abspath(os.path.expanduser(output_path))))
    target = check_output_path(output_path, overwrite)
    inputs = open_inputs(folders, labels, vocab_policy, exclude, out_dtype, dtype_from)
    workers = default_workers() if num_threads is None else int(num_threads)
    try:
        guard_outputs({"path": target}, _input_files(inputs, tokenizer_folder))
        stats = delta_statistics(inputs, 0, stats_models) if stats_models is None or stats_models else {}
        warnings = _report_statistics(stats, labels[0]) if stats else []
        dtype_info, dtype_warnings = _dtype_report(inputs, out_dtype, dtype_from)
        for w in dtype_warnings:
            logger.warning(w)
        warnings += dtype_warnings
        side_folder, side_m = _side_source_index(inputs, tokenizer_folder, side_candidates)
        specs = [(p.name, p.out_dtype, p.shape) for p in inputs.plans.values()]
        with atomic_output_dir(target, overwrite, kind=f"model ({kind})", housekeeping=housekeeping) as tmp:
            writer = ShardedSafetensorsWriter(tmp, specs, shard_bytes, check_finite=True)
            engine = _Engine(inputs, writer, base=0, workers=workers)
            try:
                with _torch_threads(1):
                    extra = body(engine) or {}
            finally:
                writer.abort()
            files = writer.close()
            float_dtypes = {torch_dtype_name(p.out_dtype) for p in inputs.plans.values() if p.is_float}
            cfg_updates: dict[str, Any] = {}
            if inputs.vocab_rows is not None:
                cfg_updates["vocab_size"] = inputs.vocab_rows
            if len(float_dtypes) == 1:
                dtype_name = next(iter(float_dtypes))
                side_cfg = inputs.readers[side_m].config if side_m is not None else {}
                cfg_updates["dtype"] = dtype_name
                if "torch_dtype" in (side_cfg or {}):
                    cfg_updates["torch_dtype"] = dtype_name
            side = write_side_files(
                side_folder, tmp, config_updates=cfg_updates, vocab_size=inputs.vocab_rows,
                pad_token=pad_token if inputs.vocab_policy == "pad_mean" else None,
            )  # fmt: skip
            wall = time.time() - start
            manifest = {
                "tool": "dare-merging-toolkit streaming engine",
                "kind": kind,
                "parameters": parameters,
                "inputs": [
                    {
                        "role": labels[m],
                        "name_or_path": paths[m],
                        "folder": str(r.folder),
                        "format": r.format,
                        "files": r.file_list(),
                        "dtypes": sorted({torch_dtype_name(i.dtype) for i in r.infos.values()}),
                        "vocab_rows": inputs.model_vocab_rows(m),
                        "config_vocab_size": _config_vocab(r.config),
                    }
                    for m, r in enumerate(inputs.readers)
                ],
                "output": {
                    "files": files,
                    "tensors": len(specs),
                    "parameters": sum(p.numel for p in inputs.plans.values()),
                    "dtypes": sorted(float_dtypes),
                    "vocab_rows": inputs.vocab_rows,
                    "max_shard_size": max_shard_size,
                },
                "dtype": dtype_info,
                "vocabulary": {
                    "policy": inputs.vocab_policy,
                    "actions": inputs.vocab_actions,
                    "pad_token": pad_token,
                    "side_files": side,
                },
                "ignored_buffers": inputs.ignored_buffers,
                "delta_statistics": stats,
                "warnings": warnings,
                "housekeeping": housekeeping,
                "method_details": extra,
                "versions": _versions(),
                "worker_threads": workers,
                "bytes_read": inputs.bytes_read,
                "bytes_written": writer.bytes_written,
                "wall_time_s": round(wall, 3),
                "peak_rss_bytes": peak_rss_bytes(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json(tmp / "merge_manifest.json", manifest)
    finally:
        inputs.close()
    manifest["output_path"] = str(target)
    logger.info("%s", summary_line(manifest))
    return manifest


def summary_line(manifest: dict[str, Any]) -> str:
    """One line describing a finished run from its manifest (what the scripts print)."""
    return (
        f"{manifest['kind']}: {manifest['output']['tensors']} tensors, read {_fmt_bytes(manifest['bytes_read'])}, "
        f"wrote {_fmt_bytes(manifest['bytes_written'])} in {manifest['wall_time_s']:.1f} s, peak RSS "
        f"{_fmt_bytes(manifest['peak_rss_bytes'])} -> {manifest.get('output_path', '?')}"
    )


def _check_dare(weight_format: str, mask_strategy: str) -> None:
    if weight_format not in WEIGHT_FORMATS:
        raise UserError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}; got {weight_format!r}")
    if mask_strategy not in MASK_STRATEGIES:
        raise UserError(f"mask_strategy must be one of {', '.join(MASK_STRATEGIES)}; got {mask_strategy!r}")


def stream_mask_model(
    pretrained: str,
    finetuned: str,
    output_path: str,
    *,
    weight_format: str = "delta_weight",
    weight_mask_rate: float = 0.0,
    use_weight_rescale: bool = True,
    mask_strategy: str = "random",
    seed: int = 0,
    exclude_param_names_regex: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    vocab_policy: str = "pad_mean",
    pad_token: str = "[PAD]",
    tokenizer_source: str | None = None,
    overwrite: bool = False,
    num_threads: int | None = None,
    name_resolver: NameResolver | None = None,
) -> dict[str, Any]:
    """DARE of one model, streamed: the same bytes as ``mask_model_weights(finetuned, pretrained, ...)`` (with
    ``model_index=None``) on the vocabulary-aligned models. Excluded tensors are copied from the fine-tuned model.
    Writes a complete model folder at ``output_path`` and returns the manifest."""
    rate = check_rate("weight_mask_rate", weight_mask_rate)
    _check_dare(weight_format, mask_strategy)
    params = dict(
        weight_format=weight_format, weight_mask_rate=rate, use_weight_rescale=bool(use_weight_rescale),
        mask_strategy=mask_strategy, seed=int(seed), exclude_param_names_regex=list(exclude_param_names_regex),
        dtype=dtype or "auto", vocab_policy=vocab_policy, pad_token=pad_token,
    )  # fmt: skip
    dare = _Dare({1: rate}, bool(use_weight_rescale), mask_strategy, weight_format, int(seed), {1: None})

    def body(engine: _Engine) -> dict[str, Any]:
        engine.elementwise([0, 1], lambda plan, xs: xs[1], dare, copy_from=1, desc="DARE")
        return {"rand_block_consistent": _RAND_BLOCKS_OK}

    return _run(
        kind="dare", paths=[pretrained, finetuned], labels=[f"pretrained {pretrained}", f"finetuned {finetuned}"],
        output_path=output_path, parameters=params, dtype=dtype, max_shard_size=max_shard_size,
        vocab_policy=vocab_policy, pad_token=pad_token, tokenizer_source=tokenizer_source, side_candidates=[1],
        overwrite=overwrite, exclude=exclude_param_names_regex, dtype_from=1, stats_models=None, body=body,
        num_threads=num_threads, name_resolver=name_resolver,
    )  # fmt: skip


def stream_recover_from_delta(
    base: str,
    delta: str,
    output_path: str,
    *,
    pad_token: str = "[PAD]",
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    num_threads: int | None = None,
    name_resolver: NameResolver | None = None,
) -> dict[str, Any]:
    """θ = θ_base + δ for models released as weight deltas (WizardLM-7B-V1.0, §2.4 step 3), after aligning the
    vocabularies with ``pad_mean``; float32 arithmetic, output in the delta's dtype unless ``dtype``."""

    def add(plan: TensorPlan, xs: list[torch.Tensor]) -> torch.Tensor:
        return xs[0] + xs[1]

    def body(engine: _Engine) -> dict[str, Any]:
        engine.elementwise([0, 1], add, None, copy_from=1, desc="recover")
        return {}

    return _run(
        kind="recover_from_delta", paths=[base, delta], labels=[f"base {base}", f"delta {delta}"],
        output_path=output_path, parameters={"recover_manner": "add", "pad_token": pad_token, "dtype": dtype or "auto"},
        dtype=dtype, max_shard_size=max_shard_size, vocab_policy="pad_mean", pad_token=pad_token,
        tokenizer_source=None, side_candidates=[1], overwrite=overwrite, exclude=(), dtype_from=1,
        stats_models=[], body=body, num_threads=num_threads, name_resolver=name_resolver,
    )  # fmt: skip


def stream_merge(
    pretrained: str,
    finetuned: Sequence[str],
    output_path: str,
    *,
    merging_method_name: str,
    scaling_coefficient: float = 1.0,
    param_value_mask_rate: float = 0.8,
    trim_scope: str = "global",
    mask_apply_method: str | None = None,
    weight_mask_rates: Sequence[float] | float | None = None,
    use_weight_rescale: bool = True,
    mask_strategy: str = "random",
    weight_format: str = "delta_weight",
    seed: int = 0,
    exclude_param_names_regex: Sequence[str] = (),
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    vocab_policy: str = "pad_mean",
    pad_token: str = "[PAD]",
    tokenizer_source: str | None = None,
    overwrite: bool = False,
    num_threads: int | None = None,
    name_resolver: NameResolver | None = None,
) -> dict[str, Any]:
    """Merge fine-tuned checkpoints out of core; the same bytes as the core's ``average_merging``,
    ``task_arithmetic``, ``ties_merging`` or ``mask_merging`` (DARE + one of them) on the vocabulary-aligned
    models. Needs at least two fine-tuned models. Writes a complete model folder at ``output_path`` (config,
    generation config and tokenizer from ``tokenizer_source``, default: the first fine-tuned model whose
    vocabulary matches the output) and returns the manifest."""
    finetuned = list(finetuned)
    if merging_method_name not in STREAM_MERGING_METHODS:
        raise UserError(
            f"merging method {merging_method_name!r} is not available for streamed LLM merging "
            f"(choose from {', '.join(STREAM_MERGING_METHODS)})"
        )
    if len(finetuned) < 2:
        raise UserError(f"merging needs at least two fine-tuned models, got {len(finetuned)}")
    lam = _check_coefficient(scaling_coefficient)
    ties_rate = check_rate("param_value_mask_rate", param_value_mask_rate)
    if trim_scope not in TRIM_SCOPES:
        raise UserError(f"trim_scope must be one of {', '.join(TRIM_SCOPES)}; got {trim_scope!r}")
    method = merging_method_name
    dare: _Dare | None = None
    rates: list[float] = []
    if merging_method_name == "mask_merging":
        if mask_apply_method not in MASK_APPLY_METHODS:
            raise UserError(
                f"mask_apply_method must be one of {', '.join(MASK_APPLY_METHODS)}; got {mask_apply_method!r}"
            )
        _check_dare(weight_format, mask_strategy)
        if weight_mask_rates is None:
            raise UserError("mask_merging needs weight_mask_rates")
        if isinstance(weight_mask_rates, int | float):
            weight_mask_rates = [weight_mask_rates] * len(finetuned)
        if len(weight_mask_rates) != len(finetuned):
            raise UserError(f"got {len(weight_mask_rates)} weight_mask_rates for {len(finetuned)} models")
        rates = [check_rate("weight_mask_rate", r) for r in weight_mask_rates]
        method = mask_apply_method
        dare = _Dare(
            {i + 1: r for i, r in enumerate(rates)}, bool(use_weight_rescale), mask_strategy, weight_format,
            int(seed), {i + 1: i for i in range(len(finetuned))},
        )  # fmt: skip
    params: dict[str, Any] = {"merging_method_name": merging_method_name}
    if merging_method_name == "mask_merging":
        params.update(
            mask_apply_method=mask_apply_method, weight_mask_rates=rates, use_weight_rescale=bool(use_weight_rescale),
            mask_strategy=mask_strategy, weight_format=weight_format, seed=int(seed),
        )  # fmt: skip
    if method in ("task_arithmetic", "ties_merging"):
        params["scaling_coefficient"] = lam
    if method == "ties_merging":
        params.update(param_value_mask_rate=ties_rate, trim_scope=trim_scope)
    params.update(
        exclude_param_names_regex=list(exclude_param_names_regex), dtype=dtype or "auto", vocab_policy=vocab_policy,
        pad_token=pad_token,
    )  # fmt: skip
    fts = list(range(1, len(finetuned) + 1))
    copy_from = 1 if method == "average_merging" else 0

    def body(engine: _Engine) -> dict[str, Any]:
        if method == "average_merging":
            engine.elementwise(fts, lambda plan, xs: average_tensor(xs), dare, copy_from, "average")
            return {}
        if method == "task_arithmetic":
            engine.elementwise(
                [0, *fts], lambda plan, xs: task_arithmetic_tensor(xs[0], xs[1:], lam), dare, copy_from,
                "task arithmetic",
            )  # fmt: skip
            return {}
        return _ties_pass(engine, fts, dare, ties_rate, lam, trim_scope, copy_from)

    labels = [f"pretrained {pretrained}"] + [f"finetuned {f}" for f in finetuned]
    return _run(
        kind=merging_method_name if method == merging_method_name else f"mask_merging+{method}",
        paths=[pretrained, *finetuned], labels=labels, output_path=output_path, parameters=params, dtype=dtype,
        max_shard_size=max_shard_size, vocab_policy=vocab_policy, pad_token=pad_token,
        tokenizer_source=tokenizer_source, side_candidates=fts, overwrite=overwrite,
        exclude=exclude_param_names_regex, dtype_from=copy_from, stats_models=None, body=body,
        num_threads=num_threads, name_resolver=name_resolver,
    )  # fmt: skip
