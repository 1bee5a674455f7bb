"""Preference optimisation: DPO, RPO, cDPO and TokenDPO (TDPO) chosen by config.

The reference is the base model with the LoRA adapter disabled, or reference log-probs that were
precomputed once (stored in the batch as `ref_logps`) for the methods that need only log-probs.
TDPO needs the reference's full distribution and always runs the reference forward.
"""
from __future__ import annotations

from contextlib import nullcontext

import lightning as L
import torch

from cdpo import losses
from cdpo.logprobs import backbone_and_head, hidden_states, response_logps
from cdpo.models import reference_model
from cdpo.modules.optim import adamw_cosine

METHODS = ("dpo", "rpo", "cdpo", "tokendpo")


class PreferenceModule(L.LightningModule):
    def __init__(self, model, *, method: str = "cdpo", beta: float = 0.1, label_smoothing: float = 0.0,
                 rpo_alpha: float = 1.0, tdpo_alpha: float = 0.5, tdpo_variant: int = 2,
                 chosen_weighting: str = "only_neg", lr: float = 4e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, loss_impl: str = "torch"):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown preference method {method!r}; choose one of {METHODS}")
        self.model = model
        self.method, self.beta, self.label_smoothing = method, beta, label_smoothing
        self.rpo_alpha, self.tdpo_alpha, self.tdpo_variant = rpo_alpha, tdpo_alpha, tdpo_variant
        self.chosen_weighting = chosen_weighting
        self.lr, self.weight_decay, self.warmup_ratio, self.loss_impl = lr, weight_decay, warmup_ratio, loss_impl

    def _reference_logps(self, side: dict) -> torch.Tensor:
        if "ref_logps" in side:
            return side["ref_logps"]
        with torch.no_grad(), reference_model(self.model):
            return response_logps(self.model, side, impl=self.loss_impl)

    def _sequential_kl(self, side: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy token log-probs and sum_t KL(p_ref || pi) over response positions."""
        _, head = backbone_and_head(self.model)
        with torch.no_grad(), reference_model(self.model):
            ref_hidden = hidden_states(self.model, side["input_ids"], side["attention_mask"])[:, :-1]
        pol_hidden = hidden_states(self.model, side["input_ids"], side["attention_mask"])
        pol_logps = response_logps(self.model, side, impl=self.loss_impl, hidden=pol_hidden)
        pol_hidden = pol_hidden[:, :-1]
        mask = side["mask"]
        if self.loss_impl == "fused":
            from cdpo_kernels import sequential_kl as fused_kl

            kl = fused_kl(ref_hidden, pol_hidden, head.weight, mask)
        else:
            # only response rows reach the vocabulary-sized matmul
            rows = mask.nonzero(as_tuple=True)
            ref_logits = (ref_hidden[rows] @ head.weight.T).unsqueeze(1)  # [N, 1, V]: one "sequence" per row
            pol_logits = (pol_hidden[rows] @ head.weight.T).unsqueeze(1)
            ones = torch.ones(ref_logits.shape[:2], dtype=torch.bool, device=mask.device)
            per_row = losses.sequential_kl(ref_logits, pol_logits, ones)
            kl = torch.zeros(mask.shape, dtype=per_row.dtype, device=mask.device).index_put(rows, per_row).sum(-1)
        return pol_logps, kl

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        c, r = batch["chosen"], batch["rejected"]
        common = dict(mask_chosen=c["mask"], mask_rejected=r["mask"], beta=self.beta)
        if self.method == "tokendpo":
            pol_c, kl_c = self._sequential_kl(c)
            pol_r, kl_r = self._sequential_kl(r)
            return losses.tdpo_loss(pol_c, pol_r, self._reference_logps(c), self._reference_logps(r),
                                    kl_chosen=kl_c, kl_rejected=kl_r, alpha=self.tdpo_alpha,
                                    variant=self.tdpo_variant, **common)
        pol_c = response_logps(self.model, c, impl=self.loss_impl)
        pol_r = response_logps(self.model, r, impl=self.loss_impl)
        ref_c, ref_r = self._reference_logps(c), self._reference_logps(r)
        if self.method == "dpo":
            return losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, label_smoothing=self.label_smoothing, **common)
        if self.method == "rpo":
            return losses.rpo_loss(pol_c, pol_r, ref_c, ref_r, alpha=self.rpo_alpha, **common)
        if "weights" not in r:
            raise ValueError("cdpo needs scored pairs (chosen_p_ce / rejected_p_ce): run the score stage first")
        w_c, w_r = losses.cdpo_weights(r["weights"], c.get("weights"), chosen_weighting=self.chosen_weighting)
        return losses.cdpo_loss(pol_c, pol_r, ref_c, ref_r, weights_rejected=w_r, weights_chosen=w_c, **common)

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        n = batch["chosen"]["input_ids"].shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(metrics, batch_size=n)
        return loss

    def on_fit_start(self):
        self.model.train()  # loaded models are in eval mode; LoRA dropout must be active in training

    def configure_optimizers(self):
        return adamw_cosine(self.model, lr=self.lr, weight_decay=self.weight_decay,
                            warmup_ratio=self.warmup_ratio, total_steps=self.trainer.estimated_stepping_batches)
