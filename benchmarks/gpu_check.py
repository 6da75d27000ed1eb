"""CPU against CUDA, on a machine with a GPU: the same bytes? how much faster? One short run, one table.

    python benchmarks/gpu_check.py                       # about 2-4 minutes on one GPU and 16 cores
    python benchmarks/gpu_check.py --num_layers 2 --vocab_size 8000   # a smaller family

Builds a small synthetic LLaMA-shaped bfloat16 family (``benchmarks/merge_benchmark.py``'s: a base and three
fine-tuned models, cached under ``--work_dir``), then, in this process, runs every configuration twice, with
``--device cpu`` and ``--device cuda`` (inputs streamed from disk either way): single-model DARE
(``stream_mask_model``: DARE, DropOnly, DARE on the fine-tuned weights), every streamable method of the registry
with its default parameters (SLERP on the first two models), and DARE (p = 0.5) followed by TIES without trim, with
the paper's global trim and with per-tensor trim, and by task arithmetic. For each it prints the wall time on both
devices and whether the output tensors are identical byte for byte (otherwise how many elements differ and the
largest difference). It first checks the generator's words and DARE's keep masks on CUDA against the CPU. Exit
status 0 when every configuration ran on both devices, 1 otherwise (the table says which and why); 2 without
CUDA. Results also go to ``--work_dir/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import torch  # noqa: E402

# methods whose bytes docs/performance.md guarantees to be the same on every device
GUARANTEED = {
    "dare", "dropout_only", "dare_finetuned_weight", "average_merging", "task_arithmetic", "ties_merging",
    "breadcrumbs_merging", "magmax_merging", "consensus_merging", "dare+ties_no_trim",
    "dare+ties_global_trim", "dare+ties_tensor_trim", "dare+task_arithmetic",
}  # fmt: skip


def configurations(fts: list[str]) -> list[tuple[str, str, dict]]:
    """(label, kind, keywords) for every run: kind "dare" (stream_mask_model) or "merge" (merge_checkpoints)."""
    from model_merging_methods.registry import get_method, method_names
    from model_merging_methods.streaming import DareSettings

    runs: list[tuple[str, str, dict]] = [
        ("dare", "dare", dict(weight_mask_rate=0.9, use_weight_rescale=True)),
        ("dropout_only", "dare", dict(weight_mask_rate=0.9, use_weight_rescale=False)),
        ("dare_finetuned_weight", "dare", dict(weight_mask_rate=0.5, weight_format="finetuned_weight")),
    ]
    for name in method_names(streamable=True):
        spec = get_method(name)
        models = fts[: spec.max_models] if spec.max_models else fts
        runs.append((name, "merge", dict(method=name, finetuned=models, params={}, dare=None)))
    dare = DareSettings(0.5, seed=1)
    runs += [
        ("dare+ties_no_trim", "merge", dict(method="ties_merging", finetuned=fts, params={"param_value_mask_rate": 0.0}, dare=dare)),
        ("dare+ties_global_trim", "merge", dict(method="ties_merging", finetuned=fts, params={"param_value_mask_rate": 0.8}, dare=dare)),
        ("dare+ties_tensor_trim", "merge", dict(method="ties_merging", finetuned=fts, params={"param_value_mask_rate": 0.8, "trim_scope": "tensor"}, dare=dare)),
        ("dare+task_arithmetic", "merge", dict(method="task_arithmetic", finetuned=fts, params={}, dare=dare)),
    ]  # fmt: skip
    return runs


def run_one(
    kind: str, kw: dict, base: str, fts: list[str], out: Path, device: str, threads: int | None
) -> dict:
    from model_merging_methods.streaming import OutputOptions, merge_checkpoints, stream_mask_model

    shutil.rmtree(out, ignore_errors=True)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    if kind == "dare":
        manifest = stream_mask_model(base, fts[0], str(out), device=device, num_threads=threads, **kw)
    else:
        options = OutputOptions(device=device, num_threads=threads)
        manifest = merge_checkpoints(
            base, kw["finetuned"], str(out), kw["method"], kw["params"], kw["dare"], options, seed=3
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"wall_s": time.perf_counter() - start, "method_details": manifest.get("method_details", {})}


def compare(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two model folders' safetensors."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = load(a), load(b)
    if set(x) != set(y):
        return {"identical": False, "note": "different tensor names"}
    differing_tensors, differing_elements, max_abs = 0, 0, 0.0
    for n in x:
        u, v = x[n], y[n]
        if u.dtype != v.dtype or u.shape != v.shape:
            return {"identical": False, "note": f"{n}: dtype/shape differ"}
        if u.is_floating_point():
            same = u.view(
                torch.uint8
                if u.element_size() == 1
                else {2: torch.int16, 4: torch.int32, 8: torch.int64}[u.element_size()]
            )
            other = v.view(same.dtype)
            neq = same != other
        else:
            neq = u != v
        k = int(neq.sum())
        if k:
            differing_tensors += 1
            differing_elements += k
            if u.is_floating_point():
                max_abs = max(max_abs, float((u.float() - v.float()).abs().max()))
    return {
        "identical": differing_tensors == 0, "tensors": len(x), "differing_tensors": differing_tensors,
        "differing_elements": differing_elements, "max_abs_difference": max_abs,
    }  # fmt: skip


def check_generator(device: str) -> dict:
    """The generator's words, DARE's keep bits and DELLA's uniforms on ``device`` against the CPU (NumPy)."""
    from model_merging_methods import rng

    if device == "cpu":  # a dry run: the tensor-op path, as every other device runs it
        words = rng._words_torch(rng.stream_key(9, "w", 2), 5, 1000, torch.device("cpu"))
        return {"tensor-op path": torch.equal(words, rng.random_words(9, "w", 2, 5, 1000))}

    out = {}
    for start, count in [(0, 1), (5, 1000), (123457, 1 << 20), ((1 << 33) + 3, 4096)]:
        ok = torch.equal(
            rng.random_words(9, "w", 2, start, count, device).cpu(), rng.random_words(9, "w", 2, start, count)
        )
        ok &= torch.equal(
            rng.keep_bits(9, "w", 2, start, count, 0.9, device).cpu(),
            rng.keep_bits(9, "w", 2, start, count, 0.9),
        )
        ok &= torch.equal(
            rng.uniform(9, "w", 2, start, count, device).cpu(), rng.uniform(9, "w", 2, start, count)
        )
        out[f"words/keep/uniform start={start} count={count}"] = bool(ok)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="/tmp/gpu_check")
    p.add_argument("--hidden_size", type=int, default=1024)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="CPU worker threads (default: the usable CPUs, at most 8)",
    )
    p.add_argument(
        "--only", nargs="*", default=None, help="run only these configurations (labels of the table)"
    )
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a dry run of this script
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: no CUDA here (torch {torch.__version__}, CUDA build {torch.version.cuda}); run this on a GPU machine"
        )
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    import merge_benchmark

    fam_args = argparse.Namespace(
        hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size,
        intermediate_size=int(round(args.hidden_size * 2.6875 / 16)) * 16, num_finetuned=3, delta_std=0.002, seed=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    family = merge_benchmark.build_family(
        work / f"family_h{args.hidden_size}_l{args.num_layers}_v{args.vocab_size}", fam_args
    )
    base, fts = str(family["base"]), [str(family[f"ft{i}"]) for i in range(3)]
    n_params = sum(math.prod(s) for _, s in merge_benchmark.llama_shapes(
        args.hidden_size, args.num_layers, args.vocab_size, fam_args.intermediate_size))  # fmt: skip
    torch.zeros(1, device=args.device)  # CUDA context outside the timings
    header = {
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpus": os.cpu_count(), "platform": platform.platform(), "parameters_per_model": n_params,
        "family_build_s": round(time.perf_counter() - t0, 1), "load_average": os.getloadavg(),
    }  # fmt: skip
    print(json.dumps(header))
    generator = check_generator(args.device)
    print("generator on CUDA == CPU:", generator)
    rows, failures = [], 0
    for label, kind, kw in configurations(fts):
        if args.only and label not in args.only:
            continue
        row = {"run": label, "guaranteed": label in GUARANTEED}
        try:
            cpu = run_one(kind, kw, base, fts, work / "out_cpu", "cpu", args.num_threads)
            gpu = run_one(kind, kw, base, fts, work / "out_cuda", args.device, args.num_threads)
            row.update(
                cpu_s=cpu["wall_s"], cuda_s=gpu["wall_s"], **compare(work / "out_cpu", work / "out_cuda")
            )
            for key in ("thresholds", "sign_sum"):
                if key in cpu["method_details"]:
                    row[f"{key}_equal"] = cpu["method_details"][key] == gpu["method_details"].get(key)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            failures += 1
            row.update(error=f"{type(exc).__name__}: {exc}"[:300], trace=traceback.format_exc()[-2000:])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    print()
    print(f"{header['gpu']}, torch {header['torch']} (CUDA {header['cuda']}), {header['cpus']} CPUs; "
          f"{n_params / 1e6:.0f}M parameters per model, bf16; generator on CUDA == CPU: {all(generator.values())}")  # fmt: skip
    print(
        "| run | guaranteed | CPU (s) | CUDA (s) | speed-up | same bytes | differing elements | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | {r['guaranteed']} | - | - | - | error: {r['error']} | | |")
            continue
        print(
            f"| {r['run']} | {r['guaranteed']} | {r['cpu_s']:.2f} | {r['cuda_s']:.2f} | {r['cpu_s'] / r['cuda_s']:.1f}x | "
            f"{r['identical']} | {r.get('differing_elements', '')} | {r.get('max_abs_difference', 0.0):.3g} |"
        )
    (work / "gpu_check.json").write_text(
        json.dumps({"header": header, "generator": generator, "rows": rows}, indent=2)
    )
    shutil.rmtree(work / "out_cpu", ignore_errors=True)
    shutil.rmtree(work / "out_cuda", ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
