"""Stages `sft_pos` and `sft_neg`: the positive and negative CE models (LoRA adapters of the base model)."""
from __future__ import annotations

from omegaconf import DictConfig

from cdpo.models import add_lora, model_summary
from cdpo.modules import SequencesDataModule, SFTModule
from cdpo.modules.callbacks import KeepBestAdapter
from cdpo.objectives import Objective
from cdpo.pipeline import context
from cdpo.pipeline.artifacts import RunPaths, load, stage_identity
from cdpo.pipeline.training import _data_kw, _fit, _lora, _optim


def run_pos(cfg: DictConfig, paths: RunPaths, objective: Objective | None = None) -> dict:
    return train_sft(cfg, paths, which="pos")


def run_neg(cfg: DictConfig, paths: RunPaths, objective: Objective | None = None) -> dict:
    return train_sft(cfg, paths, which="neg")


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
