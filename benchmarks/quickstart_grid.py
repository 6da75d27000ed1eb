"""Run ``quickstart.py`` for several seeds and thread counts and summarise the grid (issue 16).

Every (seed, threads) pair runs in its own output folder (``{output_dir}/seed{S}-threads{T}``), in a fresh
process, so each is a true first run: its wall time, the 1-minute load average before and after, the CPU model and
the quickstart's own results are recorded in ``run.json`` next to it. A pair whose ``run.json`` exists is not run
again (``--rerun`` runs it again, reusing the quickstart's cache). The summary goes to ``{output_dir}/grid.md`` and
``grid.json``: per run the base, the specialists, the share of each specialist's accuracy DARE keeps at
``--check_rate``, every merge (accuracy and share of the specialist), the run time and load; then the mean and range
over the runs, the checks of issue 16 (every specialist >= 90% on its own skill, the base <= 20% on each skill,
DARE at 0.9 keeping >= 95%) and whether every thread count gave the same tables for a seed.

    python benchmarks/quickstart_grid.py --seeds 0 1 2 3 4 --threads 1 2 --output_dir ./quickstart_grid
    python benchmarks/quickstart_grid.py --size ci --seeds 0 1 --threads 1 2 --output_dir /tmp/grid_ci
    python benchmarks/quickstart_grid.py ... -- --set sft_lr=2e-4   # arguments after -- go to quickstart.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.cli import UserError, run_main  # noqa: E402

# issue 16's checks
SPECIALIST_AT_LEAST = 0.90
BASE_AT_MOST = 0.20
DARE_KEEPS_AT_LEAST = 0.95


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_one(
    seed: int, threads: int, folder: Path, size: str, extra: list[str], rerun: bool
) -> dict[str, Any]:
    """Run the quickstart once (unless ``run.json`` already records it) and return its record."""
    record_path = folder / "run.json"
    if record_path.is_file() and not rerun:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if "records" not in record["results"]:  # written before run.json kept the per-mask-seed records
            results = json.loads((folder / "quickstart" / "results.json").read_text(encoding="utf-8"))
            record["results"]["records"] = results["records"]
        return record
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "quickstart.py"), "--size", size, "--seed", str(seed)]
    cmd += ["--threads", str(threads), "--output_dir", str(folder / "quickstart"), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load_before = os.getloadavg()
    t0 = time.time()
    with open(folder / "quickstart.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise UserError(
            f"quickstart failed for seed {seed}, {threads} thread(s): see {folder / 'quickstart.log'}"
        )
    results = json.loads((folder / "quickstart" / "results.json").read_text(encoding="utf-8"))
    record = {
        "seed": seed,
        "threads": threads,
        "size": size,
        "command": cmd,
        "wall_s": wall,
        "load_before": list(load_before),
        "load_after": list(load_after),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "results": {
            k: results[k] for k in ("config", "tables", "timings_s", "merge_drop_rates_used", "records")
        },
    }
    record_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def summarise_run(rec: dict[str, Any], check_rate: float) -> dict[str, Any]:
    """One run's numbers: base and specialists per skill, DARE share at ``check_rate``, merges and their shares."""
    tables = rec["results"]["tables"]
    skills = rec["results"]["config"]["skills"]
    fam = {r["model"]: r for r in tables["family"]}
    dare = {r["model"]: r for r in tables["dare_retention"]}
    rel = {r["model"]: r for r in tables["merges_relative_to_specialist"]}
    merges = {}
    for row in tables["merges"]:
        if row["model"] == "base" or row["model"].endswith(" specialist"):
            continue
        merges[row["model"]] = {
            s: {"accuracy": row[s], "share": rel[row["model"]][f"{s} / specialist"]} for s in skills
        }
    return {
        "seed": rec["seed"],
        "threads": rec["threads"],
        "skills": skills,
        "base": {s: fam["base"][s] for s in skills},
        "specialist": {s: fam[f"{s} specialist"][s] for s in skills},
        "specialist_other": {s: {o: fam[f"{s} specialist"][o] for o in skills if o != s} for s in skills},
        "dare_share": {s: dare[f"{s} specialist"].get(f"DARE p={check_rate:g}") for s in skills},
        "dare_share_worst_mask_seed": {
            s: _worst_mask_seed(rec, s, fam[f"{s} specialist"][s], check_rate) for s in skills
        },
        "merges": merges,
        "wall_s": rec["wall_s"],
        "load_before": rec["load_before"][0],
        "load_after": rec["load_after"][0],
        "cpu": rec["cpu"],
    }


def _worst_mask_seed(rec: dict[str, Any], skill: str, specialist: float, rate: float) -> float | None:
    """The smallest share of the specialist's accuracy DARE at ``rate`` keeps over the mask seeds."""
    values = [
        r["value"]
        for r in rec["results"].get("records", [])
        if r.get("kind") == "dare"
        and r.get("variant") == "DARE"
        and r.get("dataset") == skill
        and r.get("drop_rate") == rate
    ]
    if not values or not specialist:
        return None
    return min(values) / specialist


def _stat(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean = sum(vals) / len(vals)
    return f"{mean:.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def build_report(records: list[dict[str, Any]], check_rate: float) -> tuple[dict[str, Any], str]:
    """The grid summary as JSON and as Markdown."""
    runs = [summarise_run(r, check_rate) for r in records]
    skills = runs[0]["skills"]
    methods = list(runs[0]["merges"])
    # thread identity: every thread count of a seed gave exactly the same tables
    by_seed: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_seed.setdefault(r["seed"], []).append(r)
    identical = {
        seed: all(x["results"]["tables"] == rs[0]["results"]["tables"] for x in rs[1:])
        for seed, rs in by_seed.items()
        if len(rs) > 1
    }
    checks = {
        f"every specialist >= {SPECIALIST_AT_LEAST:.0%} on its own skill": all(
            r["specialist"][s] >= SPECIALIST_AT_LEAST for r in runs for s in skills
        ),
        f"the base <= {BASE_AT_MOST:.0%} on each skill": all(
            r["base"][s] <= BASE_AT_MOST for r in runs for s in skills
        ),
        f"DARE p={check_rate:g} keeps >= {DARE_KEEPS_AT_LEAST:.0%} of each specialist": all(
            r["dare_share"][s] is not None and r["dare_share"][s] >= DARE_KEEPS_AT_LEAST
            for r in runs
            for s in skills
        ),
        "same tables with every thread count (per seed)": all(identical.values()) if identical else None,
    }
    lines = [f"# quickstart grid: {len(runs)} runs ({records[0]['size']} size), CPU: {runs[0]['cpu']}", ""]
    lines += ["## Checks", "", "| check | passed |", "|---|---|"]
    lines += [f"| {k} | {'n/a' if v is None else ('yes' if v else 'NO')} |" for k, v in checks.items()]
    lines += ["", f"Thread identity per seed: {identical or 'only one thread count run'}", ""]
    lines += ["## Mean [min, max] over the runs", "", "| quantity | " + " | ".join(skills) + " |"]
    lines += ["|---|" + "---|" * len(skills)]
    lines.append("| base | " + " | ".join(_stat([r["base"][s] for r in runs]) for s in skills) + " |")
    lines.append(
        "| specialist (own skill) | "
        + " | ".join(_stat([r["specialist"][s] for r in runs]) for s in skills)
        + " |"
    )
    lines.append(
        f"| DARE p={check_rate:g}, share kept (mean of the mask seeds) | "
        + " | ".join(_stat([r["dare_share"][s] for r in runs]) for s in skills)
        + " |"
    )
    lines.append(
        f"| DARE p={check_rate:g}, share kept (worst mask seed) | "
        + " | ".join(_stat([r["dare_share_worst_mask_seed"][s] for r in runs]) for s in skills)
        + " |"
    )
    for m in methods:
        lines.append(
            f"| {m}, share of specialist | "
            + " | ".join(_stat([r["merges"][m][s]["share"] for r in runs]) for s in skills)
            + " |"
        )
    lines.append(f"| run time (s) | {_stat([r['wall_s'] for r in runs])} |" + " |" * (len(skills) - 1))
    lines += ["", "## Per run", ""]
    head = ["seed", "threads"]
    head += [f"base {s}" for s in skills] + [f"{s} specialist" for s in skills]
    head += [f"DARE {check_rate:g} keeps ({s})" for s in skills] + ["run time (s)", "load before / after"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [str(r["seed"]), str(r["threads"])]
        cells += [f"{r['base'][s]:.3f}" for s in skills] + [f"{r['specialist'][s]:.3f}" for s in skills]
        cells += [
            f"{_pct(r['dare_share'][s])} (worst seed {_pct(r['dare_share_worst_mask_seed'][s])})"
            for s in skills
        ]
        cells += [f"{r['wall_s']:.0f}", f"{r['load_before']:.2f} / {r['load_after']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Merges per run (accuracy, share of the specialist)", ""]
    head = ["seed", "threads"] + methods
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [str(r["seed"]), str(r["threads"])]
        for m in methods:
            cells.append(
                " / ".join(
                    f"{r['merges'][m][s]['accuracy']:.3f} ({_pct(r['merges'][m][s]['share'])})"
                    for s in skills
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Merge cells: {' / '.join(skills)}.", ""]
    summary = {"checks": checks, "thread_identity": identical, "runs": runs}
    return summary, "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", default="full", choices=["full", "ci"])
    p.add_argument("--output_dir", default="./quickstart_grid")
    p.add_argument("--check_rate", type=float, default=0.9, help="DARE drop rate of the retention check")
    p.add_argument("--rerun", action="store_true", help="run pairs again even when run.json exists")
    p.add_argument("quickstart_args", nargs="*", help="after --: more arguments for quickstart.py")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if any(t < 1 for t in args.threads):
        raise UserError("--threads must be at least 1")
    out = Path(args.output_dir)
    records = []
    for seed in args.seeds:
        for threads in args.threads:
            rec = run_one(
                seed,
                threads,
                out / f"seed{seed}-threads{threads}",
                args.size,
                args.quickstart_args,
                args.rerun,
            )
            records.append(rec)
            print(f"seed {seed}, {threads} thread(s): {rec['wall_s']:.0f} s", flush=True)
    summary, md = build_report(records, args.check_rate)
    (out / "grid.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (out / "grid.md").write_text(md, encoding="utf-8")
    print(md)
    return summary


if __name__ == "__main__":
    run_main(main)
