"""Wall time and peak memory of out-of-core LLM merging, as whole processes, against baselines and mergekit.

    python benchmarks/merge_benchmark.py --hidden_size 1024 --num_layers 8 --vocab_size 32000 \\
        --mergekit_venv /tmp/mkvenv --repeats 3 --baseline before=/tmp/worktree_of_an_older_commit

Builds (once, cached under ``--work_dir``) a synthetic LLaMA-shaped family: a bfloat16 base with N(0, 0.02²)
weights and ``--num_finetuned`` fine-tuned models = base + N(0, ``--delta_std``²), single-file safetensors with a
LLaMA ``config.json``. Then every run is a separate process (wall time from start to exit, peak RSS from
``os.wait4``'s rusage of that process; this process stays small, so that figure is the child's own), one after
the other, after a warm-up read so every run finds the inputs in the page cache:

* ``read_write``: read every input tensor and write one output of the same size (the I/O floor of a merge);
  ``read_write_single``: the same for the base and one fine-tuned model (the floor of single-model DARE);
* ``ours_ta`` / ``ours_dare_ties*``: ``merge_llms_instruct_math_code.py`` (this project's streaming engine);
* ``ours_dare_single``: ``inference_llms_instruct_math_code.py --skip_evaluation`` with DARE (``stream_mask_model``
  of the first fine-tuned model);
* ``ours_<method>``: the registry's newer methods with their default parameters (``ours_slerp`` merges the first
  two models);
* ``naive_ta`` / ``naive_dare_ties``: load every model into RAM, call the in-memory core, save (the original's
  approach, in the checkpoints' dtype instead of its float32);
* ``mergekit_ta`` / ``mergekit_dare_ties``: ``mergekit-yaml`` from ``--mergekit_venv`` (mergekit 0.1.5), same models;
* ``NAME:run`` for every ``--baseline NAME=REPO[@run,...]`` and each of its runs (default ``--baseline_runs``):
  the same command run from another checkout of this project (e.g. a ``git worktree`` of an older commit), for
  before/after figures from one run.

DARE + TIES settings: drop rate p = 1 − ``--density`` with rescale. mergekit's ``dare_ties`` has no magnitude
trim (DARE, then sign election and disjoint mean), which is our TIES with ``--param_value_mask_rate 0``
(``ours_dare_ties``); ``ours_dare_ties_trim_global`` / ``_trim_tensor`` add the paper's TIES trim (r = 0.8) with
global (exact, streamed) or per-tensor thresholds. Each run is repeated ``--repeats`` times and the median (or
the minimum, ``--statistic min``) wall time is reported, with the load average before each repeat. Results: a
JSON and a Markdown table under ``--work_dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

NEW_METHODS = {  # run name -> (method, extra flags); default parameters otherwise
    "ours_breadcrumbs": ("breadcrumbs_merging", []),
    "ours_della": ("della_merging", []),
    "ours_model_stock": ("model_stock_merging", []),
    "ours_slerp": ("slerp_merging", []),
    "ours_magmax": ("magmax_merging", []),
    "ours_consensus": ("consensus_merging", []),
}
ALL_RUNS = (
    "read_write",
    "read_write_single",
    "ours_ta",
    "ours_dare_ties",
    "ours_dare_ties_trim_global",
    "ours_dare_ties_trim_tensor",
    "ours_dare_single",
    *NEW_METHODS,
    "naive_ta",
    "naive_dare_ties",
    "mergekit_ta",
    "mergekit_dare_ties",
)
BASELINE_RUNS = ("ours_ta", "ours_dare_ties", "ours_dare_ties_trim_global", "ours_dare_single")


# ----------------------------------------------------------------------------------------------------- family


def llama_shapes(
    hidden: int, layers: int, vocab: int, intermediate: int
) -> list[tuple[str, tuple[int, ...]]]:
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [(f"{p}.self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [
            (f"{p}.mlp.gate_proj.weight", (intermediate, hidden)),
            (f"{p}.mlp.up_proj.weight", (intermediate, hidden)),
        ]
        shapes += [(f"{p}.mlp.down_proj.weight", (hidden, intermediate))]
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def build_family(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Write base + fine-tuned models (bf16 safetensors) tensor by tensor; reuse them when already built."""
    import torch

    from model_merging_methods.checkpoint_io import ShardedSafetensorsWriter

    names = ["base"] + [f"ft{i}" for i in range(args.num_finetuned)]
    folders = {n: root / n for n in names}
    if all((f / "model.safetensors").is_file() for f in folders.values()):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    shapes = llama_shapes(args.hidden_size, args.num_layers, args.vocab_size, args.intermediate_size)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size, "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.hidden_size // 64, "num_key_value_heads": args.hidden_size // 64,
        "vocab_size": args.vocab_size, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16", "rope_theta": 10000.0,
    }  # fmt: skip
    writers = {}
    for n, f in folders.items():
        f.mkdir(parents=True)
        (f / "config.json").write_text(json.dumps(config, indent=2))
        writers[n] = ShardedSafetensorsWriter(f, [(s, torch.bfloat16, shape) for s, shape in shapes], "100GB")
    g = torch.Generator().manual_seed(args.seed)
    for name, shape in shapes:
        base = torch.ones(shape) if name.endswith("norm.weight") else 0.02 * torch.randn(shape, generator=g)
        writers["base"].write(name, base.to(torch.bfloat16))
        for n in names[1:]:
            writers[n].write(
                name, (base + args.delta_std * torch.randn(shape, generator=g)).to(torch.bfloat16)
            )
    for w in writers.values():
        w.close()
    return folders


# ------------------------------------------------------------------------------------------------------- runs

READ_WRITE = """
import sys
sys.path.insert(0, {repo!r})
from model_merging_methods.checkpoint_io import CheckpointReader, ShardedSafetensorsWriter
readers = [CheckpointReader(p) for p in {inputs!r}]
specs = [(n, i.dtype, i.shape) for n, i in readers[0].infos.items()]
w = ShardedSafetensorsWriter({out!r}, specs, "5GB")
block = {block}
for name, _, shape in specs:
    w.begin(name)
    numel = readers[0].infos[name].numel
    for start in range(0, numel, block):
        parts = [r.read_flat_slice(name, start, block) for r in readers]
        w.write_part(parts[0])
    w.end()
w.close()
"""

NAIVE = """
import sys, torch
sys.path.insert(0, {repo!r})
from safetensors.torch import load_file, save_file
from model_merging_methods.merging_methods import task_arithmetic, mask_merging
pre = load_file({base!r} + "/model.safetensors")
fts = [load_file(p + "/model.safetensors") for p in {fts!r}]
if {method!r} == "ta":
    out = task_arithmetic(pre, fts, 1.0)
else:
    out = mask_merging(pre, fts, "ties_merging", {rate!r}, use_weight_rescale=True, seed=0,
                       param_value_mask_rate=0.0, scaling_coefficient=1.0)
import os; os.makedirs({out!r}, exist_ok=True)
save_file({{n: t.contiguous() for n, t in out.items()}}, {out!r} + "/model.safetensors", metadata={{"format": "pt"}})
"""


def mergekit_config(method: str, family: dict[str, Path], density: float) -> str:
    fts = [f for n, f in family.items() if n != "base"]
    if method == "ta":
        models = "\n".join(f"  - model: {f}\n    parameters:\n      weight: 1.0" for f in fts)
        return f"merge_method: task_arithmetic\nbase_model: {family['base']}\nmodels:\n{models}\ndtype: bfloat16\n"
    models = "\n".join(
        f"  - model: {f}\n    parameters:\n      weight: 1.0\n      density: {density}" for f in fts
    )
    return (
        f"merge_method: dare_ties\nbase_model: {family['base']}\nmodels:\n{models}\n"
        "parameters:\n  normalize: true\n  int8_mask: false\ndtype: bfloat16\n"
    )


def command_for(
    run: str, family: dict[str, Path], out: Path, work: Path, args: argparse.Namespace, repo: Path = REPO_ROOT
) -> list[str] | None:
    fts = [str(f) for n, f in family.items() if n != "base"]
    py = sys.executable
    rate = round(1.0 - args.density, 6)
    ours = [py, str(repo / "merge_llms_instruct_math_code.py"), "--pretrained_model_name", str(family["base"]),
            "--finetuned_model_names", *fts, "--merged_model_path", str(out), "--skip_evaluation", "--overwrite"]  # fmt: skip
    dare = ["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate",
            str(rate), "--use_weight_rescale"]  # fmt: skip
    if run in ("read_write", "read_write_single"):
        inputs = [str(f) for f in family.values()][: 2 if run == "read_write_single" else None]
        return [py, "-c", READ_WRITE.format(repo=str(REPO_ROOT), inputs=inputs, out=str(out), block=1 << 18)]
    if run == "ours_dare_single":
        return [py, str(repo / "inference_llms_instruct_math_code.py"), "--finetuned_model_name", fts[0],
                "--pretrained_model_name", str(family["base"]), "--weight_mask_rate", str(rate),
                "--use_weight_rescale", "--skip_evaluation", "--save_model_path", str(out),
                "--output_dir", str(work / "eval_logs")]  # fmt: skip
    if run in NEW_METHODS:
        method, extra = NEW_METHODS[run]
        cmd = [*ours, "--merging_method_name", method, *extra]
        if run == "ours_slerp":  # exactly two models
            i = cmd.index("--finetuned_model_names")
            cmd[i + 1 : i + 1 + len(fts)] = fts[:2]
        return cmd
    if run == "ours_ta":
        return [*ours, "--merging_method_name", "task_arithmetic", "--scaling_coefficient", "1.0"]
    if run == "ours_dare_ties":
        return [*ours, *dare, "--param_value_mask_rate", "0.0"]
    if run == "ours_dare_ties_trim_global":
        return [*ours, *dare, "--param_value_mask_rate", "0.8", "--trim_scope", "global"]
    if run == "ours_dare_ties_trim_tensor":
        return [*ours, *dare, "--param_value_mask_rate", "0.8", "--trim_scope", "tensor"]
    if run.startswith("naive_"):
        method = "ta" if run == "naive_ta" else "dare_ties"
        code = NAIVE.format(
            repo=str(REPO_ROOT), base=str(family["base"]), fts=fts, method=method, rate=rate, out=str(out)
        )
        return [py, "-c", code]
    if run.startswith("mergekit_"):
        if not args.mergekit_venv:
            return None
        exe = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
        if not exe.is_file():
            raise SystemExit(f"error: {exe} not found")
        cfg = work / f"{run}.yml"
        cfg.write_text(mergekit_config("ta" if run == "mergekit_ta" else "dare_ties", family, args.density))
        return [str(exe), str(cfg), str(out), "--no-copy-tokenizer", *args.mergekit_args]
    raise ValueError(run)


def measure(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> dict[str, float | int]:
    """Run one process; wall time from spawn to exit and its peak RSS (os.wait4 rusage, Linux KiB)."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = out.decode(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {
        "wall_s": wall, "peak_rss_bytes": rss, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "load_before": load,
        "cpu_s": usage.ru_utime + usage.ru_stime,
    }  # fmt: skip


def summarize_repeats(repeats: list[dict], statistic: str) -> dict:
    """The repeat with the median (or minimum) wall time, with every wall time and load average recorded."""
    ordered = sorted(repeats, key=lambda m: m["wall_s"])
    chosen = ordered[0] if statistic == "min" else ordered[(len(ordered) - 1) // 2]
    return {
        **chosen,
        "statistic": statistic,
        "wall_s_all": [round(m["wall_s"], 3) for m in repeats],
        "load_before_all": [round(m["load_before"], 2) for m in repeats],
        "peak_rss_bytes_max": max(m["peak_rss_bytes"] for m in repeats),
    }


def warm_page_cache(family: dict[str, Path]) -> None:
    for f in family.values():
        for p in f.glob("*.safetensors"):
            with open(p, "rb") as fh:
                while fh.read(1 << 26):
                    pass


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "_work"))
    p.add_argument("--hidden_size", type=int, default=1024)
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument(
        "--intermediate_size", type=int, default=None, help="default: 2.6875 x hidden (LLaMA-7B ratio)"
    )
    p.add_argument("--num_finetuned", type=int, default=3)
    p.add_argument("--delta_std", type=float, default=0.002)
    p.add_argument("--density", type=float, default=0.5, help="DARE keep rate (drop rate p = 1 - density)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", choices=ALL_RUNS, default=list(ALL_RUNS))
    p.add_argument("--repeats", type=int, default=1, help="runs per variant (see --statistic)")
    p.add_argument(
        "--statistic", choices=["median", "min"], default="median", help="which repeat is reported"
    )
    p.add_argument(
        "--baseline", action="append", default=[], metavar="NAME=REPO",
        help="another checkout of this project (e.g. a git worktree of an older commit) whose --baseline_runs (or "
        "the runs after @, comma-separated) are run too, as NAME:run",
    )  # fmt: skip
    p.add_argument("--baseline_runs", nargs="+", choices=BASELINE_RUNS, default=list(BASELINE_RUNS))
    p.add_argument(
        "--interleave", action="store_true",
        help="run the repeats round-robin over the variants (fairer on a machine whose load changes)",
    )  # fmt: skip
    p.add_argument("--mergekit_venv", default=None, help="virtualenv with mergekit 0.1.5 (mergekit-yaml)")
    p.add_argument("--mergekit_args", nargs="*", default=[], help="extra mergekit-yaml options")
    p.add_argument("--keep_outputs", action="store_true")
    p.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.intermediate_size = args.intermediate_size or int(round(args.hidden_size * 2.6875 / 16)) * 16

    tag = f"h{args.hidden_size}_l{args.num_layers}_v{args.vocab_size}_i{args.intermediate_size}_n{args.num_finetuned}"
    work = Path(args.work_dir)
    family_root = work / f"family_{tag}_d{args.delta_std}_s{args.seed}"
    t = time.perf_counter()
    if args.build_only:
        build_family(family_root, args)
        return {}
    # Build in a child process: this process must stay small (no torch), because a forked child starts with its
    # parent's resident pages and ru_maxrss would count them.
    build = [
        sys.executable,
        str(Path(__file__).resolve()),
        *(argv if argv is not None else sys.argv[1:]),
        "--build_only",
    ]
    subprocess.run(build, check=True)
    family = {n: family_root / n for n in ["base"] + [f"ft{i}" for i in range(args.num_finetuned)]}
    n_params = sum(
        math.prod(s)
        for _, s in llama_shapes(args.hidden_size, args.num_layers, args.vocab_size, args.intermediate_size)
    )
    print(
        f"family {tag}: {n_params / 1e6:.1f}M parameters per model ({time.perf_counter() - t:.0f} s to build/check)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    warm_page_cache(family)
    baselines: dict[str, Path] = {}
    baseline_runs: dict[str, list[str]] = {}
    for spec in args.baseline:
        name, _, rest = spec.partition("=")
        path, _, runs = rest.partition("@")
        if not name or not path or not (Path(path) / "merge_llms_instruct_math_code.py").is_file():
            raise SystemExit(
                f"error: --baseline {spec}: expected NAME=REPO[@run,run] with a checkout of this project"
            )
        baselines[name] = Path(path).resolve()
        baseline_runs[name] = runs.split(",") if runs else list(args.baseline_runs)
        unknown = sorted(set(baseline_runs[name]) - set(BASELINE_RUNS))
        if unknown:
            raise SystemExit(
                f"error: --baseline {spec}: {unknown[0]} is not one of {', '.join(BASELINE_RUNS)}"
            )
    variants: list[tuple[str, str, Path]] = [(run, run, REPO_ROOT) for run in args.runs]
    for name, repo in baselines.items():
        variants += [(f"{name}:{run}", run, repo) for run in baseline_runs[name]]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in variants}
    skipped: set[str] = set()
    order = (
        [v for _ in range(args.repeats) for v in variants]
        if args.interleave
        else [v for v in variants for _ in range(args.repeats)]
    )
    for label, run, repo in order:
        if label in skipped:
            continue
        out = work / f"out_{tag}_{label.replace(':', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = command_for(run, family, out, work, args, repo)
        if cmd is None:
            print(f"{label}: skipped (no --mergekit_venv)")
            skipped.add(label)
            continue
        m = measure(cmd, env, cwd=work)
        results[label].append(m)
        print(
            f"{label}: {m['wall_s']:.2f} s, peak RSS {m['peak_rss_bytes'] / 2**20:.0f} MiB, "
            f"load {m['load_before']:.2f}",
            flush=True,
        )
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    rows: dict[str, dict] = {
        label: summarize_repeats(ms, args.statistic) for label, ms in results.items() if ms
    }

    def get(run, key):
        return rows[run][key] if run in rows else None

    def r(a, b, key="wall_s"):
        return ratio(get(a, key), get(b, key))

    ratios = {
        "ours_ta / mergekit_ta (time)": r("ours_ta", "mergekit_ta"),
        "ours_dare_ties / mergekit_dare_ties (time; target <= 0.35)": r(
            "ours_dare_ties", "mergekit_dare_ties"
        ),
        "ours_dare_ties_trim_global / mergekit_dare_ties (time; target <= 0.5)": r(
            "ours_dare_ties_trim_global", "mergekit_dare_ties"
        ),
        "ours_dare_ties_trim_tensor / mergekit_dare_ties (time)": r(
            "ours_dare_ties_trim_tensor", "mergekit_dare_ties"
        ),
        "ours_ta / read_write (time; target <= 1.2)": r("ours_ta", "read_write"),
        "ours_dare_single / read_write_single (time; target <= 1.5)": r(
            "ours_dare_single", "read_write_single"
        ),
        "ours_ta / mergekit_ta (peak RSS)": r("ours_ta", "mergekit_ta", "peak_rss_bytes"),
        "ours_dare_ties / mergekit_dare_ties (peak RSS)": r(
            "ours_dare_ties", "mergekit_dare_ties", "peak_rss_bytes"
        ),
        "ours_ta / naive_ta (time)": r("ours_ta", "naive_ta"),
        "ours_ta / naive_ta (peak RSS)": r("ours_ta", "naive_ta", "peak_rss_bytes"),
    }
    for a, b in (("ours_dare_ties", "mergekit_dare_ties"), ("ours_dare_ties_trim_global", "mergekit_dare_ties"),
                 ("ours_ta", "read_write"), ("ours_dare_single", "read_write_single")):  # fmt: skip
        ratios[f"{a} / {b} (CPU user+sys)"] = r(a, b, "cpu_s")
    for name in baselines:
        for run in baseline_runs[name]:
            ratios[f"{run} / {name}:{run} (CPU user+sys)"] = r(run, f"{name}:{run}", "cpu_s")
            ratios[f"{run} / {name}:{run} (time)"] = r(run, f"{name}:{run}")
            ratios[f"{run} / {name}:{run} (peak RSS)"] = r(run, f"{name}:{run}", "peak_rss_bytes")
    result = {
        "family": {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "vocab_size": args.vocab_size,
            "intermediate_size": args.intermediate_size,
            "num_finetuned": args.num_finetuned,
            "parameters_per_model": n_params,
            "dtype": "bfloat16",
            "delta_std": args.delta_std,
            "density": args.density,
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
            # the floor of every child's ru_maxrss (a forked child starts with its parent's pages)
            "benchmark_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "baselines": {name: str(path) for name, path in baselines.items()},
        "statistic": args.statistic,
        "repeats": args.repeats,
        "runs": rows,
        "ratios": {k: v for k, v in ratios.items() if v is not None},
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / f"merge_benchmark_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"| run | wall time (s, {args.statistic}) | all wall times (s) | peak RSS (MiB) | CPU user+sys (s) | "
        "load before |",
        "|---|---|---|---|---|---|",
    ]
    for run, m in rows.items():
        walls = ", ".join(f"{w:.2f}" for w in m["wall_s_all"])
        loads = ", ".join(f"{x:.1f}" for x in m["load_before_all"])
        lines.append(
            f"| {run} | {m['wall_s']:.2f} | {walls} | {m['peak_rss_bytes'] / 2**20:.0f} | "
            f"{m['user_s'] + m['sys_s']:.1f} | {loads} |"
        )
    lines += ["", "| ratio | value |", "|---|---|"] + [
        f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()
    ]
    table = "\n".join(lines) + "\n"
    (work / f"merge_benchmark_{tag}.md").write_text(table)
    print(textwrap.indent(table, ""))
    return result


if __name__ == "__main__":
    main()
