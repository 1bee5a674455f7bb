"""Contrastive estimation as a Lightning predict loop.

With both CE models as LoRA adapters on one base model (the usual case: LoRA leaves lm_head
alone), p_ce comes from one vocabulary matmul over (1 + b) h_pos - b h_neg. With two separate
full models, each keeps its own head. When every sequence starts with the same tokens (few-shot
exemplars), `prefix_ids` makes each model encode them once: the batches then hold only the rest
of each sequence, continuing the cached prefix.
"""
from __future__ import annotations

import lightning as L
import torch

from cdpo.contrastive import contrastive_token_probs_from_hidden, scored_responses
from cdpo.logprobs import backbone_and_head, hidden_states, hidden_states_after_prefix, prefix_cache
from cdpo.models import use_adapter


class ContrastiveScorer(L.LightningModule):
    def __init__(self, model, *, b: float = 1.0, pos_adapter: str = "pos", neg_adapter: str = "neg",
                 neg_model=None, loss_impl: str = "torch", prefix_ids: list[int] | None = None):
        super().__init__()
        self.model, self.neg_model = model, neg_model
        self.b, self.pos_adapter, self.neg_adapter, self.loss_impl = b, pos_adapter, neg_adapter, loss_impl
        self.prefix_ids = list(prefix_ids or [])
        self._caches: dict[str, object] = {}

    def set_prefix(self, prefix_ids: list[int]) -> None:
        """Batches from now on hold sequences with `prefix_ids` stripped from their start."""
        if list(prefix_ids) != self.prefix_ids:
            self.prefix_ids, self._caches = list(prefix_ids), {}

    def _hidden(self, which: str, ids, att):
        """Hidden states of the positive or negative model (batch rows continue the prefix, if any)."""
        model = self.model
        if self.neg_model is None:
            use_adapter(model, self.pos_adapter if which == "pos" else self.neg_adapter)
        elif which == "neg":
            model = self.neg_model
        if not self.prefix_ids:
            return hidden_states(model, ids, att)[:, :-1]
        if which not in self._caches:
            self._caches[which] = prefix_cache(model, self.prefix_ids)
        return hidden_states_after_prefix(model, self._caches[which], ids, att)[:, :-1]

    @torch.no_grad()
    def predict_step(self, batch, batch_idx):
        ids, att = batch["input_ids"], batch["attention_mask"]
        h_pos, h_neg = self._hidden("pos", ids, att), self._hidden("neg", ids, att)
        _, head = backbone_and_head(self.model)
        head_neg = None if self.neg_model is None else backbone_and_head(self.neg_model)[1]
        kw = dict(b=self.b, bias=getattr(head, "bias", None))
        if head_neg is not None:
            kw.update(weight_neg=head_neg.weight, bias_neg=getattr(head_neg, "bias", None))
        if self.loss_impl == "fused":
            from cdpo_kernels import contrastive_token_probs as fused_ce

            p_ce = fused_ce(h_pos, h_neg, head.weight, batch["targets"], batch["mask"], **kw)
        else:
            p_ce = contrastive_token_probs_from_hidden(h_pos, h_neg, head.weight, batch["targets"], batch["mask"], **kw)
        return scored_responses(batch["targets"], batch["mask"], p_ce)
