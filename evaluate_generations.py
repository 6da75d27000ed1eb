"""Re-score saved generations without a model.

    python evaluate_generations.py --dataset_name {gsm8k,MATH,human_eval,mbpp} --generations_file F
        [--data_file F] [--data_dir D] [--output_file F] [--code_timeout S] [--code_workers N]

The generations file is JSON Lines with ``task_id`` and ``completion``: ``task_id`` is the row index for GSM8K and
MATH, ``"HumanEval/N"`` for HumanEval and the integer task id for MBPP; ``completion`` is the raw model output for
the math sets and the post-processed code for the code sets (the ``generations.jsonl`` written by
``inference_llms_instruct_math_code.py`` has exactly these fields). The results JSON (default: next to the input,
``<name>.results.json``) holds ``n``, GSM8K ``accuracy``/``accuracy_original``, MATH ``accuracy_original``/
``accuracy_math_verify`` or code ``pass@1``, and ``per_item`` (``task_id``, ``correct``, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from utils.cli import UserError, run_main, setup_logging
from utils.llm_evaluation import score, summary
from utils.math_code_data import load_benchmark
from utils.results_io import round_floats, write_json

SCORABLE = ("gsm8k", "MATH", "human_eval", "mbpp")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_name", required=True, choices=SCORABLE)
    p.add_argument("--generations_file", required=True, help="JSON Lines with task_id and completion")
    p.add_argument(
        "--data_file", default=None, help="the dataset (default: standard file in --data_dir, or hub)"
    )
    p.add_argument("--data_dir", default=None, help="folder with the standard data files")
    p.add_argument("--output_file", default=None, help="results JSON (default: <generations>.results.json)")
    p.add_argument("--code_timeout", type=float, default=10.0, help="seconds per test program")
    p.add_argument(
        "--code_workers", type=int, default=None, help="parallel test programs (default: CPU count)"
    )
    return p.parse_args(argv)


def read_generations(path: str | Path) -> list[dict]:
    """Rows of a generations JSONL; each needs ``task_id`` and ``completion``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"generations file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: not valid JSON ({exc})") from exc
            if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
                raise UserError(f"{path}:{n}: each line needs task_id and completion")
            if not isinstance(row["completion"], str):
                raise UserError(f"{path}:{n}: completion must be a string")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no generations")
    return rows


def match_items(dataset: str, items: list[dict], generations: list[dict], source: str) -> list[dict]:
    """The dataset item of every generation (by row index for the math sets, by task id for the code sets)."""
    if dataset in ("gsm8k", "MATH"):

        def key(tid):
            try:
                return int(tid)
            except (TypeError, ValueError):
                raise UserError(f"{dataset} task_id must be a row index, got {tid!r}") from None

        table = {it["index"]: it for it in items}
    elif dataset == "mbpp":

        def key(tid):
            try:
                return int(tid)
            except (TypeError, ValueError):
                raise UserError(f"mbpp task_id must be an integer, got {tid!r}") from None

        table = {it["task_id"]: it for it in items}
    else:
        key = str
        table = {it["task_id"]: it for it in items}
    matched, seen = [], set()
    for g in generations:
        k = key(g["task_id"])
        if k in seen:
            raise UserError(f"task_id {g['task_id']!r} appears twice in the generations file")
        seen.add(k)
        if k not in table:
            raise UserError(f"task_id {g['task_id']!r} is not in the {dataset} data ({source})")
        matched.append(table[k])
    return matched


def default_output_file(generations_file: str | Path) -> Path:
    path = Path(generations_file)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(stem + ".results.json")


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    generations = read_generations(args.generations_file)
    items, source = load_benchmark(args.dataset_name, args.data_file, args.data_dir)
    matched = match_items(args.dataset_name, items, generations, source)
    results = score(args.dataset_name, matched, [g["completion"] for g in generations], args)
    results = round_floats(
        {"dataset": args.dataset_name, "generations_file": str(args.generations_file), "data_source": source,
         **results}
    )  # fmt: skip
    output = Path(args.output_file) if args.output_file else default_output_file(args.generations_file)
    write_json(output, results)
    print(
        json.dumps({**summary({args.dataset_name: results})[args.dataset_name], "output_file": str(output)})
    )
    return results


if __name__ == "__main__":
    run_main(main)
