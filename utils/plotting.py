"""PNG plots of the paper's figures: accuracy against drop rate (Fig. 1a style), merge matrices, |δ| histograms.

matplotlib runs on its non-interactive Agg backend (no display needed). Every function writes one PNG
atomically (temporary file, then rename) and returns its path.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a plot is an ordinary file
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        _pyplot().close(fig)
    return path


def _rate_label(r: float) -> str:
    return f"{r:g}"


def plot_drop_rate_curves(
    curves: Mapping[str, Mapping[float, float]],
    path: str | Path,
    *,
    title: str = "Accuracy against drop rate",
    ylabel: str = "accuracy",
    markers: Mapping[str, Mapping[str, float]] | None = None,
    references: Mapping[str, float] | None = None,
    dpi: int = 110,
) -> Path:
    """Lines of a metric against the drop rate, one per curve (``{label: {rate: value}}``), on evenly spaced
    categorical x positions (so 0.9 and 0.99 are apart, as in the paper's Figure 1a).

    ``markers``: ``{curve label: {ablation label: value}}``, single points drawn at x = the curve's rate 0.9
    position (for DropOnly / magnitude pruning at 0.9). ``references``: horizontal dashed lines (e.g. the base).
    """
    plt = _pyplot()
    rates = sorted({float(r) for c in curves.values() for r in c})
    xpos = {r: i for i, r in enumerate(rates)}
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, points) in enumerate(curves.items()):
        color = colors[i % len(colors)]
        rs = sorted(points)
        ax.plot([xpos[float(r)] for r in rs], [points[r] for r in rs], "o-", color=color, label=label)
        for j, (mlabel, value) in enumerate((markers or {}).get(label, {}).items()):
            x = xpos.get(0.9, len(rates) - 1) + 0.12 * (j + 1)
            ax.plot(
                [x],
                [value],
                ["s", "^", "v", "D"][j % 4],
                color=color,
                mfc="none",
                ms=8,
                label=f"{label}: {mlabel}",
            )
    for label, value in (references or {}).items():
        ax.axhline(value, ls="--", lw=1, color="grey")
        ax.text(0, value, f" {label}", va="bottom", fontsize=8, color="grey")
    ax.set_xticks(range(len(rates)), [_rate_label(r) for r in rates])
    ax.set_xlabel("drop rate p")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", framealpha=0.9)
    return _save(fig, path, dpi)


def plot_merge_matrix(
    values: Sequence[Sequence[float | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    *,
    title: str = "Accuracy of each model on each skill",
    vmin: float = 0.0,
    vmax: float = 1.0,
    fmt: str = "{:.2f}",
    dpi: int = 110,
) -> Path:
    """A heat map (rows = models, columns = skills/datasets) with every value written in its cell."""
    plt = _pyplot()
    import numpy as np

    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(col_labels), 0.9 + 0.42 * len(row_labels)))
    im = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.tick_params(axis="x", labelrotation=20)
    mid = (vmin + vmax) / 2
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            v = arr[i, j]
            text = "-" if np.isnan(v) else fmt.format(v)
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=9,
                color="black" if (not np.isnan(v) and v > mid) else "white",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return _save(fig, path, dpi)


def plot_delta_histograms(
    histograms: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Distribution of |δ| (fine-tuned − pre-trained)",
    vlines: Mapping[str, float] | None = None,
    dpi: int = 110,
) -> Path:
    """Histograms of |δ| on a log x axis, one step line per model (``{label: (left bin edges, counts)}`` with
    one more edge than counts), as a fraction of that model's parameters; ``vlines`` mark reference values
    (the paper's ~0.005 "works" and ~0.03 "breaks")."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for label, (edges, counts) in histograms.items():
        if not counts:
            continue
        total = float(sum(counts)) or 1.0
        ax.stairs([c / total for c in counts], edges, label=label)
    for label, x in (vlines or {}).items():
        ax.axvline(x, ls="--", lw=1, color="grey")
        ax.text(x, ax.get_ylim()[1] * 0.95, f" {label}", fontsize=8, color="grey", va="top")
    ax.set_xscale("log")
    ax.set_xlabel("|δ|")
    ax.set_ylabel("fraction of parameters per bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(histograms) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path, dpi)
