"""AdamW with linear warm-up and cosine decay, over the trainable (adapter) parameters only."""
from __future__ import annotations

import math

import lightning as L
import torch


def adamw_cosine(module, *, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int,
                 adamw=torch.optim.AdamW):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is a LoRA adapter attached and active?")
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    warmup = int(round(warmup_ratio * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AdapterTrainingModule(L.LightningModule):
    """Shared by the SFT and preference modules: train mode at fit start, AdamW + cosine schedule."""

    lr: float
    weight_decay: float
    warmup_ratio: float

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
        return adamw_cosine(self.model, lr=self.lr, weight_decay=self.weight_decay, warmup_ratio=self.warmup_ratio,
                            total_steps=self.trainer.estimated_stepping_batches,
                            adamw=_adamw_for(self.trainer.strategy))


def _adamw_for(strategy):
    """torch's AdamW, or DeepSpeed's CPU AdamW where DeepSpeed offloads the optimizer step to the CPU."""
    zero = (getattr(strategy, "config", None) or {}).get("zero_optimization") or {}
    if zero.get("offload_optimizer"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam
    return torch.optim.AdamW
