"""Stage `sample`: N trajectories per training question, each graded against the gold answer."""
from __future__ import annotations

import functools

from omegaconf import DictConfig

from cdpo.generation import GenerationStats, generate
from cdpo.grading import grade
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, run_sharded, stage_identity
from cdpo.pipeline.identity import questions_digest
from cdpo.progress import Progress


def generate_graded(cfg: DictConfig, model, tok, problems, *, n: int, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int, desc: str, stats: GenerationStats,
                    bar: Progress | None = None, batch_size: int | None = None) -> list[dict]:
    """One record per problem: the prompt (text and ids) and its n graded completions. `bar`: the
    stage's progress bar (else `generate` shows one of its own, `desc`); `batch_size`: rows per
    generate batch (default generation.batch_size)."""
    prompts = [context.prompt_of(cfg, tok, p.question) for p in problems]
    outs = generate(model, tok, prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    stop=context.stops(cfg), seed=seed, batch_size=batch_size or cfg.generation.batch_size, desc=desc,
                    stats=stats, bar=bar, add_special_tokens=not context.chat_prompts(cfg))
    records = []
    for problem, prompt, completions in zip(problems, prompts, outs):
        samples = []
        for c in completions:
            g = grade(c.text, list(problem.answers), policy=cfg.data.get("grading", "strict"))
            samples.append({"response": c.text, "response_ids": c.token_ids, "finish_reason": c.finish_reason,
                            "extracted": g.predicted, "correct": g.correct})
        records.append({"key": problem.id, "id": problem.id, "question": problem.question, "answers": list(problem.answers),
                        "prompt": prompt, "prompt_ids": context.prompt_ids(cfg, tok, prompt), "samples": samples})
    return records


def run(cfg: DictConfig, paths: RunPaths, objective=None) -> dict:  # a run-level stage: any objective
    problems = context.problems(cfg, cfg.data.train_split, cfg.data.train_limit)
    tok = context.tokenizer(cfg)
    stats = GenerationStats()
    s = cfg.sample
    reused = []
    # one bar over every shard, in sequences (questions x n); resumed shards count as done from the start
    with context.generation_models(cfg) as model_for, Progress("sample", len(problems) * s.n, "seq") as bar:
        base = functools.cache(model_for)  # made for the first shard to sample (none if every shard is done)

        def work(shard):
            offset = problems.index(shard[0])
            return generate_graded(cfg, base(), tok, shard, n=s.n, temperature=s.temperature, top_p=s.top_p,
                                   max_new_tokens=s.max_new_tokens, seed=s.seed * 7919 + offset,
                                   desc="sample", stats=stats, bar=bar)

        def skip(n_questions):
            reused.append(n_questions)
            bar.resume(n_questions * s.n)

        records = run_sharded(problems, s.shard_size, paths.shards("sample"), work, paths.trajectories,
                              key=lambda p: p.id, on_skip=skip,
                              # shards of other settings, questions or model are never reused
                              signature=stage_identity(cfg, paths, "sample", questions=questions_digest(problems)))
    n_samples = sum(len(r["samples"]) for r in records)
    n_correct = sum(x["correct"] for r in records for x in r["samples"])
    return {"questions": len(records), "samples": n_samples, "correct": n_correct,
            "accuracy": n_correct / max(n_samples, 1), "questions_resumed": sum(reused),
            "new_tokens": stats.new_tokens, "generate_seconds": round(stats.seconds, 1),
            "tokens_per_s": round(stats.tokens_per_s, 1)}
