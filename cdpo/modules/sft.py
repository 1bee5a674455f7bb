"""Supervised fine-tuning on response tokens: the positive and negative CE models and the SFT baseline."""
from __future__ import annotations

from cdpo.logprobs import response_logps
from cdpo.losses import sft_loss
from cdpo.modules.optim import AdapterTrainingModule


class SFTModule(AdapterTrainingModule):
    def __init__(self, model, *, lr: float = 3e-4, **optim):
        super().__init__(lr=lr, **optim)
        self.model = model

    def training_step(self, batch, batch_idx):
        logps = response_logps(self.model, batch, impl=self.loss_impl)
        loss, metrics = sft_loss(logps, batch["mask"])
        self.log("loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log_dict({k: v for k, v in metrics.items()}, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        """Held-out NLL, a token mean over the whole validation set (each batch weighted by its tokens)."""
        loss, _ = sft_loss(response_logps(self.model, batch, impl=self.loss_impl), batch["mask"])
        self.log("val_loss", loss, batch_size=int(batch["mask"].sum()), prog_bar=True)

