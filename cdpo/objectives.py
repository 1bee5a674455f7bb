"""Training objectives: one class per row of Table 1 (and any row a researcher adds).

An objective says what its align stage needs — which data it trains on, whether it needs the
reference model's log-probs, its full distribution (TDPO's per-token KL) or the contrastive scores
of the score stage — and computes its loss and metrics from a batch of policy (and reference)
log-probs. `conf/method/<name>.yaml` builds one with `_target_`; the runner, the align stage, the
LightningModule and the fused kernels ask the object and never test a method's name.

The loss math lives in `cdpo.losses` (public functions); an objective names its settings and picks the
function. `METHODS` at the end of this file is the only list of methods: the report's row order and
labels, the sweep presets' rows (`grids`) and every test that covers "all methods" read it.

Adding a method: subclass `Objective` (a dataclass: its fields are the YAML keys, checked in
`__post_init__`), implement `loss`, add it to `METHODS`, add `conf/method/<name>.yaml` with `_target_`
pointing at it, and test it against an independent reference. It joins no sweep preset until its
`METHODS` entry lists the grid. A class in your own module needs no entry: `_target_: mypkg.MyLoss`
builds it, and its `label` names its row in the report. See docs/design.md, "Adding a method".
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar

import torch

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


class TrainsOn(StrEnum):
    """What an objective's align stage trains on."""
    PAIRS = "pairs"            # the preference pairs (scored ones when it needs scores)
    POSITIVES = "positives"    # the positive set (SFT)
    NOTHING = "nothing"        # no training: the base model is the result (the baseline)


def _fail(key: str, value, allowed: str):
    raise ConfigError(f"method.{key}={value!r}: {allowed}")


@dataclass
class Objective:
    """Base class. Subclasses set the class-level needs and implement `loss` (pairs) or none (SFT)."""
    name: str = ""
    label: ClassVar[str] = ""                       # the report's row label (default: the name)
    trains_on: ClassVar[TrainsOn] = TrainsOn.PAIRS
    needs_reference: ClassVar[bool] = True          # reference log-probs of every response token
    needs_reference_kl: ClassVar[bool] = False      # the reference's whole distribution (per-token KL)
    needs_scores: ClassVar[bool] = False            # contrastive scores: the score stage (and sft_neg)

    def __post_init__(self):
        if not self.name:
            self.name = type(self).name
        for f in dataclasses.fields(self):
            _check_value(f.name, getattr(self, f.name), f.metadata)

    @property
    def trains(self) -> bool:
        """Whether the method trains anything (the baseline does not: its result is the base model)."""
        return self.trains_on is not TrainsOn.NOTHING

    @property
    def row_label(self) -> str:
        """The report's label of this method's row: its `METHODS` entry's, else its class's, else its name."""
        method = METHODS.get(self.name)
        return (method.label if method is not None else None) or self.label or self.name

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
    trains_on: ClassVar[TrainsOn] = TrainsOn.NOTHING
    needs_reference: ClassVar[bool] = False


@dataclass
class SFT(Objective):
    """NLL on the positive set (the SFT row), trained per seed with the policy LoRA."""
    name: str = "sft"
    label: ClassVar[str] = "+ SFT"
    trains_on: ClassVar[TrainsOn] = TrainsOn.POSITIVES
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
        return losses.simpo_loss(b.policy_chosen, b.policy_rejected, **b.masked(), beta=self.beta, gamma=self.gamma)


@dataclass
class IPO(Objective):
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 beta))^2 with h the difference of the chosen and
    rejected log-ratios, each averaged over its response tokens (TRL's loss_type="ipo"; beta is tau).
    Rewards (metrics) are beta times the summed log-ratios, as TRL logs them."""
    name: str = "ipo"
    label: ClassVar[str] = "+ IPO"
    beta: float = dataclasses.field(default=0.1, metadata=above(0))

    def loss(self, b: PairLogps):
        return losses.ipo_loss(*b.with_reference(), **b.masked(), beta=self.beta)


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
        loss, weighted = losses.cdpo_loss(*args, beta=self.beta, **weights)  # rewards/*: the weighted sums
        if self.loss_form == "per_position":
            loss = losses.cdpo_per_position_loss(*args, beta=self.beta, **weights)
        sum_c, sum_r = losses.log_ratio_sums(*args)
        metrics = losses.preference_metrics(self.beta * sum_c, self.beta * sum_r, b.policy_chosen, b.policy_rejected,
                                            **b.masked())
        metrics.update({f"weighted_{k}": v for k, v in weighted.items() if k.startswith("rewards/")})
        return loss, metrics


@dataclass
class Hinge(Objective):
    """SLiC's hinge loss on the DPO margin (Zhao et al. 2023; TRL's loss_type="hinge"): relu(1 - beta h),
    h = sum D_c - sum D_r; beta is the reciprocal of the margin."""
    name: str = "hinge"
    label: ClassVar[str] = "+ Hinge"
    beta: float = dataclasses.field(default=0.1, metadata=above(0))

    def loss(self, b: PairLogps):
        pc, pr, rc, rr = b.with_reference()
        sum_c, sum_r = losses.log_ratio_sums(pc, pr, rc, rr, b.mask_chosen, b.mask_rejected)
        loss = torch.relu(1.0 - self.beta * (sum_c - sum_r)).mean()
        return loss, losses.preference_metrics(self.beta * sum_c, self.beta * sum_r, pc, pr, **b.masked())


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A method: a row of the report, and `conf/method/<name>.yaml`, which builds `objective` with `settings`."""
    objective: type[Objective]
    settings: dict = dataclasses.field(default_factory=dict)  # what its YAML fixes beyond the class defaults
    label: str | None = None                                  # the report's label, when not the class's
    grids: tuple[str, ...] = ()                               # the sweep presets (conf/sweep/) it is a row of


TABLE1 = ("table1", "embedded")  # the paper's Table 1 (conf/sweep/table1.yaml) and its embedded edition

# The only list of methods, in Table 1's row order. A method joins a sweep preset only when its entry lists
# it: the paper's grid keeps its rows when an objective is added.
METHODS: dict[str, Method] = {
    "baseline": Method(Baseline, grids=TABLE1),
    "sft": Method(SFT, grids=TABLE1),
    "dpo": Method(DPO, grids=TABLE1),
    "tokendpo": Method(TokenDPO, grids=TABLE1),
    "rpo": Method(RPO, grids=TABLE1),
    "simpo": Method(SimPO, grids=TABLE1),
    "ipo": Method(IPO, grids=TABLE1),
    "cdpo": Method(CDPO, grids=TABLE1),
    # the authors' training code's form, a row of its own beside the paper's formula (the embedded grid)
    "cdpo_per_position": Method(CDPO, {"loss_form": "per_position"}, "+ cDPO (per position)", ("embedded",)),
    "hinge": Method(Hinge),
}


def grid(name: str) -> list[str]:
    """The methods of sweep preset `name`, in Table 1's order (conf/sweep/<name>.yaml lists them: a test checks)."""
    methods = [method for method, m in METHODS.items() if name in m.grids]
    if not methods:  # a misspelt name would sweep, or expect, nothing
        grids = sorted({g for m in METHODS.values() for g in m.grids})
        raise ConfigError(f"grid {name!r}: no method lists it; the grids are {', '.join(grids)}")
    return methods


def build(name: str, **settings) -> Objective:
    """The method `name` of `METHODS` with `settings` (tests and scripts; configs use `_target_`)."""
    if name not in METHODS:
        raise ConfigError(f"method={name!r}: unknown method; choose one of {', '.join(METHODS)} "
                          "(or give method._target_ = your Objective subclass)")
    method = METHODS[name]
    return method.objective(**{"name": name, **method.settings, **settings})


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
    """Method name -> the report's row label, in Table 1's order."""
    return {name: build(name).row_label for name in METHODS}
