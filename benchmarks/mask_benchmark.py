"""Throughput of DARE's mask generation and of ``mask_model_weights`` (elements per second), in one process.

    python benchmarks/mask_benchmark.py --num_elements 100000000 --repeats 3

Mask generation alone (keep decisions for every element, drop rate ``--rate``), one tensor of ``--num_elements /
--num_tensors`` elements at a time:

* ``torch_rand``: ``torch.rand`` from the global generator (a float uniform per element, no decision): the reference;
* ``old_generator``: the masks of versions before the counter-based generator: a Mersenne Twister
  ``torch.Generator`` seeded per tensor, ``torch.rand(generator=g) >= p``;
* ``philox_keep_bits``: this version's masks (``rng.keep_bits`` in chunks of 2^18 elements, as DARE draws them): a
  counter-based Philox4x64-10 word per element compared as an integer, widened to an all-ones/all-zeros int32
  mask ready to be ANDed with the values;
* ``philox_keep_mask``: the same decisions as a bool tensor.

Whole DARE (``delta_weight``, rescale): ``mask_model_weights`` (random and magnitude), the old algorithm
(``old_dare``: MT uniforms, ``keep_where``, division) and the textbook ``torch.bernoulli`` baseline. The model is
``--num_tensors`` float32 tensors (pretrained + a small delta). ``--threads`` torch threads (1 by default: the
generators are sequential per tensor, and the DARE executor runs one tensor per worker thread).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_merging_methods import rng  # noqa: E402
from model_merging_methods.mask_weights_utils import (  # noqa: E402
    RANDOM_CHUNK_ELEMENTS,
    keep_where,
    mask_model_weights,
)


def old_generator(seed: int, name: str) -> torch.Generator:
    """The per-tensor generator of the versions before the counter-based one (SHA-256 of seed and name)."""
    key = f"{int(seed)}\x00\x00{name}".encode()
    return torch.Generator().manual_seed(
        int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)
    )


def old_dare(finetuned, pretrained, rate: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE as the versions before the counter-based generator computed it (delta_weight, rescale)."""
    out = {}
    for name, ft in finetuned.items():
        delta = ft - pretrained[name]
        keep = torch.rand(delta.shape, generator=old_generator(seed, name)) >= rate
        out[name] = pretrained[name] + keep_where(keep, delta) / torch.tensor(1.0 - rate)
    return out


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
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output_file", default=None, help="optional JSON file for the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    per = args.num_elements // args.num_tensors
    names = [f"layer.{i}.weight" for i in range(args.num_tensors)]
    g = torch.Generator().manual_seed(0)
    pretrained = {n: torch.randn(per, generator=g) for n in names}
    finetuned = {n: t + 0.002 * torch.randn(per, generator=g) for n, t in pretrained.items()}
    total = per * args.num_tensors
    p = args.rate

    def philox(bits: bool):
        out = []
        for n in names:
            for s in range(0, per, RANDOM_CHUNK_ELEMENTS):
                c = min(RANDOM_CHUNK_ELEMENTS, per - s)
                out.append(rng.keep_bits(0, n, None, s, c, p) if bits else rng.keep_mask(0, n, None, s, c, p))
            out.clear()  # chunks are consumed at once by DARE: do not hold them

    variants = {
        "mask: torch_rand": lambda: [torch.rand(per) for _ in names],
        "mask: old_generator": lambda: [torch.rand(per, generator=old_generator(0, n)) >= p for n in names],
        "mask: philox_keep_bits": lambda: philox(True),
        "mask: philox_keep_mask": lambda: philox(False),
        "dare: mask_model_weights_random": lambda: mask_model_weights(
            finetuned, pretrained, weight_mask_rate=p, mask_strategy="random", seed=0
        ),
        "dare: old_dare": lambda: old_dare(finetuned, pretrained, p),
        "dare: bernoulli_baseline": lambda: bernoulli_baseline(finetuned, pretrained, p),
        "dare: mask_model_weights_magnitude": lambda: mask_model_weights(
            finetuned, pretrained, weight_mask_rate=p, mask_strategy="magnitude"
        ),
    }
    results = {
        "num_elements": total, "num_tensors": args.num_tensors, "rate": p, "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(), "generator": rng.describe(), "variants": {},
    }  # fmt: skip
    for name, fn in variants.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            del out
        median = statistics.median(times)
        results["variants"][name] = {"median_s": median, "all_s": times, "elements_per_s": total / median}
    results["load_average_at_end"] = os.getloadavg()
    v = results["variants"]
    ref_rand = v["mask: torch_rand"]["elements_per_s"]
    ref_old = v["mask: old_generator"]["elements_per_s"]
    ref_old_dare = v["dare: old_dare"]["elements_per_s"]
    print(
        f"{total / 1e6:.0f}M elements, p = {p}, {results['threads']} thread(s), load {results['load_average_at_start']}"
    )
    print("| variant | median (s) | M elements/s | vs torch.rand | vs old generator / old DARE |")
    print("|---|---|---|---|---|")
    for name, r in v.items():
        r["vs_torch_rand"] = r["elements_per_s"] / ref_rand
        r["vs_old"] = r["elements_per_s"] / (ref_old if name.startswith("mask") else ref_old_dare)
        print(
            f"| {name} | {r['median_s']:.3f} | {r['elements_per_s'] / 1e6:.0f} | {r['vs_torch_rand']:.2f} | "
            f"{r['vs_old']:.2f} |"
        )
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
