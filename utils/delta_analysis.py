"""Statistics of delta parameters δ = θ_fine-tuned − θ_pre-trained, streamed one tensor at a time.

The paper's observation (Yu et al., 2024, §4.3/Fig. 4): DARE works for SFT models whose delta parameters are
small — |δ| within about 0.005 — and drops of 90–99% then keep the model's ability; with deltas around 0.03
(e.g. WizardCoder-Python measured against Llama-2 instead of its real backbone CodeLlama) DARE breaks.

Quantiles come from a fixed histogram of log10|δ| (``BINS_PER_DECADE`` bins per decade from 1e-12 to 1e3, plus
a count of exact zeros), so any model size is summarised in constant memory; a quantile is exact up to the bin
width (a relative error below 10^(1/BINS_PER_DECADE) − 1 ≈ 1.2%). Max, mean |δ| and RMS are exact.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The paper's reference points for the regime where DARE keeps a model's ability.
DARE_WORKS_BELOW: float = 0.005
DARE_BREAKS_ABOVE: float = 0.03

LOG10_MIN, LOG10_MAX = -12.0, 3.0
BINS_PER_DECADE = 200
NUM_BINS = int((LOG10_MAX - LOG10_MIN) * BINS_PER_DECADE)
QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)


def module_type(name: str) -> str:
    """The kind of module a parameter belongs to, independent of its layer: the name's components after the last
    numeric one (layer index), without the trailing ``weight``/``bias``.

    ``model.layers.3.self_attn.q_proj.weight`` → ``self_attn.q_proj``; ``model.embed_tokens.weight`` →
    ``embed_tokens``; ``bert.encoder.layer.0.attention.self.query.weight`` → ``attention.self.query``.
    """
    parts = name.split(".")
    if len(parts) > 1 and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    if numeric and numeric[-1] < len(parts) - 1:
        return ".".join(parts[numeric[-1] + 1 :])
    return parts[-1]


@dataclass
class AbsHistogram:
    """Streaming summary of |x| over many tensors: exact count/zeros/max/sum/sum of squares, log-binned histogram."""

    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(NUM_BINS, dtype=torch.float64))
    n: int = 0
    zeros: int = 0
    max: float = 0.0
    sum_abs: float = 0.0
    sum_sq: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1).to(torch.float32).abs()
        if a.numel() == 0:
            return
        self.n += a.numel()
        nz = a[a > 0]
        self.zeros += a.numel() - nz.numel()
        self.max = max(self.max, float(a.max()))
        self.sum_abs += float(a.sum(dtype=torch.float64))
        self.sum_sq += float((a.to(torch.float64) ** 2).sum())
        if nz.numel():
            idx = ((torch.log10(nz) - LOG10_MIN) * BINS_PER_DECADE).floor().clamp_(0, NUM_BINS - 1).long()
            self.counts += torch.bincount(idx, minlength=NUM_BINS).to(torch.float64)

    def merge(self, other: AbsHistogram) -> None:
        self.counts += other.counts
        self.n += other.n
        self.zeros += other.zeros
        self.max = max(self.max, other.max)
        self.sum_abs += other.sum_abs
        self.sum_sq += other.sum_sq

    def quantile(self, q: float) -> float:
        """The q-quantile of |x| (log-linear interpolation inside the bin; exact zeros count as 0)."""
        if self.n == 0:
            return math.nan
        rank = q * self.n
        if rank <= self.zeros:
            return 0.0
        cum = torch.cumsum(self.counts, 0)
        target = rank - self.zeros
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).clamp(max=NUM_BINS - 1))
        before = float(cum[i - 1]) if i > 0 else 0.0
        frac = (target - before) / max(float(self.counts[i]), 1.0)
        value = 10 ** (LOG10_MIN + (i + min(max(frac, 0.0), 1.0)) / BINS_PER_DECADE)
        return min(value, self.max)

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {
            "numel": self.n,
            "zero_fraction": self.zeros / self.n if self.n else math.nan,
            "max_abs": self.max,
            "mean_abs": self.sum_abs / self.n if self.n else math.nan,
            "rms": math.sqrt(self.sum_sq / self.n) if self.n else math.nan,
        }
        for q in QUANTILES:
            out[f"q{q * 100:g}_abs"] = self.quantile(q)
        return out

    def bins(self, per_decade: int = 20) -> tuple[list[float], list[float]]:
        """(bin edges, counts) over the non-empty range of the histogram, re-binned to ``per_decade`` bins per
        decade (a divisor of ``BINS_PER_DECADE``) for plotting; one more edge than counts."""
        if BINS_PER_DECADE % per_decade:
            raise ValueError(f"per_decade must divide {BINS_PER_DECADE}, got {per_decade}")
        group = BINS_PER_DECADE // per_decade
        coarse = self.counts.view(-1, group).sum(1)
        nz = torch.nonzero(coarse).flatten()
        if nz.numel() == 0:
            return [], []
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        edges = [10 ** (LOG10_MIN + i / per_decade) for i in range(lo, hi + 1)]
        return edges, coarse[lo:hi].tolist()


@dataclass
class DeltaReport:
    """Everything :func:`delta_statistics` measures."""

    overall: AbsHistogram
    by_module: dict[str, AbsHistogram]
    per_tensor: list[dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.summary(),
            "by_module_type": {k: v.summary() for k, v in sorted(self.by_module.items())},
            "per_tensor": self.per_tensor,
            "notes": self.notes,
            "verdict": dare_regime_verdict(self.overall.summary()),
        }


def delta_statistics(
    names: Iterable[str],
    read_pair: Callable[[str], tuple[torch.Tensor, torch.Tensor]],
    exclude_param_names_regex: Iterable[str] = (),
    progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
) -> DeltaReport:
    """Stream δ = fine-tuned − pre-trained over ``names`` (``read_pair(name)`` returns (finetuned, pretrained)).

    Non-floating tensors and names matching an exclusion regex (``re.match``) are skipped. When the two tensors
    differ only in their first dimension (an added vocabulary row such as ``[PAD]``) the common rows are compared
    and a note says so; any other shape mismatch raises ``ValueError``. A non-finite δ raises ``ValueError``.
    """
    excl = list(exclude_param_names_regex)
    overall = AbsHistogram()
    by_module: dict[str, AbsHistogram] = {}
    per_tensor: list[dict[str, Any]] = []
    notes: list[str] = []
    it = list(names)
    for name in progress(it) if progress else it:
        if any(re.match(p, name) for p in excl):
            continue
        ft, pre = read_pair(name)
        if not (ft.is_floating_point() and pre.is_floating_point()):
            continue
        if ft.shape != pre.shape:
            if ft.dim() == pre.dim() and ft.dim() >= 1 and ft.shape[1:] == pre.shape[1:]:
                rows = min(ft.shape[0], pre.shape[0])
                notes.append(
                    f"{name}: {ft.shape[0]} vs {pre.shape[0]} rows (added vocabulary); compared the first {rows}"
                )
                ft, pre = ft[:rows], pre[:rows]
            else:
                raise ValueError(
                    f"shape mismatch for {name}: fine-tuned {tuple(ft.shape)} vs pre-trained {tuple(pre.shape)}"
                )
        delta = ft.to(torch.float32) - pre.to(torch.float32)
        if not torch.isfinite(delta).all():
            raise ValueError(f"non-finite delta in tensor {name}")
        h = AbsHistogram()
        h.update(delta)
        overall.merge(h)
        by_module.setdefault(module_type(name), AbsHistogram()).merge(h)
        s = h.summary()
        per_tensor.append(
            {
                "name": name,
                "module_type": module_type(name),
                "numel": s["numel"],
                "max_abs": s["max_abs"],
                "mean_abs": s["mean_abs"],
                "q99_abs": s["q99_abs"],
            }
        )
    if overall.n == 0:
        raise ValueError("no floating-point tensor in common to compare")
    return DeltaReport(overall, by_module, per_tensor, notes)


def delta_statistics_of_state_dicts(
    finetuned: Mapping[str, torch.Tensor],
    pretrained: Mapping[str, torch.Tensor],
    exclude_param_names_regex: Iterable[str] = (),
) -> DeltaReport:
    """:func:`delta_statistics` for two in-memory state dicts (names present in both)."""
    names = [n for n in finetuned if n in pretrained]
    return delta_statistics(names, lambda n: (finetuned[n], pretrained[n]), exclude_param_names_regex)


def dare_regime_verdict(summary: Mapping[str, float]) -> str:
    """One line placing the delta size against the paper's regime, judged on the 99.9th percentile of |δ|
    (the bulk of the deltas; the max is often one outlier such as a new embedding row)."""
    q = float(summary["q99.9_abs"])
    mx = float(summary["max_abs"])
    head = f"|δ| 99.9th percentile {q:.3g}, max {mx:.3g}"
    if q <= DARE_WORKS_BELOW:
        return (
            f"IN DARE's regime: {head} is within ~{DARE_WORKS_BELOW} (paper: drop rates of 0.9-0.99 keep the "
            "ability at this delta size)."
        )
    if q < DARE_BREAKS_ABOVE:
        return (
            f"BETWEEN regimes: {head} is above ~{DARE_WORKS_BELOW} but below ~{DARE_BREAKS_ABOVE} (expect DARE to "
            "hold at moderate drop rates and to break earlier than in the paper; measure before relying on 0.9+)."
        )
    return (
        f"OUTSIDE DARE's regime: {head} reaches ~{DARE_BREAKS_ABOVE} or more (paper: DARE breaks at this delta "
        "size, e.g. WizardCoder-Python against Llama-2; keep drop rates small or use the model's real backbone)."
    )


def summary_rows(report: DeltaReport) -> list[dict[str, Any]]:
    """Flat table rows: one for all parameters, then one per module type."""
    rows = [{"module_type": "ALL", **report.overall.summary()}]
    rows += [{"module_type": k, **v.summary()} for k, v in sorted(report.by_module.items())]
    return rows


def stream_delta_statistics(
    pretrained: str, finetuned: str, exclude_param_names_regex: Iterable[str] = (), progress: bool = True
) -> tuple[DeltaReport, list[str]]:
    """:func:`delta_statistics` of two checkpoints (local folders, registry names or hub ids in the HF cache)
    read one tensor at a time with the streaming engine's reader; also returns the names found in only one of
    them (skipped). Problems become ``UserError`` naming the models."""
    from tqdm.auto import tqdm

    from model_merging_methods.checkpoint_io import CheckpointReader, resolve_model_path
    from model_merging_methods.lora import open_model_or_adapter
    from utils.cli import UserError
    from utils.llm_registry import hub_id

    pre_path, ft_path = resolve_model_path(pretrained, hub_id), resolve_model_path(finetuned, hub_id)
    with (
        CheckpointReader(pre_path, label=pretrained) as pre,
        # a LoRA adapter is read as θ = θ_pre + s·B·A, in float32 so that δ is the adapter's, not its rounding
        open_model_or_adapter(ft_path, pre, finetuned, name_resolver=hub_id, dtype=torch.float32) as ft,
    ):
        common = [n for n in ft.names() if n in pre.infos]
        only = sorted(set(ft.names()) ^ set(pre.names()))
        if not common:
            raise UserError(
                f"{finetuned} and {pretrained} share no parameter name: not the same architecture?"
            )

        def bar(names):
            return tqdm(names, desc=f"δ {Path(finetuned).name}", unit="tensor", disable=not progress)

        try:
            report = delta_statistics(
                common, lambda n: (ft.read(n), pre.read(n)), exclude_param_names_regex, bar
            )
        except ValueError as exc:
            raise UserError(f"{finetuned} vs {pretrained}: {exc}") from exc
    return report, only
