"""Contrastive estimation as a Lightning predict loop.

With both CE models as LoRA adapters on one base model (the usual case: LoRA leaves lm_head
alone), p_ce comes from one vocabulary matmul over (1 + b) h_pos - b h_neg. With two separate
full models, each keeps its own head. When every sequence starts with the same tokens (few-shot
exemplars), `prefix_ids` makes each model encode them once: the batches then hold only the rest
of each sequence, continuing the cached prefix; `score_grouped` also encodes once the prompt that
several responses share (a pair's chosen and rejected).
"""
from __future__ import annotations

import lightning as L
import torch

from cdpo.contrastive import scored_responses
from cdpo.head import head_ops
from cdpo.kv_cache import grouped_response_hidden_states, hidden_states_after_prefix, prefix_cache
from cdpo.logprobs import backbone_and_head, hidden_states
from cdpo.models import use_adapter


class ContrastiveScorer(L.LightningModule):
    def __init__(self, model, *, b: float = 1.0, pos_adapter: str = "pos", neg_adapter: str = "neg",
                 neg_model=None, loss_impl: str = "torch", prefix_ids: list[int] | None = None):
        super().__init__()
        self.model, self.neg_model = model, neg_model
        self.b, self.pos_adapter, self.neg_adapter = b, pos_adapter, neg_adapter
        self.loss_impl, self.head = loss_impl, head_ops(loss_impl)
        self.prefix_ids = list(prefix_ids or [])
        self._caches: dict[str, object] = {}

    def set_prefix(self, prefix_ids: list[int]) -> None:
        """Batches from now on hold sequences with `prefix_ids` stripped from their start."""
        if list(prefix_ids) != self.prefix_ids:
            self.prefix_ids, self._caches = list(prefix_ids), {}

    def _model(self, which: str):
        """The positive or negative model (with one base model: the base with that adapter active)."""
        if self.neg_model is None:
            use_adapter(self.model, self.pos_adapter if which == "pos" else self.neg_adapter)
            return self.model
        return self.neg_model if which == "neg" else self.model

    def _prefix_cache(self, which: str, model):
        if not self.prefix_ids:
            return None
        if which not in self._caches:
            self._caches[which] = prefix_cache(model, self.prefix_ids)
        return self._caches[which]

    def _hidden(self, which: str, ids, att):
        """Hidden states of the positive or negative model (batch rows continue the prefix, if any)."""
        model = self._model(which)
        cache = self._prefix_cache(which, model)
        if cache is None:
            return hidden_states(model, ids, att)[:, :-1]
        return hidden_states_after_prefix(model, cache, ids, att)[:, :-1]

    def _p_ce(self, h_pos, h_neg, targets, mask):
        _, head = backbone_and_head(self.model)
        head_neg = None if self.neg_model is None else backbone_and_head(self.neg_model)[1]
        kw = dict(b=self.b, bias=getattr(head, "bias", None))
        if head_neg is not None:
            kw.update(weight_neg=head_neg.weight, bias_neg=getattr(head_neg, "bias", None))
        return self.head.contrastive_token_probs(h_pos, h_neg, head.weight, targets, mask, **kw)

    @torch.no_grad()
    def predict_step(self, batch, batch_idx):
        ids, att = batch["input_ids"], batch["attention_mask"]
        h_pos, h_neg = self._hidden("pos", ids, att), self._hidden("neg", ids, att)
        return scored_responses(batch["targets"], batch["mask"], self._p_ce(h_pos, h_neg, batch["targets"], batch["mask"]))

    @torch.no_grad()
    def score_grouped(self, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> list[dict]:
        """Responses grouped by prompt (e.g. a pair's chosen and rejected), each prompt encoded once per
        model after the shared prefix; prompts hold the ids that follow `prefix_ids`. No truncation."""
        hidden = {}
        for which in ("pos", "neg"):
            model = self._model(which)
            hidden[which], targets, mask = grouped_response_hidden_states(
                model, self._prefix_cache(which, model), prompts, responses, pad_id)
        return scored_responses(targets, mask, self._p_ce(hidden["pos"], hidden["neg"], targets, mask))
