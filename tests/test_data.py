"""Data layer: shipped benchmarks, generic loaders and their errors, the arith task, prompts."""
import dataclasses
import json
import re

import pytest

from cdpo.data import (KNOWN_SOURCES, PROMPT_STYLES, Problem, build_prompt, default_prompt_style, generate_arith,
                       load_problems, stop_strings)
from cdpo.data import arith as arith_mod
from cdpo.io import DataError

# ---------------------------------------------------------------- records


def test_problem_round_trip_and_validation():
    p = Problem(id="x-1", question="2+2?", answers=["4", 4.0], solution="2 + 2 = 4.")
    assert p.answers == ("4", "4.0") and p.answer == "4"
    back = Problem(**json.loads(json.dumps(dataclasses.asdict(p))))
    assert back == p
    with pytest.raises(ValueError, match="gold answer"):
        Problem(id="x", question="q", answers=())


# ---------------------------------------------------------------- shipped benchmarks


def test_gsm8k_counts_gold_and_solutions():
    train, test = load_problems("gsm8k", "train"), load_problems("gsm8k", "test")
    assert (len(train), len(test)) == (7473, 1319)
    first = test[0]
    assert first.id == "gsm8k-test-00000" and first.answers == ("18",)
    assert first.question.startswith("Janet")
    # calculator marks gone, '#### 18' replaced by the paper-style final line
    assert first.solution == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
                              "She makes 9 * 2 = $18 every day at the farmer\u2019s market.\nThe answer is 18.")
    assert len({p.id for p in train}) == len(train)
    for p in train + test:
        assert "<<" not in p.solution and "####" not in p.solution
        assert p.solution.endswith(f"The answer is {p.answer}.")
    with_commas = [p for p in train if "," in p.answer]
    assert with_commas and all(re.fullmatch(r"\d{1,3}(,\d{3})+(\.\d+)?", p.answer) for p in with_commas)


def test_gsm8k_limit_is_a_prefix():
    assert load_problems("gsm8k", "test", limit=5) == load_problems("gsm8k", "test")[:5]


def test_math500_answers_are_lists_and_no_train_split():
    probs = load_problems("math500")
    assert len(probs) == 500 and len({p.id for p in probs}) == 500
    assert probs[0].id == "math500-215" and probs[0].answers == ("900",)
    assert all(isinstance(p.answers, tuple) and p.answers for p in probs)
    with pytest.raises(ValueError, match="no train split.*hf:"):
        load_problems("math500", "train")


def test_data_dir_override(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}))
    monkeypatch.setenv("CDPO_DATA_DIR", str(tmp_path))
    [p] = load_problems("gsm8k")
    assert p.answers == ("2",) and p.solution == "1+1=2\nThe answer is 2."


# ---------------------------------------------------------------- generic sources and errors


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_with_field_mapping(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        json.dumps({"uid": "a", "problem": "What is 3 * 4?", "final": "12", "sol": "3 * 4 = 12."}),
        "",  # blank lines are skipped
        json.dumps({"problem": "Name a square.", "final": ["4", "9"]}),
    ])
    probs = load_problems(f"jsonl:{path}", fields={"question": "problem", "answer": "final", "id": "uid",
                                                   "solution": "sol"})
    assert probs[0] == Problem(id="a", question="What is 3 * 4?", answers=("12",), solution="3 * 4 = 12.")
    assert probs[1].answers == ("4", "9") and probs[1].solution is None
    assert probs[1].id == "mine-00003"  # no id field: file stem + line number


def test_jsonl_split_placeholder_and_gsm8k_style_answer(tmp_path):
    _write(tmp_path / "train.jsonl", [json.dumps({"question": "q", "answer": "2*3=<<2*3=6>>6\n#### 6"})])
    [p] = load_problems(f"jsonl:{tmp_path}/{{split}}.jsonl", "train")
    assert p.answers == ("6",) and p.solution == "2*3=6\nThe answer is 6."


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [json.dumps({"question": "q", "answer": "1"}), "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_problems(f"jsonl:{path}")


def test_jsonl_missing_field_names_file_line_and_key(tmp_path):
    path = _write(tmp_path / "gaps.jsonl", [json.dumps({"problem": "q", "final": "1"}), json.dumps({"problem": "q"})])
    with pytest.raises(DataError) as err:
        load_problems(f"jsonl:{path}", fields={"question": "problem", "answer": "final"})
    msg = str(err.value)
    assert "gaps.jsonl:2" in msg and "'final'" in msg


def test_unknown_source_split_and_options():
    with pytest.raises(ValueError) as err:
        load_problems("gsm9k")
    assert all(s in str(err.value) for s in ("gsm8k", "math500", "arith", "jsonl:", "hf:"))
    assert set(KNOWN_SOURCES) >= {"gsm8k", "math500", "arith"}
    with pytest.raises(ValueError, match="train, test"):
        load_problems("gsm8k", "validation")
    with pytest.raises(TypeError, match="arith"):
        load_problems("gsm8k", seed=3)
    with pytest.raises(ValueError, match="unknown field"):
        load_problems("jsonl:x.jsonl", fields={"questoin": "q"})


def test_hf_offline_gives_clear_error_without_network(monkeypatch):
    import socket

    import datasets  # noqa: F401  imported before the flags, so the session's datasets config stays as it was

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("the hf loader touched the network while offline")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(RuntimeError) as err:
        load_problems("hf:nonexistent-org/no-such-dataset:main", "train")
    msg = str(err.value)
    assert "unreachable" in msg and "jsonl:" in msg


def test_hf_unreachable_hub_gives_clear_error(monkeypatch):
    from cdpo import hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)  # what a failed probe returns
    with pytest.raises(RuntimeError, match="hub is unreachable.*jsonl:<path>"):
        load_problems("hf:openai/gsm8k:main", "test")


def test_config_field_mapping_reaches_a_jsonl_source(tmp_path):
    """`+data.fields.question=problem` maps the training questions of a jsonl: source (it used to be ignored:
    "missing field 'question'"); an unknown key, or a mapping for a fixed-layout source, is refused at start-up."""
    from cdpo.errors import ConfigError
    from cdpo.io import read_jsonl
    from cdpo.pipeline import run_pipeline
    from cdpo.validation import validate
    from test_pipeline import _cfg

    path = _write(tmp_path / "mine.jsonl", [json.dumps({"problem": f"What is {a} + 2?", "answer": str(a + 2)})
                                            for a in range(3)])
    source = [f"data.source=jsonl:{path}", "data.train_split=train", "data.test_split=train", "data.n_shot=0"]
    cfg = _cfg(tmp_path / "run", *source, "+data.fields.question=problem", "stage=sample")
    validate(cfg)
    run_pipeline(cfg)
    assert [r["question"] for r in read_jsonl(tmp_path / "run" / "trajectories.jsonl")] == [
        f"What is {a} + 2?" for a in range(3)]
    with pytest.raises(ConfigError, match=r"data.fields=.*keys among question, answer, id, solution \(unknown: questoin\)"):
        validate(_cfg(tmp_path / "run", *source, "+data.fields.questoin=problem"))
    with pytest.raises(ConfigError, match="data.fields=.*this source has a fixed layout"):
        validate(_cfg(tmp_path / "run", "+data.fields.question=problem"))


# ---------------------------------------------------------------- arith

_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_arith_deterministic_and_seeded():
    a, b = generate_arith(50, seed=1), generate_arith(50, seed=1)
    assert a == b
    c = generate_arith(50, seed=2)
    assert [p.question for p in a] != [p.question for p in c]
    assert generate_arith(10, seed=1) == a[:10]  # a smaller n is a prefix
    assert len({p.question for p in a}) == 50


def test_arith_splits_are_disjoint():
    train = {p.question for p in generate_arith(2000, split="train")}
    test = {p.question for p in generate_arith(300, split="test")}
    assert len(test) == 300 and not train & test
    # even other seeds' training sets never contain a test question
    assert not {p.question for p in generate_arith(500, seed=7, split="train")} & test
    with pytest.raises(ValueError, match="train, test"):
        generate_arith(3, split="dev")


@pytest.mark.parametrize("steps,operand_max", [(1, 5), (2, 20), (4, 50)])
def test_arith_solutions_are_correct(steps, operand_max):
    for p in generate_arith(200, seed=3, steps=steps, operand_max=operand_max):
        lines = p.solution.split("\n")
        assert len(lines) == steps + 1 and lines[-1] == f"The answer is {p.answer}."
        prev = None
        for line in lines[:-1]:
            [(a, op, b, c)] = _EQ.findall(line)  # exactly one operation per step
            a, b, c = int(a), int(b), int(c)
            assert _OPS[op](a, b) == c, line
            assert c >= 0 and (prev is None or a == prev)  # each step starts from the last result
            prev = c
        assert int(p.answer) == prev
        assert p.question.endswith("have now?") and len(p.question) < 400


def test_arith_knobs_change_difficulty():
    def mean(xs):
        return sum(xs) / len(xs)

    easy, hard = generate_arith(100, steps=1), generate_arith(100, steps=3)
    assert mean([p.solution.count("\n") for p in hard]) > mean([p.solution.count("\n") for p in easy])
    assert mean([len(p.question) for p in hard]) > mean([len(p.question) for p in easy])
    small, big = generate_arith(100, operand_max=5), generate_arith(100, operand_max=100)
    assert mean([int(p.answer) for p in big]) > 3 * mean([int(p.answer) for p in small])


def test_load_problems_arith_defaults_and_overrides():
    # the library defaults are the embedded pipeline's (conf/data/arith.yaml)
    from pathlib import Path

    from omegaconf import OmegaConf

    task = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "arith.yaml").task
    assert (arith_mod.DEFAULT_STEPS, arith_mod.DEFAULT_OPERAND_MAX) == (task.steps, task.operand_max)
    test = load_problems("arith", "test")
    assert len(test) == 200 and test[0].id == "arith-test-00000"
    assert load_problems("arith", "test", limit=7) == test[:7]
    # a limit beyond the default size asks for that many (the second embedded grid's 2300 test questions),
    # the default set its prefix, none of them a training question
    many = load_problems("arith", "test", limit=2300)
    assert len(many) == len({p.question for p in many}) == 2300 and many[:200] == test
    assert not {p.question for p in many} & {p.question for p in load_problems("arith", "train", limit=3000)}
    few = load_problems("arith", "train", n=5, seed=4, steps=3)
    assert few == generate_arith(5, seed=4, steps=3, split="train")


# ---------------------------------------------------------------- prompts


def test_prompt_formats_and_stop_strings():
    assert build_prompt("What is 1+1?") == "Question: What is 1+1?\nAnswer: "
    assert build_prompt("Find $x$ with {braces}.", "math") == "Problem: Find $x$ with {braces}.\nSolution: "
    assert PROMPT_STYLES["gsm8k"] == "Question: {q}\nAnswer: " and PROMPT_STYLES["math"] == "Problem: {q}\nSolution: "
    assert stop_strings("gsm8k") == ["\n\nQuestion:"] and stop_strings("math") == ["\n\nProblem:"]
    assert stop_strings("chat") == []
    with pytest.raises(ValueError, match="gsm8k, math, chat"):
        stop_strings("alpaca")
    assert [default_prompt_style(s) for s in ("gsm8k", "arith", "math500")] == ["gsm8k", "gsm8k", "math"]


def test_eight_shot_gsm8k_prompt():
    prompt = build_prompt("Tom has 3 apples. How many?", n_shot=8)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9 and prompt.count("Question: ") == 9
    for block in blocks[:8]:
        assert re.fullmatch(r"Question: .+\nAnswer: .+ The answer is \d+\.", block, re.S)
    assert blocks[8] == "Question: Tom has 3 apples. How many?\nAnswer: "
    assert "21 - 15 = 6" in blocks[0]  # the trees exemplar comes first
    # sampling from a few-shot prompt must stop before the model invents the next question
    assert all(stop not in prompt[-40:] for stop in stop_strings("gsm8k"))
    with pytest.raises(ValueError, match="n_shot"):
        build_prompt("q", n_shot=9)
    with pytest.raises(ValueError, match="exemplars"):
        build_prompt("q", "math", n_shot=2)


def test_shipped_exemplars_are_the_standard_few_shot_prompts():
    """data/exemplars: Wei et al.'s 8 GSM8K chain-of-thought exemplars and Minerva's 4 MATH ones
    (as in lm-evaluation-harness); the paper presets sample and evaluate after them."""
    from cdpo.data import load_exemplars

    gsm8k, math = load_exemplars("gsm8k_cot_8shot"), load_exemplars("math_minerva_4shot")
    assert len(gsm8k) == 8 and len(math) == 4
    assert gsm8k[0][1].startswith("There are 15 trees originally.") and gsm8k[-1][1].endswith("The answer is 8.")
    assert [a.rsplit(" ", 1)[-1] for _, a in gsm8k] == ["6.", "5.", "39.", "8.", "9.", "29.", "33.", "8."]
    assert all(a.endswith("I hope it is correct.") and "\\boxed{" in a for _, a in math)
    assert "Final Answer: The final answer is $-\\frac{2}{3}$." in math[3][1]
    with pytest.raises(DataError, match="data.exemplars='mmlu'.*gsm8k_cot_8shot"):
        load_exemplars("mmlu")


def test_few_shot_prompts_stripped_like_the_authors():
    from cdpo.data import load_exemplars

    q = "Tom has 3 apples. How many?"
    prompt = build_prompt(q, n_shot=8, exemplars=load_exemplars("gsm8k_cot_8shot"), strip=True)
    blocks = prompt.split("\n\n")
    assert len(blocks) == 9 and blocks[0].startswith("Question: There are 15 trees in the grove.")
    assert blocks[0].endswith("\nAnswer: There are 15 trees originally. Then there were 21 trees after some more "
                              "were planted. So there must have been 21 - 15 = 6. The answer is 6.")
    assert blocks[8] == f"Question: {q}\nAnswer:"  # no trailing space: the model writes it
    math = build_prompt("Find $x$.", "math", n_shot=4, exemplars=load_exemplars("math_minerva_4shot"), strip=True)
    assert math.startswith("Problem: Find the domain") and math.endswith("\n\nProblem: Find $x$.\nSolution:")
    assert math.count("Problem: ") == 5 and math.count("Final Answer:") == 4
    assert build_prompt(q, strip=True) == f"Question: {q}\nAnswer:"  # zero-shot training prompt


def test_chat_prompt_uses_the_tokenizer_template():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                  chat_template=template)
    prompt = build_prompt("What is 2+5?", "chat", tokenizer=tok)
    assert prompt.startswith("<user>What is 2+5?\n") and "The answer is N." in prompt
    assert prompt.endswith("</s><assistant>")
    two_shot = build_prompt("What is 2+5?", "chat", tokenizer=tok, n_shot=2)
    assert two_shot.count("<user>") == 3 and two_shot.count("<assistant>") == 3
    with pytest.raises(ValueError, match="tokenizer"):
        build_prompt("q", "chat")
