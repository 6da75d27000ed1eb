"""Out-of-core merging and DARE of LLM checkpoints: one tensor (one block of rows) at a time, disk to disk.

The entry points here open the inputs (:func:`model_merging_methods.planning.open_inputs`: resolution, homology and
vocabulary checks), run the shared executor (:mod:`model_merging_methods.engine`) with a sharded safetensors writer
as its sink (:mod:`model_merging_methods.writer`), add the side files and the manifest, and publish the folder
atomically (:mod:`model_merging_methods.publish`). Memory is bounded by a block of
:data:`~model_merging_methods.planning.CHUNK_ELEMENTS` elements per model (a whole tensor per model for methods of
``tensor`` scope), whatever the model size.

Exactness: any registered method (:mod:`model_merging_methods.registry`) that the streaming engine runs gives the
bytes of the in-memory functions on the same (vocabulary-aligned) inputs, because both run the same executor on the
same blocks; DARE (random) draws each tensor's numbers from its own seeded stream, so blocks give the same bytes as
whole tensors; TIES with ``trim_scope="global"`` computes each model's exact threshold over streamed blocks and
elects the majority sign during the merge pass (:mod:`model_merging_methods.ties_streaming`).

Before merging, a homology check compares names, shapes and architectures and samples |δ| (see
:func:`~model_merging_methods.planning.delta_statistics`), with a warning when the deltas are far outside DARE's
regime. The core never prints: what the user should see is logged and returned in the manifest.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from model_merging_methods import rng
from model_merging_methods.devices import describe as describe_device
from model_merging_methods.devices import resolve_device
from model_merging_methods.engine import Dare, Executor, execute
from model_merging_methods.errors import MergeError
from model_merging_methods.lora import LoraAdapterWriter, check_output_format, copy_adapter_tokenizer
from model_merging_methods.mask_weights_utils import MASK_STRATEGIES, WEIGHT_FORMATS
from model_merging_methods.paths import guard_outputs
from model_merging_methods.planning import (
    VOCAB_POLICIES,
    Inputs,
    TensorPlan,
    _config_vocab,
    delta_statistics,
    delta_warnings,
    natural_dtype,
    open_inputs,
    pad_rows_with_mean,
)
from model_merging_methods.publish import (
    atomic_output_dir,
    check_output_path,
    remove_stale_temporaries,
    write_json,
)
from model_merging_methods.reader import (
    DTYPES_BY_NAME,
    NameResolver,
    hub_cache_repo,
    resolve_model_path,
    torch_dtype_name,
)
from model_merging_methods.registry import get_method, method_names, shared_params
from model_merging_methods.threads import default_workers, torch_threads
from model_merging_methods.validators import check_rate, check_seed, per_model
from model_merging_methods.vocab import FixedRowsSink, save_union_tokenizer
from model_merging_methods.writer import (
    TOKENIZER_FILES,
    ShardedSafetensorsWriter,
    parse_size,
    write_side_files,
)

__all__ = [
    "DARE_RESCALE_RULES",
    "DareSettings",
    "OutputOptions",
    "PerTensorSettings",
    "VOCAB_POLICIES",
    "merge_checkpoints",
    "pad_rows_with_mean",
    "resolve_model_path",
    "stream_mask_model",
    "stream_merge",
    "stream_recover_from_delta",
    "summary_line",
]

logger = logging.getLogger(__name__)


def stream_merging_methods() -> list[str]:
    """The methods the streaming engine runs (every registered one without data statistics), and ``mask_merging``."""
    return [*method_names(streamable=True), "mask_merging"]


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


def _out_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES_BY_NAME:
        raise MergeError(f"dtype must be one of auto, {', '.join(DTYPES_BY_NAME)}; got {dtype!r}")
    return DTYPES_BY_NAME[dtype]


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
        return getattr(
            inputs.readers[m], "side_folder", inputs.readers[m].folder
        ), m  # an adapter: its base's
    for m, r in enumerate(inputs.readers):
        if r.folder.resolve() == tokenizer_folder.resolve():
            return tokenizer_folder, m
    return tokenizer_folder, None


def _input_files(inputs: Inputs, tokenizer_folder: Path | None) -> dict[str, Path]:
    """Every file the run reads, by real location (weights may be symbolic links, e.g. into the HF cache)."""
    files: dict[str, Path] = {}
    folders = [(r.label, r.folder, r.weight_files) for r in inputs.readers]
    folders += [
        (f"{r.label} tokenizer", r.tokenizer_folder, [])
        for r in inputs.readers
        if hasattr(r, "tokenizer_folder")
    ]
    if tokenizer_folder is not None:
        folders.append(("tokenizer source", tokenizer_folder, []))
    for label, folder, weights in folders:
        for name in [
            *weights,
            "config.json",
            "generation_config.json",
            "adapter_config.json",
            *TOKENIZER_FILES,
        ]:
            path = folder / name
            if os.path.lexists(path):
                files[f"{label} ({name})"] = Path(os.path.realpath(path))
    return files


def _dtype_report(
    inputs: Inputs, out_dtype: torch.dtype | None, dtype_from: int
) -> tuple[dict[str, Any], list[str]]:
    """The chosen output dtype(s), why, and each input's float dtypes; a warning when the inputs' dtypes differ."""
    per_model = {
        label: sorted(
            {torch_dtype_name(natural_dtype(r, n)) for n, i in r.infos.items() if i.dtype.is_floating_point}
        )  # an adapter read in float32 over a bfloat16 base counts as bfloat16, the dtype PEFT would merge it in
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
    options: OutputOptions,
    side_candidates: list[int],
    dtype_from: int,
    stats_models: list[int] | None,
    body: Callable[[Executor], dict[str, Any]],
    rewrites: bool = True,
    extra_files: Mapping[str, str] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check everything, open the inputs, run ``body`` on an engine writing into a temporary folder, add the side
    files and the manifest, and publish the folder at ``output_path`` (see :mod:`model_merging_methods.publish`).

    The output path is refused before any model is read when it equals, contains or lies inside an input (model
    folders after resolving names to folders, and every file read, symbolic links followed), when it exists
    without ``overwrite``, or when it exists and was not written by this toolkit."""
    start = time.time()
    num_threads, name_resolver, tokenizer_source = (
        options.num_threads,
        options.name_resolver,
        options.tokenizer_source,
    )
    dtype, max_shard_size, vocab_policy, pad_token = (
        options.dtype, options.max_shard_size, options.vocab_policy, options.pad_token,
    )  # fmt: skip
    overwrite, exclude = options.overwrite, options.exclude_param_names_regex
    if num_threads is not None and int(num_threads) < 1:
        raise MergeError(f"num_threads must be >= 1, got {num_threads}")
    device = resolve_device(options.device)  # an unusable device fails before anything is read
    lora_out = check_output_format(options.output_format, options.lora_rank)
    out_dtype = _out_dtype(dtype)
    adapter_dtype = out_dtype or torch.float32
    if lora_out:  # the writer factorises θ − θ_base: the merged tensors come to it in float32
        out_dtype = torch.float32
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
    inputs = open_inputs(
        folders,
        labels,
        vocab_policy,
        exclude,
        out_dtype,
        dtype_from,
        name_resolver,
        options.pad_to_multiple_of,
    )
    workers = default_workers() if num_threads is None else int(num_threads)
    try:
        guard_outputs({"path": target}, _input_files(inputs, tokenizer_folder))
        with torch_threads(
            1
        ):  # small sampled reads: one thread is fastest (and B·A of adapters is per row group)
            stats = delta_statistics(inputs, 0, stats_models) if stats_models is None or stats_models else {}
        warnings = _report_statistics(stats, labels[0]) if stats else []
        dtype_info, dtype_warnings = _dtype_report(inputs, out_dtype, dtype_from)
        for w in dtype_warnings:
            logger.warning(w)
        warnings += dtype_warnings
        side_folder, side_m = _side_source_index(inputs, tokenizer_folder, side_candidates)
        specs = [(p.name, p.out_dtype, p.shape) for p in inputs.plans.values()]
        what = f"LoRA adapter ({kind})" if lora_out else f"model ({kind})"
        with atomic_output_dir(target, overwrite, kind=what, housekeeping=housekeeping) as tmp:
            if lora_out:
                writer = LoraAdapterWriter(
                    tmp, specs, inputs.readers[0], options.lora_rank, svd=options.lora_svd,
                    adapter_dtype=adapter_dtype, base_model_name_or_path=str(paths[0]), deferred=rewrites,
                )  # fmt: skip
            else:
                writer = ShardedSafetensorsWriter(tmp, specs, shard_bytes, check_finite=True)
            sink = FixedRowsSink(writer, inputs) if inputs.union is not None else writer
            engine = Executor(inputs, sink, base=0, workers=workers, device=device)
            try:
                with torch_threads(1):
                    extra = body(engine) or {}
            finally:
                writer.abort()
            closed = writer.close()
            lora_report = closed if lora_out else None
            files = sorted(os.listdir(tmp)) if lora_out else closed
            float_dtypes = {torch_dtype_name(p.out_dtype) for p in inputs.plans.values() if p.is_float}
            if lora_out:
                float_dtypes = {torch_dtype_name(adapter_dtype)}
            cfg_updates: dict[str, Any] = {}
            if inputs.vocab_rows is not None:
                cfg_updates["vocab_size"] = inputs.vocab_rows
            if len(float_dtypes) == 1:
                dtype_name = next(iter(float_dtypes))
                side_cfg = inputs.readers[side_m].config if side_m is not None else {}
                cfg_updates["dtype"] = dtype_name
                if "torch_dtype" in (side_cfg or {}):
                    cfg_updates["torch_dtype"] = dtype_name
            if lora_out:  # an adapter folder holds no config.json (it would look like a model folder)
                side = {"source": None, "copied": [], "note": "LoRA adapter: no model side files"}
            else:
                side = write_side_files(
                    side_folder, tmp, config_updates=cfg_updates, vocab_size=inputs.vocab_rows,
                    pad_token=pad_token if inputs.vocab_policy == "pad_mean" else None,
                )  # fmt: skip
            if side_m is not None and not lora_out:
                copy_adapter_tokenizer(inputs.readers[side_m], tmp, side)
            if inputs.union is not None and not lora_out:
                side["tokenizer"] = save_union_tokenizer(inputs.union, tmp, side)
            for file_name, text in (extra_files or {}).items():
                if os.path.lexists(tmp / file_name):
                    raise MergeError(f"the extra file {file_name} would replace a file of the merged model")
                (tmp / file_name).write_text(text, encoding="utf-8")
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
                    "format": "lora" if lora_out else "model",
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
                **({"lora": lora_report} if lora_report is not None else {}),
                **dict(manifest_extra or {}),
                "versions": _versions(),
                "random_generator": rng.describe(),  # DARE masks and DELLA draws (masks differ before version 1)
                "device": describe_device(device),
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
        raise MergeError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}; got {weight_format!r}")
    if mask_strategy not in MASK_STRATEGIES:
        raise MergeError(f"mask_strategy must be one of {', '.join(MASK_STRATEGIES)}; got {mask_strategy!r}")


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
    device: str | None = None,
) -> dict[str, Any]:
    """DARE of one model, streamed: the same bytes as ``mask_model_weights(finetuned, pretrained, ...)`` (with
    ``model_index=None``) on the vocabulary-aligned models, on any ``device``. Excluded tensors are copied from the
    fine-tuned model. Writes a complete model folder at ``output_path`` and returns the manifest."""
    rate = check_rate("weight_mask_rate", weight_mask_rate)
    _check_dare(weight_format, mask_strategy)
    params = dict(
        weight_format=weight_format, weight_mask_rate=rate, use_weight_rescale=bool(use_weight_rescale),
        mask_strategy=mask_strategy, seed=int(seed), exclude_param_names_regex=list(exclude_param_names_regex),
        dtype=dtype or "auto", vocab_policy=vocab_policy, pad_token=pad_token,
    )  # fmt: skip
    dare = Dare({1: rate}, bool(use_weight_rescale), mask_strategy, weight_format, int(seed), {1: None})

    def body(engine: Executor) -> dict[str, Any]:
        engine.elementwise([0, 1], lambda plan, xs: xs[1], dare, copy_from=1, desc="DARE")
        return {}

    return _run(
        kind="dare", paths=[pretrained, finetuned], labels=[f"pretrained {pretrained}", f"finetuned {finetuned}"],
        output_path=output_path, parameters=params, side_candidates=[1], dtype_from=1, stats_models=None, body=body,
        options=OutputOptions(
            exclude_param_names_regex=tuple(exclude_param_names_regex), dtype=dtype, max_shard_size=max_shard_size,
            vocab_policy=vocab_policy, pad_token=pad_token, tokenizer_source=tokenizer_source, overwrite=overwrite,
            num_threads=num_threads, name_resolver=name_resolver, device=device,
        ),
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

    def body(engine: Executor) -> dict[str, Any]:
        engine.elementwise([0, 1], add, None, copy_from=1, desc="recover")
        return {}

    return _run(
        kind="recover_from_delta", paths=[base, delta], labels=[f"base {base}", f"delta {delta}"],
        output_path=output_path, parameters={"recover_manner": "add", "pad_token": pad_token, "dtype": dtype or "auto"},
        side_candidates=[1], dtype_from=1, stats_models=[], body=body,
        options=OutputOptions(
            dtype=dtype, max_shard_size=max_shard_size, vocab_policy="pad_mean", pad_token=pad_token,
            overwrite=overwrite, num_threads=num_threads, name_resolver=name_resolver,
        ),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------------------------


DARE_RESCALE_RULES = ("inverse", "l1")


@dataclass(frozen=True)
class DareSettings:
    """The DARE pre-step of a merge: one drop rate for every model or one per model, rescaling, strategy, what is
    masked (``delta_weight``: the delta; ``finetuned_weight``: the weights) and the seed of the masks."""

    weight_mask_rates: Sequence[float] | float
    use_weight_rescale: bool = True
    mask_strategy: str = "random"
    weight_format: str = "delta_weight"
    seed: int = 0
    # with use_weight_rescale: "inverse" divides survivors by 1 − p (the paper's); "l1" multiplies each masked tensor
    # by ‖δ‖₁ / ‖m⊙δ‖₁ (mergekit's DARE)
    rescale_rule: str = "inverse"

    def checked(self, num_models: int) -> Dare:
        rates = per_model("weight_mask_rate", self.weight_mask_rates, num_models, check_rate)
        _check_dare(self.weight_format, self.mask_strategy)
        if self.rescale_rule not in DARE_RESCALE_RULES:
            raise MergeError(
                f"rescale_rule must be one of {', '.join(DARE_RESCALE_RULES)}; got {self.rescale_rule!r}"
            )
        dare = Dare.for_models(
            rates, bool(self.use_weight_rescale), self.mask_strategy, self.weight_format, int(self.seed)
        )
        return replace(dare, rescale_rule=self.rescale_rule) if self.rescale_rule != "inverse" else dare

    def as_dict(self, rates: Sequence[float]) -> dict[str, Any]:
        out = dict(
            weight_mask_rates=list(rates), use_weight_rescale=bool(self.use_weight_rescale),
            mask_strategy=self.mask_strategy, weight_format=self.weight_format, seed=int(self.seed),
        )  # fmt: skip
        if self.rescale_rule != "inverse":
            out["rescale_rule"] = self.rescale_rule
        return out


@dataclass(frozen=True)
class PerTensorSettings:
    """Values that vary per tensor (mergekit's gradients and filters): ``params(name)`` gives the method parameters
    of tensor ``name`` (unvalidated, like ``params`` of :func:`merge_checkpoints`; default: those for every tensor)
    and ``dare_rates(name)`` its DARE drop rates (one for every model, or one per model; default: the DARE settings'
    rates). Every tensor's values are validated before any tensor is merged."""

    params: Callable[[str], Mapping[str, Any]] | None = None
    dare_rates: Callable[[str], Sequence[float] | float] | None = None


@dataclass(frozen=True)
class OutputOptions:
    """How the inputs are aligned and the output is written."""

    exclude_param_names_regex: Sequence[str] = ()
    dtype: str | None = None
    max_shard_size: str = "5GB"
    vocab_policy: str = "pad_mean"
    pad_token: str = "[PAD]"
    tokenizer_source: str | None = None
    overwrite: bool = False
    num_threads: int | None = None
    name_resolver: NameResolver | None = None
    output_format: str = "model"  # "model" (a full model folder) or "lora" (a PEFT LoRA adapter of the base)
    lora_rank: int | None = None
    lora_svd: str = "auto"
    pad_to_multiple_of: int | None = None  # vocab_policy "union" only
    device: str | None = None  # where the arithmetic runs: "cpu" (None) or "cuda"; the bytes are the same


def merge_checkpoints(
    pretrained: str,
    finetuned: Sequence[str],
    output_path: str,
    method: str,
    params: Mapping[str, Any] | None = None,
    dare: DareSettings | None = None,
    options: OutputOptions | None = None,
    seed: int = 0,
    *,
    per_tensor: PerTensorSettings | None = None,
    extra_files: Mapping[str, str] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge fine-tuned checkpoints out of core with a registered ``method`` and its ``params`` (defaults filled
    in, validated before any model is read), optionally after a DARE pre-step; the same bytes as the in-memory
    functions on the vocabulary-aligned models. Needs at least two fine-tuned models. Writes a complete model folder
    at ``output_path`` (config, generation config and tokenizer from ``options.tokenizer_source``, default: the
    first fine-tuned model whose vocabulary matches the output) and returns the manifest. ``seed`` seeds a random
    method (DELLA); the DARE pre-step has its own in ``dare``.

    ``per_tensor`` gives values that vary per tensor (:class:`PerTensorSettings`; recorded in the manifest's
    ``method_details.per_tensor`` where they differ from ``params``); ``extra_files`` (file name → text) are written
    beside the manifest and ``manifest_extra`` (JSON-able) is added to it."""
    options = options or OutputOptions()
    if pretrained is None:  # adapters name their base model
        from model_merging_methods.lora import resolve_base_model

        pretrained = resolve_base_model(None, list(finetuned), options.name_resolver)
    for file_name in extra_files or {}:
        if not re.fullmatch(r"[\w][\w.\-]*", file_name) or file_name == "merge_manifest.json":
            raise MergeError(f"extra_files: {file_name!r} is not a plain file name for the output folder")
    finetuned = list(finetuned)
    spec = get_method(method)
    if not spec.streamable:
        raise MergeError(
            f"merging method {method!r} needs data statistics and is not available for streamed merging "
            f"(choose from {', '.join(stream_merging_methods())})"
        )
    if len(finetuned) < 2:
        raise MergeError(f"merging needs at least two fine-tuned models, got {len(finetuned)}")
    validated = spec.validate(dict(params or {}), len(finetuned))
    engine_dare: Dare | None = None
    recorded: dict[str, Any] = {"merging_method_name": "mask_merging" if dare is not None else method}
    if dare is not None:
        if not spec.dare_prestep:
            raise MergeError(f"{method} does not take DARE as a pre-step")
        engine_dare = dare.checked(len(finetuned))
        recorded.update(
            mask_apply_method=method,
            **dare.as_dict([engine_dare.rates[i + 1] for i in range(len(finetuned))]),
        )
    seed = engine_dare.seed if engine_dare is not None else check_seed("seed", seed)
    if spec.random and dare is None:
        recorded["seed"] = seed
    recorded.update(validated)
    recorded.update(
        exclude_param_names_regex=list(options.exclude_param_names_regex), dtype=options.dtype or "auto",
        vocab_policy=options.vocab_policy, pad_token=options.pad_token,
    )  # fmt: skip
    fts = list(range(1, len(finetuned) + 1))
    copy_from = 0 if spec.copy_from == "base" else 1
    runner = spec.stream_pass or execute

    if per_tensor is not None and per_tensor.dare_rates is not None and dare is None:
        raise MergeError("per-tensor DARE rates need the DARE pre-step")

    def body(executor: Executor) -> dict[str, Any]:
        if per_tensor is None:
            return runner(executor, spec, validated, fts, engine_dare, seed=seed)
        params_for, dare_for, varied = _per_tensor_settings(
            executor, spec, dict(params or {}), validated, dare, engine_dare, per_tensor, len(finetuned)
        )
        details = execute(
            executor, spec, validated, fts, engine_dare, seed=seed, params_for=params_for, dare_for=dare_for
        )
        return {**details, "per_tensor": varied}

    labels = [f"pretrained {pretrained}"] + [f"finetuned {f}" for f in finetuned]
    return _run(
        kind=method if dare is None else f"mask_merging+{method}", paths=[pretrained, *finetuned], labels=labels,
        output_path=output_path, parameters=recorded, options=options, side_candidates=fts, dtype_from=copy_from,
        stats_models=None, body=body, rewrites=spec.stream_pass is not None, extra_files=extra_files, manifest_extra=manifest_extra,
    )  # fmt: skip


def _per_tensor_settings(
    executor: Executor,
    spec,
    params: dict[str, Any],
    validated: dict[str, Any],
    dare: DareSettings | None,
    engine_dare: Dare | None,
    per_tensor: PerTensorSettings,
    num_models: int,
) -> tuple[Callable | None, Callable | None, dict[str, Any]]:
    """Every merged tensor's validated parameters and DARE pre-step (before any tensor is merged), as the
    per-tensor hooks of :func:`~model_merging_methods.engine.execute`, and what differs from the global values."""
    params_by_name: dict[str, dict[str, Any]] = {}
    dare_by_name: dict[str, Dare] = {}
    varied: dict[str, dict[str, Any]] = {}
    seen_params: dict[str, dict[str, Any]] = {}
    seen_dare: dict[str, Dare] = {}
    for plan in executor.plans:
        if not plan.is_float or plan.excluded:
            continue
        diff: dict[str, Any] = {}
        if per_tensor.params is not None:
            raw = dict(per_tensor.params(plan.name))
            key = repr(sorted(raw.items()))
            if key not in seen_params:
                try:
                    seen_params[key] = spec.validate(raw, num_models)
                except MergeError as exc:
                    raise MergeError(f"tensor {plan.name}: {exc}") from None
            params_by_name[plan.name] = seen_params[key]
            diff.update({k: v for k, v in seen_params[key].items() if v != validated.get(k)})
        if per_tensor.dare_rates is not None and dare is not None:
            rates = per_tensor.dare_rates(plan.name)
            key = repr(rates)
            if key not in seen_dare:
                try:
                    seen_dare[key] = replace(dare, weight_mask_rates=rates).checked(num_models)
                except MergeError as exc:
                    raise MergeError(f"tensor {plan.name}: {exc}") from None
            dare_by_name[plan.name] = seen_dare[key]
            tensor_rates = [seen_dare[key].rates[i + 1] for i in range(num_models)]
            if engine_dare is None or tensor_rates != [engine_dare.rates[i + 1] for i in range(num_models)]:
                diff["weight_mask_rates"] = tensor_rates
        if diff:
            varied[plan.name] = diff
    params_for = (lambda name: params_by_name.get(name, validated)) if per_tensor.params is not None else None
    dare_for = (
        (lambda name: dare_by_name.get(name, engine_dare)) if per_tensor.dare_rates is not None else None
    )
    return params_for, dare_for, varied


def stream_merge(
    pretrained: str,
    finetuned: Sequence[str],
    output_path: str,
    *,
    merging_method_name: str,
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
    extra_files: Mapping[str, str] | None = None,
    manifest_extra: Mapping[str, Any] | None = None,
    output_format: str = "model",
    lora_rank: int | None = None,
    lora_svd: str = "auto",
    pad_to_multiple_of: int | None = None,
    device: str | None = None,
    **method_params: Any,
) -> dict[str, Any]:
    """:func:`merge_checkpoints` spelled as the command line spells it: ``merging_method_name`` (or
    ``mask_merging`` with ``mask_apply_method`` and the DARE keywords), the method's parameters as keywords (those of
    other registered methods are ignored, as on the command line; unknown names are an error), and the output
    options."""
    method = merging_method_name
    dare = None
    if merging_method_name == "mask_merging":
        if mask_apply_method is None:
            raise MergeError("mask_merging needs mask_apply_method (the method applied after DARE)")
        if weight_mask_rates is None:
            raise MergeError("mask_merging needs weight_mask_rates")
        method = mask_apply_method
        dare = DareSettings(weight_mask_rates, use_weight_rescale, mask_strategy, weight_format, seed)
    spec = get_method(method)
    known = shared_params()
    unknown = sorted(set(method_params) - set(known))
    if unknown:
        raise MergeError(f"no merging method has a parameter {unknown[0]!r}")
    own = {p.name for p in spec.params}
    params = {k: v for k, v in method_params.items() if k in own}
    if dare is None and "weight_mask_rate" in own and weight_mask_rates is not None:
        params.setdefault("weight_mask_rate", weight_mask_rates)
    options = OutputOptions(
        exclude_param_names_regex=tuple(exclude_param_names_regex), dtype=dtype, max_shard_size=max_shard_size,
        vocab_policy=vocab_policy, pad_token=pad_token, tokenizer_source=tokenizer_source, overwrite=overwrite,
        num_threads=num_threads, name_resolver=name_resolver, output_format=output_format, lora_rank=lora_rank,
        lora_svd=lora_svd, pad_to_multiple_of=pad_to_multiple_of, device=device,
    )  # fmt: skip
    return merge_checkpoints(
        pretrained, finetuned, output_path, method, params, dare, options, seed=seed, extra_files=extra_files,
        manifest_extra=manifest_extra,
    )  # fmt: skip
