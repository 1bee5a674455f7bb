"""AdamW with linear warm-up and cosine decay, over the trainable (adapter) parameters only."""
from __future__ import annotations

import math

import lightning as L
import torch


def adamw_cosine(module, *, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int):
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: is a LoRA adapter attached and active?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
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

    def configure_optimizers(self):
        return adamw_cosine(self.model, lr=self.lr, weight_decay=self.weight_decay,
                            warmup_ratio=self.warmup_ratio, total_steps=self.trainer.estimated_stepping_batches)
