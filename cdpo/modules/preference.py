"""Preference optimisation: DPO, RPO, cDPO and TokenDPO (TDPO) chosen by config.

The reference is the base model with the LoRA adapter disabled, or reference log-probs that were
precomputed once (stored in the batch as `ref_logps`) for the methods that need only log-probs.
TDPO needs the reference's full distribution and always runs the reference forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cdpo import losses
from cdpo.logprobs import backbone_and_head, hidden_states, response_logps
from cdpo.models import reference_model
from cdpo.modules.optim import AdapterTrainingModule

METHODS = ("dpo", "rpo", "cdpo", "tokendpo")
KL_CHUNK = 256  # response rows whose [rows, V] logits are alive at once in the TDPO KL


def _kl_of_rows(ref_rows, pol_rows, weight, bias):
    """Per-row KL(p_ref || pi) over the vocabulary, in fp32 (also under bf16 autocast)."""
    with torch.autocast(device_type=pol_rows.device.type, enabled=False):
        ref = F.linear(ref_rows.float(), weight.float(), None if bias is None else bias.float())
        pol = F.linear(pol_rows.float(), weight.float(), None if bias is None else bias.float())
        ones = torch.ones(ref.shape[0], 1, dtype=torch.bool, device=ref.device)
        return losses.sequential_kl(ref[:, None], pol[:, None], ones)  # each row is a one-token "sequence"


class PreferenceModule(AdapterTrainingModule):
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

    def _sequential_kl(self, side: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Policy and reference token log-probs, and sum_t KL(p_ref || pi) over response positions.
        One reference forward gives both the reference log-probs and its distribution."""
        _, head = backbone_and_head(self.model)
        mask, targets = side["mask"], side["targets"]
        with torch.no_grad(), reference_model(self.model):
            ref_hidden = hidden_states(self.model, side["input_ids"], side["attention_mask"])[:, :-1]
            ref_logps = side.get("ref_logps")
            if ref_logps is None:
                ref_logps = losses.token_logprobs_from_hidden(ref_hidden, head.weight, targets, mask, bias=head.bias)
        pol_hidden = hidden_states(self.model, side["input_ids"], side["attention_mask"])
        pol_logps = response_logps(self.model, side, impl=self.loss_impl, hidden=pol_hidden)
        pol_hidden = pol_hidden[:, :-1]
        if self.loss_impl == "fused":
            from cdpo_kernels import sequential_kl as fused_kl

            return pol_logps, ref_logps, fused_kl(ref_hidden, pol_hidden, head.weight, mask, bias=head.bias)
        # only response rows reach the vocabulary, a chunk of rows at a time, recomputed in backward
        rows = mask.nonzero(as_tuple=True)
        ref_rows, pol_rows = ref_hidden[rows], pol_hidden[rows]
        pieces = [checkpoint(_kl_of_rows, ref_rows[i:i + KL_CHUNK], pol_rows[i:i + KL_CHUNK], head.weight, head.bias,
                             use_reentrant=False) for i in range(0, ref_rows.shape[0], KL_CHUNK)]
        per_row = torch.cat(pieces) if pieces else pol_rows.new_zeros(0, dtype=torch.float32)
        kl = torch.zeros(mask.shape, dtype=per_row.dtype, device=mask.device).index_put(rows, per_row).sum(-1)
        return pol_logps, ref_logps, kl

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict]:
        c, r = batch["chosen"], batch["rejected"]
        common = dict(mask_chosen=c["mask"], mask_rejected=r["mask"], beta=self.beta)
        if self.method == "tokendpo":
            pol_c, ref_c, kl_c = self._sequential_kl(c)
            pol_r, ref_r, kl_r = self._sequential_kl(r)
            return losses.tdpo_loss(pol_c, pol_r, ref_c, ref_r,
                                    kl_chosen=kl_c, kl_rejected=kl_r, alpha=self.tdpo_alpha,
                                    variant=self.tdpo_variant, **common)
        ref_c, ref_r = self._reference_logps(c), self._reference_logps(r)
        w_c, w_r = self._token_weights(c, r)
        if self.loss_impl == "fused":
            return self._fused_loss(c, r, ref_c, ref_r, w_c, w_r)
        pol_c = response_logps(self.model, c, impl=self.loss_impl)
        pol_r = response_logps(self.model, r, impl=self.loss_impl)
        if self.method == "dpo":
            return losses.dpo_loss(pol_c, pol_r, ref_c, ref_r, label_smoothing=self.label_smoothing, **common)
        if self.method == "rpo":
            return losses.rpo_loss(pol_c, pol_r, ref_c, ref_r, alpha=self.rpo_alpha, **common)
        return losses.cdpo_loss(pol_c, pol_r, ref_c, ref_r, weights_rejected=w_r, weights_chosen=w_c, **common)

    def _token_weights(self, c: dict, r: dict):
        """(w_chosen, w_rejected) from the scored pairs for cDPO; (None, None) for DPO and RPO."""
        if self.method != "cdpo":
            return None, None
        if "weights" not in r:
            raise ValueError("cdpo needs scored pairs (chosen_p_ce / rejected_p_ce): run the score stage first")
        return losses.cdpo_weights(r["weights"], c.get("weights"), chosen_weighting=self.chosen_weighting)

    def _fused_loss(self, c: dict, r: dict, ref_c: torch.Tensor, ref_r: torch.Tensor, w_c, w_r):
        """DPO / RPO / cDPO through the fused kernel: one pass over the head for chosen and rejected rows."""
        from cdpo_kernels import preference_loss

        _, head = backbone_and_head(self.model)
        h_c = hidden_states(self.model, c["input_ids"], c["attention_mask"])[:, :-1]
        h_r = hidden_states(self.model, r["input_ids"], r["attention_mask"])[:, :-1]
        return preference_loss(self.method, h_c, h_r, head.weight, c["targets"], r["targets"], c["mask"], r["mask"],
                               ref_c, ref_r, bias=getattr(head, "bias", None), beta=self.beta,
                               label_smoothing=self.label_smoothing, alpha=self.rpo_alpha,
                               weights_chosen=w_c, weights_rejected=w_r)

    def training_step(self, batch, batch_idx):
        loss, metrics = self.compute_loss(batch)
        n = batch["chosen"]["input_ids"].shape[0]
        self.log("loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(metrics, batch_size=n)
        return loss

