"""The answer rule of the paper authors' code, for `grading=authors_gsm8k|authors_math`.

Facts from chenzhiling9954/Critical-Tokens-Matter (written here in our own code):
- src/utils/utils.py `multi_result_check`: a response is first cut at "\\n\\nQuestion:" and at
  "\\n\\nProblem:" (the model going on with a new exemplar);
- src/utils/parser.py `extract_answer_by_question_source`, GSM8K: after removing "$", "€", "£"
  and ",", the first number after the FIRST "he answer is ", else the last number of the response;
  the prediction is lower-cased;
- src/utils/parser.py `extract_latex_answer`, MATH: the "$...$" after the last "Final Answer:"
  (text from "I hope it is correct" on dropped), else the last "boxed" group, else the text after
  the last "he answer is", else the last number; then its first line without a leading ":" and a
  trailing "." or "/";
- src/utils/grader.py `math_equal`: equal strings, or both numbers (commas and "%" dropped) with
  the prediction within rel_tol 1e-4 of gold, gold / 100 or gold * 100; otherwise sympy.

Not re-implemented: their sympy string normalisation (`strip_string`) and `symbolic_equal`;
non-numeric MATH answers are compared by math-verify instead (cdpo.grading).
"""
from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d*\.?\d+")
_CONTINUATIONS = ("\n\nQuestion:", "\n\nProblem:")


def cut_continuation(response: str) -> str:
    for marker in _CONTINUATIONS:
        response = response.split(marker)[0]
    return response


def _numbers(text: str, drop: str) -> list[str]:
    for ch in drop:
        text = text.replace(ch, "")
    return _NUMBER.findall(text)


def extract_gsm8k(response: str) -> str:
    """The authors' GSM8K prediction ('' when the response has no number)."""
    text = cut_continuation(response)
    if "he answer is " in text:
        found = _numbers(text.split("he answer is ")[1], "$€£,")
        return found[0].lower() if found else ""
    found = _numbers(text, "$€£,")
    return found[-1].lower() if found else ""


def _last_boxed(text: str) -> str:
    rest = text.split("boxed")[-1]
    if not rest:
        return ""
    if rest[0] != "{":
        return rest.split("$")[0].strip()
    depth, out = 1, []
    for ch in rest[1:]:
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            break
        out.append(ch)
    return "".join(out)


def extract_math(response: str) -> str:
    """The authors' MATH prediction, before their sympy normalisation ('' when none)."""
    text = cut_continuation(response)
    pred = None
    if "Final Answer:" in text:
        if "I hope it is correct" in text:
            text = text.split("I hope it is correct")[0]
        dollars = re.findall(r"\$(.*)\$", text.split("Final Answer:")[-1], re.DOTALL)
        pred = dollars[0] if dollars else None
    if pred is None:
        if "boxed" in text:
            pred = _last_boxed(text)
        elif "he answer is" in text:
            pred = text.split("he answer is")[-1].strip()
        else:
            found = _numbers(text, "$€,\\")
            pred = found[-1] if found else ""
    pred = pred.split("\n")[0]
    pred = pred[1:] if pred.startswith(":") else pred
    pred = pred[:-1] if pred.endswith((".", "/")) else pred
    return pred.strip()


def _as_number(text: str) -> float | None:
    try:
        return float(str(text).replace(",", "").replace("%", ""))
    except ValueError:
        return None


def numbers_equal(pred: str, gold: str) -> bool | None:
    """The authors' numeric comparison (percentages either way); None when either is no number."""
    p, g = _as_number(pred), _as_number(gold)
    if p is None or g is None:
        return None
    return any(math.isclose(ref, p, rel_tol=1e-4) for ref in (g / 100, g, g * 100))
