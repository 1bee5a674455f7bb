"""The objectives of cdpo.objectives: SimPO and IPO against TRL 1.16 and float64 formulas, the
registry (every method of it: what it reads, its config, its label), and the validation of their settings."""
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf

from cdpo.objectives import (CDPO, DPO, METHODS, ConfigError, PairLogps, TrainsOn, build, from_config,
                             row_labels)
from test_losses import _leaves, _pair_batch, _with_garbage, naive_logsig, naive_sum, trl_dpo

PAIR_METHODS = [m for m in METHODS if build(m).trains_on is TrainsOn.PAIRS]


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


# ---------------------------------------------------------------------------- hinge


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_hinge_matches_trl(beta):
    batch = _pair_batch(seed=25)
    t_loss, t_metrics, t_gc, t_gr = trl_dpo(batch, beta, loss_types=("hinge",))
    ours = _leaves(batch, garbage=True)
    loss, metrics = build("hinge", beta=beta).loss(_logps(ours))
    loss.backward()
    assert t_gc.abs().sum() > 0  # some pair inside the margin: the gradient is compared, not only zeros
    torch.testing.assert_close(loss.detach(), t_loss, rtol=1e-5, atol=1e-6)
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    torch.testing.assert_close(ours["policy_chosen"].grad[mc], t_gc[mc], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["policy_rejected"].grad[mr], t_gr[mr], rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert abs(metrics[key].item() - t_metrics[key]) < 1e-5, key


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
    needs = {name: (o.trains_on, o.needs_reference, o.needs_reference_kl, o.needs_scores)
             for name, o in ((name, build(name)) for name in METHODS)}
    assert {name: needs[name] for name in ("baseline", "sft", "dpo", "tokendpo", "rpo", "simpo", "ipo", "cdpo")} == {
        "baseline": ("nothing", False, False, False), "sft": ("positives", False, False, False),
        "dpo": ("pairs", True, False, False), "tokendpo": ("pairs", True, True, False),
        "rpo": ("pairs", True, False, False), "simpo": ("pairs", False, False, False),
        "ipo": ("pairs", True, False, False), "cdpo": ("pairs", True, False, True),
    }


# the inputs each need brings (PairLogps fields)
NEEDS = {"needs_reference": ("ref_chosen", "ref_rejected"), "needs_scores": ("weights_chosen", "weights_rejected"),
         "needs_reference_kl": ("kl_chosen", "kl_rejected")}


@pytest.mark.parametrize("name", PAIR_METHODS)
def test_every_pair_objective_reads_what_it_declares_and_no_masked_slot(name):
    """Every method of the registry (a new one too): without an input it does not declare, the same loss; without
    one it declares, a ValueError naming it; NaN / inf in masked slots of every input change nothing; TRL's
    metric names, detached."""
    objective = build(name)
    batch = _pair_batch(seed=31)
    g = torch.Generator().manual_seed(5)
    scores = tuple(torch.rand(batch[k].shape, generator=g) for k in ("policy_chosen", "policy_rejected"))
    kl = torch.rand(3, generator=g), torch.rand(3, generator=g)

    def run(garbage=False, drop=()):
        b = _leaves(batch, garbage=garbage)
        masks = (batch["mask_chosen"], batch["mask_rejected"])
        sc, sr = (_with_garbage(x, m) if garbage else x for x, m in zip(scores, masks))
        w_c, w_r = objective.token_weights(sc, sr)
        fields = dict(ref_chosen=b["ref_chosen"], ref_rejected=b["ref_rejected"], weights_chosen=w_c,
                      weights_rejected=w_r, kl_chosen=kl[0], kl_rejected=kl[1])
        fields.update({k: None for k in drop})
        loss, metrics = objective.loss(PairLogps(b["policy_chosen"], b["policy_rejected"], b["mask_chosen"],
                                                 b["mask_rejected"], **fields))
        loss.backward()
        return loss.detach(), metrics, b["policy_chosen"].grad, b["policy_rejected"].grad

    loss, metrics, g_c, g_r = run()
    assert torch.isfinite(loss) and g_c.abs().sum() > 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected"} <= set(metrics)
    assert all(not v.requires_grad and torch.isfinite(v) for v in metrics.values())
    d_loss, _, d_c, d_r = run(garbage=True)
    torch.testing.assert_close(d_loss, loss, rtol=0, atol=0)
    assert torch.equal(d_c, g_c) and torch.equal(d_r, g_r)
    for need, fields in NEEDS.items():
        if getattr(objective, need):
            with pytest.raises(ValueError):
                run(drop=fields)
        else:
            assert torch.equal(run(drop=fields)[0], loss), need


def test_defining_an_objective_class_registers_nothing():
    """The registry is explicit: a class defined elsewhere (a test, a user's module) does not join it."""
    before = dict(METHODS)

    @dataclasses.dataclass
    class Mine(DPO):
        name: str = "mine_dpo"
        label: ClassVar[str] = "+ Mine"

    assert METHODS == before and "mine_dpo" not in row_labels()
    assert Mine().row_label == "+ Mine" and Mine().trains


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

CONF = Path(__file__).parents[1] / "conf" / "method"


def _method_cfg(path):
    """A method config as the train config holds it: composed by Hydra (a variant extends its class's
    config through its defaults list), its interpolations resolved against the root."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose(config_name="train", overrides=[f"method={path.stem}"]).method



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
    cfg = _method_cfg(CONF / f"{method}.yaml")
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
    built = {p.stem: from_config(_method_cfg(p)) for p in CONF.glob("*.yaml")}
    assert set(built) == set(row_labels()) == set(METHODS)  # one YAML per method of the registry
    for name, objective in built.items():
        assert type(objective) is METHODS[name].objective and objective.name == name
        assert all(getattr(objective, k) == v for k, v in METHODS[name].settings.items())
        assert objective.row_label == row_labels()[name] == build(name).row_label
    # the authors' form as a row of its own: cDPO with only the loss form fixed
    variant, cdpo = built["cdpo_per_position"], built["cdpo"]
    assert type(variant) is CDPO and variant.name == "cdpo_per_position"
    assert (variant.loss_form, cdpo.loss_form) == ("per_position", "sequence")
    assert {**vars(variant), "name": "", "loss_form": ""} == {**vars(cdpo), "name": "", "loss_form": ""}


# ---------------------------------------------------------------------------- cDPO, the authors' per-position form


def _authors_per_position(rows, beta, only_neg=True):
    """float64 loop in the layout of the authors' training code: each row is prompt + response, right-padded
    to a common width L; per-token log-ratios are 0 outside responses, weights are given for every
    position; the loss is the mean over all B x L positions of -log sigmoid(beta (w_c D_c - w_r D_r))."""
    L = max(r["prompt"] + max(len(r["d_c"]), len(r["d_r"])) for r in rows)
    total = torch.zeros((), dtype=torch.float64)
    for r in rows:
        for t in range(L):
            k = t - r["prompt"]
            d_c = r["d_c"][k] if 0 <= k < len(r["d_c"]) else 0.0
            d_r = r["d_r"][k] if 0 <= k < len(r["d_r"]) else 0.0
            w_c = 1.0 if only_neg or not 0 <= k < len(r["d_c"]) else r["p_c"][k]
            w_r = 1.0 - r["p_r"][k] if 0 <= k < len(r["d_r"]) else 1.0
            z = beta * (w_c * d_c - w_r * d_r)
            total = total - naive_logsig(torch.as_tensor(z, dtype=torch.float64))
    return total / (len(rows) * L), L


def _per_position_case(seed, padding_side):
    g = torch.Generator().manual_seed(seed)
    spec = [(3, 4, 6), (5, 2, 2), (2, 7, 3)]  # prompt length, chosen length, rejected length per pair
    rows = [{"prompt": p, "d_c": (torch.randn(nc, generator=g) * 2).tolist(), "d_r": (torch.randn(nr, generator=g) * 2).tolist(),
             "p_c": torch.rand(nc, generator=g).tolist(), "p_r": torch.rand(nr, generator=g).tolist()} for p, nc, nr in spec]
    width = max(p + max(nc, nr) for p, nc, nr in spec)

    def side(key, weights_key):
        d = torch.full((3, width), float("nan"))  # garbage outside the response must not leak
        w = torch.full((3, width), float("nan"))
        mask = torch.zeros(3, width, dtype=torch.bool)
        for b, r in enumerate(rows):
            n = len(r[key])
            start = r["prompt"] if padding_side == "right" else width - n  # left padding: responses end the row
            d[b, start:start + n], w[b, start:start + n] = torch.tensor(r[key]), torch.tensor(r[weights_key])
            mask[b, start:start + n] = True
        return d, w, mask

    d_c, p_c, m_c = side("d_c", "p_c")
    d_r, p_r, m_r = side("d_r", "p_r")
    return rows, d_c, p_c, m_c, d_r, p_r, m_r


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("chosen_weighting", ["only_neg", "p_ce"])
def test_cdpo_per_position_matches_the_authors_layout_in_float64(padding_side, chosen_weighting):
    rows, d_c, p_c, m_c, d_r, p_r, m_r = _per_position_case(31, padding_side)
    policy_c = d_c.clone().requires_grad_()  # reference 0: D = policy log-prob
    policy_r = d_r.clone().requires_grad_()
    objective = build("cdpo", beta=0.7, chosen_weighting=chosen_weighting, loss_form="per_position")
    w_c, w_r = objective.token_weights(p_c, p_r)
    loss, metrics = objective.loss(PairLogps(policy_c, policy_r, m_c, m_r, ref_chosen=torch.zeros_like(d_c),
                                             ref_rejected=torch.zeros_like(d_r), weights_chosen=w_c, weights_rejected=w_r))
    want, _ = _authors_per_position(rows, 0.7, only_neg=chosen_weighting == "only_neg")
    assert abs(loss.item() - want.item()) < 1e-6
    # gradients against float64 autograd of the same layout
    loss.backward()
    leaves = [[torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (r["d_c"], r["d_r"])] for r in rows]
    rows64 = [{**r, "d_c": c, "d_r": d} for r, (c, d) in zip(rows, leaves)]
    _authors_per_position(rows64, 0.7, only_neg=chosen_weighting == "only_neg")[0].backward()
    for b, (c, d) in enumerate(leaves):
        torch.testing.assert_close(policy_c.grad[b][m_c[b]].double(), c.grad, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(policy_r.grad[b][m_r[b]].double(), d.grad, rtol=1e-5, atol=1e-8)
    assert torch.isfinite(policy_c.grad).all() and not policy_c.grad[~m_c].any()


def test_cdpo_forms_differ_and_metrics_are_trls_unweighted_rewards():
    rows, d_c, p_c, m_c, d_r, p_r, m_r = _per_position_case(32, "right")
    logps = PairLogps(d_c, d_r, m_c, m_r, ref_chosen=torch.zeros_like(d_c), ref_rejected=torch.zeros_like(d_r))
    results = {}
    for form in ("sequence", "per_position"):
        objective = build("cdpo", beta=0.1, loss_form=form)
        logps.weights_chosen, logps.weights_rejected = objective.token_weights(p_c, p_r)
        results[form] = objective.loss(logps)
    (seq, m_seq), (pos, m_pos) = results["sequence"], results["per_position"]
    assert abs(seq.item() - pos.item()) > 1e-3
    dpo_loss, dpo_metrics = build("dpo", beta=0.1).loss(logps)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert torch.equal(m_seq[key], dpo_metrics[key]) and torch.equal(m_pos[key], dpo_metrics[key])
    w_r = torch.where(m_r, 1 - p_r, 0.0)
    weighted_rejected = 0.1 * (torch.where(m_r, d_r, 0.0) * w_r).sum(-1).mean()
    assert abs(m_seq["weighted_rewards/rejected"].item() - weighted_rejected.item()) < 1e-6


# ---------------------------------------------------------------------------- a user's own objective


def test_a_users_objective_in_its_own_module_has_its_label_in_the_report(tmp_path, monkeypatch):
    """`_target_: mypkg.MyLoss`: no registry entry, and the report labels its row as the class says (the label
    is asked of the objective the run's saved method section builds, not looked up at import)."""
    from cdpo.io import write_json, write_jsonl
    from cdpo.report import Table, collect_local

    def write_run(method: dict, seed: int, correct: list[int]):  # what the eval stage writes in a method_dir
        method_dir = tmp_path / "runs" / f"{method['name']}-seed{seed}"
        config = {"model": {"name": "tiny"}, "data": {"name": "arith"}, "method": method, "seed": seed}
        write_json(method_dir / "eval.json", {"accuracy": sum(correct) / len(correct), "questions": len(correct),
                                              "correct": sum(correct), "config": config})
        write_jsonl(method_dir / "eval.jsonl", [{"id": f"q{i}", "samples": [{"correct": bool(c)}]}
                                                for i, c in enumerate(correct)])

    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text(
        "from dataclasses import dataclass\nfrom typing import ClassVar\n\nfrom cdpo.objectives import DPO\n\n\n"
        "@dataclass\nclass MyLoss(DPO):\n    name: str = 'my_loss'\n    label: ClassVar[str] = '+ My loss'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run({"_target_": "mypkg.MyLoss", "name": "my_loss", "beta": 0.2}, seed, [1, 0, 1])
        write_run({"_target_": "cdpo.objectives.CDPO", "name": "cdpo"}, seed, [1, 1, 1])
    table = Table(collect_local([root]), resamples=100)
    assert table.rows == ["cdpo", "my_loss"]  # Table 1's order, then the user's methods
    md = table.markdown()
    assert "| + My loss |" in md and "| my_loss |" not in md and "| + cDPO |" in md
