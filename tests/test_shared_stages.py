"""What the Table-1 grid and the ablations rely on: shared stages independent of the method seed,
the baseline method, reusing finished stages from another run_dir, the negative-selection rule and
chosen-weights switches that change what is trained, eval results in wandb."""
import json
import logging
import os

import pytest
import torch
from test_modules import _pairs, _policy
from test_pipeline import _cfg, _inject_correct_samples
from wandb_offline import offline_run_holding

from cdpo.data.collate import collate_pairs
from cdpo.io import read_jsonl, write_jsonl
from cdpo.models import load_tokenizer
from cdpo.pipeline import context, run_pipeline, trainers
from cdpo.pipeline import select as select_stage
from cdpo.pipeline.artifacts import RunPaths
from cdpo.pipeline.select import select_question
from cdpo.pipeline.align import preference_module



def _logged(caplog) -> str:
    """What the pipeline logged since the last call (the records are cleared)."""
    text = caplog.text
    caplog.clear()
    return text

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


def _prepared(run, tok, *overrides):
    """Samples with correct and wrong answers (a random tiny model has none) and a selection."""
    run_pipeline(_cfg(run, "stage=sample", *overrides))
    _inject_correct_samples(RunPaths(_cfg(run, *overrides)), tok)
    run_pipeline(_cfg(run, "stage=select", *overrides))


def _bytes(path):
    return (path / "adapter_model.safetensors").read_bytes()


def test_shared_stages_do_not_depend_on_the_method_seed(tmp_path, tok):
    for seed in (0, 1):
        run = tmp_path / f"seed{seed}"
        run_pipeline(_cfg(run, "stage=sample", f"seed={seed}"))
        _inject_correct_samples(RunPaths(_cfg(run)), tok)
        for stage in ("select", "sft_pos"):
            run_pipeline(_cfg(run, f"stage={stage}", f"seed={seed}"))
    a, b = tmp_path / "seed0", tmp_path / "seed1"
    assert read_jsonl(a / "trajectories.jsonl") == read_jsonl(b / "trajectories.jsonl")
    assert _bytes(a / "adapters" / "pos") == _bytes(b / "adapters" / "pos")
    # ... while sample.seed and ce.seed do change them
    run_pipeline(_cfg(tmp_path / "other", "stage=sample", "sample.seed=5"))
    assert read_jsonl(tmp_path / "other" / "trajectories.jsonl") != read_jsonl(b / "trajectories.jsonl")


def test_baseline_evaluates_the_base_model_alone_and_shares_it(tmp_path, capsys):
    result = run_pipeline(_cfg(tmp_path, "method=baseline"))
    assert list(result["stages"]) == ["eval"] and not (tmp_path / "trajectories.jsonl").exists()
    base = json.loads((tmp_path / "eval" / "base.json").read_text())
    own = json.loads((tmp_path / "baseline-seed0" / "eval.json").read_text())
    assert own["accuracy"] == base["accuracy"] and own["config"]["method"]["name"] == "baseline"
    assert read_jsonl(tmp_path / "baseline-seed0" / "eval.jsonl") == read_jsonl(tmp_path / "eval" / "base.jsonl")
    capsys.readouterr()
    run_pipeline(_cfg(tmp_path, "method=baseline", "seed=1"))
    assert "eval base" not in capsys.readouterr().err  # the cached base evaluation, no generation
    assert (tmp_path / "baseline-seed1" / "eval.json").exists()
    with pytest.raises(ValueError, match="method=baseline trains nothing"):
        run_pipeline(_cfg(tmp_path, "method=baseline", "stage=align"))


def test_reuse_from_carries_over_stages_made_with_the_same_settings(tmp_path, tok, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    main = tmp_path / "main"
    _prepared(main, tok)
    for stage in ("sft_pos", "sft_neg", "score"):
        run_pipeline(_cfg(main, f"stage={stage}"))
    caplog.clear()
    # the CE models do not depend on b: no warning when b changes
    run_pipeline(_cfg(main, "stage=sft_pos", "ce.b=2.0"))
    assert "WARNING" not in _logged(caplog)

    # an ablation over b in its own run_dir: everything up to the CE models is reused, score is redone
    abl = tmp_path / "b2"
    for stage in ("sample", "select", "sft_pos", "sft_neg", "score"):
        run_pipeline(_cfg(abl, f"stage={stage}", "ce.b=2.0", f"reuse_from={main}"))
    out = _logged(caplog)
    for stage in ("sample", "select", "sft_pos", "sft_neg"):
        assert f"[{stage}] reused from {main}" in out
    assert "[score] running" in out and "[score] reused" not in out
    assert os.stat(abl / "trajectories.jsonl").st_ino == os.stat(main / "trajectories.jsonl").st_ino  # hard link
    assert _bytes(abl / "adapters" / "neg") == _bytes(main / "adapters" / "neg")
    b1, b2 = read_jsonl(main / "scored_pairs.jsonl"), read_jsonl(abl / "scored_pairs.jsonl")
    assert [p["rejected_ids"] for p in b1] == [p["rejected_ids"] for p in b2]
    assert [p["rejected_p_ce"] for p in b1] != [p["rejected_p_ce"] for p in b2]  # b reaches the scores

    # the CE rank ablation: samples and selection reused, the CE models retrained at the new rank
    rank = tmp_path / "r4"
    for stage in ("sample", "select", "sft_pos"):
        run_pipeline(_cfg(rank, f"stage={stage}", "peft@ce_lora=ce_lora_r4", f"reuse_from={main}"))
    out = _logged(caplog)
    assert "[sample] reused" in out and "[select] reused" in out and "[sft_pos] running" in out
    assert json.loads((rank / "adapters" / "pos" / "adapter_config.json").read_text())["r"] == 4
    # a source made with other settings is not reused
    run_pipeline(_cfg(tmp_path / "n4", "stage=sample", "sample.n=4", f"reuse_from={main}"))
    assert "reused" not in _logged(caplog)


def test_negative_selection_rule():
    def s(ans, ok):
        return {"response": ans, "response_ids": [1], "extracted": ans, "correct": ok}

    record = {"id": "q", "question": "?", "answers": ["1"], "prompt": "", "prompt_ids": [0],
              "samples": [s("1", True)] + [s("7", False)] * 4 + [s("8", False)] * 3 + [s("9", False)] * 2}
    rule = lambda **kw: [n["extracted"] for n in select_question(record, top_k=1, top_p=0.5, **kw)[1]]  # noqa: E731
    assert rule() == ["7", "8"]  # top_p 0.5: 4/9 < 0.5, 7/9 >= 0.5
    assert rule(negative_rule="top_k", negative_k=1) == ["7"]
    assert rule(negative_rule="top_k", negative_k=3) == ["7", "8", "9"]
    with pytest.raises(ValueError, match="select.negative_rule='top_q'"):
        rule(negative_rule="top_q")


def test_negative_rule_reaches_the_select_stage(tmp_path, tok):
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    _inject_correct_samples(RunPaths(_cfg(tmp_path)), tok)
    records = read_jsonl(tmp_path / "trajectories.jsonl")
    for r in records:  # per question: the gold solution, 3 x "12345" and a rarer wrong answer
        r["samples"] = [x for x in r["samples"] if x["correct"] or x["extracted"] == "12345"]
        r["samples"].append({**r["samples"][-1], "extracted": "777", "response": "The answer is 777."})
    write_jsonl(tmp_path / "trajectories.jsonl", records)
    counts = {}
    for rule in ("top_p", "top_k"):
        cfg = _cfg(tmp_path, f"select.negative_rule={rule}", "select.negative_k=2", "select.top_p=0.5")
        counts[rule] = select_stage.run(cfg, RunPaths(cfg))["negatives"]
    assert counts == {"top_p": 4, "top_k": 8}  # 12345 covers half the wrong samples; top-2 adds 777


def test_chosen_weighting_in_the_config_changes_the_cdpo_loss(tmp_path):
    policy = _policy()
    items = _pairs()
    batch = collate_pairs(items, pad_id=2, with_weights=True)
    losses = {}
    for weighting in ("only_neg", "p_ce"):
        module = preference_module(_cfg(tmp_path, f"method.chosen_weighting={weighting}"), policy)
        with torch.no_grad():
            losses[weighting] = module.compute_loss(batch)[0].item()
    assert losses["only_neg"] != pytest.approx(losses["p_ce"], rel=1e-4)
    # with every chosen p_ce = 1 the two weightings are the same loss
    ones = collate_pairs([{**it, "chosen_p_ce": [1.0] * len(it["chosen_ids"])} for it in items], pad_id=2,
                         with_weights=True)
    with torch.no_grad():
        same = [preference_module(_cfg(tmp_path, f"method.chosen_weighting={w}"), policy).compute_loss(ones)[0].item()
                for w in ("only_neg", "p_ce")]
    assert same[0] == pytest.approx(same[1], rel=1e-6)


def test_eval_results_reach_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = _cfg(tmp_path, "logger=wandb")
    trainers.log_results(cfg, "eval_cdpo_seed0", {"eval/accuracy": 0.25, "eval/per_question": {"arith-q1": 1}})
    keys = (b"eval/accuracy", b"eval/per_question", b"arith-q1", b"eval_cdpo_seed0")
    blob = offline_run_holding(tmp_path / "wandb", keys)
    for key in keys:
        assert key in blob, key
    trainers.log_results(_cfg(tmp_path / "csv"), "x", {"eval/accuracy": 1.0})  # csv logger: nothing to do
    assert not (tmp_path / "csv").exists()


def _graded(*groups):
    """Samples from (extracted answer, correct, count) groups, in that order."""
    return [{"response": f"... {a}", "response_ids": [i], "extracted": a, "correct": ok}
            for i, (a, ok, n) in enumerate(groups) for _ in range(n)]


def _negatives(samples, rule, top_p=0.5):
    record = {"id": "q", "question": "?", "answers": ["1"], "prompt": "", "prompt_ids": [0], "samples": samples}
    _, neg, pairs = select_question(record, top_k=1, top_p=top_p, negative_rule=rule)
    return [n["extracted"] for n in neg], [p["rejected_answer"] for p in pairs]


@pytest.mark.parametrize("groups,authors,top_p", [
    # 11 answered wrong samples: 7 (4) < 5.5, 7+8 (7) >= 5.5; top_p also counts the unanswered one
    ([("1", True, 1), ("7", False, 4), ("8", False, 3), ("9", False, 2), ("5", False, 1), ("6", False, 1),
      (None, False, 1)], ["7", "8"], ["7", "8"]),
    # singletons: the authors take the first wrong answer only; top_p keeps taking them
    ([("1", True, 1), ("7", False, 1), ("8", False, 1), ("9", False, 1), ("10", False, 1)], ["7"], ["7", "8"]),
    # unanswered samples: not counted by the authors (2 of 4 answered), counted and taken by top_p
    ([("1", True, 2), ("7", False, 2), ("8", False, 2), (None, False, 6)], ["7"], ["7", "8", None]),
    # 7 (3 of 6 answered) is enough for the authors; top_p needs 5 of 10 samples
    ([("1", True, 1), ("7", False, 3), ("8", False, 1), ("9", False, 1), ("10", False, 1), (None, False, 4)],
     ["7"], ["7", "8", "9"]),
    # an answer seen twice after the first is taken by both
    ([("1", True, 1), ("7", False, 3), ("8", False, 2), ("9", False, 2), ("5", False, 1)], ["7", "8"], ["7", "8"]),
])
def test_negative_rules_authors_and_top_p(groups, authors, top_p):
    assert _negatives(_graded(*groups), "authors")[0] == authors
    assert _negatives(_graded(*groups), "top_p")[0] == top_p


def test_authors_rule_gives_no_pair_without_an_answered_wrong_sample():
    samples = _graded(("1", True, 3), (None, False, 5))
    assert _negatives(samples, "authors") == ([], [])
    assert _negatives(samples, "top_p") == ([None], [None])  # this project's rule pairs an unanswered one
    # with one answered wrong sample the pair's rejected is that one, not the more frequent no-answer
    samples = _graded(("1", True, 3), (None, False, 5), ("9", False, 1))
    assert _negatives(samples, "authors") == (["9"], ["9"])


def _authors_reference(samples, top_p):
    """A literal transcription of the rule in the authors' code (src/pipeline.py): a need counter of
    ceil(top_p * answered wrong samples), decremented by each taken answer's count."""
    import math
    from collections import Counter

    wrong = Counter(s["extracted"] for s in samples if not s["correct"] and s["extracted"])
    need = first = math.ceil(top_p * sum(wrong.values()))
    taken = []
    for answer, count in sorted(wrong.items(), key=lambda kv: -kv[1]):  # stable: ties by first appearance
        if need > 0 and (need == first or count > 1):
            taken.append(answer)
            need -= count
    return taken


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.9])
def test_authors_rule_matches_a_literal_transcription(seed, top_p):
    import random

    rng = random.Random(seed)
    samples = [{"response": "", "response_ids": [0], "correct": rng.random() < 0.2,
                "extracted": rng.choice([None, "3", "4", "5", "6", "7", "8", "9"])} for _ in range(rng.randint(1, 30))]
    assert _negatives(samples, "authors", top_p)[0] == _authors_reference(samples, top_p)


def test_training_prompt_is_zero_shot_when_configured(tmp_path, tok):
    """The authors sample after a few-shot prompt but train the CE models and the policy on the
    zero-shot one: select writes the training prompt into positives, negatives and pairs."""
    over = ("data.n_shot=3", "data.train_n_shot=0", "data.strip_prompt=true")
    cfg = _cfg(tmp_path, *over)
    q = "Ann has 2 pens and buys 3 more. How many pens does she have?"
    sampled = context.prompt_of(cfg, tok, q)
    assert sampled.count("Question: ") == 4 and sampled.endswith("Answer:")
    samples = [{"response": " 2 + 3 = 5. The answer is 5.", "response_ids": tok(" 2 + 3 = 5. The answer is 5.")["input_ids"],
                "extracted": "5", "correct": True},
               {"response": " 2 + 3 = 6. The answer is 6.", "response_ids": [1, 2], "extracted": "6", "correct": False}]
    write_jsonl(tmp_path / "trajectories.jsonl", [{"key": "q1", "id": "q1", "question": q, "answers": ["5"],
                                                   "prompt": sampled, "prompt_ids": context.prompt_ids(cfg, tok, sampled),
                                                   "samples": samples}])
    select_stage.run(cfg, RunPaths(cfg))
    zero_shot = f"Question: {q}\nAnswer:"
    for name in ("positives", "negatives", "pairs"):
        (row,) = read_jsonl(tmp_path / f"{name}.jsonl")
        assert row["prompt"] == zero_shot and row["prompt_ids"] == tok(zero_shot)["input_ids"]
    # the text the CE models and policy see is the authors' "Question: q\nAnswer: <response>"
    (pos,) = read_jsonl(tmp_path / "positives.jsonl")
    assert tok.decode(pos["prompt_ids"] + pos["response_ids"]) == f"{zero_shot} 2 + 3 = 5. The answer is 5."
    # without train_n_shot the sampling prompt is kept (the embedded default)
    select_stage.run(_cfg(tmp_path, "data.n_shot=3"), RunPaths(cfg))
    assert read_jsonl(tmp_path / "pairs.jsonl")[0]["prompt"] == sampled
