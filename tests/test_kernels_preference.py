"""Token-weighted preference losses (DPO / RPO / cDPO) from hidden states: the pair log-probs of one fused
call (`cdpo_kernels.policy_logprobs_pair`, what `loss_impl=fused` trains with) given to the objective,
against a float64 full-logits reference written independently of cdpo.losses."""

import importlib.util

import pytest
import torch

import cdpo_kernels as ck
from cdpo_kernels import reference
from cdpo_kernels.testing import leaf, random_problem, rel_err

pytest.importorskip("cdpo.losses")
from cdpo.objectives import PairLogps, build  # noqa: E402
from oracles import dpo_from_logprobs  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton missing"))]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "nll")


def _preference_loss(objective, hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected, mask_chosen,
                     mask_rejected, ref_chosen=None, ref_rejected=None, *, bias=None, weights_chosen=None,
                     weights_rejected=None, backend=None):
    """(loss, metrics) of `objective` on the pair log-probs of one fused call (cdpo's FusedHead path)."""
    pol_c, pol_r = ck.policy_logprobs_pair(hidden_chosen, hidden_rejected, weight, labels_chosen, labels_rejected,
                                           mask_chosen, mask_rejected, bias=bias, backend=backend)
    return objective.loss(PairLogps(pol_c, pol_r, mask_chosen, mask_rejected, ref_chosen=ref_chosen,
                                    ref_rejected=ref_rejected, weights_chosen=weights_chosen,
                                    weights_rejected=weights_rejected))


def _stacked_preference_loss(objective, hidden, weight, labels, mask, ref_logps, *, weights, backend=None):
    """The same for one concatenated batch (TRL's / Liger's layout: rows [0, B) chosen, [B, 2B) rejected)."""
    half = hidden.shape[0] // 2
    lp = ck.token_logprobs(hidden, weight, labels, mask, backend=backend)
    return objective.loss(PairLogps(lp[:half], lp[half:], mask[:half], mask[half:], ref_chosen=ref_logps[:half],
                                    ref_rejected=ref_logps[half:], weights_chosen=weights[:half],
                                    weights_rejected=weights[half:]))


def _pair(dtype, seed, bias=False):
    # Chosen and rejected of different lengths: stacking must not assume equal T.
    c = random_problem(B=3, T=9, dtype=dtype, bias=bias, seed=seed)
    r = random_problem(B=3, T=12, dtype=dtype, seed=seed + 100)
    g = torch.Generator().manual_seed(seed)
    ref_c = torch.where(c["mask"], -3 * torch.rand(3, 9, generator=g), 0.0)
    ref_r = torch.where(r["mask"], -3 * torch.rand(3, 12, generator=g), 0.0)
    return c, r, ref_c, ref_r


def _expected(method, c, r, weight, bias, ref_c, ref_r, kw):
    """float64 loss, metrics and grads (hidden_c, hidden_r, W) from the naive full-logits formula."""
    hc, hr, w, b = leaf(c["hidden"], r["hidden"], weight, bias)
    lp_c = reference.token_logprobs(hc, w, c["labels"], c["mask"], bias=b, dtype=torch.float64)
    lp_r = reference.token_logprobs(hr, w, r["labels"], r["mask"], bias=b, dtype=torch.float64)
    wc = c["weights"].nan_to_num(0.0) if method == "cdpo" else None
    wr = r["weights"].nan_to_num(0.0) if method == "cdpo" else None
    loss, metrics = dpo_from_logprobs(
        lp_c, lp_r, ref_c, ref_r, c["mask"], r["mask"], beta=kw["beta"], label_smoothing=kw.get("label_smoothing", 0.0),
        weights_chosen=wc, weights_rejected=wr, rpo_alpha=kw.get("alpha") if method == "rpo" else None)
    loss.backward()
    return loss.detach(), metrics, (hc.grad, hr.grad, w.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,kw", [
    ("dpo", dict(beta=0.1)),
    ("dpo", dict(beta=0.5, label_smoothing=0.2)),
    ("rpo", dict(beta=0.1, alpha=1.0)),
    ("cdpo", dict(beta=0.3)),
])
def test_preference_loss_against_float64(backend, method, kw):
    c, r, ref_c, ref_r = _pair(torch.float32, seed=11, bias=True)
    weight, bias = c["weight"], c["bias"]
    hc, hr, w, b = leaf(c["hidden"], r["hidden"], weight, bias)
    extra = {}
    if method == "cdpo":
        extra = dict(weights_chosen=c["weights"], weights_rejected=r["weights"])  # NaN where masked
    objective = build(method, **{("nll_weight" if k == "alpha" else k): v for k, v in kw.items()})
    loss, metrics = _preference_loss(objective, hc, hr, w, c["labels"], r["labels"], c["mask"], r["mask"],
                                       ref_c, ref_r, bias=b, backend=backend, **extra)
    loss.backward()
    want_loss, want_metrics, want_grads = _expected(method, c, r, weight, bias, ref_c, ref_r, kw)
    assert abs(loss.item() - want_loss.item()) < 1e-5 * max(1.0, abs(want_loss.item()))
    assert set(METRICS) <= set(metrics)
    if method == "cdpo":  # TRL's rewards/* stay unweighted (comparable with DPO); weighted ones by their own names
        _, unweighted, _ = _expected("dpo", c, r, weight, bias, ref_c, ref_r, kw)
        for key in ("chosen", "rejected", "margins", "accuracies"):
            want = want_metrics[f"rewards/{key}"].item()
            assert abs(metrics[f"weighted_rewards/{key}"].item() - want) < 1e-4 * max(1.0, abs(want)), key
        want_metrics = unweighted
    for key in METRICS:
        assert abs(metrics[key].item() - want_metrics[key].item()) < 1e-4 * max(1.0, abs(want_metrics[key].item())), key
    for got, want in zip((hc.grad, hr.grad, w.grad), want_grads):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_cdpo_bf16_and_weights_matter(backend):
    c, r, ref_c, ref_r = _pair(torch.bfloat16, seed=12)
    hc, hr, w = leaf(c["hidden"], r["hidden"], c["weight"])
    loss, _ = _preference_loss(build("cdpo", beta=0.5), hc, hr, w, c["labels"], r["labels"], c["mask"], r["mask"],
                                 ref_c, ref_r, weights_rejected=r["weights"], backend=backend)
    loss.backward()
    want_loss, _, want_grads = _expected("cdpo", dict(c, weights=torch.ones_like(c["weights"])), r, c["weight"], None,
                                         ref_c, ref_r, dict(beta=0.5))
    assert abs(loss.item() - want_loss.item()) < 1e-3
    for got, want in zip((hc.grad, hr.grad, w.grad), want_grads):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 3e-2
    # Uniform weights must give a different loss (weights are really applied).
    plain, _ = _preference_loss(build("dpo", beta=0.5), hc, hr, w, c["labels"], r["labels"], c["mask"], r["mask"],
                                  ref_c, ref_r, backend=backend)
    assert abs(plain.item() - loss.item()) > 1e-4


def test_stacked_call_equals_separate_calls():
    c, r, _, _ = _pair(torch.float32, seed=13)
    lp_c, lp_r = ck.policy_logprobs_pair(c["hidden"], r["hidden"], c["weight"], c["labels"], r["labels"],
                                         c["mask"], r["mask"])
    assert torch.equal(lp_c, ck.token_logprobs(c["hidden"], c["weight"], c["labels"], c["mask"]))
    assert torch.equal(lp_r, ck.token_logprobs(r["hidden"], c["weight"], r["labels"], r["mask"]))


def test_reference_formula_agrees_with_cdpo_losses():
    """The test oracle and the project's pure-torch losses must describe the same losses."""
    from cdpo import losses

    c, r, ref_c, ref_r = _pair(torch.float32, seed=14)
    lp_c = reference.token_logprobs(c["hidden"], c["weight"], c["labels"], c["mask"])
    lp_r = reference.token_logprobs(r["hidden"], c["weight"], r["labels"], r["mask"])
    args = (lp_c, lp_r, ref_c, ref_r, c["mask"], r["mask"])
    wc, wr = c["weights"].nan_to_num(0.0), r["weights"].nan_to_num(0.0)
    pairs = [
        (losses.dpo_loss(*args, beta=0.2, label_smoothing=0.1), dpo_from_logprobs(*args, beta=0.2, label_smoothing=0.1)),
        (losses.rpo_loss(*args, beta=0.2, alpha=0.7), dpo_from_logprobs(*args, beta=0.2, rpo_alpha=0.7)),
        (losses.cdpo_loss(*args, beta=0.2, weights_chosen=wc, weights_rejected=wr),
         dpo_from_logprobs(*args, beta=0.2, weights_chosen=wc, weights_rejected=wr)),
    ]
    for (loss, metrics), (want, want_metrics) in pairs:
        assert abs(loss.item() - want.item()) < 1e-5
        for key in METRICS:
            assert abs(metrics[key].item() - want_metrics[key].item()) < 1e-4, key


def test_rejects_bad_arguments():
    c, r, ref_c, ref_r = _pair(torch.float32, seed=15)
    args = (c["hidden"], r["hidden"], c["weight"], c["labels"], r["labels"], c["mask"], r["mask"], ref_c, ref_r)
    with pytest.raises(ValueError, match="weights_rejected"):
        _preference_loss(build("cdpo"), *args)
    with pytest.raises(ValueError, match="unknown method"):
        build("bogus")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_batch_equals_separate(backend):
    """Concatenated forward layout (chosen rows first) gives the same loss, metrics and grads."""
    c = random_problem(B=2, T=10, seed=16)
    r = random_problem(B=2, T=10, seed=17)
    ref_c, ref_r = torch.rand(2, 10) * -3, torch.rand(2, 10) * -3
    hc, hr, w = leaf(c["hidden"], r["hidden"], c["weight"])
    loss, metrics = _preference_loss(build("cdpo", beta=0.2), hc, hr, w, c["labels"], r["labels"], c["mask"],
                                       r["mask"], ref_c, ref_r, weights_rejected=r["weights"], backend=backend)
    loss.backward()
    h = torch.cat([c["hidden"], r["hidden"]]).requires_grad_()
    w2 = c["weight"].clone().requires_grad_()
    weights = torch.cat([torch.ones(2, 10), r["weights"]])
    loss2, metrics2 = _stacked_preference_loss(
        build("cdpo", beta=0.2), h, w2, torch.cat([c["labels"], r["labels"]]), torch.cat([c["mask"], r["mask"]]),
        torch.cat([ref_c, ref_r]), weights=weights, backend=backend)
    loss2.backward()
    assert abs(loss.item() - loss2.item()) < 1e-6
    assert all(abs(metrics[k].item() - metrics2[k].item()) < 1e-5 for k in METRICS)
    assert rel_err(h.grad, torch.cat([hc.grad, hr.grad])) < 1e-6 and rel_err(w2.grad, w.grad) < 1e-6
