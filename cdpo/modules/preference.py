"""Preference optimisation of the policy with any pair objective (`cdpo.objectives`).

The module runs what the objective asks for and nothing else: the policy's token log-probs of
chosen and rejected; the reference's (the base with the LoRA adapter disabled, or log-probs
precomputed once and stored in the batch as `ref_logps`) only for objectives that need them; the
reference's full distribution for the per-token KL of TDPO; token weights from the contrastive
scores for cDPO. The head math goes through `cdpo.head` (`loss_impl`).
"""
from __future__ import annotations

import torch

from cdpo.head import head_ops
from cdpo.logprobs import backbone_and_head, hidden_states
from cdpo.models import reference_model
from cdpo.modules.optim import AdapterTrainingModule
from cdpo.objectives import Objective, PairLogps, TrainsOn


class PreferenceModule(AdapterTrainingModule):
    def __init__(self, model, objective: Objective, *, lr: float = 4e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.1, **optim):
        super().__init__(lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio, **optim)
        if objective.trains_on is not TrainsOn.PAIRS:
            raise ValueError(f"method {objective.name!r} trains on {objective.trains_on}, not on preference pairs")
        self.model, self.objective = model, objective
        self.head = head_ops(self.loss_impl)

    def _head(self):
        _, head = backbone_and_head(self.model)
        return head.weight, getattr(head, "bias", None)

    def _hidden(self, side: dict) -> torch.Tensor:
        """Last hidden states that score each target: [B, L-1, H]."""
        return hidden_states(self.model, side["input_ids"], side["attention_mask"])[:, :-1]

    @torch.no_grad()
    def _reference(self, side: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(reference token log-probs, reference hidden states when the objective needs its distribution)."""
        if not self.objective.needs_reference:
            return None, None
        if "ref_logps" in side and not self.objective.needs_reference_kl:
            return side["ref_logps"], None
        weight, bias = self._head()
        with reference_model(self.model):
            hidden = hidden_states(self.model, side["input_ids"], side["attention_mask"])[:, :-1]
        logps = side.get("ref_logps")
        if logps is None:
            logps = self.head.token_logprobs(hidden, weight, side["targets"], side["mask"], bias=bias)
        return logps, hidden if self.objective.needs_reference_kl else None

    def pair_logps(self, batch) -> PairLogps:
        """Everything the objective needs for one batch of pairs."""
        c, r = batch["chosen"], batch["rejected"]
        obj = self.objective
        ref_c, ref_hidden_c = self._reference(c)
        ref_r, ref_hidden_r = self._reference(r)
        weight, bias = self._head()
        h_c, h_r = self._hidden(c), self._hidden(r)
        pol_c, pol_r = self.head.pair_logprobs(h_c, h_r, weight, c["targets"], r["targets"], c["mask"], r["mask"],
                                               bias=bias)
        out = PairLogps(pol_c, pol_r, c["mask"], r["mask"], ref_chosen=ref_c, ref_rejected=ref_r)
        if obj.needs_reference_kl:
            out.kl_chosen = self.head.sequential_kl(ref_hidden_c, h_c, weight, c["mask"], bias=bias)
            out.kl_rejected = self.head.sequential_kl(ref_hidden_r, h_r, weight, r["mask"], bias=bias)
        if obj.needs_scores:
            if "weights" not in r:
                raise ValueError(f"method {obj.name!r} needs scored pairs (chosen_p_ce / rejected_p_ce): "
                                 "run the score stage first")
            out.weights_chosen, out.weights_rejected = obj.token_weights(c.get("weights"), r["weights"])
        return out

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        return self.objective.loss(self.pair_logps(batch))

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        n = batch["chosen"]["input_ids"].shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(metrics, batch_size=n)
        return loss
