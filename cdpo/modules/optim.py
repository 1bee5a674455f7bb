"""AdamW with linear warm-up, then cosine or linear decay, over the trainable (adapter) parameters only."""
from __future__ import annotations

import math

import lightning as L
import torch


SCHEDULES = ("cosine", "linear")


def adamw_schedule(module, *, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                   schedule: str = "cosine", warmup_steps: int | None = None, adamw=torch.optim.AdamW):
    """Warm-up over `warmup_steps` optimizer steps (or `warmup_ratio` of them), then decay to 0 by the
    last step: half a cosine (the CE models in the paper) or a straight line (HF's default, which the
    authors' cDPO training used)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is a LoRA adapter attached and active?")
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    warmup = min(warmup_steps, total_steps) if warmup_steps is not None else int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AdapterTrainingModule(L.LightningModule):
    """Shared by the SFT and preference modules: train mode at fit start, AdamW + warm-up and decay."""

    def __init__(self, *, lr: float, weight_decay: float = 0.0, warmup_ratio: float = 0.0,
                 warmup_steps: int | None = None, schedule: str = "cosine", loss_impl: str = "torch"):
        super().__init__()
        self.lr, self.weight_decay, self.loss_impl = lr, weight_decay, loss_impl
        self.warmup_ratio, self.warmup_steps, self.schedule = warmup_ratio, warmup_steps, schedule

    def on_fit_start(self):
        self.model.train()  # loaded models are in eval mode; LoRA dropout must be active in training

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if gradient_clip_val and isinstance(self.trainer.model, FullyShardedDataParallel):
            # each rank holds a shard of every gradient: only the root FSDP module knows the global norm
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val,
                            gradient_clip_algorithm=gradient_clip_algorithm)

    def configure_optimizers(self):
        return adamw_schedule(self.model, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                              warmup_steps=self.warmup_steps, schedule=self.schedule,
                              total_steps=self.trainer.estimated_stepping_batches,
                              adamw=_adamw_for(self.trainer.strategy))


def _adamw_for(strategy):
    """torch's AdamW, or DeepSpeed's CPU AdamW where DeepSpeed offloads the optimizer step to the CPU."""
    zero = (getattr(strategy, "config", None) or {}).get("zero_optimization") or {}
    if zero.get("offload_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW
