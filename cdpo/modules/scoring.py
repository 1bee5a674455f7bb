"""Contrastive estimation as a Lightning predict loop.

With both CE models as LoRA adapters on one base model (the usual case: LoRA leaves lm_head
alone), p_ce comes from one vocabulary matmul over (1 + b) h_pos - b h_neg. With two separate
full models, each keeps its own head.
"""
from __future__ import annotations

import lightning as L
import torch

from cdpo.contrastive import contrastive_token_probs_from_hidden, scored_responses
from cdpo.logprobs import backbone_and_head, hidden_states
from cdpo.models import use_adapter


class ContrastiveScorer(L.LightningModule):
    def __init__(self, model, *, b: float = 1.0, pos_adapter: str = "pos", neg_adapter: str = "neg",
                 neg_model=None, loss_impl: str = "torch"):
        super().__init__()
        self.model, self.neg_model = model, neg_model
        self.b, self.pos_adapter, self.neg_adapter, self.loss_impl = b, pos_adapter, neg_adapter, loss_impl

    @torch.no_grad()
    def predict_step(self, batch, batch_idx):
        ids, att = batch["input_ids"], batch["attention_mask"]
        if self.neg_model is None:
            use_adapter(self.model, self.pos_adapter)
            h_pos = hidden_states(self.model, ids, att)[:, :-1]
            use_adapter(self.model, self.neg_adapter)
            h_neg = hidden_states(self.model, ids, att)[:, :-1]
            _, head = backbone_and_head(self.model)
            head_neg = None
        else:
            h_pos = hidden_states(self.model, ids, att)[:, :-1]
            h_neg = hidden_states(self.neg_model, ids, att)[:, :-1]
            _, head = backbone_and_head(self.model)
            _, head_neg = backbone_and_head(self.neg_model)
        kw = dict(b=self.b, bias=getattr(head, "bias", None))
        if head_neg is not None:
            kw.update(weight_neg=head_neg.weight, bias_neg=getattr(head_neg, "bias", None))
        if self.loss_impl == "fused":
            from cdpo_kernels import contrastive_token_probs as fused_ce

            p_ce = fused_ce(h_pos, h_neg, head.weight, batch["targets"], batch["mask"], **kw)
        else:
            p_ce = contrastive_token_probs_from_hidden(h_pos, h_neg, head.weight, batch["targets"], batch["mask"], **kw)
        return scored_responses(batch["targets"], batch["mask"], p_ce)
