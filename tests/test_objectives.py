"""The objectives of cdpo.objectives: SimPO and IPO against TRL 1.16 and float64 formulas, the
registry, and the validation of their settings."""
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from cdpo.objectives import REGISTRY, ConfigError, PairLogps, build, from_config
from test_losses import _leaves, _pair_batch, naive_logsig, naive_sum, trl_dpo


def _logps(batch, **extra):
    return PairLogps(batch["policy_chosen"], batch["policy_rejected"], batch["mask_chosen"], batch["mask_rejected"],
                     ref_chosen=batch["ref_chosen"], ref_rejected=batch["ref_rejected"], **extra)


def _leaf_batch(seed):
    batch = _pair_batch(seed=seed)
    for k in ("policy_chosen", "policy_rejected"):
        batch[k] = batch[k].clone().requires_grad_()
    return batch


# ---------------------------------------------------------------------------- IPO


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_matches_trl_loss_type_ipo(beta):
    batch = _pair_batch(seed=21)
    t_loss, t_metrics, t_gc, t_gr = trl_dpo(batch, beta, loss_types=("ipo",))
    ours = _leaves(batch, garbage=True)  # NaN / inf in every masked slot must not leak
    loss, metrics = build("ipo", beta=beta).loss(_logps(ours))
    loss.backward()
    torch.testing.assert_close(loss.detach(), t_loss, rtol=1e-5, atol=1e-6)
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    torch.testing.assert_close(ours["policy_chosen"].grad[mc], t_gc[mc], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["policy_rejected"].grad[mr], t_gr[mr], rtol=1e-5, atol=1e-6)
    assert torch.all(ours["policy_chosen"].grad[~mc] == 0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert abs(metrics[key].item() - t_metrics[key]) < 1e-5, key


def test_ipo_against_float64_formula():
    batch = _pair_batch(seed=22)
    beta = 0.3
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    avg = lambda x, m: naive_sum(x, m) / m.sum(-1).double()  # noqa: E731
    h = (avg(batch["policy_chosen"], mc) - avg(batch["ref_chosen"], mc)) - (
        avg(batch["policy_rejected"], mr) - avg(batch["ref_rejected"], mr))
    want = ((h - 1 / (2 * beta)) ** 2).mean()
    got, _ = build("ipo", beta=beta).loss(_logps(batch))
    assert abs(got.item() - want.item()) < 1e-5


# ---------------------------------------------------------------------------- SimPO


def _trl_simpo(avg_c, avg_r, beta, gamma):
    """TRL's CPOTrainer.cpo_loss (loss_type="simpo") on length-averaged log-probs, as TRL computes them."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    fake = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                           accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, avg_c, avg_r)
    return losses.mean(), chosen_rewards, rejected_rewards


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 1.375), (0.5, 0.0)])
def test_simpo_matches_trl_cpo_simpo(beta, gamma):
    batch = _leaf_batch(seed=23)
    loss, metrics = build("simpo", beta=beta, gamma=gamma).loss(PairLogps(
        batch["policy_chosen"], batch["policy_rejected"], batch["mask_chosen"], batch["mask_rejected"]))
    loss.backward()
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    pc = batch["policy_chosen"].detach().clone().requires_grad_()
    pr = batch["policy_rejected"].detach().clone().requires_grad_()
    avg_c = torch.where(mc, pc, 0.0).sum(-1) / mc.sum(-1)
    avg_r = torch.where(mr, pr, 0.0).sum(-1) / mr.sum(-1)
    t_loss, t_rc, t_rr = _trl_simpo(avg_c, avg_r, beta, gamma)
    t_loss.backward()
    torch.testing.assert_close(loss.detach(), t_loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(batch["policy_chosen"].grad, pc.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batch["policy_rejected"].grad, pr.grad, rtol=1e-5, atol=1e-7)
    assert abs(metrics["rewards/chosen"].item() - t_rc.mean().item()) < 1e-5
    assert abs(metrics["rewards/margins"].item() - (t_rc - t_rr).mean().item()) < 1e-5


def test_simpo_against_float64_formula_and_needs_no_reference():
    batch = _pair_batch(seed=24)
    beta, gamma = 2.0, 0.8
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    z = beta * (naive_sum(batch["policy_chosen"], mc) / mc.sum(-1).double()
                - naive_sum(batch["policy_rejected"], mr) / mr.sum(-1).double()) - gamma
    want = -naive_logsig(z).mean()
    objective = build("simpo", beta=beta, gamma=gamma)
    got, _ = objective.loss(PairLogps(batch["policy_chosen"], batch["policy_rejected"], mc, mr))  # no reference
    assert abs(got.item() - want.item()) < 1e-6
    assert not objective.needs_reference and not objective.uses_cached_reference


# ---------------------------------------------------------------------------- what each objective asks for


def test_each_objective_declares_its_needs():
    needs = {name: (cls.trains_on, cls.needs_reference, cls.needs_reference_kl, cls.needs_scores)
             for name, cls in REGISTRY.items()}
    assert needs == {
        "baseline": ("nothing", False, False, False), "sft": ("positives", False, False, False),
        "dpo": ("pairs", True, False, False), "tokendpo": ("pairs", True, True, False),
        "rpo": ("pairs", True, False, False), "simpo": ("pairs", False, False, False),
        "ipo": ("pairs", True, False, False), "cdpo": ("pairs", True, False, True),
    }


def test_reference_free_objective_never_runs_the_reference(monkeypatch):
    """A reference-free method skips the reference forward entirely."""
    from cdpo.data.collate import collate_pairs
    from cdpo.models import add_lora, tiny_llama
    from cdpo.modules import PreferenceModule
    from cdpo.modules import preference

    calls = []
    real = preference.reference_model
    monkeypatch.setattr(preference, "reference_model", lambda m: calls.append(1) or real(m))
    model = add_lora(tiny_llama(vocab_size=64, seed=1), "policy", r=2, alpha=4, target_modules=["q_proj"])
    batch = collate_pairs([{"prompt_ids": [3, 4], "chosen_ids": [5, 6], "rejected_ids": [7]}], pad_id=0)
    loss, _ = PreferenceModule(model, build("simpo")).compute_loss(batch)
    assert math.isfinite(loss.item()) and calls == []
    PreferenceModule(model, build("dpo")).compute_loss(batch)
    assert calls == [1, 1]  # chosen and rejected


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize("method,key,value,message", [
    ("cdpo", "chosen_weighting", "pce", "method.chosen_weighting='pce': choose one of only_neg, p_ce"),
    ("dpo", "beta", -0.1, "method.beta=-0.1: must be > 0"),
    ("dpo", "beta", "high", "method.beta='high': must be a number"),
    ("dpo", "label_smoothing", 0.5, "method.label_smoothing=0.5: must be >= 0 and < 0.5"),
    ("tokendpo", "variant", 3, "method.variant=3: choose one of 1, 2"),
    ("rpo", "nll_weight", -1, "method.nll_weight=-1: must be >= 0"),
    ("simpo", "gamma", -0.5, "method.gamma=-0.5: must be >= 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(method, key, value, message):
    cfg = OmegaConf.load(f"{__import__('pathlib').Path(__file__).parents[1]}/conf/method/{method}.yaml")
    cfg[key] = value
    with pytest.raises(ConfigError) as e:
        from_config(cfg)
    assert str(e.value) == message


def test_unknown_key_and_missing_target_are_named():
    with pytest.raises(ConfigError, match="alpha.*its settings are beta, nll_weight"):
        from_config(OmegaConf.create({"_target_": "cdpo.objectives.RPO", "name": "rpo", "alpha": 1.0}))
    with pytest.raises(ConfigError, match="method._target_ is missing"):
        from_config(OmegaConf.create({"name": "dpo", "beta": 0.1}))


def test_every_method_config_builds_its_objective():
    from pathlib import Path

    conf = Path(__file__).parents[1] / "conf" / "method"
    built = {p.stem: from_config(OmegaConf.load(p)) for p in conf.glob("*.yaml")}
    assert set(built) == set(REGISTRY)
    assert all(type(o) is REGISTRY[name] and o.name == name for name, o in built.items())
