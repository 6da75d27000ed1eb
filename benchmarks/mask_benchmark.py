"""Throughput of ``mask_model_weights`` (elements per second) against a plain ``torch.bernoulli`` DARE baseline.

    python benchmarks/mask_benchmark.py --num_elements 100000000 --repeats 3

The model is ``--num_tensors`` float32 tensors totalling ``--num_elements`` elements (pretrained + a small delta).
All variants run in one process, one after the other, so the ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_merging_methods.mask_weights_utils import mask_model_weights  # noqa: E402


def bernoulli_baseline(finetuned, pretrained, rate: float) -> dict[str, torch.Tensor]:
    """The textbook DARE: delta * (1 - bernoulli(p)) / (1 - p) with the global RNG, no per-tensor seeding."""
    out = {}
    for name, ft in finetuned.items():
        delta = ft - pretrained[name]
        drop = torch.bernoulli(torch.full_like(delta, rate))
        out[name] = pretrained[name] + delta * (1 - drop) / (1 - rate)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_elements", type=int, default=100_000_000)
    parser.add_argument("--num_tensors", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output_file", default=None, help="optional JSON file for the figures")
    args = parser.parse_args(argv)

    per = args.num_elements // args.num_tensors
    g = torch.Generator().manual_seed(0)
    pretrained = {f"layer.{i}.weight": torch.randn(per, generator=g) for i in range(args.num_tensors)}
    finetuned = {n: t + 0.002 * torch.randn(per, generator=g) for n, t in pretrained.items()}
    total = per * args.num_tensors

    variants = {
        "bernoulli_baseline": lambda: bernoulli_baseline(finetuned, pretrained, args.rate),
        "mask_model_weights_random": lambda: mask_model_weights(
            finetuned, pretrained, weight_mask_rate=args.rate, mask_strategy="random", seed=0
        ),
        "mask_model_weights_magnitude": lambda: mask_model_weights(
            finetuned, pretrained, weight_mask_rate=args.rate, mask_strategy="magnitude"
        ),
    }
    results = {"num_elements": total, "rate": args.rate, "threads": torch.get_num_threads(), "variants": {}}
    for name, fn in variants.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            del out
        median = statistics.median(times)
        results["variants"][name] = {"median_s": median, "elements_per_s": total / median}
    base = results["variants"]["bernoulli_baseline"]["elements_per_s"]
    for name, v in results["variants"].items():
        v["throughput_vs_baseline"] = v["elements_per_s"] / base
        print(
            f"{name:32s} {v['median_s']:8.3f} s  {v['elements_per_s'] / 1e6:8.1f} M elem/s  x{v['throughput_vs_baseline']:.2f}"
        )
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
