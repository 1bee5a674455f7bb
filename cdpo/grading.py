"""Final-answer extraction and equivalence, through math-verify.

math-verify does the mathematics (parsing LaTeX and plain expressions to sympy, comparing numbers,
fractions, intervals, sets, tuples, matrices). This module only decides *which part* of a model
response is its final answer, because math-verify on a whole chain of thought picks the wrong
number when the model keeps writing after its answer. That choice is a named policy (`POLICIES`,
config key `grading`):

- strict: the last final-answer statement: ``\\boxed{...}`` / ``\\fbox{...}``, ``#### X``,
  "... answer is X" (rest of the sentence), "Final Answer: X", or a line "Answer: X" / "A: X" with
  a short X (a longer "Answer: ..." line is a chain of thought, the prompt's own format). A
  response without one has no answer (a truncated chain of thought is not an answer);
- flexible: strict's statement, else the last number of the response ("... = 18", "$18.");
- authors_gsm8k / authors_math: the rule of the authors' code (cdpo.grading_authors): the first
  "answer is" else the last number (GSM8K); "Final Answer: $X$", boxed, "answer is", last number
  (MATH); numbers equal up to a factor 100 either way (a percentage).

Every policy first cuts the response where the model starts a new exemplar (a line beginning
"Question:", "Problem:" or "Q:"; the authors' code cuts at "\\n\\nQuestion:"), and with strict and
flexible a percentage "70%" matches gold 70 and gold 0.7, and a stated answer that starts with a
lone number is that number ("20 apples, 4 more than 16"). The chosen text is cleaned lightly
(currency dollar signs, ``%``, markdown bold, trailing full stop) and handed to math-verify; bare
LaTeX (``\\frac12``, ``(-\\infty, 3]``) is wrapped in ``$...$`` because math-verify reads intervals
and ``\\frac12`` only inside math delimiters.

Timeouts: math-verify's own timeouts use ``signal.alarm`` (whole seconds, main thread only, and a
timeout inside ``verify`` only skips one comparison). Instead one interval timer (``setitimer``,
fractional seconds) bounds a whole ``grade`` call. Signals can only be handled by the main
thread, so in any other thread ``grade`` runs without a timeout: same results, but a pathological
expression can take long there.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from cdpo import grading_authors as authors
from cdpo.io import DataError, iter_jsonl, write_jsonl

POLICIES = ("strict", "flexible", "authors_gsm8k", "authors_math")


class GoldParseError(ValueError):
    """math-verify cannot parse a gold answer: the item cannot be graded (it is not 'wrong')."""


class GradingPolicyError(DataError):
    """An unknown grading policy (a DataError, so the entry points report it in one line)."""


class GradingTimeout(BaseException):
    # BaseException so that math-verify's and sympy's `except Exception` do not swallow it.
    pass


@dataclass
class Grade:
    correct: bool
    predicted: str | None
    error: str | None = None


class _DropDisabledTimeoutWarning(logging.Filter):
    # We pass timeout None to math-verify on purpose (see module doc); its warning would mislead.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())

_CONFIG = [LatexExtractionConfig(), ExprExtractionConfig()]

# ---------------------------------------------------------------------------------------------
# Locating the final-answer statement

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES = re.compile(r"####[ \t]*")
# "The answer is 18", "the final answer is: $5$", "Final Answer: 7"; not a bare "Answer:".
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?[ \t]*|\bfinal\s+answer\s*:[ \t]*", re.IGNORECASE)
# A full stop that ends a sentence (not a decimal point): followed by whitespace or the end.
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


def _braced(text: str, open_brace: int) -> str | None:
    """Content of the brace group opening at `open_brace`; None when it never closes."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1 : i]
    return None


def _statement_tail(text: str, start: int) -> str:
    """What follows an anchor: the rest of its sentence, or the next paragraph when the anchor ends
    its line ("The final answer is:\\n$$x = 5$$")."""
    line_end = text.find("\n", start)
    line = text[start:] if line_end < 0 else text[start:line_end]
    if not line.strip() and line_end >= 0:
        rest = text[line_end:].lstrip("\n")
        blank = rest.find("\n\n")
        return rest if blank < 0 else rest[:blank]
    m = _SENTENCE_END.search(line)
    return line if m is None else line[: m.start()]


# A line "Answer: 18", "**Answer:** $18", "A: 18"; only a short rest of line is an answer.
_ANSWER_LINE = re.compile(r"^[ \t>#*_]*(?:answer|a)[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)
_SHORT_ANSWER = 40  # characters
# The model starting a new exemplar after its answer (few-shot prompts).
_NEXT_EXEMPLAR = re.compile(r"\n[ \t]*(?:Question|Problem|Q)[ \t]*:")


def _own_part(response: str) -> str:
    """The response up to where the model starts a new exemplar."""
    m = _NEXT_EXEMPLAR.search(response)
    return response if m is None else response[: m.start()]


def _final_statements(response: str) -> list[tuple[str, str]]:
    """(kind, text) of every final-answer statement, the last one first; kind 'boxed' or 'text'."""
    candidates: list[tuple[int, str, str]] = []
    for m in _ANSWER_LINE.finditer(response):
        line_end = response.find("\n", m.end())
        rest = response[m.end() :] if line_end < 0 else response[m.end() : line_end]
        if len(rest.strip()) <= _SHORT_ANSWER:
            candidates.append((m.start(), "text", rest))
    for m in _BOXED.finditer(response):
        content = _braced(response, m.end() - 1)
        if content is not None:
            candidates.append((m.start(), "boxed", content))
    for m in _HASHES.finditer(response):
        line_end = response.find("\n", m.end())
        candidates.append((m.start(), "text", response[m.end() :] if line_end < 0 else response[m.end() : line_end]))
    for m in _ANSWER_IS.finditer(response):
        candidates.append((m.start(), "text", _statement_tail(response, m.end())))
    return [(kind, text) for _, kind, text in sorted(candidates, key=lambda c: -c[0])]


# ---------------------------------------------------------------------------------------------
# Cleaning a statement before math-verify sees it

_PERCENT = re.compile(r"\\?%")
_ESCAPED_DOLLAR = re.compile(r"\\\$")
_CURRENCY_DOLLAR = re.compile(r"\$(?=\s*-?\d)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_MATH_DELIMS = re.compile(r"\$|\\\(|\\\[")
# Bare LaTeX or a bracketed/comma-separated answer (interval, tuple, set, list of numbers).
_LOOKS_LATEX = re.compile(r"[\\{}^_]|^\s*[(\[].*[)\]]\s*$|^\s*-?[\w./]+(\s*,\s*-?[\w./]+)+\s*$")


_MATRIX = re.compile(r"\\begin\{([pbvBV]?matrix)\}(.*?)\\end\{\1\}", re.DOTALL)
_LOST_ROW_BREAK = re.compile(r"(?<!\\)\\(?=[-\d.])")


def _repair_matrix_rows(text: str) -> str:
    # Some MATH500 golds lost a backslash of the row separator ("-7\16\5" for "-7\\16\\5");
    # a backslash before a digit or sign is no LaTeX command, so it can only be a row break.
    return _MATRIX.sub(lambda m: m.group(0).replace(m.group(2), _LOST_ROW_BREAK.sub(r"\\\\", m.group(2))), text)


def _clean(text: str) -> str:
    """Remove what math-verify would misread: currency signs, percent signs, bold, final stop."""
    text = _repair_matrix_rows(text.strip().strip("*").strip())
    # The percent sign is read as a unit: "10%" matches gold "10" (math-verify would make it 0.1).
    text = _PERCENT.sub("", text)
    # "\$" is always currency; a lone "$" before a number is currency too ("$18.00"), while
    # paired "$...$" are math delimiters and stay.
    text = _ESCAPED_DOLLAR.sub("", text)
    if text.count("$") % 2 == 1:
        text = _CURRENCY_DOLLAR.sub("", text, count=1)
    return text.strip().rstrip(".").strip()


def _parse_text(text: str, *, latex_first: bool) -> list:
    """math-verify parse of a short answer string; empty list when nothing parses.

    Text with math delimiters goes as it is. Bare LaTeX and bracketed or comma-separated answers
    are read inside `$...$` first (math-verify finds intervals, sets and `\\frac12` only there);
    plain text ("18 dollars", "5 cm") goes to math-verify's expression extraction first, which
    takes the number and drops the unit.
    """
    if not text:
        return []
    if _THOUSANDS.match(text):
        text = text.replace(",", "")  # "1,000" is a number, not the list (1, 000)
    as_latex, as_plain = f"${text}$", text
    if _MATH_DELIMS.search(text):
        attempts = [as_plain]
    elif latex_first or _LOOKS_LATEX.search(text):
        attempts = [as_latex, as_plain]
    else:
        attempts = [as_plain, as_latex]  # the LaTeX retry reads words ("east") as symbols
    for candidate in attempts:
        # "first_match" adds the matched string to the result (what `extracted` reports); a
        # result without a sympy object is a failed parse.
        parsed = parse(candidate, _CONFIG, fallback_mode="first_match", parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return parsed
    return []


# The last number of a response: "1,000" is one number, "3/4" a fraction, "70%" a percentage.
_LAST_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(\s*\\?%)?")
_UNIT_POWER = re.compile(r"(?<=[A-Za-z])\^\{?\d+\}?")  # "cm^2": the 2 is no answer


# A statement that starts with a lone number: "20 apples, 4 more than 16" states 20 (math-verify
# would read the whole sentence and may take 16). Not when the number starts an expression
# ("9 * 2 = 18", "20 times 3 = 60", "2 1/2") or a LaTeX / algebraic answer ("5x", "2\sqrt{3}").
_LEADING_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_LONE_AFTER = re.compile(r"$|\s*\\?%|[,;:!?]|\s+(?!(?:x|times|plus|minus|divided|multiplied|over)\b)[A-Za-z]")


def _leading_number(text: str) -> str | None:
    m = _LEADING_NUMBER.match(text)
    return m.group(0) if m is not None and _LONE_AFTER.match(text, m.end()) else None


def _percent_alternative(raw: str, text: str) -> list:
    """A percentage "70%" also stands for 0.7 (gold 0.7); math-verify parse of text / 100."""
    if "%" not in raw or not re.fullmatch(r"-?[\d.]+", text):
        return []
    return _parse_text(f"{text}/100", latex_first=False)


def _extract(response: str, policy: str = "strict") -> tuple[str | None, list[list]]:
    """(predicted string, math-verify parses it may stand for) under `policy` (strict/flexible)."""
    response = _own_part(response or "")
    for kind, raw in _final_statements(response):
        text = _clean(raw)
        if not text:  # "... what the answer is." states nothing: look further back
            continue
        if kind == "text":
            text = _leading_number(text) or text
        parsed = _parse_text(text, latex_first=(kind == "boxed"))
        # math-verify returns [sympy object, matched string]: the string is what was graded. An
        # answer it cannot parse ("twelve") is still an answer, a wrong one: predicted = the text.
        predicted = next((p for p in reversed(parsed) if isinstance(p, str)), None) or text
        return predicted, [parsed, _percent_alternative(raw, text)]
    if policy == "flexible":
        numbers = list(_LAST_NUMBER.finditer(_UNIT_POWER.sub("", response)))
        if numbers:
            raw = numbers[-1].group(0)
            text = _clean(raw).replace(" ", "")
            text = text.replace(",", "") if _THOUSANDS.match(text) else text
            return text, [_parse_text(text, latex_first=False), _percent_alternative(raw, text)]
    return None, []


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise GradingPolicyError(f"grading={policy!r}: choose one of {', '.join(POLICIES)} "
                                 "(data.grading in the pipeline)")


def extract_answer(response: str, policy: str = "strict") -> str | None:
    """The final answer a response states under `policy`, as a string; None when it states none."""
    _check_policy(policy)
    if policy.startswith("authors"):
        pred = (authors.extract_gsm8k if policy == "authors_gsm8k" else authors.extract_math)(response or "")
        return pred or None
    return _extract(response, policy)[0]


# ---------------------------------------------------------------------------------------------
# Gold answers and grading


@lru_cache(maxsize=4096)  # N samples per question share one gold: parse it once
def _parse_gold(gold: str) -> tuple:
    text = gold.split("####")[-1]  # a whole GSM8K solution works as a gold too
    parsed = _parse_text(_clean(text), latex_first=True)
    if not parsed:
        raise GoldParseError(f"gold answer {gold!r} cannot be parsed by math-verify")
    return tuple(parsed)


def _golds(gold: str | int | float | Sequence[Any]) -> list[str]:
    if isinstance(gold, (str, int, float)):
        return [str(gold)]
    golds = [str(g) for g in gold]
    if not golds:
        raise GoldParseError("empty list of gold answers")
    return golds


@contextmanager
def _time_limit(timeout_s: float | None):
    """Raise GradingTimeout in the body after `timeout_s` seconds (main thread only, see module doc)."""
    usable = (
        timeout_s is not None and timeout_s > 0 and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise GradingTimeout(f"grading took longer than {timeout_s:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay > 0:  # someone else's timer was running (e.g. a test timeout): re-arm it
            remaining = outer_delay - (time.monotonic() - started)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), outer_interval)


def _authors_prediction(response: str, policy: str) -> tuple[str | None, list[list]]:
    predicted = extract_answer(response, policy)
    return predicted, [_parse_text(_clean(predicted), latex_first=False)] if predicted else []


def grade(response: str, gold: str | Sequence[str], *, timeout_s: float = 5.0, policy: str = "strict") -> Grade:
    """Grade one response against one or several accepted gold answers under `policy` (POLICIES).

    Correct when the prediction matches any gold. Raises GoldParseError when the prediction
    matches no parseable gold and some gold could not be parsed: that item cannot be graded.
    A timeout gives Grade(correct=False, error='timeout: ...').
    """
    _check_policy(policy)
    by_authors = policy.startswith("authors")
    predicted = None
    try:
        with _time_limit(timeout_s):
            predicted, alternatives = (_authors_prediction if by_authors else _extract)(response, policy)
            unparseable: list[GoldParseError] = []
            for g in _golds(gold):
                if by_authors and predicted:
                    own = g.strip().lower() if policy == "authors_gsm8k" else g.strip()  # they lower-case GSM8K only
                    same = predicted == own or authors.numbers_equal(predicted, g)
                    if same is not None:  # both numbers: the authors' comparison decides
                        if same:
                            return Grade(True, predicted)
                        continue
                try:
                    gold_parsed = _parse_gold(g)
                except GoldParseError as e:
                    unparseable.append(e)
                    continue
                if any(p and verify(list(gold_parsed), p, timeout_seconds=None) for p in alternatives):
                    return Grade(True, predicted)
    except GradingTimeout as e:
        return Grade(False, predicted, f"timeout: {e}")
    if unparseable:
        unparseable[0].predicted = predicted  # grade_records still reports what was extracted
        raise unparseable[0]
    return Grade(False, predicted)


def grade_records(
    records: Iterable[dict[str, Any]],
    *,
    response_key: str = "response",
    answer_key: str = "answer",
    timeout_s: float = 5.0,
    policy: str = "strict",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Grade records; each output record = input + `correct`, `extracted` (+ `grade_error`).

    `correct` is null for an item whose gold cannot be parsed; such items are counted in
    `gold_unparseable` and left out of the accuracy, whose denominator is `graded`.
    """
    out: list[dict[str, Any]] = []
    n = correct = gold_unparseable = no_answer = timeouts = 0
    for record in records:
        n += 1
        graded = dict(record)
        try:
            g = grade(record[response_key], record[answer_key], timeout_s=timeout_s, policy=policy)
            graded.update(correct=g.correct, extracted=g.predicted)
            if g.error:
                graded["grade_error"] = g.error
                timeouts += 1
            correct += g.correct
            no_answer += g.predicted is None
        except GoldParseError as e:
            extracted = getattr(e, "predicted", None)
            graded.update(correct=None, extracted=extracted, grade_error=str(e))
            gold_unparseable += 1
            no_answer += extracted is None
        out.append(graded)
    n_graded = n - gold_unparseable
    summary = {
        "n": n,
        "graded": n_graded,
        "correct": correct,
        "accuracy": correct / n_graded if n_graded else None,
        "gold_unparseable": gold_unparseable,
        "no_answer": no_answer,
        "timeouts": timeouts,
        "policy": policy,
    }
    return out, summary


def default_output_path(in_path: str | os.PathLike) -> Path:
    in_path = Path(in_path)
    return in_path.with_name(f"{in_path.stem}.graded.jsonl")


def _load_predictions(path: Path, response_key: str, answer_key: str) -> list[dict[str, Any]]:
    """Read and validate every record before any grading: a bad line fails fast, naming file:line."""
    records = []
    for lineno, record in iter_jsonl(path):
        # Records written from cdpo.data.records.Problem carry the golds as `answers`.
        if answer_key not in record and answer_key == "answer" and "answers" in record:
            record = {**record, "answer": record["answers"]}
        samples = record.get("samples")
        if response_key not in record and response_key == "response" and isinstance(samples, list) and samples:
            # the pipeline's own predictions (eval_*.jsonl): the first sample is the one its accuracy counts
            if not (isinstance(samples[0], dict) and isinstance(samples[0].get("response"), str)):
                raise DataError(f"{path}:{lineno}: 'samples' must be a list of objects with a 'response' string")
            record = {**record, "response": samples[0]["response"]}
        for key in (answer_key, response_key):
            if key not in record:
                raise DataError(f"{path}:{lineno}: missing key {key!r} (keys: {sorted(record)})")
        if not isinstance(record[response_key], str):
            raise DataError(f"{path}:{lineno}: {response_key!r} must be a string, "
                            f"got {type(record[response_key]).__name__}")
        gold = record[answer_key]
        ok_gold = isinstance(gold, (str, int, float)) and not isinstance(gold, bool) or (
            isinstance(gold, list) and gold and all(isinstance(g, (str, int, float)) for g in gold))
        if not ok_gold:
            raise DataError(f"{path}:{lineno}: {answer_key!r} must be a string, a number or a "
                            f"non-empty list of them, got {gold!r}")
        records.append(record)
    return records


def grade_file(
    in_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    response_key: str = "response",
    answer_key: str = "answer",
    timeout_s: float = 5.0,
    policy: str = "strict",
) -> dict[str, Any]:
    """Grade a predictions JSONL (`response`, `answer`, optional `question`, any other fields kept)
    into a graded JSONL, written atomically; returns the summary with `input` and `output` paths."""
    in_path = Path(in_path)
    out_path = Path(out_path) if out_path is not None else default_output_path(in_path)
    _check_policy(policy)  # before reading a large file
    records = _load_predictions(in_path, response_key, answer_key)
    graded, summary = grade_records(records, response_key=response_key, answer_key=answer_key,
                                    timeout_s=timeout_s, policy=policy)
    write_jsonl(out_path, graded)
    return {**summary, "input": str(in_path), "output": str(out_path)}
