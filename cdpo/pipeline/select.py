"""Stage `select`: the positive set, the negative set and the preference pairs (docs/design.md §1, step 2).

Per question, samples are grouped by extracted answer, most frequent first.
- positives: top_k correct trajectories;
- negatives: one trajectory per wrong answer, most frequent wrong answers first, `negative_rule`:
  - authors (the authors' code, `select_data_for_sft_and_dpo` in src/pipeline.py): only wrong
    samples with an extracted answer count and can be taken; the most frequent wrong answer is
    always taken, further ones only when seen more than once, until they cover top_p of the
    answered wrong samples;
  - top_p: any wrong answer, also one seen once, until they cover top_p of all wrong samples
    (samples without an answer count, and rank last);
  - top_k: the negative_k most frequent wrong answers (the selection-rule ablation);
- pairs: chosen = a correct trajectory, rejected = a trajectory of the most frequent wrong answer
  (under `authors` an answered one: a question whose wrong samples all lack an answer gives none).

With preference data (data=preference) nothing was sampled: the user's rows are the pairs, their chosen
responses the positives and their rejected ones the negatives (`import_preferences`); rows that cannot
be used are listed in bad_rows.jsonl with where they are and why.
"""
from __future__ import annotations

import logging
from collections import Counter

from omegaconf import DictConfig

from cdpo.data.preferences import load_preferences
from cdpo.errors import UserError
from cdpo.io import DataError, write_jsonl
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, load

log = logging.getLogger(__name__)

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


NEGATIVE_RULES = ("authors", "top_p", "top_k")


def _take_negatives(groups: list[tuple[str, list[dict]]], rule: str, top_p: float, k: int) -> list[list[dict]]:
    """The wrong-answer groups that give a negative (see the module doc)."""
    if rule == "top_k":
        return [members for _, members in groups[:k]]
    if rule == "authors":
        groups = [(key, members) for key, members in groups if key != NO_ANSWER]
    total, taken, covered = sum(len(m) for _, m in groups), [], 0
    for _, members in groups:
        if covered >= top_p * total:
            break
        if rule == "authors" and taken and len(members) < 2:
            continue  # only the first wrong answer may be a singleton
        taken.append(members)
        covered += len(members)
    return taken


def select_question(record: dict, *, top_k: int, top_p: float, pairs_per_question: int = 1,
                    negative_rule: str = "top_p", negative_k: int = 1):
    """Positives, negatives and pairs of one question's graded samples; `negative_rule` is one of
    NEGATIVE_RULES (module doc)."""
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
    groups = _wrong_groups(wrong)
    negatives = [seq(members[0], "negative") for members in _take_negatives(groups, negative_rule, top_p, negative_k)]
    if negative_rule == "authors":  # an unanswered sample is never the rejected response
        groups = [(key, members) for key, members in groups if key != NO_ANSWER]
    pairs = []
    if correct and groups:
        rejected = groups[0][1]
        for i in range(min(pairs_per_question, len(correct), len(rejected))):
            pairs.append({**base, "pair": i, "chosen": correct[i]["response"], "chosen_ids": correct[i]["response_ids"],
                          "rejected": rejected[i]["response"], "rejected_ids": rejected[i]["response_ids"],
                          "rejected_answer": rejected[i]["extracted"]})
    return positives, negatives, pairs


def with_training_prompts(cfg: DictConfig, records: list[dict]) -> list[dict]:
    """Records whose prompt is the training one (data.train_n_shot): every later stage (CE models,
    scoring, the policy) reads `prompt_ids` from what select writes. The sampled responses follow
    the sampling prompt's last token, which both prompts share (e.g. "Answer:")."""
    if not context.separate_training_prompt(cfg):
        return records
    tok = context.tokenizer(cfg)
    out = []
    for r in records:
        prompt = context.prompt_of(cfg, tok, r["question"], for_training=True)
        out.append({**r, "prompt": prompt, "prompt_ids": context.prompt_ids(cfg, tok, prompt)})
    return out


def run(cfg: DictConfig, paths: RunPaths, objective=None) -> dict:  # a run-level stage: any objective
    if paths.preference:
        return import_preferences(cfg, paths)
    records = with_training_prompts(cfg, load(paths.trajectories))
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


def _sequences(pairs: list[dict], side: str, kind: str) -> list[dict]:
    """One side of the pairs as an SFT set, each (prompt, response) once."""
    out, seen = [], set()
    for p in pairs:
        key = (tuple(p["prompt_ids"]), tuple(p[f"{side}_ids"]))
        if key not in seen:
            seen.add(key)
            out.append({"id": p["id"], "question": p["question"], "answers": p["answers"], "prompt": p["prompt"],
                        "prompt_ids": p["prompt_ids"], "kind": kind, "response": p[side],
                        "response_ids": p[f"{side}_ids"], "extracted": None, "source": p["source"]})
    return out


def import_preferences(cfg: DictConfig, paths: RunPaths) -> dict:
    """The user's preference rows as the select stage's artifacts; every bad row logged and listed."""
    d = cfg.data
    pairs, bad = load_preferences(d.path, context.tokenizer(cfg), split=d.split, limit=d.get("train_limit"),
                                  fields=dict(d.fields or {}), prompt_format=d.prompt_format,
                                  template=d.get("prompt_template") or "{prompt}", max_length=d.max_length,
                                  max_prompt_length=d.max_prompt_length)
    kinds = Counter(b["kind"] for b in bad)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    if bad:
        write_jsonl(paths.bad_rows, bad)
        log.warning(f"[select] {len(bad)} of {len(bad) + len(pairs)} rows of {d.path} left out ({counts}); all of them "
                    f"in {paths.bad_rows}:")
        for b in bad[:10]:
            log.warning(f"[select]   {b['where']}: {b['reason']}")
        if len(bad) > 10:
            log.warning(f"[select]   ... and {len(bad) - 10} more")
    else:
        paths.bad_rows.unlink(missing_ok=True)  # the list of an earlier version of the data
    if not pairs and not bad:
        raise DataError(f"{d.path}: no rows")
    if not pairs:
        raise DataError(f"{d.path}: no usable row: all {len(bad)} are bad ({counts}), e.g. {bad[0]['where']}: "
                        f"{bad[0]['reason']}; see {paths.bad_rows}")
    positives, negatives = _sequences(pairs, "chosen", "positive"), _sequences(pairs, "rejected", "negative")
    write_jsonl(paths.positives, positives)
    write_jsonl(paths.negatives, negatives)
    write_jsonl(paths.pairs, pairs)
    return {"rows": len(pairs) + len(bad), "pairs": len(pairs), "positives": len(positives),
            "negatives": len(negatives), "bad_rows": len(bad), "bad_kinds": dict(kinds),
            "bad_where": [b["where"] for b in bad[:100]]}
