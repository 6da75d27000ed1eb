"""Prompts, answer extraction and code post-processing for the decoder-LLM benchmarks (spec §6.3-§6.7).

Everything here is a pure function of strings. Two flavours exist where the original has known bugs (§7 items
19-20):

* *faithful* (``*_original`` / the Hendrycks-style ``strip_string`` and ``is_equiv``) reproduces the original
  numbers, bugs included;
* *corrected* (:func:`extract_gsm8k_answer`, :func:`math_verify_equiv`) is what the toolkit reports as the
  primary GSM8K ``accuracy`` and as MATH ``accuracy_math_verify``.
"""

from __future__ import annotations

import logging
import math
import re
import unicodedata
from fractions import Fraction

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# §6.3 prompt templates (byte-exact)
# ---------------------------------------------------------------------------------------------------------------

ALPACA_EVAL_CHAT_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"
)
ALPACA_EVAL_PLAIN_TEMPLATE = "{instruction}\n\n### Response:\n"
MATH_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)
CODE_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n\n### Instruction:\nCreate a Python script for this problem:\n{input}\n\n### Response:"
)
# MBPP task 493's first test is 1,912 characters long; the original replaces its tests by this one line.
MBPP_493_TEST_LINE = "calculate_polygons(startx, starty, endx, endy, radius)"

# §6.4 decoding table: greedy (temperature 0, top_p 1) everywhere
MATH_STOP_STRINGS: tuple[str, ...] = ("Instruction:", "Instruction", "Response:", "Response")
DECODING: dict[str, dict] = {
    "alpaca_eval": {"max_tokens": 2048, "stop": ()},
    "gsm8k": {"max_tokens": 1024, "stop": MATH_STOP_STRINGS},
    "MATH": {"max_tokens": 2048, "stop": MATH_STOP_STRINGS},
    "human_eval": {"max_tokens": 2048, "stop": ()},
    "mbpp": {"max_tokens": 2048, "stop": ()},
}

ANSWER_MARKER = "The answer is: "


def alpaca_eval_prompt(instruction: str, is_chat_model: bool = True) -> str:
    """The AlpacaEval prompt: the Vicuna-style chat template (always used), or the unused plain variant."""
    template = ALPACA_EVAL_CHAT_TEMPLATE if is_chat_model else ALPACA_EVAL_PLAIN_TEMPLATE
    return template.format(instruction=instruction)


def math_prompt(instruction: str) -> str:
    """The GSM8K / MATH chain-of-thought prompt (``instruction`` = GSM8K question or MATH problem)."""
    return MATH_TEMPLATE.format(instruction=instruction)


def code_prompt(problem_input: str) -> str:
    """The HumanEval/MBPP prompt: every run of 4 spaces in ``problem_input`` becomes a tab *before* insertion
    into the template (whose first sentence is followed by three newlines)."""
    return CODE_TEMPLATE.format(input=problem_input.replace("    ", "\t"))


def human_eval_prompt(problem_prompt: str) -> str:
    """The code prompt for one HumanEval problem (``problem["prompt"]``)."""
    return code_prompt(problem_prompt)


def mbpp_prompt(example: dict) -> str:
    """The code prompt for one MBPP row: ``"\\n" + text + "\\nTest examples:"`` then ``"\\n" + test`` for each test
    (task 493: the single line :data:`MBPP_493_TEST_LINE`). ``test_setup_code`` is ignored, as in the original."""
    tests = [MBPP_493_TEST_LINE] if int(example["task_id"]) == 493 else list(example["test_list"])
    text = "\n" + example["text"] + "\nTest examples:" + "".join("\n" + t for t in tests)
    return code_prompt(text)


def batch_data(data: list, batch_size: int) -> list[list]:
    """The original ``batch_data``: n = len // bs; n-1 full batches, then one last batch with everything from
    (n-1)*bs on (so up to 2*bs-1 long); a single batch when len < bs. (The toolkit itself does not use it.)"""
    n = len(data) // batch_size
    if n <= 1:
        return [list(data)] if data else []
    batches = [list(data[i * batch_size : (i + 1) * batch_size]) for i in range(n - 1)]
    batches.append(list(data[(n - 1) * batch_size :]))
    return batches


# ---------------------------------------------------------------------------------------------------------------
# §6.5 GSM8K
# ---------------------------------------------------------------------------------------------------------------

_GSM8K_ORIGINAL_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def gsm8k_gold(answer: str) -> float:
    """Gold answer of a GSM8K row: the text after the **first** ``"#### "`` (up to a second one, as the original's
    ``split("#### ")[1]`` reads it), commas removed, as a number. Where the original would crash because more text
    follows on later lines, the first line is read. ValueError when it is missing, not a number or not finite."""
    if not isinstance(answer, str):
        raise ValueError(f"GSM8K answer is not text but {type(answer).__name__}")
    if "#### " not in answer:
        raise ValueError(f"GSM8K answer has no '#### ' line: {answer[-80:]!r}")
    text = answer.split("#### ")[1].strip().split("\n")[0].strip().replace(",", "")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"GSM8K gold answer after the first '#### ' is not a number: {text[:80]!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"GSM8K gold answer is not a finite number: {text[:80]!r}")
    return value


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        pass
    try:
        unicodedata.numeric(s)
        return True
    except (TypeError, ValueError):
        return False


def gsm8k_original_parse(completion: str) -> tuple[int | None, str | None]:
    """The original (faithful) GSM8K parser, bugs included (§6.5, §7.19), and why it failed.

    After the *last* ``"The answer is: "``: the *first* match of ``[\\-+]?\\d*[\\.,/]?\\d+`` (one separator only,
    so ``1,000,000`` -> 1000 and ``1,234.5`` -> 1234); ``a/b`` -> round(a/b) (denominator ``"0"`` -> round(a));
    otherwise commas removed and ``round(float(.))`` (banker's rounding: 2.5 -> 2).

    Returns ``(prediction, None)``, ``(None, None)`` when the original reports the prediction invalid, or
    ``(None, reason)`` where the original crashes (``5/00`` divides by zero; a 400-digit number over 7 or a
    huge negative number overflows): such an answer is invalid here, and ``reason`` says what the original does.
    """
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None, None
    match = _GSM8K_ORIGINAL_NUMBER.search(parts[-1].strip())
    if match is None:
        return None, None
    text = match.group()
    try:
        if "/" in text:
            numerator, denominator = text.split("/")[0], text.split("/")[1]
            if not (_is_number(numerator) and _is_number(denominator)):
                return None, None
            if denominator == "0":
                return round(float(numerator.replace(",", ""))), None
            frac = Fraction(text.replace(",", ""))
            return round(float(frac.numerator / frac.denominator)), None
        value = float(text.replace(",", ""))
        if value == float("inf"):
            return None, None
        return round(value), None
    except (ArithmeticError, ValueError) as exc:  # ZeroDivisionError, OverflowError, ...
        return None, f"the original parser crashes on {_short(text)}: {type(exc).__name__}: {exc}"


def extract_gsm8k_answer_original(completion: str) -> int | None:
    """The original (faithful) GSM8K parser (:func:`gsm8k_original_parse`): the prediction, or None when invalid.
    One deviation: where the original crashes (``5/00``, numbers too large for a float) this returns None."""
    return gsm8k_original_parse(completion)[0]


def _short(text: str, n: int = 40) -> str:
    return (
        repr(text)
        if len(text) <= n
        else repr(text[: n // 2]) + f"...({len(text)} chars)..." + repr(text[-8:])
    )


# a number: 1,234,567.89 (groups of three) | 1234.5 | .5, optionally followed by /denominator
_NUMBER = r"(?:\d{1,3}(?:,\d{3})+(?![\d])(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
_GSM8K_NUMBER = re.compile(rf"(?<![\w.])([-+−]?)\$?\s?({_NUMBER})(?:\s*/\s*({_NUMBER}))?")


def extract_gsm8k_answer(completion: str, marker: str = "The answer is") -> float | None:
    """Corrected GSM8K parser: the *last* number after the last ``"The answer is"`` (colon optional), with
    thousands separators (``1,000,000``), decimals (``1,234.5``, ``.5``), a leading sign or ``$`` and simple
    fractions ``a/b``; no rounding. None when the marker or a number is missing (or a fraction divides by 0)."""
    if marker not in completion:
        return None
    tail = completion.rsplit(marker, 1)[1]
    matches = list(_GSM8K_NUMBER.finditer(tail))
    if not matches:
        return None
    sign, num, den = matches[-1].groups()
    value = float(num.replace(",", ""))
    if den is not None:
        d = float(den.replace(",", ""))
        if d == 0:
            return None
        value /= d
    if sign in ("-", "−"):
        value = -value
    return value if math.isfinite(value) else None


def gsm8k_is_correct(prediction: float | None, gold: float, tol: float = 1e-6) -> bool:
    """A prediction is correct when it equals the gold number (absolute tolerance ``tol``)."""
    return prediction is not None and abs(float(prediction) - float(gold)) <= tol


# ---------------------------------------------------------------------------------------------------------------
# §6.6 MATH (faithful Hendrycks-style normalisation)
# ---------------------------------------------------------------------------------------------------------------


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or, failing that, the last ``\\fbox``) with balanced braces, or None."""
    idx = text.rfind("\\boxed")
    if idx < 0:
        idx = text.rfind("\\fbox")
        if idx < 0:
            return None
    depth = 0
    for i in range(idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[idx : i + 1]
    return None


def remove_boxed(s: str | None) -> str | None:
    """Inside of ``\\boxed{...}``; None for anything else (including ``\\fbox{...}`` and ``\\boxed 5``)."""
    left = "\\boxed{"
    if s is None or not s.startswith(left) or not s.endswith("}"):
        return None
    return s[len(left) : -1]


def math_gold_original(solution: str) -> str | None:
    """The faithful MATH gold answer: ``remove_boxed(last_boxed_only_string(solution))``."""
    return remove_boxed(last_boxed_only_string(solution))


def math_gold(solution: str) -> str | None:
    """Corrected gold answer: also accepts ``\\fbox{...}`` and ``\\boxed 5`` (used with math-verify)."""
    boxed = last_boxed_only_string(solution)
    if boxed is None:
        m = re.findall(r"\\boxed\s+([^\s$]+)", solution)
        return m[-1] if m else None
    for left in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(left) and boxed.endswith("}"):
            return boxed[len(left) : -1]
    m = re.match(r"\\boxed\s+([^\s$]+)", boxed)
    return m.group(1) if m else None


def extract_math_answer(completion: str) -> str | None:
    """The faithful MATH prediction: after the last ``"The answer is: "``, cut at the first ``".\\n"``, strip,
    drop one trailing ``.``, strip again. None when the marker is absent."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    ans = parts[-1].split(".\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1]
    return ans.strip()


def _fix_fracs(string: str) -> str:
    substrs = string.split("\\frac")
    new_str = substrs[0]
    if len(substrs) > 1:
        for substr in substrs[1:]:
            new_str += "\\frac"
            if substr[0] == "{":  # IndexError for a trailing \frac, as in the original
                new_str += substr
            else:
                if len(substr) < 2:
                    return string
                a, b = substr[0], substr[1]
                if b != "{":
                    new_str += "{" + a + "}{" + b + "}" + substr[2:]
                else:
                    new_str += "{" + a + "}" + b + substr[2:]
    return new_str


def _fix_a_slash_b(string: str) -> str:
    if len(string.split("/")) != 2:
        return string
    a, b = string.split("/")
    # a ValueError here propagates (faithful): is_equiv then falls back to comparing the raw strings
    a_int, b_int = int(a), int(b)
    if string != f"{a_int}/{b_int}":
        return string
    return "\\frac{" + str(a_int) + "}{" + str(b_int) + "}"


def _remove_right_units(string: str) -> str:
    if "\\text{ " in string:
        splits = string.split("\\text{ ")
        assert len(splits) == 2
        return splits[0]
    return string


def _fix_sqrt(string: str) -> str:
    if "\\sqrt" not in string:
        return string
    splits = string.split("\\sqrt")
    new_string = splits[0]
    for split in splits[1:]:
        if split[0] != "{":  # IndexError for a trailing \sqrt, as in the original
            new_substr = "\\sqrt{" + split[0] + "}" + split[1:]
        else:
            new_substr = "\\sqrt" + split
        new_string += new_substr
    return new_string


def strip_string(string: str) -> str:
    """The faithful MATH normaliser (§6.6 steps 1-18). May raise; :func:`is_equiv` then compares raw strings."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if len(string) == 0:
        return string
    if string[0] == ".":
        string = "0" + string
    if len(string.split("=")) == 2 and len(string.split("=")[0]) <= 2:
        string = string.split("=")[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    string = _fix_a_slash_b(string)
    return string


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """Faithful MATH equivalence: both None -> True (with a warning); one None -> False; else equality after
    :func:`strip_string`, falling back to raw equality if normalising raises anything."""
    if str1 is None and str2 is None:
        logger.warning("is_equiv: both answers are None")
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:
        return str1 == str2


def math_is_correct_original(completion: str, solution: str) -> bool:
    """Faithful MATH scoring of one completion against the reference solution (``accuracy_original``)."""
    prediction = extract_math_answer(completion)
    if prediction is None:
        return False
    return is_equiv(prediction, math_gold_original(solution))


def math_verify_available() -> bool:
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _mv_clean(text: str) -> str:
    """Escaped dollars (currency), ``\\!`` spacing and a final full stop confuse math-verify's LaTeX parser."""
    text = text.replace("\\$", "").replace("\\!", "").strip()
    return text[:-1].strip() if text.endswith(".") else text


def math_verify_equiv(completion: str, solution: str) -> bool:
    """Symbolic check with the ``math-verify`` library (``accuracy_math_verify``).

    Gold: the corrected boxed answer of ``solution`` (``\\boxed``, ``\\fbox`` or ``\\boxed 5``; the whole
    solution when none is found). Prediction: the text after the last ``"The answer is:"`` (up to the first
    ``".\\n"``) when present, else the whole completion (math-verify then looks for a ``\\boxed`` answer).
    Escaped dollar signs, ``\\!`` and a trailing full stop are removed from both. Raises ImportError without
    math-verify.
    """
    import threading

    import math_verify

    # math-verify's timeouts use signal.alarm, which works in the main thread only
    timeout = 5 if threading.current_thread() is threading.main_thread() else None

    def parse(text: str):
        return math_verify.parse(text, parsing_timeout=timeout)

    def verify(gold, pred) -> bool:
        return math_verify.verify(gold, pred, timeout_seconds=timeout)

    gold_text = math_gold(solution)
    gold = parse(f"${_mv_clean(gold_text)}$") if gold_text is not None else []
    if not gold:
        gold = parse(solution)
    if "The answer is:" in completion:
        pred_text = _mv_clean(completion.rsplit("The answer is:", 1)[1].split(".\n")[0])
        pred = (parse(f"${pred_text}$") if "$" not in pred_text else []) or parse(pred_text)
    else:
        pred = parse(completion)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred))


# ---------------------------------------------------------------------------------------------------------------
# §6.7 code post-processing
# ---------------------------------------------------------------------------------------------------------------


def split_code_generation(generation: str) -> tuple[str, str]:
    """(completion, all_code) of a raw code generation: completion = text after the last ``"### Response:"``
    (the whole generation when absent) and ``all_code`` = the whole generation, both with tabs -> 4 spaces."""
    completion = generation.split("### Response:")[-1]
    return completion.replace("\t", "    "), generation.replace("\t", "    ")


def postprocess_code_completion(completion: str, dataset: str) -> str:
    """The original clean-up of a code completion (§6.7 steps 1-7) for ``dataset`` in {human_eval, mbpp}.

    Every cut is followed by a strip of the cut text; a step that cuts nothing strips nothing, and there is no
    final strip. In particular a ```` ```python ```` fence that never closes is removed without stripping, so the
    text keeps the newline after the fence and its first line's indentation (an indented function body still
    runs after the HumanEval prompt).
    """
    if dataset not in ("human_eval", "mbpp"):
        raise ValueError(f"code post-processing is for human_eval or mbpp, not {dataset!r}")
    if dataset == "human_eval":
        completion = completion.replace("\r", "")
    completion = completion.strip()
    if "```python" in completion:
        completion = completion[completion.index("```python") :].strip()
        completion = completion.replace("```python", "")
        fence = "```" if dataset == "human_eval" else "\n```"
        if fence in completion:
            completion = completion[: completion.index(fence)].strip()
        else:  # the original logs it and does not strip
            logger.debug("no closing code fence in completion: %r", completion[:200])
    if '__name__ == "__main__"' in completion and 'if __name__ == "__main__":' in completion:
        completion = completion[: completion.index('if __name__ == "__main__":')].strip()
    if "# Example usage" in completion:
        completion = completion[: completion.index("# Example usage")].strip()
    if dataset == "mbpp" and "# Test examples" in completion:
        completion = completion[: completion.index("# Test examples")].strip()
    if "The solution is:" in completion:
        completion = completion[completion.index("The solution is:") :]
        completion = completion.replace("The solution is:", "")
        if "\n\nThe answer is:" in completion:
            completion = completion[: completion.index("\n\nThe answer is:")]
        completion = completion.strip()
    if "The answer is:" in completion:
        completion = completion[completion.index("The answer is:") :]
        completion = completion.replace("The answer is:", "")
        completion = completion.strip()
    return completion


def process_code_generation(generation: str, dataset: str) -> dict[str, str]:
    """Raw generation -> ``{"completion": cleaned code, "all_code": full generation (tabs -> spaces)}``."""
    completion, all_code = split_code_generation(generation)
    return {"completion": postprocess_code_completion(completion, dataset), "all_code": all_code}


# ---------------------------------------------------------------------------------------------------------------
# test programs for built-in code execution
# ---------------------------------------------------------------------------------------------------------------


def human_eval_program(problem: dict, completion: str) -> str:
    """The HumanEval check program (as human-eval builds it): prompt + completion + tests + ``check(entry)``."""
    return (
        problem["prompt"]
        + completion
        + "\n"
        + problem["test"]
        + "\n"
        + f"check({problem['entry_point']})"
        + "\n"
    )


def mbpp_program(example: dict, completion: str) -> str:
    """The MBPP check program: completion, then ``test_setup_code`` (it uses names the code defines, e.g. task
    367's ``Node``), then the asserts of ``test_list``."""
    setup = example.get("test_setup_code") or ""
    return completion + "\n" + setup + "\n" + "\n".join(example["test_list"]) + "\n"
