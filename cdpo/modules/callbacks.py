"""Callbacks of the training stages."""
from __future__ import annotations

import lightning as L
import torch


class KeepBestAdapter(L.Callback):
    """Keeps a copy of the trainable (adapter) weights whenever the monitored validation metric improves,
    and puts the best copy back when asked (`restore`): the authors' CE models keep their best
    checkpoint by held-out loss. Only the adapter is copied, to host memory."""

    def __init__(self, monitor: str = "val_loss"):
        self.monitor, self.best, self.best_step, self._weights = monitor, float("inf"), None, None

    def on_validation_end(self, trainer, pl_module):
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking or not float(value) < self.best:
            return
        self.best, self.best_step = float(value), trainer.global_step
        self._weights = {n: p.detach().to("cpu", copy=True) for n, p in pl_module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def restore(self, pl_module) -> None:
        if self._weights is None:
            return
        params = dict(pl_module.named_parameters())
        for name, value in self._weights.items():
            params[name].copy_(value.to(params[name].device))
