"""`python eval.py predictions=<file>` end to end, in a subprocess run from a foreign directory."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

EVAL = Path(__file__).resolve().parents[1] / "eval.py"

PREDICTIONS = [
    {"question": "How many boxes?", "response": "4 * 250 = 1000 boxes.\nThe answer is 1,000.", "answer": "1000"},
    {"question": "How much?", "response": "9 * 2 = 18.\n#### 18", "answer": "18"},
    {"question": "How far?", "response": "9 * 60 = 520 m.\nThe answer is 520.", "answer": "540"},
    {"question": "How many pens?", "response": "John buys 3 boxes of 12 pens, so", "answer": "31"},
    {"response": "So $x = \\boxed{\\frac{1}{2}}$.", "answer": ["\\frac12", "0.5"]},
    {"response": "The answer is 7.", "answer": "\\frac{1}{"},
]


def run_eval(cwd: Path, *overrides: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, str(EVAL), *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def write_predictions(path: Path, records=PREDICTIONS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_grades_a_predictions_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_predictions(data / "preds.jsonl")
    proc = run_eval(tmp_path, "predictions=data/preds.jsonl", importtime=True)  # relative to cwd
    assert proc.returncode == 0, proc.stderr[-3000:]

    graded_path = data / "preds.graded.jsonl"
    # the default policy is flexible: the truncated solution's last number (12) is its (wrong) answer
    assert (f"accuracy 60.0% (3/5); 0 without an answer; 1 gold unparseable; grading flexible -> {graded_path}"
            in proc.stdout)
    graded = [json.loads(line) for line in graded_path.read_text().splitlines()]
    assert [r["correct"] for r in graded] == [True, True, False, False, True, None]
    assert [r["extracted"] for r in graded] == ["1000", "18", "520", "12", "\\frac{1}{2}", "7"]
    assert graded[0]["question"] == "How many boxes?"

    summary = json.loads((data / "preds.graded.summary.json").read_text())
    assert summary["accuracy"] == 0.6 and summary["n"] == 6 and summary["gold_unparseable"] == 1
    assert summary["policy"] == "flexible"

    # grading a file loads no model stack, and Hydra leaves nothing behind in the cwd
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "math_verify" in imported
    assert not {"torch", "transformers", "lightning"} & imported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_output_override(tmp_path):
    write_predictions(tmp_path / "preds.jsonl", PREDICTIONS[:2])
    proc = run_eval(tmp_path, "predictions=preds.jsonl", "output=out/graded.jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"accuracy 100\.0% \(2/2\).* -> .*out/graded\.jsonl", proc.stdout)
    assert [json.loads(x)["correct"] for x in (tmp_path / "out/graded.jsonl").read_text().splitlines()] == [True, True]
    assert (tmp_path / "out/graded.summary.json").exists()


def test_bad_input_names_file_and_line(tmp_path):
    src = write_predictions(tmp_path / "preds.jsonl", PREDICTIONS[:2])
    with src.open("a") as f:
        f.write('{"response": "The answer is 3.", "answer": \n')
    proc = run_eval(tmp_path, f"predictions={src}")
    assert proc.returncode != 0
    assert f"{src}:3: malformed JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "preds.graded.jsonl").exists()

    write_predictions(src, [PREDICTIONS[0], {"question": "q", "answer": "3"}])
    proc = run_eval(tmp_path, f"predictions={src}")
    assert proc.returncode != 0 and f"{src}:2: missing key 'response'" in proc.stderr


def test_missing_file_and_no_predictions(tmp_path):
    proc = run_eval(tmp_path, "predictions=nope.jsonl")
    assert proc.returncode != 0 and f"{tmp_path / 'nope.jsonl'}: no such file" in proc.stderr

    # without predictions= eval.py evaluates a model: a missing model directory is one clear line
    proc = run_eval(tmp_path, "model.path=./no-such-model")
    assert proc.returncode != 0 and "no-such-model does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_grading_policy_choice_and_a_bad_one(tmp_path):
    write_predictions(tmp_path / "preds.jsonl", [{"response": "So she makes 9 * 2 = 18", "answer": "18"}])
    strict = run_eval(tmp_path, "predictions=preds.jsonl", "grading=strict")
    assert strict.returncode == 0 and "accuracy 0.0% (0/1); 1 without an answer" in strict.stdout
    assert "grading strict" in strict.stdout
    bad = run_eval(tmp_path, "predictions=preds.jsonl", "grading=lenient")
    assert bad.returncode != 0 and "grading='lenient': choose one of strict, flexible" in bad.stderr
    assert "Traceback" not in bad.stderr
