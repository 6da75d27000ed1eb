"""Peak memory and wall time of merging LoRA adapters against merging full fine-tunes of the same model.

    python benchmarks/adapter_benchmark.py --hidden_size 512 --num_layers 32 --vocab_size 32000 --lora_rank 16

Builds (once, cached under ``--work_dir``) the synthetic LLaMA family of ``benchmarks/merge_benchmark.py`` (a
bfloat16 base and ``--num_finetuned`` full fine-tunes = base + N(0, ``--delta_std``²)) and as many PEFT LoRA adapters
of that base (rank ``--lora_rank``, lora_alpha = 2r, on all seven projections of every layer, A and B with
N(0, 1/r) entries scaled so that |s·B·A| has the full fine-tunes' delta scale; float32 factors). Then each run is a
separate process (peak RSS from ``os.wait4``), after a warm-up read of the inputs:

* ``full_ta``: task arithmetic of the full fine-tunes (``merge_llms_instruct_math_code.py``);
* ``lora_ta``: task arithmetic of the adapters (the base read once per adapter, B·A computed block by block);
* ``full_dare_ties`` / ``lora_dare_ties``: DARE (p = 1 − ``--density``) + TIES of the full fine-tunes / adapters;
* ``lora_ta_to_lora``: task arithmetic of the adapters written as a rank-``--lora_rank × num_finetuned`` adapter
  (``--output_format lora``).

With ``--repeats N`` each run is repeated and the minimum wall time and minimum peak RSS are reported (the peak RSS
of a run varies by some 10-30 MiB with how the C allocator happens to hold freed blocks). Results: a JSON and a
Markdown table under ``--work_dir``.
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
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.merge_benchmark import build_family, llama_shapes, measure, warm_page_cache  # noqa: E402

ALL_RUNS = ("full_ta", "lora_ta", "full_dare_ties", "lora_dare_ties", "lora_ta_to_lora")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapters(root: Path, base: Path, args: argparse.Namespace) -> list[Path]:
    """``--num_finetuned`` PEFT LoRA adapters of ``base`` (reused when already built)."""
    import torch
    from peft import LoraConfig

    from model_merging_methods.checkpoint_io import ShardedSafetensorsWriter

    folders = [root / f"lora{i}" for i in range(args.num_finetuned)]
    if all((f / "adapter_model.safetensors").is_file() for f in folders):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    shapes = llama_shapes(args.hidden_size, args.num_layers, args.vocab_size, args.intermediate_size)
    modules = [(n[: -len(".weight")], s) for n, s in shapes if n.rsplit(".", 2)[-2] in TARGETS]
    r = args.lora_rank
    scaling = 2.0  # lora_alpha = 2r
    # |δ| = |s·B·A| ≈ s·σ_A·σ_B·√r; choose σ_A = σ_B so that this equals delta_std
    sigma = math.sqrt(args.delta_std / (scaling * math.sqrt(r)))
    g = torch.Generator().manual_seed(args.seed + 1)
    for f in folders:
        f.mkdir(parents=True)
        specs = []
        for m, (out_f, in_f) in modules:
            specs += [(f"base_model.model.{m}.lora_A.weight", torch.float32, (r, in_f)),
                      (f"base_model.model.{m}.lora_B.weight", torch.float32, (out_f, r))]  # fmt: skip
        w = ShardedSafetensorsWriter(f, specs, "100GB")
        for m, (out_f, in_f) in modules:
            w.write(f"base_model.model.{m}.lora_A.weight", sigma * torch.randn(r, in_f, generator=g))
            w.write(f"base_model.model.{m}.lora_B.weight", sigma * torch.randn(out_f, r, generator=g))
        w.close()
        os.replace(f / "model.safetensors", f / "adapter_model.safetensors")
        LoraConfig(
            r=r, lora_alpha=2 * r, target_modules=list(TARGETS), base_model_name_or_path=str(base),
            task_type="CAUSAL_LM",
        ).save_pretrained(str(f))  # fmt: skip
    return folders


def command_for(run: str, base: Path, fulls: list[Path], loras: list[Path], out: Path, args) -> list[str]:
    models = [str(f) for f in (fulls if run.startswith("full") else loras)]
    cmd = [sys.executable, str(REPO_ROOT / "merge_llms_instruct_math_code.py"), "--pretrained_model_name", str(base),
           "--finetuned_model_names", *models, "--merged_model_path", str(out), "--skip_evaluation", "--overwrite"]  # fmt: skip
    if run in ("full_ta", "lora_ta", "lora_ta_to_lora"):
        cmd += ["--merging_method_name", "task_arithmetic", "--scaling_coefficient", "1.0"]
    if run in ("full_dare_ties", "lora_dare_ties"):
        cmd += ["--merging_method_name", "mask_merging", "--mask_apply_method", "ties_merging", "--weight_mask_rate",
                str(round(1.0 - args.density, 6)), "--use_weight_rescale", "--param_value_mask_rate", "0.0"]  # fmt: skip
    if run == "lora_ta_to_lora":
        cmd += ["--output_format", "lora", "--lora_rank", str(args.lora_rank * args.num_finetuned)]
    return cmd


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default=str(REPO_ROOT / "benchmarks" / "_work"))
    p.add_argument("--hidden_size", type=int, default=512)
    p.add_argument("--num_layers", type=int, default=32)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--intermediate_size", type=int, default=None, help="default: 2.6875 x hidden")
    p.add_argument("--num_finetuned", type=int, default=3)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--delta_std", type=float, default=0.002)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="+", choices=ALL_RUNS, default=list(ALL_RUNS))
    p.add_argument("--repeats", type=int, default=1, help="runs per variant: minimum wall time and peak RSS")
    p.add_argument("--build_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.intermediate_size = args.intermediate_size or int(round(args.hidden_size * 2.6875 / 16)) * 16
    tag = f"h{args.hidden_size}_l{args.num_layers}_v{args.vocab_size}_i{args.intermediate_size}_n{args.num_finetuned}"
    work = Path(args.work_dir)
    family_root = work / f"family_{tag}_d{args.delta_std}_s{args.seed}"
    lora_root = work / f"adapters_{tag}_r{args.lora_rank}_d{args.delta_std}_s{args.seed}"
    if args.build_only:
        family = build_family(family_root, args)
        build_adapters(lora_root, family["base"], args)
        return {}
    # build in a child process, so that this process stays small (a child's ru_maxrss starts from its parent's)
    subprocess.run([sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--build_only"],
                   check=True)  # fmt: skip
    base = family_root / "base"
    fulls = [family_root / f"ft{i}" for i in range(args.num_finetuned)]
    loras = [lora_root / f"lora{i}" for i in range(args.num_finetuned)]
    n_params = sum(math.prod(s) for _, s in llama_shapes(args.hidden_size, args.num_layers, args.vocab_size,
                                                         args.intermediate_size))  # fmt: skip
    adapter_bytes = (loras[0] / "adapter_model.safetensors").stat().st_size
    print(
        f"family {tag}: {n_params / 1e6:.1f}M parameters per model; adapters of {adapter_bytes / 2**20:.1f} MiB"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    warm_page_cache({"base": base, **{f.name: f for f in fulls}, **{f.name: f for f in loras}})
    rows = {}
    for run in args.runs:
        out = work / f"out_adapter_{tag}_{run}"
        tries = []
        for _ in range(max(1, args.repeats)):
            shutil.rmtree(out, ignore_errors=True)
            tries.append(measure(command_for(run, base, fulls, loras, out, args), env))
        rows[run] = {k: min(t[k] for t in tries) for k in tries[0]}
        rows[run]["peak_rss_bytes_all"] = [t["peak_rss_bytes"] for t in tries]
        print(
            f"{run}: {rows[run]['wall_s']:.1f} s, peak RSS {rows[run]['peak_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        shutil.rmtree(out, ignore_errors=True)
    result = {
        "family": {
            "hidden_size": args.hidden_size,
            "num_layers": args.num_layers,
            "vocab_size": args.vocab_size,
            "intermediate_size": args.intermediate_size,
            "num_finetuned": args.num_finetuned,
            "parameters_per_model": n_params,
            "lora_rank": args.lora_rank,
            "adapter_bytes": adapter_bytes,
            "dtype": "bfloat16 base, float32 adapters",
        },  # fmt: skip
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_end": os.getloadavg(),
            "benchmark_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        },  # fmt: skip
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "runs": rows,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / f"adapter_benchmark_{tag}_r{args.lora_rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| run | wall time (s) | peak RSS (MiB) | CPU user+sys (s) |", "|---|---|---|---|"]
    lines += [f"| {r} | {m['wall_s']:.1f} | {m['peak_rss_bytes'] / 2**20:.0f} | {m['user_s'] + m['sys_s']:.1f} |"
              for r, m in rows.items()]  # fmt: skip
    table = "\n".join(lines) + "\n"
    (work / f"adapter_benchmark_{tag}_r{args.lora_rank}.md").write_text(table)
    print(table)
    return result


if __name__ == "__main__":
    main()
