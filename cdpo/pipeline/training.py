"""What the training stages share: a Lightning fit that writes an adapter (resumable), LoRA, data and optimizer
settings. The stages: `sft.py` (sft_pos, sft_neg: the CE models) and `align.py` (the preference-optimised policy)."""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from omegaconf import DictConfig

from cdpo import distributed
from cdpo.errors import CorruptArtifactError
from cdpo.models import save_adapter
from cdpo.modules.callbacks import KeepBestAdapter
from cdpo.pipeline import trainers

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


def _optim(cfg: DictConfig, section: DictConfig) -> dict:
    """Optimizer and schedule settings of `section` (cfg.ce or cfg.align)."""
    return dict(lr=section.lr, weight_decay=section.weight_decay, warmup_ratio=section.warmup_ratio,
                warmup_steps=section.get("warmup_steps"), schedule=section.get("schedule", "cosine"),
                loss_impl=cfg.loss_impl)
