"""Re-score saved generations without a model.

    python evaluate_generations.py --dataset_name {gsm8k,MATH,human_eval,mbpp} --generations_file F
        [--data_file F] [--data_dir D] [--output_file F] [--code_timeout S] [--code_workers N]

The generations file is JSON Lines with ``task_id`` and ``completion``: ``task_id`` is the row index for GSM8K and
MATH, ``"HumanEval/N"`` for HumanEval and the integer task id for MBPP; ``completion`` is the raw model output for
the math sets and the post-processed code for the code sets (the ``generations.jsonl`` written by
``inference_llms_instruct_math_code.py`` has exactly these fields). The results JSON (default: next to the input,
``<name>.results.json``) holds ``n``, GSM8K ``accuracy``/``accuracy_original``, MATH ``accuracy_original``/
``accuracy_math_verify`` or code ``pass@1``, ``scoring_errors`` and ``per_item`` (``task_id``, ``correct``, ...;
``error`` where an item could not be scored: it then counts as wrong).

The results file must not be, contain or lie inside the generations file, the data file or the data folder (this
is refused before anything is read); an existing file is only replaced when it is a results file of this script.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from model_merging_methods.paths import guard_outputs
from utils.cli import UserError, run_main, setup_logging
from utils.llm_evaluation import check_evaluation_args, score, summary, write_results_json
from utils.math_code_data import data_source_paths, load_benchmark
from utils.results_io import round_floats

SCORABLE = ("gsm8k", "MATH", "human_eval", "mbpp")
_SOURCE_LABELS = {"data file": "--data_file", "data folder": "--data_dir"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_name", required=True, choices=SCORABLE)
    p.add_argument("--generations_file", required=True, help="JSON Lines with task_id and completion")
    p.add_argument(
        "--data_file", default=None, help="the dataset (default: standard file in --data_dir, or hub)"
    )
    p.add_argument("--data_dir", default=None, help="folder with the standard data files")
    p.add_argument("--output_file", default=None, help="results JSON (default: <generations>.results.json)")
    p.add_argument(
        "--code_timeout", type=float, default=10.0, help="seconds per test program (0 < S <= 3600)"
    )
    p.add_argument(
        "--code_workers", type=int, default=None, help="parallel test programs (default: CPU count)"
    )
    return p.parse_args(argv)


def read_generations(path: str | Path) -> list[dict]:
    """Rows of a generations JSONL; each needs ``task_id`` and ``completion``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"generations file not found: {path}")
    if not path.is_file():
        raise UserError(f"generations file {path} is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"generations file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from exc
    except OSError as exc:
        raise UserError(f"cannot read generations file {path}: {exc.strerror or exc}") from exc
    rows = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise UserError(f"{path}:{n}: not valid JSON ({str(exc)[:200]})") from exc
        if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
            raise UserError(f"{path}:{n}: each line needs task_id and completion")
        if not isinstance(row["completion"], str):
            raise UserError(f"{path}:{n}: completion must be a string")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no generations")
    return rows


def _int_key(dataset: str, what: str):
    def key(tid):
        if isinstance(tid, bool):
            raise UserError(f"{dataset} task_id must be {what}, got {tid!r}")
        if isinstance(tid, int):
            return tid
        if isinstance(tid, float) and tid.is_integer():
            return int(tid)
        if isinstance(tid, str) and tid.strip().lstrip("+-").isdigit() and len(tid) < 20:
            return int(tid)
        raise UserError(f"{dataset} task_id must be {what}, got {str(tid)[:80]!r}")

    return key


def match_items(dataset: str, items: list[dict], generations: list[dict], source: str) -> list[dict]:
    """The dataset item of every generation (by row index for the math sets, by task id for the code sets)."""
    if dataset in ("gsm8k", "MATH"):
        key = _int_key(dataset, "a row index")
        table = {it["index"]: it for it in items}
    elif dataset == "mbpp":
        key = _int_key(dataset, "an integer")
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
            raise UserError(f"task_id {str(g['task_id'])[:80]!r} is not in the {dataset} data ({source})")
        matched.append(table[k])
    return matched


def default_output_file(generations_file: str | Path) -> Path:
    path = Path(generations_file)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.stem
    return path.with_name(stem + ".results.json")


def _is_results_file(path: Path) -> bool:
    """True for a JSON object this script wrote (``dataset``, ``generations_file`` and a ``per_item`` list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return (
        isinstance(data, dict)
        and data.get("dataset") in SCORABLE
        and "generations_file" in data
        and isinstance(data.get("per_item"), list)
    )


def check_output_file(output: Path, args: argparse.Namespace) -> None:
    """Before anything is read: the results file must not be, contain or lie inside an input; an existing path
    must be an earlier results file of this script; its folder must be (or become) a writable folder."""
    inputs: dict[str, str | Path] = {"--generations_file": args.generations_file}
    for role, path in data_source_paths(args.dataset_name, args.data_file, args.data_dir).items():
        inputs[_SOURCE_LABELS.get(role, role)] = path
    guard_outputs({"--output_file": output}, inputs)
    if output.is_symlink() or output.exists():
        if output.is_dir():
            raise UserError(f"--output_file {output} is a folder; name a file")
        if not output.is_file() or output.is_symlink():
            raise UserError(
                f"--output_file {output} exists and is not a regular file; refusing to replace it"
            )
        if not _is_results_file(output):
            raise UserError(
                f"--output_file {output} exists and is not a results file of evaluate_generations.py; "
                "refusing to replace it (remove it or choose another name)"
            )
    for parent in output.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write --output_file {output}: {parent} is not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"cannot write --output_file {output}: no write permission in {parent}")
            break


def write_results(output: Path, results: dict) -> None:
    """Write atomically; on an OS error (no space, read-only, name too long...) one error line naming the path,
    and the folders this call created are removed again."""
    created = [p for p in output.absolute().parents if not p.exists()]
    try:
        write_results_json(output, results)
    except OSError as exc:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
        raise UserError(f"cannot write --output_file {output}: {exc.strerror or exc}") from exc


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_logging()
    check_evaluation_args(args)
    output = Path(args.output_file) if args.output_file else default_output_file(args.generations_file)
    check_output_file(output, args)
    generations = read_generations(args.generations_file)
    items, source = load_benchmark(args.dataset_name, args.data_file, args.data_dir)
    matched = match_items(args.dataset_name, items, generations, source)
    results = score(args.dataset_name, matched, [g["completion"] for g in generations], args)
    results = round_floats(
        {"dataset": args.dataset_name, "generations_file": str(args.generations_file), "data_source": source,
         **results}
    )  # fmt: skip
    write_results(output, results)
    print(
        json.dumps({**summary({args.dataset_name: results})[args.dataset_name], "output_file": str(output)})
    )
    return results


if __name__ == "__main__":
    run_main(main)
