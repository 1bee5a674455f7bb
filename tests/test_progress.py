"""The long stages (sample, score, eval) show one progress bar each over all of their work (every shard,
every evaluated model) with the tokens/s, and count resumed work as done from the start."""
import re

import torch

from cdpo.io import write_jsonl
from cdpo.models import add_lora, load_tokenizer, save_adapter, tiny_llama_like_embedded
from cdpo.pipeline import evaluate, run_pipeline, score
from cdpo.pipeline.artifacts import RunPaths
from test_pipeline import _cfg

BAR = re.compile(r"^(?P<desc>[^:|]*):\s+\d+%\|.*\| (?P<n>\d+)/(?P<total>\d+) \[(?P<post>[^\]]*)\]$")


def _bars(stderr: str) -> list[dict]:
    """Every state tqdm printed (it rewrites its line with \\r), in order."""
    states = []
    for line in re.split(r"[\r\n]+", stderr):
        m = BAR.match(line.strip())
        if m:
            states.append({"desc": m["desc"], "n": int(m["n"]), "total": int(m["total"]), "post": m["post"]})
    return states


def _one_bar(states: list[dict], desc: str, total: int, first: int) -> float:
    """One bar `desc` (no other) from `first` to `total`, ending with a tokens/s figure: returns it."""
    assert states, "no progress bar printed"
    assert {s["desc"] for s in states} == {desc} and {s["total"] for s in states} == {total}, states
    ns = [s["n"] for s in states]
    assert ns[0] == first and ns[-1] == total and ns == sorted(ns), ns  # one bar: never starts again
    rate = re.search(r"([\d,]+) tokens/s", states[-1]["post"])
    assert rate, states[-1]
    return float(rate[1].replace(",", ""))


def test_sample_stage_has_one_bar_over_its_shards_and_counts_resumed_ones(tmp_path, capsys):
    cfg = _cfg(tmp_path, "stage=sample")  # 4 questions x 3 samples in shards of 2 questions
    run_pipeline(cfg)
    assert _one_bar(_bars(capsys.readouterr().err), "sample", 12, 0) > 0

    paths = RunPaths(cfg)
    paths.marker("sample").unlink()
    # the first shard is lost: the second one (6 of 12) is counted before the work starts, not after it
    (paths.shards("sample") / "shard-00000.jsonl").unlink()
    run_pipeline(cfg)
    assert _one_bar(_bars(capsys.readouterr().err), "sample", 12, 6) > 0


def _adapter(path, seed):
    model = add_lora(tiny_llama_like_embedded(seed=0), "ce", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01 * (seed + 1))
    save_adapter(model, "ce", path)


def test_eval_stage_has_one_bar_over_every_model(tmp_path, capsys):
    cfg = _cfg(tmp_path)  # base, SFT (the positive CE model) and cDPO on 3 test questions
    paths = RunPaths(cfg)
    _adapter(paths.pos_adapter, 0)
    _adapter(paths.aligned_adapter, 1)
    results = evaluate.run(cfg, paths)["results"]
    assert set(results) == {"base", "sft", "cdpo"}
    assert _one_bar(_bars(capsys.readouterr().err), "eval", 9, 0) > 0

    (paths.eval_file("sft").with_suffix(".json")).unlink()  # base and cDPO are cached: 6 of 9 done
    evaluate.run(cfg, paths)
    assert _one_bar(_bars(capsys.readouterr().err), "eval", 9, 6) > 0


def test_score_bar_counts_pairs_and_scored_tokens_per_second(tmp_path, capsys):
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [{"id": f"q{i}", "prompt_ids": enc(f"Question: {i} + 1?\nAnswer: "), "chosen_ids": enc(f"It is {i + 1}."),
              "rejected_ids": enc(f"{i} + 1 = {i + 2}, so {i + 2}.")} for i in range(5)]
    paths = RunPaths(_cfg(tmp_path))
    _adapter(paths.pos_adapter, 0)
    _adapter(paths.neg_adapter, 1)
    write_jsonl(paths.pairs, pairs)
    for share in ("true", "false"):  # prompts encoded once per pair / sequence batches that split pairs
        cfg = _cfg(tmp_path, f"ce.share_prefix={share}", "ce.batch_size=3", "ce.shard_size=2")
        scorer = score.scorer_for(cfg, paths.pos_adapter, paths.neg_adapter)
        with score.Progress("score", len(pairs), "pair") as bar:
            bar.resume(2)  # a finished first shard
            scored = score.score_pairs(cfg, scorer, pairs[2:4], tok, bar) + score.score_pairs(cfg, scorer, pairs[4:], tok, bar)
        assert bar.tokens == sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs[2:]) == sum(
            len(s["chosen_ids"]) + len(s["rejected_ids"]) for s in scored)
        assert _one_bar(_bars(capsys.readouterr().err), "score", 5, 2) > 0
