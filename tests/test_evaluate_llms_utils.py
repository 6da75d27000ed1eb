"""Prompts (byte-exact, §6.3), GSM8K/MATH extraction and equivalence (§6.5-6.6), code post-processing (§6.7)."""

import json

import pytest

from utils import evaluate_llms_utils as ev

A = "The answer is: "

# ------------------------------------------------------------------------------------------------ prompts

MBPP_11 = {
    "task_id": 11,
    "text": "Write a python function to remove first and last occurrence of a given character from the string.",
    "code": "def remove_Occ(s,ch): ...",
    "test_list": [
        'assert remove_Occ("hello","l") == "heo"',
        'assert remove_Occ("abcda","a") == "bcd"',
        'assert remove_Occ("PHP","P") == "H"',
    ],
    "test_setup_code": "",
}
# the spec's example (§6.3), written out in full
MBPP_11_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\n"
    "### Instruction:\nCreate a Python script for this problem:\n\n"
    "Write a python function to remove first and last occurrence of a given character from the string.\n"
    "Test examples:\n"
    'assert remove_Occ("hello","l") == "heo"\n'
    'assert remove_Occ("abcda","a") == "bcd"\n'
    'assert remove_Occ("PHP","P") == "H"\n\n'
    "### Response:"
)


def test_mbpp_prompt_matches_the_spec_example_for_task_11():
    assert ev.mbpp_prompt(MBPP_11) == MBPP_11_PROMPT


def test_mbpp_prompt_of_the_real_task_11(shared_data):
    row = json.loads((shared_data / "mbpp.test.jsonl").read_text().splitlines()[0])
    assert row["task_id"] == 11
    assert ev.mbpp_prompt(row) == MBPP_11_PROMPT


def test_mbpp_task_493_uses_the_single_call_line_and_tabs():
    row = {"task_id": 493, "text": "Poly.", "test_list": ["assert x == " + "1" * 2000]}
    prompt = ev.mbpp_prompt(row)
    assert "Test examples:\ncalculate_polygons(startx, starty, endx, endy, radius)\n\n### Response:" in prompt
    assert "1111" not in prompt
    row = {"task_id": 12, "text": "T", "test_list": ["assert f(1) ==" + " " * 4 + "2"]}
    assert "assert f(1) ==\t2" in ev.mbpp_prompt(row)


def test_alpaca_and_math_templates_are_byte_exact():
    assert ev.alpaca_eval_prompt("Hi?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi? ASSISTANT:"
    )
    assert ev.alpaca_eval_prompt("Hi?", is_chat_model=False) == "Hi?\n\n### Response:\n"
    assert ev.math_prompt("What is 1+1?") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nWhat is 1+1?\n\n### Response: Let's think step by step."
    )


def test_human_eval_prompt_turns_four_spaces_into_tabs_before_insertion():
    problem = 'def f(x):\n    """Doc."""\n        # eight\n'
    prompt = ev.human_eval_prompt(problem)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n"
        'def f(x):\n\t"""Doc."""\n\t\t# eight\n\n\n### Response:'
    )
    # the template's own text is not touched by the tab conversion
    assert ev.code_prompt("a    b").count("\t") == 1


def test_batch_data_has_a_ragged_last_batch():
    sizes = [len(b) for b in ev.batch_data(list(range(1319)), 60)]
    assert sizes == [60] * 20 + [119]
    assert [len(b) for b in ev.batch_data(list(range(5000)), 50)] == [50] * 100
    assert ev.batch_data([1, 2, 3], 60) == [[1, 2, 3]]
    assert ev.batch_data(list(range(119)), 60) == [list(range(119))]  # n == 1: everything in one batch
    assert sum(ev.batch_data(list(range(130)), 60), []) == list(range(130))


def test_decoding_table():
    assert ev.DECODING["gsm8k"] == {
        "max_tokens": 1024,
        "stop": ("Instruction:", "Instruction", "Response:", "Response"),
    }
    assert ev.DECODING["MATH"]["max_tokens"] == 2048 and ev.DECODING["MATH"]["stop"] == ev.MATH_STOP_STRINGS
    for d in ("alpaca_eval", "human_eval", "mbpp"):
        assert ev.DECODING[d] == {"max_tokens": 2048, "stop": ()}


# ------------------------------------------------------------------------------------------------ GSM8K


@pytest.mark.parametrize(
    "text, original, corrected",
    [
        ("1,000,000", 1000, 1_000_000.0),  # the original allows one separator only
        ("1,234.5", 1234, 1234.5),
        (".5", 0, 0.5),  # round(0.5) == 0 (banker's rounding)
        ("2.5", 2, 2.5),
        ("3.5", 4, 3.5),
        ("12,5/3", 125, 5 / 3),
        ("7/2", 4, 3.5),  # Fraction -> round(3.5) == 4
        ("5/0", 5, None),  # denominator "0": round(numerator) in the original
        ("5/00", None, None),  # the original crashes here; both report invalid
        ("-3", -3, -3.0),
        ("$1,000.", 1000, 1000.0),
        ("18 dollars.", 18, 18.0),
        ("5 apples and 6 pears", 5, 6.0),  # the original takes the first number, the fix the last
        ("none", None, None),
    ],
)
def test_gsm8k_extraction_original_and_corrected(text, original, corrected):
    assert ev.extract_gsm8k_answer_original(A + text) == original
    got = ev.extract_gsm8k_answer(A + text)
    if corrected is None:
        assert got is None
    else:
        assert got == pytest.approx(corrected)


def test_gsm8k_marker_handling():
    assert ev.extract_gsm8k_answer_original("so 42") is None
    assert ev.extract_gsm8k_answer("so 42") is None
    two = "The answer is: 3\nThe answer is: 4"
    assert ev.extract_gsm8k_answer_original(two) == 4 and ev.extract_gsm8k_answer(two) == 4.0
    assert ev.extract_gsm8k_answer_original("The answer is 42") is None  # needs the colon and space
    assert ev.extract_gsm8k_answer("The answer is 42") == 42.0
    assert ev.gsm8k_gold("blah\n#### 1,234") == 1234.0
    assert ev.gsm8k_is_correct(1234.0, 1234.0) and not ev.gsm8k_is_correct(None, 1.0)
    assert not ev.gsm8k_is_correct(1233.0, 1234.0)
    with pytest.raises(ValueError):
        ev.gsm8k_gold("no marker")


# ------------------------------------------------------------------------------------------------ MATH


@pytest.mark.parametrize(
    "a, b, equal",
    [
        ("\\frac12", "\\frac{1}{2}", True),
        ("0.5", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("10\\text{ cm}", "10", True),
        ("k = 5", "5", True),
        ("\\$5", "5", True),
        ("$5$", "5", False),  # plain $ is not removed
        ("50\\%", "50", True),
        ("\\sqrt2", "\\sqrt{2}", True),
        ("90^\\circ", "90", True),
        ("\\left(1,2\\right)", "(1,2)", True),
        ("\\dfrac{3}{4}", "\\frac34", True),
        ("x/2", "\\frac{x}{2}", False),  # fix_a_slash_b raises -> raw comparison
        ("x/2", "x/2", True),
        ("1\\text{ a}\\text{ b}", "1", False),  # two "\text{ " -> assertion -> raw comparison
        ("\\sqrt", "\\sqrt", True),  # trailing \sqrt raises -> raw comparison
    ],
)
def test_is_equiv_faithful_cases(a, b, equal):
    assert ev.is_equiv(a, b) is equal


def test_is_equiv_none_rules():
    assert ev.is_equiv(None, None) is True
    assert ev.is_equiv("1", None) is False and ev.is_equiv(None, "1") is False


def test_boxed_extraction():
    sol = "First \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}} done."
    assert ev.last_boxed_only_string(sol) == "\\boxed{\\frac{1}{\\sqrt{2}}}"
    assert ev.math_gold_original(sol) == "\\frac{1}{\\sqrt{2}}"
    assert ev.last_boxed_only_string("\\boxed{unclosed") is None
    assert ev.last_boxed_only_string("nothing") is None
    # the original rejects \fbox and "\boxed 5"; the corrected gold accepts them
    assert ev.math_gold_original("so \\fbox{7}") is None and ev.math_gold("so \\fbox{7}") == "7"
    assert ev.math_gold_original("so $\\boxed 5$.") is None and ev.math_gold("so $\\boxed 5$.") == "5"


def test_math_prediction_extraction_and_scoring():
    assert ev.extract_math_answer("blah The answer is: \\frac{1}{2}.\nmore") == "\\frac{1}{2}"
    assert ev.extract_math_answer("The answer is: 1\nThe answer is: 7. ") == "7"
    assert ev.extract_math_answer("no marker") is None
    sol = "Hence $\\boxed{\\frac{1}{2}}$."
    assert ev.math_is_correct_original("The answer is: 0.5", sol)
    assert not ev.math_is_correct_original("The answer is: 0.6", sol)
    assert not ev.math_is_correct_original("\\boxed{\\frac{1}{2}}", sol)  # no marker: wrong in the original


def test_math_verify_equivalence():
    pytest.importorskip("math_verify")
    sol = "Hence $\\boxed{\\frac{1}{2}}$."
    assert ev.math_verify_equiv("The answer is: 0.5", sol)
    assert ev.math_verify_equiv("The answer is: \\dfrac{2}{4}.", sol)
    assert ev.math_verify_equiv("so the result is \\boxed{1/2}", sol)  # no marker: the boxed answer is used
    assert not ev.math_verify_equiv("The answer is: 0.6", sol)
    assert not ev.math_verify_equiv("no answer at all", sol)
    assert ev.math_verify_equiv("The answer is: \\$18.90", "It costs $\\boxed{\\$18.90}$.")
    assert ev.math_verify_equiv("The answer is: x/2", "$\\boxed{\\frac{x}{2}}$")  # the original says no
    # outside the main thread math-verify's signal-based timeout is unavailable: it still works
    import threading

    out = []
    worker = threading.Thread(target=lambda: out.append(ev.math_verify_equiv("The answer is: 0.5", sol)))
    worker.start()
    worker.join()
    assert out == [True]


# ------------------------------------------------------------------------------------------------ code


def test_split_code_generation():
    gen = "intro ### Response: a\n### Response:\ndef f():\n\treturn 1"
    completion, all_code = ev.split_code_generation(gen)
    assert completion == "\ndef f():\n    return 1"
    assert all_code == gen.replace("\t", "    ")
    assert ev.split_code_generation("x\ty")[0] == "x    y"


def test_code_fences_differ_between_human_eval_and_mbpp():
    text = "Here:\n```python\ndef f():\n    return '```'\n```\nBye"
    # HumanEval cuts at the next ``` anywhere, MBPP only at "\n```"
    assert ev.postprocess_code_completion(text, "human_eval") == "def f():\n    return '"
    assert ev.postprocess_code_completion(text, "mbpp") == "def f():\n    return '```'"
    # no closing fence: the original does not strip (corrected spec §6.7), so the newline after the fence stays
    assert ev.postprocess_code_completion("```python\ndef g(): pass", "mbpp") == "\ndef g(): pass"


def test_code_cut_markers():
    main = 'def f():\n    return 1\n\nif __name__ == "__main__":\n    print(f())'
    assert ev.postprocess_code_completion(main, "human_eval") == "def f():\n    return 1"
    usage = "def f():\n    return 1\n# Example usage\nprint(f())"
    assert ev.postprocess_code_completion(usage, "mbpp") == "def f():\n    return 1"
    tests = "def f():\n    return 1\n# Test examples\nassert f() == 1"
    assert ev.postprocess_code_completion(tests, "mbpp") == "def f():\n    return 1"
    assert ev.postprocess_code_completion(tests, "human_eval") == tests  # HumanEval keeps it
    crlf = "def f():\r\n    return 1\r\n"
    assert ev.postprocess_code_completion(crlf, "human_eval") == "def f():\n    return 1"
    assert "\r" in ev.postprocess_code_completion(crlf, "mbpp")


def test_code_alpaca_markers():
    sol = "Sure.\nThe solution is:\ndef f():\n    return 1\n\nThe answer is: 1"
    assert ev.postprocess_code_completion(sol, "mbpp") == "def f():\n    return 1"
    ans = "Text The answer is: def g(): The answer is: return 2"
    assert ev.postprocess_code_completion(ans, "mbpp") == "def g():  return 2"
    with pytest.raises(ValueError):
        ev.postprocess_code_completion("x", "gsm8k")


def test_process_code_generation_and_programs():
    rec = ev.process_code_generation("### Response:\n```python\ndef add(a, b):\n\treturn a + b\n```", "mbpp")
    assert rec["completion"] == "def add(a, b):\n    return a + b"
    row = {"test_list": ["assert add(1, 2) == 3"], "test_setup_code": "X = 1"}
    assert ev.mbpp_program(row, rec["completion"]) == (
        "def add(a, b):\n    return a + b\nX = 1\nassert add(1, 2) == 3\n"
    )
    problem = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1", "entry_point": "f"}
    assert ev.human_eval_program(problem, "    return 1") == (
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\ncheck(f)\n"
    )
