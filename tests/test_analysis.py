"""Critical-token analysis: rollout success rates and the critical token, replacement sampling, pass@k,
the agreement table, and `python rollout.py` end to end on a tiny random model.

A random model never writes a correct answer, so where a test needs successes the grader is replaced
by one that knows the critical token: a response is correct unless it starts with y_<=c. Everything
else (batched generation from token-id prompts, the policy's distributions, sharding) is real.
"""
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cdpo.analysis import report, rollout  # noqa: E402
from cdpo.analysis.rollout import (  # noqa: E402
    RolloutConfigError, RolloutSettings, critical_position, expected_work, policy_view, response_text,
    rollout_trajectory, sample_replacements)
from cdpo.analysis.tokens import line_numbers, token_pieces  # noqa: E402
from cdpo.generation import Completion, generate_ids  # noqa: E402
from cdpo.grading import Grade  # noqa: E402
from cdpo.io import read_jsonl, write_jsonl  # noqa: E402
from cdpo.models import load_tokenizer, tiny_llama_like_embedded  # noqa: E402
from cdpo.pipeline.artifacts import pending_items  # noqa: E402
from cdpo.pipeline.evaluate import pass_at_k  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Question: Mia has 4 stickers. She buys 2 more. How many stickers does Mia have now?\nAnswer: "
WRONG = "Mia has 4 stickers and buys 2, so 4 x 2 = 8.\nThe answer is 8."


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def model():
    return tiny_llama_like_embedded(seed=0).eval()


def _enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _item(tok, key="q0#0"):
    return {"key": key, "prompt_ids": _enc(tok, PROMPT), "response_ids": _enc(tok, WRONG) + [tok.eos_token_id],
            "answers": ["6"]}


@pytest.fixture
def oracle(monkeypatch, tok):
    """Replace the grader: for a registered gold answer, a response is correct unless it starts with
    the text of y_<=c; for any other gold, never correct."""
    critical_texts = {}

    def fake_grade(text, answers, policy="strict"):
        t = critical_texts.get(answers[0])
        return Grade(correct=t is not None and not text.startswith(t), predicted=None)

    def set_critical(gold, response_ids, c):
        critical_texts[gold] = tok.decode(response_ids[:c + 1], skip_special_tokens=True)

    monkeypatch.setattr(rollout, "grade", fake_grade)
    return set_critical


SMALL = dict(m=3, compare_n=5, temperature=1.0, max_new_tokens=3, batch_size=8, stop=["\n\n"])


# ------------------------------------------------------------------ critical token


def test_critical_position_is_the_last_successful_position():
    assert critical_position({0: 0.5, 1: 0.25, 2: 0.0, 3: 0.0}) == 1
    assert critical_position({0: 0.5, 1: 0.0, 2: 0.1, 3: 0.0}) == 2  # the rate must *stay* at 0 after it
    assert critical_position({0: 0.0, 4: 0.0}) is None  # lost from the prompt on
    assert critical_position({0: 1.0, 1: 1.0}) == 1


@pytest.mark.parametrize("stride,refine,expect_exact", [(1, True, True), (3, True, True), (3, False, False)])
def test_rollout_finds_the_critical_token(model, tok, oracle, stride, refine, expect_exact):
    item = _item(tok)
    c = 7  # not a multiple of 3: the coarse pass alone cannot land on it
    oracle("6", item["response_ids"], c)
    s = RolloutSettings(stride=stride, refine=refine, **SMALL)
    r = rollout_trajectory(model, tok, item, s, seed=11)
    n = len(item["response_ids"])
    coarse = list(range(0, n, stride))
    rates = dict(zip(r["positions"], r["correct"]))
    assert set(coarse) <= set(r["positions"])
    for t, k in rates.items():
        assert k == (s.m if t <= c else 0), (t, k)  # y_<t with t <= c does not contain y_c
    if expect_exact:
        assert r["critical_index"] == c and r["critical_exact"]
        assert set(r["positions"]) == set(coarse) | set(range(7, 9)) - {n}  # refinement: c and c + 1 sampled
    else:
        assert r["critical_index"] == 6 and not r["critical_exact"]  # only known to lie in [6, 8]
        assert r["positions"] == coarse
    # with/without: fresh samples from y_<=c all fail; replacements (never y_c itself) succeed
    assert r["with"]["n"] == 5 and r["with"]["correct"] == (0 if expect_exact else 5)
    assert r["without"]["n"] == 5 and item["response_ids"][r["critical_index"]] not in r["without"]["replacement_ids"]
    assert r["without"]["correct"] == sum(r["without"]["replacement_correct"])
    if expect_exact:
        assert r["without"]["correct"] >= 4
    assert len(r["policy_logp"]) == n and r["new_tokens"] > 0
    # seeded by the trajectory: a rerun reproduces it
    again = rollout_trajectory(model, tok, item, s, seed=11)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in r.items() if k != "seconds"}


def test_trajectory_lost_from_the_start_has_no_critical_token(model, tok, monkeypatch):
    monkeypatch.setattr(rollout, "grade", lambda text, answers, policy="strict": Grade(False, None))
    r = rollout_trajectory(model, tok, _item(tok), RolloutSettings(stride=4, **SMALL), seed=0)
    assert r["critical_index"] is None and r["critical_exact"] and "with" not in r
    assert set(r["correct"]) == {0}


def test_bad_settings_name_the_key():
    with pytest.raises(RolloutConfigError, match="rollout.temperature"):
        RolloutSettings(temperature=0.0)
    with pytest.raises(RolloutConfigError, match="rollout.stride"):
        RolloutSettings(stride=0)


def test_expected_work_counts():
    s = RolloutSettings(m=3, stride=2, compare_n=4)
    items = [{"response_ids": [1] * 5}]  # coarse 0, 2, 4 + one refinement position, 2 x 4 comparison samples
    assert expected_work(items, s) == (3 * 4 + 8, 3 * (5 + 3 + 1 + 2) + 8 * 2)


# ------------------------------------------------------------------ model-facing pieces


def test_rollout_prompts_share_a_prefix_and_match_one_at_a_time(model, tok):
    """Prompts that continue one trajectory (prompt + y_<t) generate exactly what each generates alone."""
    item = _item(tok)
    prompts = [item["prompt_ids"] + item["response_ids"][:t] for t in (0, 3, 9, 4)]
    batched = generate_ids(model, tok, prompts, max_new_tokens=5, batch_size=4, progress=False)
    alone = [generate_ids(model, tok, [p], max_new_tokens=5, progress=False, share_prefix=False)[0] for p in prompts]
    assert [b[0].token_ids for b in batched] == [a[0].token_ids for a in alone]


def test_policy_view_matches_a_plain_forward(model, tok):
    item = _item(tok)
    logps, hidden = policy_view(model, item["prompt_ids"], item["response_ids"])
    ids = torch.tensor([item["prompt_ids"] + item["response_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits.double().log_softmax(-1)[0]
    p = len(item["prompt_ids"])
    expected = [ref[p + t - 1, y].item() for t, y in enumerate(item["response_ids"])]
    assert logps == pytest.approx(expected, abs=1e-4)
    assert hidden.shape[0] == ids.shape[1]


def test_replacements_follow_the_masked_distribution(model, tok):
    item = _item(tok)
    p, pos = len(item["prompt_ids"]), 5
    _, hidden = policy_view(model, item["prompt_ids"], item["response_ids"])
    ids = torch.tensor([item["prompt_ids"] + item["response_ids"][:pos]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    temperature = 0.02  # peaked, so that frequencies are measurable over a 49k vocabulary
    top = logits.topk(3).indices.tolist()
    original = top[0]  # mask the most likely token: the sample must move to the others
    masked = (logits / temperature).clone()
    masked[original] = float("-inf")
    expected = masked.softmax(-1)
    draws = sample_replacements(model, hidden, p, pos, original, 4000, temperature=temperature, seed=1)
    assert original not in draws
    for token in top[1:]:
        assert draws.count(token) / len(draws) == pytest.approx(expected[token].item(), abs=0.03)


def test_response_text_cuts_at_a_stop_string_across_the_boundary_and_at_eos(tok):
    prefix = _enc(tok, "4 + 2 = 6.\n")
    cont = Completion("\nQuestion: next", _enc(tok, "\nQuestion: next"), "length")
    assert response_text(tok, prefix, cont, ["\n\n"]) == "4 + 2 = 6."
    with_eos = prefix + [tok.eos_token_id]
    assert response_text(tok, with_eos, Completion("x", _enc(tok, " more"), "length"), ["\n\n"]) == "4 + 2 = 6.\n"


def test_token_pieces_rebuild_the_text_with_multibyte_characters(tok):
    text = "Café costs 5 €.\nThe answer is 5 🙂."
    ids = _enc(tok, text)
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    lines = line_numbers(pieces)
    newline = next(i for i, piece in enumerate(pieces) if "\n" in piece)
    assert lines[newline] == 0 and lines[newline + 1] == 1 and lines[-1] == 1


# ------------------------------------------------------------------ numbers


def test_pass_at_k_equals_the_naive_combinatorial_definition():
    """pass@k = probability that a random k-subset of the n samples holds a correct one (enumerated)."""
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                naive = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12)


def test_pass_at_k_curves_average_over_trajectories_with_a_critical_token():
    records = [{"critical_index": 3, "with": {"n": 4, "correct": 0}, "without": {"n": 4, "correct": 2}},
               {"critical_index": 1, "with": {"n": 4, "correct": 1}, "without": {"n": 4, "correct": 4}},
               {"critical_index": None}]
    curves = report.pass_at_k_curves(records)
    assert curves["trajectories"] == 2 and curves["k"] == [1, 2, 3, 4]
    assert curves["with"][0] == pytest.approx((0 + 1 / 4) / 2)
    assert curves["without"][0] == pytest.approx((2 / 4 + 1) / 2)
    assert curves["without"][-1] == 1.0 and curves["with"][-1] == pytest.approx(0.5)


def _agreement_records():
    # tokens:        0  1  2  3  4  5  6  7
    lines = [0, 0, 0, 1, 1, 1, 2, 2]
    return [
        {"critical_index": 4, "ce_critical_index": 4, "policy_logp": [-1, -9, -1, -1, -1, -1, -1, -1], "token_lines": lines},
        {"critical_index": 2, "ce_critical_index": 3, "policy_logp": [-1, -1, -1, -1, -1, -1, -1, -9], "token_lines": lines},
        {"critical_index": 6, "ce_critical_index": 1, "policy_logp": [-1, -1, -1, -1, -1, -9, -1, -1], "token_lines": lines},
        {"critical_index": None, "ce_critical_index": 0, "policy_logp": [-1] * 8, "token_lines": lines},
    ]


def test_agreement_table():
    table = report.agreement(_agreement_records(), windows=[1, 3])
    assert table["with_critical_token"] == 3 and table["lost_from_the_start"] == 1
    ce = table["rows"]["contrastive estimation (lowest p_ce)"]
    assert ce["exact"] == pytest.approx(1 / 3) and ce["within_1"] == pytest.approx(2 / 3)
    assert ce["within_3"] == pytest.approx(2 / 3) and ce["same_line"] == pytest.approx(1 / 3)
    assert ce["distance"] == pytest.approx((0 + 1 + 5) / 3)
    policy = table["rows"]["policy (lowest pi(y_t))"]
    assert policy["exact"] == 0 and policy["within_1"] == pytest.approx(1 / 3)  # |5 - 6| = 1
    md = report.agreement_markdown(table)
    assert "| contrastive estimation (lowest p_ce) | 33 % | 67 % | 67 % | 33 % | 2.00 |" in md
    assert "within ±3" in md and "3 of 4 incorrect trajectories" in md


def test_random_row_is_the_expectation_of_random_guesses():
    records = _agreement_records()
    exact = report.agreement(records, windows=[1, 3])["rows"]["random token (expected)"]
    rng, draws, sampled = random.Random(0), 20000, {}
    rs = report.with_critical(records)
    for r in rs:
        for _ in range(draws):
            h = report._hits(rng.randrange(len(r["token_lines"])), r["critical_index"], r["token_lines"], [1, 3])
            for k, v in h.items():
                sampled[k] = sampled.get(k, 0.0) + v / (draws * len(rs))
    for k, v in exact.items():
        assert sampled[k] == pytest.approx(v, abs=0.02 * max(1.0, v)), k


def test_pending_items_follow_run_sharded(tmp_path):
    from cdpo.pipeline.artifacts import run_sharded

    items, sig = list(range(5)), {"x": 1}
    assert pending_items(items, 2, tmp_path / "shards", key=str, signature=sig) == items

    def work(shard):
        if 4 in shard:
            raise KeyboardInterrupt
        return [{"key": str(i)} for i in shard]

    with pytest.raises(KeyboardInterrupt):
        run_sharded(items, 2, tmp_path / "shards", work, tmp_path / "out.jsonl", key=str, signature=sig)
    assert pending_items(items, 2, tmp_path / "shards", key=str, signature=sig) == [4]
    assert pending_items(items, 2, tmp_path / "shards", key=str, signature={"x": 2}) == items


# ------------------------------------------------------------------ rollout.py


def _scored_pairs(tok, n=3):
    pairs = []
    for i in range(n):
        wrong = _enc(tok, f"{i} + 2 = {i + 3}.\nThe answer is {i + 3}.") + [tok.eos_token_id]
        right = _enc(tok, f"{i} + 2 = {i + 2}.\nThe answer is {i + 2}.") + [tok.eos_token_id]
        p_ce = [0.9] * len(wrong)
        p_ce[4] = 0.1
        pairs.append({"id": f"q{i}", "pair": 0, "question": f"What is {i} + 2?", "answers": [str(i + 2)],
                      "prompt_ids": _enc(tok, f"Question: What is {i} + 2?\nAnswer: "),
                      "chosen": tok.decode(right, skip_special_tokens=True), "chosen_ids": right,
                      "chosen_p_ce": [0.95] * len(right), "rejected": tok.decode(wrong, skip_special_tokens=True),
                      "rejected_ids": wrong, "rejected_p_ce": p_ce, "rejected_answer": str(i + 3),
                      "critical_index": 4, "critical_token": tok.decode([wrong[4]])})
    return pairs


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="rollout", overrides=overrides)


def test_rollout_config_defaults_follow_the_paper_and_train():
    cfg = _compose([])
    assert cfg.rollout.m == 64 and cfg.rollout.compare_n == 64 and cfg.rollout.stride == 1
    assert cfg.rollout.temperature == cfg.sample.temperature and cfg.rollout.input.endswith("scored_pairs.jsonl")
    assert cfg.model.name == "smollm2_135m"


def test_rollout_run_end_to_end_and_resume(tmp_path, tok, oracle, monkeypatch, capsys):
    from cdpo.analysis import run as run_module, viewer

    pairs = _scored_pairs(tok)
    write_jsonl(tmp_path / "scored.jsonl", pairs)
    for p in pairs[:2]:
        oracle(p["answers"][0], p["rejected_ids"], 3)  # the third pair never succeeds: lost from the start
    overrides = ["model=tiny", f"rollout.input={tmp_path / 'scored.jsonl'}", f"rollout.output_dir={tmp_path / 'out'}",
                 "rollout.m=2", "rollout.stride=2", "rollout.compare_n=3", "rollout.max_new_tokens=3",
                 "rollout.batch_size=8", "rollout.shard_size=2", "rollout.screenshot=false", "rollout.temperature=1.0"]
    cfg = _compose(overrides)
    summary = run_module.run(cfg)
    out = tmp_path / "out"
    records = read_jsonl(out / "rollouts.jsonl")
    assert [r["key"] for r in records] == ["q0#0", "q1#0", "q2#0"]
    assert [r["critical_index"] for r in records] == [3, 3, None] and summary["with_critical_token"] == 2
    assert records[0]["ce_critical_index"] == 4 and len(records[0]["token_pieces"]) == len(records[0]["response_ids"])
    curves = json.loads((out / "pass_at_k.json").read_text())
    assert curves["k"] == [1, 2, 3] and curves["with"] == [0, 0, 0]
    table = json.loads((out / "agreement.json").read_text())
    assert table["rows"]["contrastive estimation (lowest p_ce)"]["within_1"] == 1.0  # 4 vs 3
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "success_rates.png").exists() and "| detector |" in (out / "agreement.md").read_text()
    page = (out / "viewer.html").read_text()
    assert page.count('class="tok') >= sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    assert "data-r=" in page and "roll-crit" in page

    # rerun: every shard is reused, nothing is sampled again; the screenshot asked for on a machine
    # without Chromium is one line saying what to install, and the report is written all the same
    monkeypatch.setattr(run_module, "rollout_trajectory", lambda *a, **k: pytest.fail("resumed run resampled"))
    monkeypatch.setattr(run_module, "measured_tokens_per_s", lambda *a, **k: pytest.fail("probe on a finished run"))
    monkeypatch.setattr(viewer, "find_chromium", lambda: None)
    capsys.readouterr()
    again = run_module.run(_compose([*overrides, "rollout.screenshot=true"]))
    assert read_jsonl(out / "rollouts.jsonl") == records and again["with_critical_token"] == 2
    printed = capsys.readouterr().out
    assert "no viewer screenshot: no Chromium found on PATH" in printed and "apt-get install chromium" in printed
    assert not (out / "viewer.png").exists()


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "rollout.py"), "model=tiny", *args], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'kernels'}"})


def test_rollout_py_reports_bad_input_in_one_line(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [{"id": "q", "prompt_ids": [1], "rejected_ids": [2], "answers": ["1"]}])
    out = _cli(tmp_path, "rollout.input=pairs.jsonl", "rollout.output_dir=out")
    assert out.returncode == 2 and "pairs.jsonl:1: missing rejected_p_ce" in out.stderr
    assert "Traceback" not in out.stderr


def test_rollout_run_refuses_greedy_rollouts_before_loading_a_model(tmp_path, monkeypatch):
    from cdpo.analysis import run as run_module

    write_jsonl(tmp_path / "scored.jsonl", [{"id": "q", "prompt_ids": [1], "rejected_ids": [2], "answers": ["1"],
                                             "rejected_p_ce": [0.5]}])
    monkeypatch.setattr(run_module.context, "base_model", lambda cfg: pytest.fail("model loaded"))
    cfg = _compose(["model=tiny", f"rollout.input={tmp_path / 'scored.jsonl'}", "rollout.temperature=0"])
    with pytest.raises(RolloutConfigError, match="rollout.temperature must be > 0"):
        run_module.run(cfg)
