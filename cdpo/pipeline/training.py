"""Stages `sft_pos`, `sft_neg` (the CE models) and `align` (the preference-optimised policy)."""
from __future__ import annotations

import logging
import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig

from cdpo import distributed
from cdpo.errors import CorruptArtifactError
from cdpo.data.collate import collate_pairs, drop_overlong
from cdpo.io import write_jsonl
from cdpo.logprobs import response_logps
from cdpo.models import add_lora, model_summary, reference_model, save_adapter
from cdpo.modules import PairsDataModule, PreferenceModule, SequencesDataModule, SFTModule
from cdpo.modules.callbacks import KeepBestAdapter
from cdpo.objectives import from_config as objective_of
from cdpo.pipeline import context, trainers
from cdpo.pipeline.artifacts import RunPaths, align_input, load, stage_identity
from cdpo.pipeline.identity import model_identity

log = logging.getLogger(__name__)

def _lora(peft_cfg: DictConfig) -> dict:
    if not peft_cfg.r:
        raise ValueError("peft=none: this pipeline trains LoRA adapters (the reference is the adapter-disabled base)")
    return dict(r=peft_cfg.r, alpha=peft_cfg.alpha, dropout=peft_cfg.dropout, target_modules=list(peft_cfg.target_modules))


def _data_kw(cfg: DictConfig, tok, batch_size: int, seed: int) -> dict:
    return dict(pad_id=tok.pad_token_id, batch_size=batch_size, seed=seed, max_length=cfg.data.max_length,
                max_prompt_length=cfg.data.max_prompt_length)


def _fit(cfg, name, module, datamodule, *, adapter: str, path, epochs, grad_accum=1, key: str | None = None,
         history=None, keep_best: KeepBestAdapter | None = None, val_every: int | None = None) -> dict:
    """Fit `module`, then write its adapter `adapter` into `path` (global rank 0; gathered from every
    process's shard under FSDP / DeepSpeed). With trainer.checkpoint_every_n_steps, an interrupted fit
    resumes from its last checkpoint, kept beside `path` under a name that holds the stage's identity
    `key` (settings and input contents: a checkpoint of other settings or inputs is never resumed) and
    removed once the adapter is written. A damaged checkpoint (a kill during its write) is discarded;
    `ckpt_path=` names a checkpoint to resume from instead. With `keep_best` (a held-out set in the
    datamodule, evaluated every `val_every` batches and once at the end) the best adapter is written."""
    path = Path(path)
    ckpt_dir = path.parent / f".checkpoints-{path.name}-{(key or hashlib.sha1(name.encode()).hexdigest())[:12]}"
    last = ckpt_dir / "last.ckpt"
    resume = str(last) if cfg.trainer.get("checkpoint_every_n_steps") and _usable_checkpoint(last, name) else None
    if cfg.get("ckpt_path"):
        _check_checkpoint(str(cfg.ckpt_path))
    resume = cfg.get("ckpt_path") or resume
    trainer = trainers.make_trainer(cfg, name, epochs=epochs, grad_accum=grad_accum, checkpoint_dir=ckpt_dir,
                                    history=history, resume_history=resume is not None,
                                    callbacks=[keep_best] if keep_best else None, val_every=val_every)
    if resume:
        log.info(f"[{name}] resuming from {resume}")
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
        if keep_best is not None:  # the final adapter is a candidate too, then the best goes back in
            trainer.validate(module, datamodule=datamodule, verbose=False)
            keep_best.restore(module)
            log.info(f"[{name}] kept the adapter of step {keep_best.best_step}: held-out loss {keep_best.best:.4f}")
    finally:
        trainers.finish_logger(trainer.logger)
    # a strategy's wrapping (and sharding): gathered from every process, a collective; one device: the model's own
    single = isinstance(trainer.strategy, SingleDeviceStrategy)
    state = None if single else distributed.trained_adapter_state(trainer)
    if trainer.is_global_zero:
        save_adapter(module.model, adapter, path, state_dict=state)
        for old in path.parent.glob(f".checkpoints-{path.name}-*"):
            shutil.rmtree(old, ignore_errors=True)
    metrics = {k: round(float(v), 5) for k, v in trainer.callback_metrics.items()}
    if datamodule.truncation.truncated:
        log.info(f"[{name}] {datamodule.truncation.truncated}/{datamodule.truncation.seen} sequences truncated to "
                 f"max_length={cfg.data.max_length} (prompt <= {cfg.data.max_prompt_length})")
    summary = {"steps": trainer.global_step, "seconds": round(time.perf_counter() - t0, 1), "final": metrics,
               "truncated": datamodule.truncation.truncated, "records": len(datamodule.records),
               "processes": trainer.world_size}
    if keep_best is not None:
        summary.update(best_step=keep_best.best_step, best_val_loss=round(keep_best.best, 5),
                       held_out=len(datamodule.val_records))
    return summary


def _check_checkpoint(path: str) -> None:
    """ckpt_path= loaded as Lightning will (torch.load's defaults; memory-mapped, so the tensors are not read),
    before fit: a file torch refuses is one line, not a traceback from inside it."""
    try:
        torch.load(path, map_location="cpu", mmap=True)
    except Exception as e:  # UnpicklingError (not a checkpoint, or weights_only refused it), a cut zip, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CorruptArtifactError(f"ckpt_path={path}: torch cannot load it ({type(e).__name__}: {reason}): give a "
                                   "Lightning checkpoint (.ckpt) a cdpo training stage wrote") from None


def _usable_checkpoint(last: Path, name: str) -> bool:
    """Whether `last` can be resumed from. Lightning writes checkpoints in place, so a kill during the
    write leaves a truncated zip (its central directory, at the end, is missing): discarded, the fit starts
    over, rather than a traceback at every rerun. A folder (FSDP's sharded checkpoint) is trusted."""
    if not last.exists():
        return False
    if last.is_dir():
        return True
    try:
        with zipfile.ZipFile(last):
            return True
    except (zipfile.BadZipFile, OSError) as e:
        log.warning(f"[{name}] {last}: unreadable checkpoint ({e}), probably cut by a kill during its write: discarded, "
                    "the fit starts over")
        last.unlink()
        return False


def train_sft(cfg: DictConfig, paths: RunPaths, *, which: str) -> dict:
    """Fit the positive (which='pos') or negative (which='neg') CE model."""
    records = load(paths.positives if which == "pos" else paths.negatives)
    ce = cfg.ce
    holdout = ce.get("holdout") or 0  # the authors hold out the last examples and keep the best checkpoint
    if holdout and holdout >= len(records):
        raise ValueError(f"ce.holdout={holdout}: the {which} set has only {len(records)} examples; lower it "
                         "(the authors' 300 assume thousands of training questions) or set ce.holdout=0")
    train, held_out = (records[:-holdout], records[-holdout:]) if holdout else (records, [])
    tok = context.tokenizer(cfg)
    model = add_lora(context.base_model(cfg, for_training=True), which, **_lora(cfg.ce_lora))
    module = SFTModule(model, **_optim(cfg, ce))
    sizes = model_summary(model)  # before fitting: FSDP leaves each process a shard of every tensor
    data = SequencesDataModule(train, val_records=held_out, **_data_kw(cfg, tok, ce.batch_size, ce.seed))
    summary = _fit(cfg, f"sft_{which}", module, data, adapter=which,
                   path=paths.pos_adapter if which == "pos" else paths.neg_adapter, epochs=ce.epochs,
                   key=stage_identity(cfg, paths, f"sft_{which}")["hash"],
                   keep_best=KeepBestAdapter() if holdout else None,
                   val_every=ce.get("eval_every_n_steps") if holdout else None)  # nothing to evaluate without one
    return {**summary, **sizes}


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


def _optim(cfg: DictConfig, section: DictConfig) -> dict:
    """Optimizer and schedule settings of `section` (cfg.ce or cfg.align)."""
    return dict(lr=section.lr, weight_decay=section.weight_decay, warmup_ratio=section.warmup_ratio,
                warmup_steps=section.get("warmup_steps"), schedule=section.get("schedule", "cosine"),
                loss_impl=cfg.loss_impl)


def preference_module(cfg: DictConfig, policy) -> PreferenceModule:
    """The PreferenceModule of the objective `method=...` configures, with the align settings."""
    return PreferenceModule(policy, objective_of(cfg.method), **_optim(cfg, cfg.align))


def train_align(cfg: DictConfig, paths: RunPaths) -> dict:
    objective = objective_of(cfg.method)
    if objective.trains_on == "nothing":
        raise ValueError(f"method={objective.name} trains nothing: it has no align stage (run stage=eval or all)")
    tok = context.tokenizer(cfg)
    a = cfg.align
    policy = add_lora(context.base_model(cfg, for_training=True), "policy", **_lora(cfg.peft))
    kw = _data_kw(cfg, tok, a.batch_size, cfg.seed)
    _, records = align_input(paths, objective)
    if objective.trains_on == "positives":
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
                   key=stage_identity(cfg, paths, "align")["hash"])
    return {**summary, **sizes}
