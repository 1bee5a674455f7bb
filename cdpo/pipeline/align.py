"""Stage `align`: the policy trained with the run's objective (a LoRA adapter), on what the objective trains on."""
from __future__ import annotations

import hashlib
import json
import logging

import torch
from omegaconf import DictConfig

from cdpo import distributed
from cdpo.data.collate import collate_pairs, drop_overlong
from cdpo.io import write_jsonl
from cdpo.logprobs import response_logps
from cdpo.models import add_lora, model_summary, reference_model
from cdpo.modules import PairsDataModule, PreferenceModule, SequencesDataModule, SFTModule
from cdpo.objectives import Objective, TrainsOn, from_config as objective_of
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, align_input, load, stage_identity
from cdpo.pipeline.identity import model_identity
from cdpo.pipeline.training import _data_kw, _fit, _lora, _optim

log = logging.getLogger(__name__)


@torch.no_grad()
def reference_logps(cfg: DictConfig, paths: RunPaths, pairs: list[dict], tok, policy) -> list[dict]:
    """Reference token log-probs of every pair: the policy with its adapter disabled (= the base
    model, no second copy in memory), computed once and cached in the run dir. A cached entry is
    used only for the same token ids, truncation and base model."""
    cached = {c["key"]: c for c in load(paths.ref_logps)} if paths.ref_logps.exists() else {}
    model_id = model_identity(cfg.model)  # a local model's files, listed once
    keys = [_ref_key(cfg, p, model_id) for p in pairs]
    if all(k in cached for k in keys):
        return [cached[k] for k in keys]
    device = next(policy.parameters()).device
    out = []
    with reference_model(policy):
        for start in range(0, len(pairs), cfg.ce.batch_size):
            batch_pairs, batch_keys = pairs[start:start + cfg.ce.batch_size], keys[start:start + cfg.ce.batch_size]
            batch = collate_pairs(batch_pairs, pad_id=tok.pad_token_id, max_length=cfg.data.max_length,
                                  max_prompt_length=cfg.data.max_prompt_length)
            row = {}
            for side in ("chosen", "rejected"):
                b = {k: v.to(device) for k, v in batch[side].items()}
                logps = response_logps(policy, b, impl=cfg.loss_impl)
                row[side] = [lp[m].tolist() for lp, m in zip(logps.cpu(), b["mask"].cpu())]
            out += [{"key": k, "ref_chosen": c, "ref_rejected": r}
                    for k, c, r in zip(batch_keys, row["chosen"], row["rejected"])]
    wanted = set(keys)
    write_jsonl(paths.ref_logps, [*(v for k, v in cached.items() if k not in wanted), *out])
    return out


def _ref_key(cfg: DictConfig, pair: dict, model_id: str) -> str:
    """Everything a reference log-prob depends on: the ids, the truncation and the base model."""
    d, m = cfg.data, cfg.model
    text = json.dumps([pair["prompt_ids"], pair["chosen_ids"], pair["rejected_ids"], d.max_length,
                       d.max_prompt_length, m.path, m.dtype, cfg.loss_impl, model_id])
    return hashlib.sha1(text.encode()).hexdigest()


def _drop_overlong(pairs: list[dict], a: DictConfig) -> list[dict]:
    kept = drop_overlong(pairs, prompt_length=a.drop_prompt_length, length=a.drop_length)
    log.warning(f"[align] align.overlong=drop: {len(pairs) - len(kept)} of {len(pairs)} pairs left out (prompt >= "
                f"{a.drop_prompt_length} or prompt + response >= {a.drop_length} tokens)")
    if not kept:
        raise ValueError(f"align.overlong=drop left no pair: every pair has a prompt of >= align.drop_prompt_length="
                         f"{a.drop_prompt_length} tokens or a prompt + response of >= align.drop_length={a.drop_length}")
    return kept


def preference_module(cfg: DictConfig, policy) -> PreferenceModule:
    """The PreferenceModule of the objective `method=...` configures, with the align settings (tests, benchmarks)."""
    return PreferenceModule(policy, objective_of(cfg.method), **_optim(cfg, cfg.align))


def run(cfg: DictConfig, paths: RunPaths, objective: Objective) -> dict:
    if not objective.trains:
        raise ValueError(f"method={objective.name} trains nothing: it has no align stage (run stage=eval or all)")
    tok = context.tokenizer(cfg)
    a = cfg.align
    policy = add_lora(context.base_model(cfg, for_training=True), "policy", **_lora(cfg.peft))
    kw = _data_kw(cfg, tok, a.batch_size, cfg.seed)
    _, records = align_input(paths, objective)
    if objective.trains_on is TrainsOn.POSITIVES:
        module = SFTModule(policy, **_optim(cfg, cfg.align))
        dm = SequencesDataModule(load(records), **kw)
    else:
        pairs = load(records)
        if a.get("overlong", "truncate") == "drop":
            pairs = _drop_overlong(pairs, a)
        with_ref = bool(a.precompute_ref) and objective.uses_cached_reference
        if with_ref and distributed.planned_processes(cfg.trainer) > 1:
            # every process would compute (and write) all of them: the reference runs in each step instead
            log.warning("[align] several processes: reference log-probs are computed in each training step "
                        "(align.precompute_ref applies to one process)")
            with_ref = False
        if with_ref:
            for pair, ref in zip(pairs, reference_logps(cfg, paths, pairs, tok, policy)):
                pair.update(ref_chosen=ref["ref_chosen"], ref_rejected=ref["ref_rejected"])
        module = PreferenceModule(policy, objective, **_optim(cfg, cfg.align))
        dm = PairsDataModule(pairs, with_weights=objective.needs_scores, with_ref=with_ref, **kw)
    sizes = model_summary(policy)
    summary = _fit(cfg, f"align_{objective.name}_seed{cfg.seed}", module, dm, adapter="policy",
                   path=paths.aligned_adapter, epochs=a.epochs, grad_accum=a.grad_accum, history=paths.history,
                   key=stage_identity(cfg, paths, "align", objective)["hash"])
    return {**summary, **sizes}
