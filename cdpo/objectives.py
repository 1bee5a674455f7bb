"""Training objectives: one class per row of Table 1 (and any row a researcher adds).

An objective says what its align stage needs — which data it trains on, whether it needs the
reference model's log-probs, its full distribution (TDPO's per-token KL) or the contrastive scores
of the score stage — and computes its loss and metrics from a batch of policy (and reference)
log-probs. `conf/method/<name>.yaml` builds one with `_target_`; the runner, the align stage, the
LightningModule and the fused kernels ask the object and never test a method's name.

Adding a method: subclass `Objective` (a dataclass: its fields are the YAML keys, checked in
`__post_init__`), implement `loss`, add `conf/method/<name>.yaml` with `_target_` pointing at it,
and test it against an independent reference. See docs/design.md, "Adding a method".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from cdpo import losses
from cdpo.errors import ConfigError

Metrics = dict[str, torch.Tensor]


@dataclass
class PairLogps:
    """One batch of preference pairs, as per-token values [B, T] (chosen and rejected may differ in T).

    `weights_*` are the token weights an objective derived from the contrastive scores
    (`Objective.token_weights`); `kl_*` [B] the sequential KL(reference || policy) of TDPO.
    Fields an objective does not declare a need for are None.
    """
    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    mask_chosen: torch.Tensor
    mask_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    weights_chosen: torch.Tensor | None = None
    weights_rejected: torch.Tensor | None = None
    kl_chosen: torch.Tensor | None = None
    kl_rejected: torch.Tensor | None = None

    def masked(self) -> dict:
        return dict(mask_chosen=self.mask_chosen, mask_rejected=self.mask_rejected)

    def with_reference(self) -> tuple:
        if self.ref_chosen is None or self.ref_rejected is None:
            raise ValueError("this objective needs reference log-probs (ref_chosen, ref_rejected)")
        return self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected


REGISTRY: dict[str, type[Objective]] = {}  # name -> class, in Table 1's row order (definition order)


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"method.{key}={value!r}: {allowed}")


@dataclass
class Objective:
    """Base class. Subclasses set the class-level needs and implement `loss` (pairs) or none (SFT)."""
    name: str = ""
    label: ClassVar[str] = ""                       # the report's row label
    trains_on: ClassVar[Literal["pairs", "positives", "nothing"]] = "pairs"
    needs_reference: ClassVar[bool] = True          # reference log-probs of every response token
    needs_reference_kl: ClassVar[bool] = False      # the reference's whole distribution (per-token KL)
    needs_scores: ClassVar[bool] = False            # contrastive scores: the score stage (and sft_neg)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        default = cls.__dict__.get("name")
        if isinstance(default, str) and default:
            REGISTRY.setdefault(default, cls)

    def __post_init__(self):
        if not self.name:
            self.name = type(self).name
        for f in dataclasses.fields(self):
            _check_value(f.name, getattr(self, f.name), f.metadata)

    @property
    def uses_cached_reference(self) -> bool:
        """Reference log-probs can be computed once before training (no per-step reference forward)."""
        return self.needs_reference and not self.needs_reference_kl

    def token_weights(self, scores_chosen, scores_rejected) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Token weights from the contrastive scores p_ce (for objectives that need scores)."""
        return None, None

    def loss(self, batch: PairLogps) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError(f"{type(self).__name__} trains on {self.trains_on}, not on preference pairs")


def above(low: float) -> dict:
    """Field metadata: a number > low."""
    return {"above": low}


def at_least(low: float) -> dict:
    return {"at_least": low}


def interval(low: float, high: float) -> dict:
    """A number in [low, high)."""
    return {"at_least": low, "below": high}


_BOUNDS = {"above": (">", lambda v, x: v > x), "at_least": (">=", lambda v, x: v >= x), "below": ("<", lambda v, x: v < x)}


def _check_value(key: str, value, rules) -> None:
    if "choices" in rules and value not in rules["choices"]:
        _fail(key, value, f"choose one of {', '.join(map(str, rules['choices']))}")
    bounds = [(op, rules[op]) for op in _BOUNDS if op in rules]
    if not bounds:
        return
    allowed = "must be " + " and ".join(f"{_BOUNDS[op][0]} {bound:g}" for op, bound in bounds)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(key, value, "must be a number")
    if not all(_BOUNDS[op][1](value, bound) for op, bound in bounds):
        _fail(key, value, allowed)


# ---------------------------------------------------------------------------------------------
# Table 1's rows


@dataclass
class Baseline(Objective):
    """The base model as it is: nothing is trained, the eval stage evaluates the base."""
    name: str = "baseline"
    label: ClassVar[str] = "Baseline"
    trains_on: ClassVar[str] = "nothing"
    needs_reference: ClassVar[bool] = False


@dataclass
class SFT(Objective):
    """NLL on the positive set (the SFT row), trained per seed with the policy LoRA."""
    name: str = "sft"
    label: ClassVar[str] = "+ SFT"
    trains_on: ClassVar[str] = "positives"
    needs_reference: ClassVar[bool] = False


@dataclass
class DPO(Objective):
    """DPO (Rafailov et al. 2023): -(1-ls) logsig(beta h) - ls logsig(-beta h), h = sum D_c - sum D_r."""
    name: str = "dpo"
    label: ClassVar[str] = "+ DPO"
    beta: float = dataclasses.field(default=0.1, metadata=above(0))
    label_smoothing: float = dataclasses.field(default=0.0, metadata=interval(0, 0.5))

    def loss(self, b: PairLogps):
        return losses.dpo_loss(*b.with_reference(), **b.masked(), beta=self.beta, label_smoothing=self.label_smoothing)


@dataclass
class TokenDPO(Objective):
    """TDPO (Zeng et al. 2024) with the sequential forward KL over the vocabulary.
    kl_weight is the paper's alpha (TDPO2 only); variant 1 or 2."""
    name: str = "tokendpo"
    label: ClassVar[str] = "+ TokenDPO"
    needs_reference_kl: ClassVar[bool] = True
    beta: float = dataclasses.field(default=0.1, metadata=above(0))
    kl_weight: float = dataclasses.field(default=0.5, metadata=at_least(0))
    variant: int = dataclasses.field(default=2, metadata={"choices": (1, 2)})

    def loss(self, b: PairLogps):
        if b.kl_chosen is None or b.kl_rejected is None:
            raise ValueError("tokendpo needs the sequential KL of chosen and rejected (kl_chosen, kl_rejected)")
        return losses.tdpo_loss(*b.with_reference(), **b.masked(), kl_chosen=b.kl_chosen, kl_rejected=b.kl_rejected,
                                beta=self.beta, alpha=self.kl_weight, variant=self.variant)


@dataclass
class RPO(Objective):
    """RPO (Pang et al. 2024): DPO + nll_weight * mean_b NLL(chosen_b) / |chosen_b| (TRL's rpo_alpha)."""
    name: str = "rpo"
    label: ClassVar[str] = "+ RPO"
    beta: float = dataclasses.field(default=0.1, metadata=above(0))
    nll_weight: float = dataclasses.field(default=1.0, metadata=at_least(0))

    def loss(self, b: PairLogps):
        return losses.rpo_loss(*b.with_reference(), **b.masked(), beta=self.beta, alpha=self.nll_weight)


def _average_logps(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] mean log-prob per response token (length normalisation of SimPO and IPO)."""
    return losses.sequence_logps(logps, mask) / mask.sum(-1).clamp(min=1)


def _metrics(chosen_rewards, rejected_rewards, b: PairLogps) -> Metrics:
    return losses._preference_metrics(chosen_rewards, rejected_rewards, b.policy_chosen, b.policy_rejected,
                                      b.mask_chosen, b.mask_rejected)


@dataclass
class SimPO(Objective):
    """SimPO (Meng et al. 2024), reference-free: -logsig(beta (avg logp_c - avg logp_r) - gamma), with
    avg logp the length-normalised log-likelihood. The paper's grid: beta 2.0-2.5, gamma 0.5-1.5
    (gamma/beta ~0.3-0.8); TRL's CPOTrainer(loss_type="simpo") with simpo_gamma=gamma is the same loss."""
    name: str = "simpo"
    label: ClassVar[str] = "+ SimPO"
    needs_reference: ClassVar[bool] = False
    beta: float = dataclasses.field(default=2.0, metadata=above(0))
    gamma: float = dataclasses.field(default=1.0, metadata=at_least(0))

    def loss(self, b: PairLogps):
        avg_c = _average_logps(b.policy_chosen, b.mask_chosen)
        avg_r = _average_logps(b.policy_rejected, b.mask_rejected)
        loss = -F.logsigmoid(self.beta * (avg_c - avg_r) - self.gamma).mean()
        return loss, _metrics(self.beta * avg_c, self.beta * avg_r, b)


@dataclass
class IPO(Objective):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 with h the difference of the chosen and
    rejected log-ratios, each averaged over its response tokens (TRL's loss_type="ipo"; beta is tau).
    Rewards (metrics) are beta times the summed log-ratios, as TRL logs them."""
    name: str = "ipo"
    label: ClassVar[str] = "+ IPO"
    beta: float = dataclasses.field(default=0.1, metadata=above(0))

    def loss(self, b: PairLogps):
        pc, pr, rc, rr = b.with_reference()
        sum_c, sum_r = losses._log_ratio_sums(pc, pr, rc, rr, b.mask_chosen, b.mask_rejected)
        avg_c = sum_c / b.mask_chosen.sum(-1).clamp(min=1)
        avg_r = sum_r / b.mask_rejected.sum(-1).clamp(min=1)
        loss = ((avg_c - avg_r - 1.0 / (2.0 * self.beta)) ** 2).mean()
        return loss, _metrics(self.beta * sum_c, self.beta * sum_r, b)  # TRL's rewards: unnormalised log-ratios


@dataclass
class CDPO(Objective):
    """cDPO (the paper): token-weighted DPO with rejected-token weights 1 - p_ce from the contrastive
    estimation; chosen weights 1 (only_neg, the paper's default) or p_ce of the chosen tokens.

    loss_form: "sequence" is the paper's formula, one sigmoid of the weighted sums per pair;
    "per_position" is the authors' training code, one sigmoid per response position
    (`losses.cdpo_per_position_loss`). The rewards/* metrics are TRL's, unweighted, for every form
    (comparable with DPO's); weighted_rewards/* are the token-weighted sums cDPO's sequence form uses.
    """
    name: str = "cdpo"
    label: ClassVar[str] = "+ cDPO"
    # rows of their own (conf/method/<name>.yaml) that fix a setting: the report labels them
    variants: ClassVar[dict[str, str]] = {"cdpo_per_position": "+ cDPO (per position)"}
    needs_scores: ClassVar[bool] = True
    beta: float = dataclasses.field(default=0.1, metadata=above(0))
    chosen_weighting: str = dataclasses.field(default="only_neg", metadata={"choices": ("only_neg", "p_ce")})
    loss_form: str = dataclasses.field(default="sequence", metadata={"choices": ("sequence", "per_position")})

    def token_weights(self, scores_chosen, scores_rejected):
        return losses.cdpo_weights(scores_rejected, scores_chosen, chosen_weighting=self.chosen_weighting)

    def loss(self, b: PairLogps):
        if b.weights_rejected is None:
            raise ValueError("cdpo needs token weights (weights_rejected = 1 - p_ce of the rejected tokens): "
                             "train on scored pairs (run the score stage first)")
        args = (*b.with_reference(), b.mask_chosen, b.mask_rejected)
        weights = dict(weights_chosen=b.weights_chosen, weights_rejected=b.weights_rejected)
        if self.loss_form == "per_position":
            loss = losses.cdpo_per_position_loss(*args, beta=self.beta, **weights)
        else:
            loss, _ = losses.cdpo_loss(*args, beta=self.beta, **weights)
        sum_c, sum_r = losses._log_ratio_sums(*args)
        metrics = _metrics(self.beta * sum_c, self.beta * sum_r, b)
        w_c, w_r = (self.beta * s for s in losses._log_ratio_sums(*args, b.weights_chosen, b.weights_rejected))
        metrics.update({"weighted_rewards/chosen": w_c.mean(), "weighted_rewards/rejected": w_r.mean(),
                        "weighted_rewards/margins": (w_c - w_r).mean(),
                        "weighted_rewards/accuracies": (w_c > w_r).float().mean()})
        return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------


def build(name: str, **settings) -> Objective:
    """The registered objective `name` with `settings` (tests and scripts; configs use `_target_`)."""
    if name not in REGISTRY:
        raise ConfigError(f"method={name!r}: unknown method; choose one of {', '.join(REGISTRY)} "
                          "(or give method._target_ = your Objective subclass)")
    return REGISTRY[name](**settings)


def from_config(method_cfg) -> Objective:
    """The objective a `method` config section describes (its `_target_`), its values checked."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    target = method_cfg.get("_target_") if method_cfg is not None else None
    if not target:
        raise ConfigError("method._target_ is missing: a method config names its Objective class "
                          "(e.g. _target_: cdpo.objectives.DPO); see conf/method/")
    try:
        objective = instantiate(OmegaConf.to_container(method_cfg, resolve=True), _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, TypeError):  # an unknown key: the dataclass names it
            fields = sorted({f.name for f in dataclasses.fields(_class_of(target))} - {"name"})
            raise ConfigError(f"method ({target}): {cause}; its settings are {', '.join(fields) or 'none'}") from None
        raise ConfigError(f"method._target_={target!r}: {cause}") from None
    if not isinstance(objective, Objective):
        raise ConfigError(f"method._target_={target!r} is not a cdpo.objectives.Objective")
    return objective


def _class_of(target: str) -> type:
    from hydra.utils import get_class

    return get_class(target)


def row_labels() -> dict[str, str]:
    """Method name -> the report's row label, in Table 1's order (a class's variants right after it)."""
    labels = {}
    for name, cls in REGISTRY.items():
        labels[name] = cls.label or name
        labels.update(getattr(cls, "variants", {}))
    return labels
