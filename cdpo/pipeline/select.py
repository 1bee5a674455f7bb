"""Stage `select`: the positive set, the negative set and the preference pairs (DESIGN §1 step 2).

Per question, samples are grouped by extracted answer, most frequent first.
- positives: top_k correct trajectories;
- negatives: one trajectory per wrong answer, taking the most frequent wrong answers until they
  cover top_p of the question's wrong samples (samples without an answer rank last), or with
  negative_rule=top_k the negative_k most frequent wrong answers (the selection-rule ablation);
- pairs: chosen = a correct trajectory, rejected = a trajectory of the most frequent wrong answer.
"""
from __future__ import annotations

from collections import Counter

from omegaconf import DictConfig

from cdpo.errors import UserError
from cdpo.io import write_jsonl
from cdpo.pipeline.artifacts import RunPaths, load

NO_ANSWER = "<no answer>"


class EmptySelectionError(UserError, RuntimeError):
    pass


def answer_key(extracted: str | None) -> str:
    """Grouping key of an extracted answer: numbers by value ("18", "18.0", "18.00" alike)."""
    if not extracted:
        return NO_ANSWER
    try:
        value = float(extracted.replace(",", ""))
    except ValueError:
        return extracted.strip()
    return str(int(value)) if value.is_integer() else repr(value)


def _wrong_groups(wrong: list[dict]) -> list[tuple[str, list[dict]]]:
    """Wrong samples grouped by answer, most frequent first; ties by first appearance, no-answer last."""
    order = Counter(answer_key(s["extracted"]) for s in wrong)
    keys = sorted(order, key=lambda k: (k == NO_ANSWER, -order[k]))
    return [(k, [s for s in wrong if answer_key(s["extracted"]) == k]) for k in keys]


NEGATIVE_RULES = ("top_p", "top_k")


def select_question(record: dict, *, top_k: int, top_p: float, pairs_per_question: int = 1,
                    negative_rule: str = "top_p", negative_k: int = 1):
    """negative_rule top_p: the most frequent wrong answers until they cover top_p of the wrong
    samples (the paper); top_k: the negative_k most frequent wrong answers, however many samples."""
    if negative_rule not in NEGATIVE_RULES:
        raise ValueError(f"select.negative_rule={negative_rule!r}: choose one of {', '.join(NEGATIVE_RULES)}")
    correct = [s for s in record["samples"] if s["correct"]]
    wrong = [s for s in record["samples"] if not s["correct"]]
    base = {"id": record["id"], "question": record["question"], "answers": record["answers"],
            "prompt": record["prompt"], "prompt_ids": record["prompt_ids"]}

    def seq(sample, kind):
        return {**base, "kind": kind, "response": sample["response"], "response_ids": sample["response_ids"],
                "extracted": sample["extracted"]}

    positives = [seq(s, "positive") for s in correct[:top_k]]
    negatives, covered = [], 0
    groups = _wrong_groups(wrong)
    for _, members in groups:
        if negative_rule == "top_p" and covered >= top_p * len(wrong):
            break
        if negative_rule == "top_k" and len(negatives) >= negative_k:
            break
        negatives.append(seq(members[0], "negative"))
        covered += len(members)
    pairs = []
    if correct and groups:
        rejected = groups[0][1]
        for i in range(min(pairs_per_question, len(correct), len(rejected))):
            pairs.append({**base, "pair": i, "chosen": correct[i]["response"], "chosen_ids": correct[i]["response_ids"],
                          "rejected": rejected[i]["response"], "rejected_ids": rejected[i]["response_ids"],
                          "rejected_answer": rejected[i]["extracted"]})
    return positives, negatives, pairs


def run(cfg: DictConfig, paths: RunPaths) -> dict:
    records = load(paths.trajectories)
    positives, negatives, pairs = [], [], []
    for record in records:
        p, n, q = select_question(record, top_k=cfg.select.top_k, top_p=cfg.select.top_p,
                                  pairs_per_question=cfg.select.pairs_per_question,
                                  negative_rule=cfg.select.get("negative_rule", "top_p"),
                                  negative_k=cfg.select.get("negative_k", 1))
        positives += p
        negatives += n
        pairs += q
    if not positives or not negatives or not pairs:
        n_samples = sum(len(r["samples"]) for r in records)
        n_correct = sum(s["correct"] for r in records for s in r["samples"])
        missing = "correct" if not positives else "incorrect" if not negatives else "both correct and incorrect"
        raise EmptySelectionError(
            f"no question has {missing} trajectories ({n_correct}/{n_samples} samples correct over "
            f"{len(records)} questions in {paths.trajectories}), so there is nothing to contrast. "
            "Raise sample.temperature or sample.n, or use more/easier training questions (data.train_limit), "
            f"then rerun with the sample stage removed: rm -r {paths.trajectories} {paths.shards('sample')} "
            f"{paths.marker('sample')}")
    write_jsonl(paths.positives, positives)
    write_jsonl(paths.negatives, negatives)
    write_jsonl(paths.pairs, pairs)
    return {"questions": len(records), "positives": len(positives), "negatives": len(negatives), "pairs": len(pairs)}
