"""Stage `eval`: accuracy on the held-out split, greedy (or sampled with n and pass@k), graded."""
from __future__ import annotations

import logging
import json
from math import comb
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cdpo.errors import StaleInputError
from cdpo.generation import GenerationStats
from cdpo.io import DataError, read_jsonl, write_json, write_jsonl
from cdpo.objectives import Objective, from_config as objective_of
from cdpo.pipeline import context, trainers
from cdpo.pipeline.artifacts import RunPaths
from cdpo.pipeline.identity import describe, model_identity, questions_digest
from cdpo.pipeline.sample import generate_graded
from cdpo.progress import Progress

log = logging.getLogger(__name__)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per question, have {n}")
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def eval_signature(cfg: DictConfig, adapter: Path | None, questions: str | None = None) -> dict:
    """What an evaluation result depends on; a cached result is reused only when this matches: the
    settings, the test questions' digest, the base model's and the adapter's content hashes."""
    c = OmegaConf.to_container(cfg, resolve=True)
    # the speed settings count only where they change the computation: evaluations made before they
    # existed (the defaults) stay valid, and a base model (nothing to merge) is shared by merged runs
    if adapter is None or not c["eval"].get("merge_adapter"):
        c["eval"].pop("merge_adapter", None)
    if c["eval"].get("batch_size") == c["generation"]["batch_size"]:
        c["eval"].pop("batch_size", None)
    return {"model": c["model"], "data": c["data"], "eval": c["eval"], "generation": c["generation"],
            "model_identity": model_identity(cfg.model), "questions": questions,
            "adapter": None if adapter is None else describe(adapter)["sha256"]}


def cached_result(out: Path, signature: dict) -> dict | None:
    """A cached evaluation with this signature whose predictions file is intact, else None (a damaged
    or other cache is evaluated again, it is only a cache)."""
    summary = out.with_suffix(".json")
    if not summary.exists():
        return None
    try:
        result = json.loads(summary.read_text())
        if result.get("signature") != signature:
            return None
        if len(read_jsonl(out)) != result["questions"]:
            raise DataError(f"{out}: {len(read_jsonl(out))} predictions, {result['questions']} questions")
        return result
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, DataError, FileNotFoundError) as e:
        log.warning(f"[eval] {summary}: unusable cached evaluation ({str(e)[:120]}): evaluating again")
        return None


def evaluate_model(cfg: DictConfig, model, tok, out_path: Path, label: str, signature: dict | None = None,
                   bar: Progress | None = None, problems: list | None = None) -> dict:
    """`bar`: the eval stage's one bar over every model it evaluates (else one for this model); `problems`:
    the test questions when the caller has loaded them already."""
    e = cfg.eval
    problems = problems if problems is not None else context.problems(cfg, e.split, e.limit)
    stats = GenerationStats()
    records = generate_graded(cfg, model, tok, problems, n=e.n, temperature=e.temperature, top_p=e.get("top_p", 1.0),
                              max_new_tokens=cfg.generation.max_new_tokens, seed=cfg.seed, desc=f"eval {label}",
                              stats=stats, bar=bar, batch_size=e.get("batch_size"))
    n_correct = [sum(s["correct"] for s in r["samples"]) for r in records]
    first_correct = sum(r["samples"][0]["correct"] for r in records)
    results = {
        "model": label, "split": e.split, "grading": cfg.data.get("grading", "strict"),
        "questions": len(records), "samples_per_question": e.n,
        "correct": first_correct, "accuracy": first_correct / max(len(records), 1),
        "no_answer": sum(r["samples"][0]["extracted"] is None for r in records),
        "pass_at_k": {str(k): sum(pass_at_k(e.n, c, k) for c in n_correct) / max(len(records), 1)
                      for k in e.pass_k if k <= e.n},
        "tokens_per_s": round(stats.tokens_per_s, 1),
        "signature": signature,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_jsonl(out_path, records)
    write_json(out_path.with_suffix(".json"), results)
    return results


def adapter_for(paths: RunPaths, label: str) -> Path | None:
    return None if label == "base" else paths.pos_adapter if label == "sft" else paths.aligned_adapter


def run(cfg: DictConfig, paths: RunPaths, objective: Objective | None = None) -> dict:
    """`objective`: the run's (built from cfg.method when a caller outside a run gives none)."""
    tok = context.tokenizer(cfg)
    objective = objective if objective is not None else objective_of(cfg.method)
    baseline = not objective.trains  # the base model is the method's own result
    labels = [cfg.method.name] if baseline else list(dict.fromkeys([*cfg.compare, cfg.method.name]))
    results, todo = {}, []
    problems = context.problems(cfg, cfg.eval.split, cfg.eval.limit)
    questions = questions_digest(problems)
    for label in labels:
        key = "base" if baseline else "aligned" if label == cfg.method.name else label
        out, adapter = paths.eval_file(key), adapter_for(paths, key)
        if adapter is not None and not (adapter / "adapter_config.json").exists():
            stage = "sft_pos" if key == "sft" else "align"
            raise StaleInputError(f"{adapter}: missing or incomplete adapter: run stage={stage} first, or stage=all")
        signature = eval_signature(cfg, adapter, questions)
        cached = cached_result(out, signature)
        if cached is not None:
            results[label] = cached  # base and sft are shared by every method
        else:
            todo.append((label, key, out, adapter, signature))
    if todo:
        per_model = len(problems) * cfg.eval.n  # sequences; one bar over every model, cached ones done already
        with context.generation_models(cfg, merge=cfg.eval.get("merge_adapter", False)) as model_for, Progress("eval", len(labels) * per_model, "seq") as bar:
            bar.resume((len(labels) - len(todo)) * per_model)
            for label, key, out, adapter, signature in todo:  # one vLLM engine serves every adapter
                results[label] = evaluate_model(cfg, model_for(adapter, key), tok, out, label, signature, bar, problems)
    own = paths.eval_file("aligned")
    if baseline:  # a result file in the method dir like every other method's: the report reads those
        write_jsonl(own, read_jsonl(paths.eval_file("base")))
        write_json(own.with_suffix(".json"), {**results[cfg.method.name], "model": cfg.method.name,
                                              "config": OmegaConf.to_container(cfg, resolve=True)})
    r = results[cfg.method.name]
    trainers.log_results(cfg, f"eval_{cfg.method.name}_seed{cfg.seed}", {
        "eval/accuracy": r["accuracy"], "eval/correct": r["correct"], "eval/questions": r["questions"],
        "eval/no_answer": r["no_answer"], "eval/per_question": per_question(own)})
    keep = ("questions", "correct", "accuracy", "no_answer", "pass_at_k")
    return {"results": {label: {k: results[label][k] for k in keep} for label in labels}, "evaluated": len(todo)}


def per_question(predictions: Path) -> dict[str, int]:
    """Question id -> 1 when its first answer is correct: what paired significance tests compare."""
    return {r["id"]: int(r["samples"][0]["correct"]) for r in read_jsonl(predictions)}
