"""Stage `score`: contrastive estimation of every pair's chosen and rejected tokens.

Writes scored pairs: the response token ids exactly as scored, each next to its p_ce, plus the
critical token of the rejected response (the lowest p_ce) for inspection.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cdpo.kv_cache import shared_prefix_ids
from cdpo.models import load_adapter
from cdpo.modules import ContrastiveScorer, SequencesDataModule
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, load, run_sharded, stage_identity
from cdpo.progress import Progress


def scorer_for(cfg: DictConfig, pos: str | Path, neg: str | Path) -> ContrastiveScorer:
    """Positive and negative models, each an adapter directory or a full model directory."""
    pos, neg = Path(pos), Path(neg)
    for path in (pos, neg):
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such adapter or model directory")
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


def pair_key(pair: dict) -> str:
    return f"{pair['id']}#{pair.get('pair', 0)}"


def fits_untruncated(cfg: DictConfig, pairs: list[dict]) -> bool:
    d = cfg.data
    return all(len(p["prompt_ids"]) <= d.max_prompt_length
               and len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= d.max_length
               for p in pairs)


def shared_prefix(cfg: DictConfig, pairs: list[dict]) -> list[int]:
    """The prompt tokens every pair starts with (e.g. few-shot exemplars), kept at least one token
    short of every prompt; empty when truncation would cut into prompts (the prefix would differ)."""
    return shared_prefix_ids([p["prompt_ids"] for p in pairs]) if fits_untruncated(cfg, pairs) else []


def score_pairs(cfg: DictConfig, scorer: ContrastiveScorer, pairs: list[dict], tok,
                bar: Progress | None = None) -> list[dict]:
    """`bar`: the score stage's one bar over every shard (pairs, scored response tokens/s); else its own."""
    share = cfg.ce.get("share_prefix", True) and fits_untruncated(cfg, pairs)
    prefix = shared_prefix(cfg, pairs) if share else []
    scorer.set_prefix(prefix)
    own = bar is None
    bar = (Progress(f"score {len(pairs)} pairs", len(pairs), "pair") if own else bar).start()
    scored = []

    def add(outputs: list[dict]) -> None:  # the scorer's outputs: chosen, rejected of each pair in turn
        pairs_before = len(scored) // 2
        scored.extend(outputs)
        bar.advance(len(scored) // 2 - pairs_before, sum(len(o["token_ids"]) for o in outputs))

    if share:
        # Each pair's prompt is encoded once after the shared prefix; chosen and rejected continue it.
        per_batch = max(cfg.ce.batch_size // 2, 1)
        for i in range(0, len(pairs), per_batch):
            chunk = pairs[i:i + per_batch]
            add(scorer.score_grouped([p["prompt_ids"][len(prefix):] for p in chunk],
                                     [r for p in chunk for r in (p["chosen_ids"], p["rejected_ids"])],
                                     pad_id=tok.pad_token_id))
    else:
        seqs = [{"prompt_ids": p["prompt_ids"], "response_ids": p[side]} for p in pairs
                for side in ("chosen_ids", "rejected_ids")]
        dm = SequencesDataModule(seqs, pad_id=tok.pad_token_id, batch_size=cfg.ce.batch_size, shuffle=False,
                                 max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length)
        # The scorer's predict_step over batches on the model's device. (A Trainer.predict per shard
        # would move the whole model back to the CPU after every shard.)
        device = next(scorer.model.parameters()).device
        for i, batch in enumerate(dm.predict_dataloader()):
            add(scorer.predict_step({k: v.to(device) for k, v in batch.items()}, i))
    if own:
        bar.close()
    out = []
    for i, p in enumerate(pairs):
        c, r = scored[2 * i], scored[2 * i + 1]
        low = min(range(len(r["p_ce"])), key=r["p_ce"].__getitem__) if r["p_ce"] else None
        out.append({**p, "key": pair_key(p), "chosen_ids": c["token_ids"], "chosen_p_ce": c["p_ce"],
                    "rejected_ids": r["token_ids"], "rejected_p_ce": r["p_ce"],
                    "critical_index": low,
                    "critical_token": tok.decode([r["token_ids"][low]]) if low is not None else None})
    return out


def run(cfg: DictConfig, paths: RunPaths, objective=None) -> dict:  # a run-level stage: any objective
    pairs = load(paths.pairs)
    tok = context.tokenizer(cfg)
    scorer = scorer_for(cfg, paths.pos_adapter, paths.neg_adapter)
    reused = []
    with Progress("score", len(pairs), "pair") as bar:  # one bar over every shard; resumed ones done from the start

        def skip(n_pairs):
            reused.append(n_pairs)
            bar.resume(n_pairs)

        out = run_sharded(pairs, cfg.ce.shard_size, paths.shards("score"),
                          lambda shard: score_pairs(cfg, scorer, shard, tok, bar), paths.scored_pairs, key=pair_key,
                          on_skip=skip, signature=stage_identity(cfg, paths, "score"))  # pairs' and adapters' contents too
    rej = [x for p in out for x in p["rejected_p_ce"]]
    cho = [x for p in out for x in p["chosen_p_ce"]]
    mean = lambda xs: round(sum(xs) / max(len(xs), 1), 4)  # noqa: E731
    return {"pairs": len(out), "pairs_resumed": sum(reused), "mean_p_ce_chosen": mean(cho),
            "mean_p_ce_rejected": mean(rej), "rejected_tokens_below_0.5": sum(x < 0.5 for x in rej),
            "rejected_tokens": len(rej)}
