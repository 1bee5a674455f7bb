"""Stage `score`: contrastive estimation of every pair's chosen and rejected tokens.

Writes scored pairs: the response token ids exactly as scored, each next to its p_ce, plus the
critical token of the rejected response (the lowest p_ce) for inspection.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cdpo.models import load_adapter
from cdpo.modules import ContrastiveScorer, SequencesDataModule
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, load, run_sharded


def scorer_for(cfg: DictConfig, pos: str | Path, neg: str | Path) -> ContrastiveScorer:
    """Positive and negative models, each an adapter directory or a full model directory."""
    pos, neg = Path(pos), Path(neg)
    is_adapter = [(p / "adapter_config.json").exists() for p in (pos, neg)]
    if all(is_adapter):
        model = load_adapter(context.base_model(cfg), pos, "pos")
        model = load_adapter(model, neg, "neg")
        return ContrastiveScorer(model, b=cfg.ce.b, loss_impl=cfg.loss_impl)
    if any(is_adapter):
        raise ValueError(f"mixing an adapter and a full model is not supported: {pos} / {neg}")
    from cdpo.models import load_model

    kw = dict(dtype=cfg.model.dtype, device=context.device_for(cfg))
    return ContrastiveScorer(load_model(str(pos), **kw), neg_model=load_model(str(neg), **kw), b=cfg.ce.b,
                             loss_impl=cfg.loss_impl)


def score_pairs(cfg: DictConfig, scorer: ContrastiveScorer, pairs: list[dict], tok) -> list[dict]:
    seqs = []
    for p in pairs:
        seqs.append({"prompt_ids": p["prompt_ids"], "response_ids": p["chosen_ids"]})
        seqs.append({"prompt_ids": p["prompt_ids"], "response_ids": p["rejected_ids"]})
    dm = SequencesDataModule(seqs, pad_id=tok.pad_token_id, batch_size=cfg.ce.batch_size, shuffle=False,
                             max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
    trainer = context.make_trainer(cfg, "score", epochs=1)
    trainer.logger = None
    scored = [row for batch in trainer.predict(scorer, datamodule=dm) for row in batch]
    out = []
    for i, p in enumerate(pairs):
        c, r = scored[2 * i], scored[2 * i + 1]
        low = min(range(len(r["p_ce"])), key=r["p_ce"].__getitem__) if r["p_ce"] else None
        out.append({**p, "chosen_ids": c["token_ids"], "chosen_p_ce": c["p_ce"],
                    "rejected_ids": r["token_ids"], "rejected_p_ce": r["p_ce"],
                    "critical_index": low,
                    "critical_token": tok.decode([r["token_ids"][low]]) if low is not None else None})
    return out


def run(cfg: DictConfig, paths: RunPaths) -> dict:
    pairs = load(paths.pairs)
    tok = context.tokenizer(cfg)
    scorer = scorer_for(cfg, paths.pos_adapter, paths.neg_adapter)
    reused = []
    out = run_sharded(pairs, cfg.ce.shard_size, paths.shards("score"), lambda shard: score_pairs(cfg, scorer, shard, tok),
                      paths.scored_pairs, on_skip=reused.append)
    rej = [x for p in out for x in p["rejected_p_ce"]]
    cho = [x for p in out for x in p["chosen_p_ce"]]
    mean = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
    return {"pairs": len(out), "pairs_resumed": sum(reused), "mean_p_ce_chosen": mean(cho),
            "mean_p_ce_rejected": mean(rej), "rejected_tokens_below_0.5": sum(x < 0.5 for x in rej),
            "rejected_tokens": len(rej)}
