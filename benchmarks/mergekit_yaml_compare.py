"""The same mergekit YAML run by mergekit 0.1.5 and by us (``merge_llms_instruct_math_code.py --config``).

    python benchmarks/mergekit_yaml_compare.py --mergekit_venv /tmp/mkvenv

Builds a tiny float32 LLaMA family in a temporary folder (``benchmarks/mergekit_compare.build_family``: a random base
and ``--num_finetuned`` models θ_i = θ_pre + σ(s + z_i)), writes each configuration below, runs ``mergekit-yaml`` from
``--mergekit_venv`` (a separate process and virtualenv) and our merge script in this process on it, and compares:

* deterministic methods (linear, task_arithmetic, ties, breadcrumbs, breadcrumbs_ties, model_stock, slerp), with
  per-model weights, densities, per-layer gradients and ``filter`` lists: the max abs difference over every tensor
  and the number of differing entries (0 = identical bytes);
* random methods (dare_ties, dare_linear, della, della_linear): mergekit draws its masks from the global torch RNG
  (``--random-seed``), we from per-tensor seeded streams, so the masks differ; compared are the keep fraction (the
  first model alone, ``rescale: false``, so an entry is kept iff it is non-zero; DELLA per rank decile) and the merged delta's
  statistics (mean, std, zero fraction, correlation with the undropped merge), for two seeds of each tool;
* merges run from flags: the ``mergekit_config.yml`` our script writes beside the manifest, run by mergekit.

Results: ``mergekit_yaml_compare.json`` and ``.md`` in ``--work_dir`` (created if missing; only those two files are
written there). Not a test: CI has no mergekit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

from benchmarks.mergekit_compare import build_family, keep_by_decile, load_folder, max_abs_diff  # noqa: E402

StateDict = dict[str, torch.Tensor]

# name, merge_method config body ({base}, {ft0}, {ft1}, {ft2} are the model folders), what to expect
DETERMINISTIC = [
    (
        "linear, weights",
        """
merge_method: linear
models:
  - {{model: {ft0}, parameters: {{weight: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 0.3}}}}
  - {{model: {ft2}, parameters: {{weight: 0.2}}}}
dtype: float32
""",
    ),
    (
        "linear, normalize false, base included",
        """
merge_method: linear
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.7}}}}
  - {{model: {ft1}, parameters: {{weight: 0.6}}}}
parameters: {{weight: -0.3, normalize: false}}
dtype: float32
""",
    ),
    (
        "task_arithmetic, weights, lambda",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 1.0}}}}
  - {{model: {ft1}, parameters: {{weight: 0.7}}}}
  - {{model: {ft2}, parameters: {{weight: 0.5}}}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    ),
    (
        "task_arithmetic, weight gradient + lambda filter, normalize",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: [0.2, 1.0]}}}}
  - {{model: {ft1}, parameters: {{weight: [1.0, 0.5, 0.0]}}}}
  - {{model: {ft2}}}
parameters:
  weight: 0.6
  normalize: true
  lambda:
    - {{filter: mlp, value: 0.5}}
    - {{filter: self_attn, value: [1.0, 0.25]}}
    - {{value: 1.0}}
dtype: float32
""",
    ),
    (
        "ties, density 0.5",
        """
merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {ft1}, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {ft2}, parameters: {{weight: 1.0, density: 0.5}}}}
dtype: float32
""",
    ),
    (
        "ties, mergekit's example (density gradient, weight gradient, weight filter)",
        """
merge_method: ties
base_model: {base}
models:
  - model: {ft0}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {ft1}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {ft2}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    ),
    (
        "ties, normalize false, rescale true, lambda 0.7",
        """
merge_method: ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.9, density: 0.3}}}}
  - {{model: {ft1}, parameters: {{weight: 0.4, density: 0.6}}}}
  - {{model: {ft2}, parameters: {{weight: 0.6, density: 0.2}}}}
parameters: {{normalize: false, rescale: true, lambda: 0.7}}
dtype: float32
""",
    ),
    (
        "breadcrumbs, density 0.9, gamma 0.01",
        """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 1.0, density: 0.9, gamma: 0.01}}}}
  - {{model: {ft1}, parameters: {{weight: 1.0, density: 0.9, gamma: 0.01}}}}
  - {{model: {ft2}, parameters: {{weight: 1.0, density: 0.9, gamma: 0.01}}}}
dtype: float32
""",
    ),
    (
        "breadcrumbs, weights, densities, gamma 0.05, normalize, lambda",
        """
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.5, density: 0.4}}}}
  - {{model: {ft1}, parameters: {{weight: 0.8, density: 0.6}}}}
  - {{model: {ft2}, parameters: {{weight: 0.3, density: [0.2, 0.8]}}}}
parameters: {{gamma: 0.05, normalize: true, lambda: 1.5}}
dtype: float32
""",
    ),
    (
        "breadcrumbs_ties, weights",
        """
merge_method: breadcrumbs_ties
base_model: {base}
models:
  - {{model: {ft0}, parameters: {{weight: 0.7, density: 0.5, gamma: 0.02}}}}
  - {{model: {ft1}, parameters: {{weight: 1.0, density: 0.5, gamma: 0.02}}}}
  - {{model: {ft2}, parameters: {{weight: 0.4, density: 0.5, gamma: 0.02}}}}
dtype: float32
""",
    ),
    (
        "model_stock",
        """
merge_method: model_stock
base_model: {base}
models:
  - model: {ft0}
  - model: {ft1}
  - model: {ft2}
dtype: float32
""",
    ),
    (
        "slerp, t 0.3",
        """
merge_method: slerp
base_model: {ft0}
models:
  - model: {ft0}
  - model: {ft1}
parameters: {{t: 0.3}}
dtype: float32
""",
    ),
    (
        "slerp, t gradients by filter (mergekit's example)",
        """
merge_method: slerp
base_model: {ft0}
models:
  - model: {ft0}
  - model: {ft1}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    ),
]

RANDOM = {
    "dare_ties": "dare_ties (L1 rescale, disjoint sum)",
    "dare_linear": "dare_linear (L1 rescale, sum)",
    "della": "della (L1 rescale, disjoint mean)",
    "della_linear": "della_linear (L1 rescale, sum)",
}

# merges run from flags: their mergekit_config.yml is run by mergekit
FROM_FLAGS = [
    ("average_merging", []),
    ("task_arithmetic", ["--scaling_coefficient", "0.7"]),
    ("model_stock_merging", []),
    ("slerp_merging", ["--slerp_t", "0.4"]),
    ("ties_merging", ["--param_value_mask_rate", "0.5", "--trim_scope", "global"]),
]


def run_mergekit(venv: Path, config: Path, out: Path, seed: int) -> float:
    exe = venv / "bin" / "mergekit-yaml"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [str(exe), str(config), str(out), "--no-copy-tokenizer", "--random-seed", str(seed), "--quiet",
         "--no-write-model-card"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"error: mergekit failed on {config}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def run_ours(argv: list[str]) -> float:
    import merge_llms_instruct_math_code as script

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        script.main([*argv, "--skip_evaluation", "--num_threads", "1"])
    return time.perf_counter() - start


def mergekit_rule(label: str):
    """(description, context manager) re-implementing mergekit's rule where ours differs on purpose: the unstable
    sort of |τ| (TIES, Breadcrumbs) or Model Stock's cosine denominator max(‖τ_i‖‖τ_j‖, 1e-6)."""
    from unittest import mock

    if label.startswith("model_stock"):
        from model_merging_methods.methods import model_stock

        def clamped(taus):
            flat = [t.reshape(-1) for t in taus]
            cosines = []
            for i in range(len(flat)):
                for j in range(i + 1, len(flat)):
                    product = torch.norm(flat[i], dim=-1) * torch.norm(flat[j], dim=-1)
                    cosines.append(((flat[i] * flat[j]).sum(dim=-1) / product.clamp(min=1e-6)).clamp(-1, 1))
            return torch.stack(cosines).mean(dim=0)

        return "cosine / max(norm product, 1e-6)", mock.patch.object(
            model_stock, "mean_pairwise_cosine", clamped
        )
    from model_merging_methods import sparsify

    def unstable(tau, descending):
        return torch.argsort(tau.detach().abs().reshape(-1).to(torch.float32), descending=descending)

    return "unstable sort of the magnitudes", mock.patch.object(sparsify, "_order_of_magnitudes", unstable)


def has_tied_magnitudes(pre: StateDict, fts: list[StateDict], name: str) -> bool:
    """Whether some model's |τ| has equal values within tensor ``name`` (so rankings by magnitude can differ)."""
    for ft in fts:
        magnitudes = (ft[name] - pre[name]).abs().reshape(-1)
        if magnitudes.unique().numel() < magnitudes.numel():
            return True
    return False


def delta_stats(pre: StateDict, merged: StateDict, reference: StateDict) -> dict:
    names = [n for n in pre if n in merged]
    deltas = torch.cat([(merged[n] - pre[n]).double().reshape(-1) for n in names])
    ref = torch.cat([(reference[n] - pre[n]).double().reshape(-1) for n in names])
    return {
        "mean": float(deltas.mean()),
        "std": float(deltas.std()),
        "zero_fraction": float((deltas == 0).double().mean()),
        "corr_with_undropped": float(torch.corrcoef(torch.stack([deltas, ref]))[0, 1]),
    }


def keep_fraction(pre: StateDict, merged: StateDict) -> float:
    kept = total = 0
    for n, base in pre.items():
        if base.dim() < 2:  # the norm vectors' deltas are tiny; the matrices hold the statistics
            continue
        kept += int(((merged[n] - base) != 0).sum())
        total += base.numel()
    return kept / total


def random_config(
    method: str, paths: dict, weights: list[float], density: float, eps: float, rescale: bool
) -> str:
    extra = f", epsilon: {eps}" if method.startswith("della") else ""
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "models:"]
    for i, w in enumerate(weights):
        lines.append(
            f"  - {{model: {paths[f'ft{i}']}, parameters: {{weight: {w}, density: {density}{extra}}}}}"
        )
    lines += [f"parameters: {{rescale: {str(rescale).lower()}}}", "dtype: float32", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mergekit_venv", required=True, help="virtualenv with mergekit 0.1.5 (mergekit-yaml)")
    p.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "_work"))
    p.add_argument("--hidden_size", type=int, default=64)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=128)
    p.add_argument("--intermediate_size", type=int, default=128)
    p.add_argument("--delta_std", type=float, default=0.005)
    p.add_argument("--norm_delta_std", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.num_finetuned = 3
    venv = Path(args.mergekit_venv)
    if not (venv / "bin" / "mergekit-yaml").is_file():
        raise SystemExit(f"error: {venv / 'bin' / 'mergekit-yaml'} not found")
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ[k] = "1"
    torch.set_num_threads(1)
    results: dict = {
        "command": " ".join(
            ["python benchmarks/mergekit_yaml_compare.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "load_average_at_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="mergekit_yaml_compare_") as tmp:
        root = Path(tmp)
        with contextlib.redirect_stderr(io.StringIO()):
            paths, pre, fts = build_family(root, args)
        results["family"] = {
            "parameters_per_model": sum(t.numel() for t in pre.values()), "tensors": len(pre),
            "layers": args.num_layers, "num_finetuned": 3, "delta_std": args.delta_std, "dtype": "float32",
        }  # fmt: skip
        fmt = {k: str(v) for k, v in paths.items()}

        rows = []
        for k, (label, body) in enumerate(DETERMINISTIC):
            cfg = root / f"det{k}.yml"
            cfg.write_text(body.format(**fmt).lstrip())
            mk_s = run_mergekit(venv, cfg, root / f"mk_det{k}", args.seed)
            ours_s = run_ours(["--config", str(cfg), "--merged_model_path", str(root / f"ours_det{k}")])
            theirs, ours = load_folder(root / f"mk_det{k}"), load_folder(root / f"ours_det{k}")
            worst, count, total, where = max_abs_diff(ours, theirs)
            differing = [n for n in sorted(set(ours) & set(theirs)) if not torch.equal(ours[n], theirs[n])]
            if (
                differing
            ):  # rerun ours with mergekit's rule where ours differs on purpose: does that explain it?
                rule, patch = mergekit_rule(label)
                with patch:
                    run_ours(["--config", str(cfg), "--merged_model_path", str(root / f"ours_rule{k}")])
                explained = max_abs_diff(load_folder(root / f"ours_rule{k}"), theirs)
            row = {
                "config": label, "max_abs_diff": worst, "differing": count, "entries": total, "at": where,
                "same_tensor_names": sorted(ours) == sorted(theirs), "mergekit_s": round(mk_s, 2),
                "ours_s": round(ours_s, 2), "differing_tensors": differing,
                # mergekit ranks |τ| with an unstable sort, we with a stable one: they may keep different entries
                # among equal magnitudes (the norm vectors' tiny deltas are multiples of one float32 step)
                "tied_magnitudes_in_differing_tensors": all(has_tied_magnitudes(pre, fts, n) for n in differing),
            }  # fmt: skip
            if differing:
                row.update(
                    mergekit_rule=rule, max_abs_diff_with_rule=explained[0], differing_with_rule=explained[1]
                )
            rows.append(row)
            print(json.dumps(row), flush=True)
        results["deterministic"] = rows

        # random methods: keep fraction (one model, no rescale) and merged-delta statistics (three models)
        random_rows = []
        from model_merging_methods.merging_methods import merge_state_dicts

        weights = [1.0, 0.8, 0.6]
        for method, label in RANDOM.items():
            density, eps = 0.6, 0.2
            one = root / f"{method}_one.yml"
            # the first model alone (the second has weight 0: we merge two models or more), no rescale: an entry of
            # the merged delta is non-zero iff the first model's mask kept it
            one.write_text(random_config(method, fmt, [1.0, 0.0], density, eps, rescale=False))
            row: dict = {
                "method": label,
                "density": density,
                **({"epsilon": eps} if "della" in method else {}),
            }
            fractions = {}
            for tool in ("ours", "mergekit"):
                for s in (0, 1):
                    out = root / f"{method}_one_{tool}_{s}"
                    if tool == "mergekit":
                        run_mergekit(venv, one, out, s)
                    else:
                        run_ours(["--config", str(one), "--merged_model_path", str(out), "--seed", str(s)])
                    fractions[f"{tool} seed {s}"] = keep_fraction(pre, load_folder(out))
                    if "della" in method and s == 0:
                        row.setdefault("keep_by_decile", {})[tool] = keep_by_decile(
                            pre, fts[0], load_folder(out), 1 - density, eps
                        )
            row["keep_fraction"] = fractions
            full = root / f"{method}_all.yml"
            full.write_text(random_config(method, fmt, weights, density, eps, rescale=True))
            if method in ("dare_linear", "della_linear"):
                undropped = merge_state_dicts("task_arithmetic", pre, fts, model_weights=weights)
            else:  # dare_ties sums the agreeing entries (normalize: false), della takes their mean
                undropped = merge_state_dicts(
                    "ties_merging", pre, fts, trim_scope="tensor", param_value_mask_rate=0.0, zero_sign="plus",
                    model_weights=weights, no_normalize=method == "dare_ties",
                )  # fmt: skip
            stats = {"undropped": delta_stats(pre, undropped, undropped)}
            for tool in ("ours", "mergekit"):
                for s in (0, 1):
                    out = root / f"{method}_all_{tool}_{s}"
                    if tool == "mergekit":
                        run_mergekit(venv, full, out, s)
                    else:
                        run_ours(["--config", str(full), "--merged_model_path", str(out), "--seed", str(s)])
                    stats[f"{tool} seed {s}"] = delta_stats(pre, load_folder(out), undropped)
            row["merged_delta"] = stats
            random_rows.append(row)
            print(json.dumps({"method": label, "keep_fraction": fractions}), flush=True)
        results["random"] = random_rows

        # merges from flags: the YAML written beside the manifest, run by mergekit
        flag_rows = []
        for method, extra in FROM_FLAGS:
            out = root / f"flags_{method}"
            fts_paths = [str(paths["ft0"]), str(paths["ft1"])] if method == "slerp_merging" else [
                str(paths[f"ft{i}"]) for i in range(3)
            ]  # fmt: skip
            run_ours([
                "--pretrained_model_name", str(paths["base"]), "--finetuned_model_names", *fts_paths,
                "--merging_method_name", method, *extra, "--merged_model_path", str(out),
            ])  # fmt: skip
            manifest = json.loads((out / "merge_manifest.json").read_text())
            entry = manifest["mergekit"]
            row = {
                "flags": " ".join(["--merging_method_name", method, *extra]),
                "mergekit_config": entry["config"],
            }
            if entry["config"] is None:
                row["reason"] = entry["reason"]
            else:
                run_mergekit(venv, out / entry["config"], root / f"mk_flags_{method}", args.seed)
                worst, count, total, _ = max_abs_diff(
                    load_folder(out), load_folder(root / f"mk_flags_{method}")
                )
                row.update(max_abs_diff=worst, differing=count, entries=total)
            flag_rows.append(row)
            print(json.dumps(row), flush=True)
        results["from_flags"] = flag_rows
    results["load_average_at_end"] = os.getloadavg()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "mergekit_yaml_compare.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (work / "mergekit_yaml_compare.md").write_text(table)
    print(table)
    return results


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`", "", f"family: {results['family']}",
             f"load average: start {results['load_average_at_start']}, end {results['load_average_at_end']}", "",
             "| configuration | max abs diff | differing entries | differing tensors (tied \\|τ\\| in them) | "
             "with mergekit's rule: rule, max abs diff, differing | same tensor names | mergekit s | ours s |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["deterministic"]:
        where = ", ".join(r["differing_tensors"]) or "—"
        if r["differing_tensors"]:
            where += f" ({r['tied_magnitudes_in_differing_tensors']})"
        rule = (
            f"{r['mergekit_rule']}: {r['max_abs_diff_with_rule']:.3g}, {r['differing_with_rule']}"
            if "mergekit_rule" in r
            else "—"
        )
        lines.append(
            f"| {r['config']} | {r['max_abs_diff']:.3g} | {r['differing']} / {r['entries']} | {where} | {rule} | "
            f"{r['same_tensor_names']} | {r['mergekit_s']} | {r['ours_s']} |"
        )
    lines += ["", "Random methods: keep fraction (the first model alone, rescale false; matrices)", "",
              "| method | density | ours seed 0 | ours seed 1 | mergekit seed 0 | mergekit seed 1 |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["random"]:
        f = r["keep_fraction"]
        lines.append(
            f"| {r['method']} | {r['density']} | {f['ours seed 0']:.4f} | {f['ours seed 1']:.4f} | "
            f"{f['mergekit seed 0']:.4f} | {f['mergekit seed 1']:.4f} |"
        )
    for r in results["random"]:
        if "keep_by_decile" in r:
            lines += ["", f"{r['method']}: keep fraction per rank decile within rows (seed 0)", "",
                      "| decile | keep probability | ours | mergekit |", "|---|---|---|---|"]  # fmt: skip
            for o, m in zip(r["keep_by_decile"]["ours"], r["keep_by_decile"]["mergekit"]):
                lines.append(
                    f"| {o['decile']} | {o['probability']:.4f} | {o['keep_fraction']:.4f} | {m['keep_fraction']:.4f} |"
                )
    lines += ["", "Random methods: merged delta (three models, weights 1.0/0.8/0.6, rescale true)", "",
              "| method | run | mean | std | zero fraction | corr. with undropped |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results["random"]:
        for run, s in r["merged_delta"].items():
            lines.append(
                f"| {r['method']} | {run} | {s['mean']:.3e} | {s['std']:.4e} | {s['zero_fraction']:.4f} | "
                f"{s['corr_with_undropped']:.4f} |"
            )
    lines += ["", "Merges from flags: the mergekit_config.yml written beside the manifest, run by mergekit", "",
              "| flags | mergekit_config.yml | max abs diff | differing entries |", "|---|---|---|---|"]  # fmt: skip
    for r in results["from_flags"]:
        if r["mergekit_config"] is None:
            lines.append(f"| `{r['flags']}` | none: {r['reason']} | — | — |")
        else:
            lines.append(
                f"| `{r['flags']}` | written | {r['max_abs_diff']:.3g} | {r['differing']} / {r['entries']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
