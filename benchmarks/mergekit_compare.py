"""Side by side with mergekit 0.1.5: Model Stock, SLERP, Breadcrumbs (deterministic) and DELLA (random).

    python benchmarks/mergekit_compare.py --mergekit_venv /tmp/mkvenv

Builds a tiny float32 LLaMA family in a temporary folder (a randomly initialised base from
``utils.tiny_models.build_tiny_llama`` and ``--num_finetuned`` models θ_i = θ_pre + σ(s + z_i) with a shared
direction s and own noise z_i, all N(0, 1), so the task vectors have pairwise cosines near 1/2), runs ``mergekit-yaml``
from ``--mergekit_venv`` as a separate process for each configuration, and our in-memory merge
(:func:`model_merging_methods.merging_methods.merge_state_dicts`) on the same state dicts.

* Deterministic methods: the max abs difference over every tensor, the number of differing entries, and, to explain
  the differences, the same comparison against a re-implementation of mergekit's rule where ours differs on purpose
  (Breadcrumbs: mergekit keeps int((1 − r − β)·n) entries, ours n − int(r·n) − int(β·n); Model Stock: mergekit
  divides each dot product by max(‖τ_i‖‖τ_j‖, 1e-6), ours by ‖τ_i‖‖τ_j‖).
* DELLA: with one model (mergekit ``rescale: false``, so a kept entry is non-zero, a dropped one zero) the keep
  fraction per rank decile within the rows, against the keep probability; with all models the merged delta's mean
  and std (mergekit's defaults: L1-norm rescale and disjoint mean), next to the un-dropped merge (TIES without trim).

Results: a JSON and a Markdown table in ``--work_dir`` (created if missing; only its two result files are written).
This is not a test: CI has no mergekit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from model_merging_methods.merging_methods import merge_state_dicts, ties_merging  # noqa: E402
from model_merging_methods.methods.della import keep_probabilities  # noqa: E402

StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------------- family


def build_family(root: Path, args: argparse.Namespace) -> tuple[dict[str, Path], StateDict, list[StateDict]]:
    """Save base + fine-tuned float32 LLaMA folders (safetensors + config.json); return paths and state dicts."""
    from utils.tiny_models import build_tiny_llama, tiny_llama_config

    config = tiny_llama_config(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
        num_attention_heads=max(1, args.hidden_size // 32), intermediate_size=args.intermediate_size,
    )  # fmt: skip
    model = build_tiny_llama(config, seed=args.seed)
    pre = {n: t.detach().clone() for n, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(args.seed + 1)
    shared = {n: torch.randn(t.shape, generator=g) for n, t in pre.items()}
    paths = {"base": root / "base"}
    model.save_pretrained(str(paths["base"]))
    fts = []
    for i in range(args.num_finetuned):
        sd = {
            n: t
            + (args.delta_std if t.dim() > 1 else args.norm_delta_std)
            * (shared[n] + torch.randn(t.shape, generator=g))
            for n, t in pre.items()
        }
        model.load_state_dict(sd)
        paths[f"ft{i}"] = root / f"ft{i}"
        model.save_pretrained(str(paths[f"ft{i}"]))
        fts.append(sd)
    return paths, pre, fts


def load_folder(folder: Path) -> StateDict:
    from safetensors.torch import load_file

    out: StateDict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ----------------------------------------------------------------------------------------------------- mergekit


def run_mergekit(venv: Path, config: str, out: Path, seed: int) -> tuple[StateDict, float]:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        raise SystemExit(f"error: {exe} not found")
    cfg = out.with_suffix(".yml")
    cfg.write_text(config)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(exe), str(cfg), str(out), "--no-copy-tokenizer", "--random-seed", str(seed), "--quiet",
         "--no-write-model-card"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(
            f"error: mergekit failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return load_folder(out), wall


def models_yaml(paths: list[Path], **params) -> str:
    lines = []
    for p in paths:
        lines.append(f"  - model: {p}")
        if params:
            lines.append("    parameters:")
            lines += [f"      {k}: {v}" for k, v in params.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- measures


def max_abs_diff(a: StateDict, b: StateDict) -> tuple[float, int, int, str]:
    """(max |a − b| over common tensors, differing entries, total entries, the tensor holding the max)."""
    worst, count, total, where = 0.0, 0, 0, ""
    names = sorted(set(a) & set(b))
    for n in names:
        d = (a[n].double() - b[n].double()).abs()
        count += int((d != 0).sum())
        total += d.numel()
        if d.numel() and float(d.max()) > worst:
            worst, where = float(d.max()), n
    return worst, count, total, where


def mergekit_breadcrumbs_rule(pre: StateDict, fts: list[StateDict], density: float, gamma: float, lam: float):
    """mergekit's magnitude_outliers count rule, written here: keep the sorted-ascending |τ| at positions
    n_bot .. n_bot + int(density·n) − 1 with n_bot = n − int(density·n) − int(gamma·n) (stable ties)."""
    out = {}
    for name, base in pre.items():
        total = torch.zeros_like(base)
        for ft in fts:
            tau = ft[name] - base
            n = tau.numel()
            target, top = int(density * n), int(gamma * n)
            bot = max(0, n - target - top)
            order = torch.argsort(tau.abs().reshape(-1), stable=True)
            keep = torch.zeros(n, dtype=torch.bool)
            keep[order[bot : bot + target]] = True
            total += torch.where(keep.reshape(tau.shape), tau, 0.0)
        out[name] = base + lam * total
    return out


def mergekit_model_stock_rule(pre: StateDict, fts: list[StateDict]) -> StateDict:
    """Ours with mergekit's cosine denominator max(‖τ_i‖‖τ_j‖, 1e-6), written here (float32, per tensor)."""
    out = {}
    for name, base in pre.items():
        taus = [(ft[name] - base).reshape(-1) for ft in fts]
        cosines = []
        for i in range(len(taus)):
            for j in range(i + 1, len(taus)):
                product = torch.norm(taus[i], dim=-1) * torch.norm(taus[j], dim=-1)
                cosines.append(((taus[i] * taus[j]).sum(dim=-1) / product.clamp(min=1e-6)).clamp(-1, 1))
        c = torch.stack(cosines).mean(dim=0)
        k = len(fts)
        den = 1 + (k - 1) * c
        t = torch.where(den.abs() < 1e-6, 0.0, (k * c) / torch.where(den.abs() < 1e-6, 1.0, den))
        average = sum(ft[name] for ft in fts) / k
        out[name] = t * average + (1 - t) * base
    return out


def rank_deciles(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(decile 0..9 of rank / (n − 1) within each row, rank_norm), flattened like ``tau``."""
    rows = tau.reshape(-1, tau.shape[-1] if tau.dim() else 1)
    n = rows.shape[1]
    rank = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).double()
    rank_norm = rank / max(1, n - 1)
    return (rank_norm * 10).clamp(max=9.999).long().reshape(-1), rank_norm.reshape(-1)


def keep_by_decile(pre: StateDict, ft: StateDict, merged: StateDict, p: float, eps: float) -> list[dict]:
    kept = torch.zeros(10, dtype=torch.float64)
    seen = torch.zeros(10, dtype=torch.float64)
    prob = torch.zeros(10, dtype=torch.float64)
    for name, base in pre.items():
        tau = ft[name] - base
        if tau.numel() < 2 or tau.shape[-1] < 2:
            continue
        decile, _ = rank_deciles(tau)
        q = keep_probabilities(tau, p, eps).double().reshape(-1)
        k = ((merged[name] - base).reshape(-1) != 0).double()
        kept.index_add_(0, decile, k)
        seen.index_add_(0, decile, torch.ones_like(k))
        prob.index_add_(0, decile, q)
    return [
        {
            "decile": d,
            "entries": int(seen[d]),
            "keep_fraction": float(kept[d] / seen[d]),
            "probability": float(prob[d] / seen[d]),
        }
        for d in range(10)
    ]


def delta_stats(pre: StateDict, merged: StateDict, reference: StateDict | None = None) -> dict:
    deltas = torch.cat([(merged[n] - pre[n]).double().reshape(-1) for n in pre])
    out = {
        "mean": float(deltas.mean()),
        "std": float(deltas.std()),
        "zero_fraction": float((deltas == 0).double().mean()),
    }
    if reference is not None:
        ref = torch.cat([(reference[n] - pre[n]).double().reshape(-1) for n in pre])
        out["corr_with_undropped"] = float(torch.corrcoef(torch.stack([deltas, ref]))[0, 1])
    return out


# ----------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit_venv", required=True, help="virtualenv with mergekit 0.1.5 (mergekit-yaml)")
    p.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "_work"))
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=256)
    p.add_argument("--intermediate_size", type=int, default=256)
    p.add_argument("--num_finetuned", type=int, default=3)
    p.add_argument("--delta_std", type=float, default=0.005)
    p.add_argument("--norm_delta_std", type=float, default=1e-5, help="σ of the 1-D (norm) weights' deltas")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    venv = Path(args.mergekit_venv)
    torch.set_num_threads(1)
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    }
    with tempfile.TemporaryDirectory(prefix="mergekit_compare_") as tmp:
        root = Path(tmp)
        paths, pre, fts = build_family(root, args)
        ft_paths = [paths[f"ft{i}"] for i in range(args.num_finetuned)]
        results["family"] = {
            "parameters_per_model": sum(t.numel() for t in pre.values()), "tensors": len(pre),
            "num_finetuned": args.num_finetuned, "delta_std": args.delta_std, "norm_delta_std": args.norm_delta_std,
            "dtype": "float32",
        }  # fmt: skip
        rows = []

        def deterministic(label, ours, theirs, wall, note, explained=None):
            worst, count, total, where = max_abs_diff(ours, theirs)
            row = {"method": label, "max_abs_diff": worst, "differing": count, "entries": total, "at": where,
                   "max_abs_value": max(float(t.abs().max()) for t in ours.values()), "mergekit_s": wall,
                   "note": note}  # fmt: skip
            if explained is not None:
                row["max_abs_diff_vs_mergekit_rule"] = max_abs_diff(explained, theirs)[0]
                row["differing_vs_mergekit_rule"] = max_abs_diff(explained, theirs)[1]
            rows.append(row)
            print(json.dumps(row), flush=True)

        # Model Stock
        cfg = f"merge_method: model_stock\nbase_model: {paths['base']}\nmodels:\n{models_yaml(ft_paths)}\ndtype: float32\n"
        theirs, wall = run_mergekit(venv, cfg, root / "mk_model_stock", args.seed)
        ours = merge_state_dicts("model_stock_merging", pre, fts)
        rule = mergekit_model_stock_rule(pre, fts)
        deterministic("model_stock (3 models)", ours, theirs, wall, "per tensor", explained=rule)

        # SLERP, two t values
        for t in (0.3, 0.5):
            cfg = (
                f"merge_method: slerp\nbase_model: {ft_paths[0]}\nmodels:\n{models_yaml(ft_paths[:2])}\n"
                f"parameters:\n  t: {t}\ndtype: float32\n"
            )
            theirs, wall = run_mergekit(venv, cfg, root / f"mk_slerp_{t}", args.seed)
            ours = merge_state_dicts("slerp_merging", None, fts[:2], slerp_t=t)
            deterministic(f"slerp t={t} (ft0 → ft1)", ours, theirs, wall, "per tensor")

        # Breadcrumbs, three settings
        for r, beta, lam in ((0.8, 0.01, 1.0), (0.5, 0.05, 0.7), (0.9, 0.0, 1.0)):
            density = round(1.0 - r - beta, 10)
            cfg = (
                f"merge_method: breadcrumbs\nbase_model: {paths['base']}\nmodels:\n"
                f"{models_yaml(ft_paths, weight=1.0, density=density, gamma=beta)}\n"
                f"parameters:\n  normalize: false\n  lambda: {lam}\ndtype: float32\n"
            )
            theirs, wall = run_mergekit(venv, cfg, root / f"mk_breadcrumbs_{r}_{beta}", args.seed)
            ours = merge_state_dicts(
                "breadcrumbs_merging", pre, fts, param_value_mask_rate=r, outlier_mask_rate=beta,
                scaling_coefficient=lam,
            )  # fmt: skip
            rule = mergekit_breadcrumbs_rule(pre, fts, density, beta, lam)
            deterministic(f"breadcrumbs r={r} β={beta} λ={lam}", ours, theirs, wall,
                          f"mergekit density={density} gamma={beta}", explained=rule)  # fmt: skip
        results["deterministic"] = rows

        # DELLA: keep fraction per rank decile (one model, no rescale) and merged delta statistics (all models)
        della = {}
        pr, eps, lam = 0.5, 0.2, 1.0
        cfg = (
            f"merge_method: della\nbase_model: {paths['base']}\nmodels:\n"
            f"{models_yaml(ft_paths[:1], weight=1.0, density=1 - pr, epsilon=eps)}\n"
            f"parameters:\n  rescale: false\n  lambda: {lam}\ndtype: float32\n"
        )
        theirs, _ = run_mergekit(venv, cfg, root / "mk_della_one", args.seed)
        ours = merge_state_dicts(
            "della_merging", pre, fts[:1], weight_mask_rate=pr, della_epsilon=eps, seed=args.seed
        )
        della["setting"] = {"p": pr, "epsilon": eps, "lambda": lam, "mergekit_density": 1 - pr}
        della["keep_by_decile"] = {
            "ours": keep_by_decile(pre, fts[0], ours, pr, eps),
            "mergekit": keep_by_decile(pre, fts[0], theirs, pr, eps),
        }
        cfg = (
            f"merge_method: della\nbase_model: {paths['base']}\nmodels:\n"
            f"{models_yaml(ft_paths, weight=1.0, density=1 - pr, epsilon=eps)}\n"
            f"parameters:\n  lambda: {lam}\ndtype: float32\n"
        )
        theirs, _ = run_mergekit(venv, cfg, root / "mk_della_all", args.seed)
        undropped = ties_merging(pre, fts, 0.0, lam, "tensor")
        della["merged_delta"] = {
            "undropped (TIES, no trim)": delta_stats(pre, undropped),
            "ours (seed 0)": delta_stats(pre, ours_all := merge_state_dicts(
                "della_merging", pre, fts, weight_mask_rate=pr, della_epsilon=eps, scaling_coefficient=lam, seed=0), undropped),
            "ours (seed 1)": delta_stats(pre, merge_state_dicts(
                "della_merging", pre, fts, weight_mask_rate=pr, della_epsilon=eps, scaling_coefficient=lam, seed=1), undropped),
            "mergekit della (L1 rescale, normalize)": delta_stats(pre, theirs, undropped),
        }  # fmt: skip
        del ours_all
        results["della"] = della

    results["load_average_at_end"] = os.getloadavg()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "mergekit_compare.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (work / "mergekit_compare.md").write_text(table)
    print(table)
    return results


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`", "", f"family: {results['family']}", ""]
    lines += ["| method | max abs diff | differing entries | max abs value | where | vs mergekit's rule (max, differing) |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["deterministic"]:
        rule = (
            f"{r['max_abs_diff_vs_mergekit_rule']:.3g}, {r['differing_vs_mergekit_rule']}"
            if "max_abs_diff_vs_mergekit_rule" in r
            else "—"
        )
        lines.append(
            f"| {r['method']} | {r['max_abs_diff']:.3g} | {r['differing']} / {r['entries']} | "
            f"{r['max_abs_value']:.3g} | {r['at']} | {rule} |"
        )
    d = results["della"]
    lines += ["", f"DELLA {d['setting']}: keep fraction per rank decile (one model)", "",
              "| decile | entries | keep probability | ours | mergekit |", "|---|---|---|---|---|"]  # fmt: skip
    for o, m in zip(d["keep_by_decile"]["ours"], d["keep_by_decile"]["mergekit"]):
        lines.append(
            f"| {o['decile']} | {o['entries']} | {o['probability']:.4f} | {o['keep_fraction']:.4f} | "
            f"{m['keep_fraction']:.4f} |"
        )
    lines += ["", "merged delta (all models)", "", "| merge | mean | std | zero fraction | corr. with un-dropped |",
              "|---|---|---|---|---|"]  # fmt: skip
    for k, s in d["merged_delta"].items():
        corr = f"{s['corr_with_undropped']:.4f}" if "corr_with_undropped" in s else "—"
        lines.append(f"| {k} | {s['mean']:.3e} | {s['std']:.3e} | {s['zero_fraction']:.4f} | {corr} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
