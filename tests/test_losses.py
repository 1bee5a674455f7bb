"""cdpo.losses against independent references: TRL 1.16's DPO code and float64 naive formulas."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from cdpo import head as cdpo_head
from cdpo import losses as L
import oracles as O

GARBAGE = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30]


def _garbage_like(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    idx = torch.randint(len(GARBAGE), x.shape, generator=gen)
    return torch.tensor(GARBAGE, dtype=x.dtype)[idx]


def _with_garbage(x, mask, seed=0):
    """x with every masked-out slot replaced by NaN / inf / huge values."""
    gen = torch.Generator().manual_seed(seed)
    m = mask.bool()
    while m.dim() < x.dim():
        m = m.unsqueeze(-1)
    return torch.where(m, x, _garbage_like(x, gen))


def _pair_batch(seed=0, B=3, Tc=6, Tr=4):
    """Per-token log-probs for chosen/rejected with unequal lengths and left/right padding."""
    g = torch.Generator().manual_seed(seed)
    lp = lambda T: -torch.rand(B, T, generator=g) * 3 - 0.05  # noqa: E731
    mask_c = torch.zeros(B, Tc, dtype=torch.bool)
    mask_r = torch.zeros(B, Tr, dtype=torch.bool)
    mask_c[0, 1:] = True  # left padding / prompt
    mask_c[1, :3] = True  # right padding
    mask_c[2, 2:5] = True
    mask_r[0, :] = True
    mask_r[1, 1:3] = True
    mask_r[2, :2] = True
    return dict(
        policy_chosen=lp(Tc), policy_rejected=lp(Tr), ref_chosen=lp(Tc), ref_rejected=lp(Tr),
        mask_chosen=mask_c, mask_rejected=mask_r,
    )


# ---------------------------------------------------------------------------- naive float64


def naive_sum(x, mask, w=None):
    """[B] float64 sum over the mask by an explicit loop (reads only masked-in slots)."""
    out = []
    for b in range(x.shape[0]):
        acc = torch.zeros((), dtype=torch.float64)
        for t in range(x.shape[1]):
            if mask[b, t]:
                acc = acc + (1.0 if w is None else float(w[b][t])) * x[b, t].double()
        out.append(acc)
    return torch.stack(out)


def naive_logsig(z):
    return torch.log(1.0 / (1.0 + torch.exp(-z)))


def naive_dpo(pc, pr, rc, rr, mc, mr, beta, ls=0.0, wc=None, wr=None):
    h = (naive_sum(pc, mc, wc) - naive_sum(rc, mc, wc)) - (naive_sum(pr, mr, wr) - naive_sum(rr, mr, wr))
    return (-(1 - ls) * naive_logsig(beta * h) - ls * naive_logsig(-beta * h)).mean()


def naive_rpo(pc, pr, rc, rr, mc, mr, beta, alpha):
    nll = torch.stack([-naive_sum(pc, mc)[b] / int(mc[b].sum()) for b in range(pc.shape[0])])
    return naive_dpo(pc, pr, rc, rr, mc, mr, beta) + alpha * nll.mean()


def naive_log_softmax_at(logits, labels, mask):
    """float64 per-token log-prob via a Python loop over tokens."""
    B, T, _ = logits.shape
    rows = []
    for b in range(B):
        row = []
        for t in range(T):
            if mask[b, t]:
                z = logits[b, t].double()
                row.append(z[int(labels[b, t])] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
            else:
                row.append(torch.zeros((), dtype=torch.float64))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_kl(ref_logits, pol_logits, mask):
    """[B] float64 double loop over t and v; 0 log 0 = 0."""
    out = []
    for b in range(ref_logits.shape[0]):
        acc = torch.zeros((), dtype=torch.float64)
        for t in range(ref_logits.shape[1]):
            if not mask[b, t]:
                continue
            zr, zp = ref_logits[b, t].double(), pol_logits[b, t].double()
            log_zr = torch.logsumexp(zr, 0)
            log_zp = torch.logsumexp(zp, 0)
            for v in range(zr.shape[0]):
                p = torch.exp(zr[v] - log_zr)
                if float(p) > 0:
                    acc = acc + p * ((zr[v] - log_zr) - (zp[v] - log_zp))
        out.append(acc)
    return torch.stack(out)


# ---------------------------------------------------------------------------- TRL harness
#
# TRL 1.16 computes the DPO loss inside `DPOTrainer._compute_loss(model, inputs, return_outputs)`;
# there is no standalone loss function. We call that method for real on an instance made with
# `object.__new__` carrying only the attributes it reads, a stand-in `model` whose output holds
# given per-token log-probs (what `fused_lm_head=True` returns: 0 at label -100), and precomputed
# reference log-probs (`precompute_ref_logps=True`, so no reference model is needed).


class _FakeLM:
    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, input_ids, **kwargs):
        assert kwargs.get("fused_lm_head") is True
        zeros = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )


def _pad(x, T):
    return torch.nn.functional.pad(x, (0, T - x.shape[1]))


def trl_dpo(batch, beta, loss_types=("sigmoid",), loss_weights=None, label_smoothing=0.0,
            weights_chosen=None, weights_rejected=None):
    """Run TRL's `_compute_loss`; returns (loss, metrics dict, grad of policy chosen, grad rejected)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    B, T = mc.shape[0], max(mc.shape[1], mr.shape[1])
    wc = torch.ones_like(batch["policy_chosen"]) if weights_chosen is None else weights_chosen
    wr = torch.ones_like(batch["policy_rejected"]) if weights_rejected is None else weights_rejected
    # Clean masked slots (TRL trusts them to be 0) and pre-weight per-token values: TRL sums the
    # per-token log-probs, so sums of w * logp give cDPO's token-weighted sequence scores.
    pc = torch.where(mc, batch["policy_chosen"], 0.0).clone().requires_grad_()
    pr = torch.where(mr, batch["policy_rejected"], 0.0).clone().requires_grad_()
    per_token = torch.cat([_pad(pc * wc, T), _pad(pr * wr, T)])
    ref_c = (torch.where(mc, batch["ref_chosen"], 0.0) * wc).sum(1)
    ref_r = (torch.where(mr, batch["ref_rejected"], 0.0) * wr).sum(1)
    completion = torch.cat([_pad(mc.long(), T), _pad(mr.long(), T)])
    completion = torch.cat([torch.zeros(2 * B, 1, dtype=torch.long), completion], dim=1)
    inputs = {
        "input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    trainer = object.__new__(DPOTrainer)
    state = dict(
        model=_FakeLM(per_token), beta=beta, loss_types=list(loss_types),
        loss_weights=list(loss_weights or [1.0] * len(loss_types)), ld_alpha=None,
        f_divergence_type="reverse_kl", label_smoothing=label_smoothing, use_weighting=False,
        precompute_ref_logps=True, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
    )
    for k, v in state.items():
        setattr(trainer, k, v)
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), metrics, pc.grad, pr.grad


def _leaves(batch, garbage=False):
    """Policy log-probs as grad leaves; optionally every masked slot of every input is garbage."""
    out = dict(batch)
    for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
        m = batch["mask_chosen" if "chosen" in k else "mask_rejected"]
        x = _with_garbage(batch[k], m, seed=len(k)) if garbage else batch[k].clone()
        out[k] = x.requires_grad_() if k.startswith("policy") else x
    return out


def _assert_close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a).double(), torch.as_tensor(b).double(), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- TRL comparisons


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl(beta):
    batch = _pair_batch(seed=1)
    t_loss, t_metrics, t_gc, t_gr = trl_dpo(batch, beta)
    # Our side sees garbage in masked slots; TRL's side gets them zeroed.
    ours = _leaves(batch, garbage=True)
    loss, metrics = L.dpo_loss(**ours, beta=beta)
    loss.backward()
    _assert_close(loss, t_loss)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        _assert_close(metrics[key], t_metrics[key])
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    _assert_close(ours["policy_chosen"].grad[mc], t_gc[mc])
    _assert_close(ours["policy_rejected"].grad[mr], t_gr[mr])
    assert torch.all(ours["policy_chosen"].grad[~mc] == 0)
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                            "rewards/accuracies", "logps/chosen", "logps/rejected", "nll"}


def test_dpo_label_smoothing_matches_trl_aot_single_pair():
    # TRL's sigmoid loss ignores label smoothing; its "aot" loss is the label-smoothed sigmoid of
    # the sorted log-ratio differences, which for one pair is exactly the conservative-DPO form.
    batch = _pair_batch(seed=2)
    ls, beta = 0.2, 0.3
    per_pair = []
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        per_pair.append(trl_dpo(one, beta, loss_types=("aot",), label_smoothing=ls)[0])
    loss, _ = L.dpo_loss(**batch, beta=beta, label_smoothing=ls)
    _assert_close(loss, torch.stack(per_pair).mean())
    assert not torch.allclose(loss, L.dpo_loss(**batch, beta=beta)[0])


def test_rpo_matches_trl_sigmoid_plus_sft():
    # TRL expresses RPO as loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]. Its "sft" term is
    # a token mean over the whole batch, RPO's is per-sequence length-normalised: with one pair per
    # call they coincide, so unequal lengths are compared pair by pair, then averaged.
    batch = _pair_batch(seed=3)
    beta, alpha = 0.1, 0.7
    per_pair = [
        trl_dpo({k: v[b : b + 1] for k, v in batch.items()}, beta, ("sigmoid", "sft"), (1.0, alpha))[0]
        for b in range(3)
    ]
    loss, metrics = L.rpo_loss(**batch, beta=beta, alpha=alpha)
    _assert_close(loss, torch.stack(per_pair).mean())
    # Equal chosen lengths: one batched TRL call agrees too (token mean == mean of sequence means).
    eq = dict(batch)
    eq["mask_chosen"] = torch.zeros_like(batch["mask_chosen"])
    eq["mask_chosen"][:, 1:4] = True
    t_loss, t_metrics, t_gc, _ = trl_dpo(eq, beta, ("sigmoid", "sft"), (1.0, alpha))
    ours = _leaves(eq)
    loss, metrics = L.rpo_loss(**ours, beta=beta, alpha=alpha)
    loss.backward()
    _assert_close(loss, t_loss)
    _assert_close(metrics["rewards/margins"], t_metrics["rewards/margins"])
    m = eq["mask_chosen"]
    _assert_close(ours["policy_chosen"].grad[m], t_gc[m])


def test_cdpo_matches_trl_on_preweighted_logps():
    batch = _pair_batch(seed=4)
    g = torch.Generator().manual_seed(0)
    wc = torch.rand(batch["policy_chosen"].shape, generator=g)
    wr = torch.rand(batch["policy_rejected"].shape, generator=g)
    t_loss, t_metrics, t_gc, t_gr = trl_dpo(batch, 0.2, weights_chosen=wc, weights_rejected=wr)
    ours = _leaves(batch)
    loss, metrics = L.cdpo_loss(**ours, beta=0.2, weights_chosen=wc,
                                weights_rejected=_with_garbage(wr, batch["mask_rejected"]))
    loss.backward()
    _assert_close(loss, t_loss)
    _assert_close(metrics["rewards/chosen"], t_metrics["rewards/chosen"])
    _assert_close(metrics["rewards/rejected"], t_metrics["rewards/rejected"])
    mr = batch["mask_rejected"]
    _assert_close(ours["policy_rejected"].grad[mr], t_gr[mr])
    assert torch.isfinite(ours["policy_rejected"].grad).all()


# ---------------------------------------------------------------------------- float64 gradients


def _weights(batch, seed=7):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(batch["policy_chosen"].shape, generator=g) + 0.1,
            torch.rand(batch["policy_rejected"].shape, generator=g) + 0.1)


CASES = ["dpo", "dpo_ls", "cdpo", "cdpo_pce", "rpo", "sft"]


@pytest.mark.parametrize("case", CASES)
def test_loss_gradients_match_float64_naive(case):
    batch = _pair_batch(seed=11)
    wc, wr = _weights(batch)
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    beta = 0.4
    # Our inputs: float32 leaves with garbage in masked slots.
    pc = _with_garbage(batch["policy_chosen"], mc).requires_grad_()
    pr = _with_garbage(batch["policy_rejected"], mr).requires_grad_()
    rc, rr = _with_garbage(batch["ref_chosen"], mc), _with_garbage(batch["ref_rejected"], mr)
    # Reference: float64 leaves with clean values.
    pc64 = batch["policy_chosen"].double().requires_grad_()
    pr64 = batch["policy_rejected"].double().requires_grad_()
    rc64, rr64 = batch["ref_chosen"].double(), batch["ref_rejected"].double()
    args = (pc, pr, rc, rr, mc, mr)
    args64 = (pc64, pr64, rc64, rr64, mc, mr)
    if case == "dpo":
        loss = L.dpo_loss(*args, beta=beta)[0]
        ref = naive_dpo(*args64, beta)
    elif case == "dpo_ls":
        loss = L.dpo_loss(*args, beta=beta, label_smoothing=0.15)[0]
        ref = naive_dpo(*args64, beta, ls=0.15)
    elif case == "cdpo":
        loss = L.cdpo_loss(*args, beta=beta, weights_rejected=_with_garbage(wr, mr))[0]
        ref = naive_dpo(*args64, beta, wr=wr)
    elif case == "cdpo_pce":
        p_ce_r, p_ce_c = wr.clamp(max=1), wc.clamp(max=1)
        w_c, w_r = L.cdpo_weights(p_ce_r, p_ce_chosen=p_ce_c, chosen_weighting="p_ce")
        loss = L.cdpo_loss(*args, beta=beta, weights_rejected=w_r, weights_chosen=w_c)[0]
        ref = naive_dpo(*args64, beta, wc=[[float(v) for v in r] for r in p_ce_c],
                        wr=[[1.0 - float(v) for v in r] for r in p_ce_r])
    elif case == "rpo":
        loss = L.rpo_loss(*args, beta=beta, alpha=0.8)[0]
        ref = naive_rpo(*args64, beta, 0.8)
    else:
        loss = L.sft_loss(pc, mc)[0]
        n = int(mc.sum())
        ref = -naive_sum(pc64, mc).sum() / n
    loss.backward()
    ref.backward()
    _assert_close(loss, ref)
    _assert_close(pc.grad, pc64.grad)  # includes exact 0 at masked slots
    if case != "sft":
        _assert_close(pr.grad, pr64.grad)
        assert pr64.grad.abs().sum() > 0
    assert pc64.grad.abs().sum() > 0


def test_cdpo_all_ones_equals_dpo_and_pce_weights_change_it():
    batch = _pair_batch(seed=5)
    dpo, dpo_m = L.dpo_loss(**batch, beta=0.1)
    ones_r = torch.ones_like(batch["policy_rejected"])
    cdpo, cdpo_m = L.cdpo_loss(**batch, beta=0.1, weights_rejected=ones_r)
    assert torch.equal(dpo, cdpo)
    for k in dpo_m:
        assert torch.equal(dpo_m[k], cdpo_m[k])
    p_ce = torch.rand(batch["policy_rejected"].shape, generator=torch.Generator().manual_seed(1))
    w_c, w_r = L.cdpo_weights(p_ce)
    assert w_c is None
    _assert_close(w_r, 1 - p_ce)
    weighted, _ = L.cdpo_loss(**batch, beta=0.1, weights_rejected=w_r, weights_chosen=w_c)
    assert abs(float(weighted) - float(dpo)) > 1e-4
    w_c2, _ = L.cdpo_weights(p_ce, p_ce_chosen=torch.rand(3, 6), chosen_weighting="only_neg")
    assert torch.equal(w_c2, torch.ones(3, 6))
    with pytest.raises(ValueError):
        L.cdpo_weights(p_ce, chosen_weighting="p_ce")
    with pytest.raises(ValueError):
        L.cdpo_weights(p_ce, chosen_weighting="both")


def test_metrics_values():
    batch = _pair_batch(seed=6)
    beta = 0.3
    _, m = L.dpo_loss(**batch, beta=beta)
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    rc = beta * (naive_sum(batch["policy_chosen"], mc) - naive_sum(batch["ref_chosen"], mc))
    rr = beta * (naive_sum(batch["policy_rejected"], mr) - naive_sum(batch["ref_rejected"], mr))
    _assert_close(m["rewards/chosen"], rc.mean())
    _assert_close(m["rewards/rejected"], rr.mean())
    _assert_close(m["rewards/accuracies"], (rc > rr).double().mean())
    _assert_close(m["logps/chosen"], naive_sum(batch["policy_chosen"], mc).mean())
    _assert_close(m["nll"], -naive_sum(batch["policy_chosen"], mc).sum() / int(mc.sum()))
    assert all(v.dtype == torch.float32 and not v.requires_grad for v in m.values())


# ---------------------------------------------------------------------------- masking invariance


def _all_losses(batch, kl_c, kl_r, wr):
    return {
        "sft": L.sft_loss(batch["policy_chosen"], batch["mask_chosen"]),
        "dpo": L.dpo_loss(**batch, label_smoothing=0.1),
        "rpo": L.rpo_loss(**batch),
        "cdpo": L.cdpo_loss(**batch, weights_rejected=wr, weights_chosen=wr.new_ones(3, 6) * 0.5),
        "tdpo1": L.tdpo_loss(**batch, kl_chosen=kl_c, kl_rejected=kl_r, variant=1),
        "tdpo2": L.tdpo_loss(**batch, kl_chosen=kl_c, kl_rejected=kl_r, variant=2),
    }


def test_masked_slots_never_change_any_loss():
    batch = _pair_batch(seed=8)
    kl_c, kl_r = torch.rand(3), torch.rand(3)
    wr = torch.rand(batch["policy_rejected"].shape)
    clean = _all_losses(batch, kl_c, kl_r, wr)
    dirty_batch = dict(batch)
    for k in ("policy_chosen", "ref_chosen"):
        dirty_batch[k] = _with_garbage(batch[k], batch["mask_chosen"], seed=len(k))
    for k in ("policy_rejected", "ref_rejected"):
        dirty_batch[k] = _with_garbage(batch[k], batch["mask_rejected"], seed=len(k))
    dirty = _all_losses(dirty_batch, kl_c, kl_r, _with_garbage(wr, batch["mask_rejected"]))
    for name in clean:
        assert torch.equal(clean[name][0], dirty[name][0]), name
        assert torch.isfinite(dirty[name][0]), name
        for k in clean[name][1]:
            assert torch.equal(clean[name][1][k], dirty[name][1][k]), (name, k)


def _logits_case(seed=0, B=3, T=5, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:] = True
    mask[1, :4] = True
    mask[2, 1:3] = True
    return logits, labels, mask


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 64])
def test_token_logprobs_ignores_masked_logits_and_labels(chunk_size):
    logits, labels, mask = _logits_case()
    clean = logits.clone().requires_grad_()
    out_clean = O.token_logprobs(clean, labels, mask, chunk_size=chunk_size)
    dirty = _with_garbage(logits, mask).requires_grad_()
    bad_labels = torch.where(mask, labels, torch.full_like(labels, -100))
    out_dirty = O.token_logprobs(dirty, bad_labels, mask, chunk_size=chunk_size)
    assert torch.equal(out_clean, out_dirty)
    assert torch.all(out_dirty[~mask] == 0)
    coef = torch.randn(out_clean.shape, generator=torch.Generator().manual_seed(3))
    (out_clean * coef).sum().backward()
    (out_dirty * coef).sum().backward()
    assert torch.isfinite(dirty.grad).all()
    assert torch.equal(clean.grad, dirty.grad)
    assert torch.all(dirty.grad[~mask] == 0)


# ---------------------------------------------------------------------------- token log-probs


def test_token_logprobs_chunked_unchunked_hidden_and_float64():
    g = torch.Generator().manual_seed(21)
    B, T, H, V = 3, 5, 6, 13
    _, labels, mask = _logits_case(seed=4, B=B, T=T, V=V)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    bias = torch.randn(V, generator=g)
    coef = torch.randn(B, T, generator=g)

    # float64 naive reference and its gradients.
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    logits64 = h64 @ w64.T + b64
    ref = naive_log_softmax_at(logits64, labels, mask)
    (ref * coef.double()).sum().backward()

    results = {}
    for name in ("unchunked", "chunked", "hidden"):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        if name == "hidden":
            out = cdpo_head.token_logprobs_from_hidden(h, w, labels, mask, bias=b, chunk_size=2)
        else:
            logits = h @ w.T + b
            out = O.token_logprobs(logits, labels, mask, chunk_size=None if name == "unchunked" else 3)
        (out * coef).sum().backward()
        assert out.dtype == torch.float32
        _assert_close(out, ref)
        _assert_close(h.grad, h64.grad)
        _assert_close(w.grad, w64.grad)
        _assert_close(b.grad, b64.grad)
        results[name] = out.detach()
    _assert_close(results["chunked"], results["unchunked"], tol=1e-6)
    _assert_close(results["hidden"], results["unchunked"], tol=1e-6)
    # no grad: the hidden-state version also works without autograd bookkeeping
    with torch.no_grad():
        _assert_close(cdpo_head.token_logprobs_from_hidden(hidden, weight, labels, mask, bias=bias), ref)


def test_token_logprobs_upcasts_half_precision():
    logits, labels, mask = _logits_case(seed=9)
    lb = logits.bfloat16()
    ref = naive_log_softmax_at(lb.double(), labels, mask)
    for cs in (None, 2):
        out = O.token_logprobs(lb, labels, mask, chunk_size=cs)
        assert out.dtype == torch.float32
        _assert_close(out, ref)
    x = lb.clone().requires_grad_()
    O.token_logprobs(x, labels, mask, chunk_size=2).sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_sequence_logps():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    w = torch.tensor([[0.5, 2.0, float("inf")], [9.0, 1.0, 0.25]])
    assert torch.equal(L.sequence_logps(x, m), torch.tensor([3.0, 11.0]))
    assert torch.equal(L.sequence_logps(x, m, w), torch.tensor([4.5, 6.5]))


# ---------------------------------------------------------------------------- TDPO


def _kl_case(seed=0, B=2, T=4, V=5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(B, T, V, generator=g) * 2
    pol = torch.randn(B, T, V, generator=g) * 2
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 0] = False
    mask[1, T - 1] = False
    # Zero-probability reference entries: exact -inf and underflow to 0 in float32 and float64.
    ref[0, 1, 2] = -float("inf")
    ref[1, 0, 0] = -1e4
    ref[1, 1, :] = torch.tensor([0.0, -1e4, -float("inf"), -1e4, 3.0])
    return ref, pol, mask


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_sequential_kl_matches_double_loop(chunk_size):
    ref, pol, mask = _kl_case()
    pol_leaf = pol.clone().requires_grad_()
    kl = cdpo_head.sequential_kl_from_logits(_with_garbage(ref, mask), pol_leaf, mask, chunk_size=chunk_size)
    pol64 = pol.double().requires_grad_()
    kl64 = naive_kl(ref, pol64, mask)
    assert torch.isfinite(kl).all() and kl.dtype == torch.float32
    _assert_close(kl, kl64)
    coef = torch.tensor([0.7, -1.3])
    (kl * coef).sum().backward()
    (kl64 * coef.double()).sum().backward()
    assert torch.isfinite(pol_leaf.grad).all()
    _assert_close(pol_leaf.grad, pol64.grad)
    # KL(p || p) = 0 and KL >= 0
    _assert_close(cdpo_head.sequential_kl_from_logits(ref, ref.clone(), mask), torch.zeros(2))
    assert (kl > 0).all()


def test_sequential_kl_gradient_wrt_ref_is_finite():
    ref, pol, mask = _kl_case(seed=3)
    r = ref.clone().requires_grad_()
    cdpo_head.sequential_kl_from_logits(r, pol, mask).sum().backward()
    assert torch.isfinite(r.grad).all()


def _tdpo_inputs(seed=0):
    """Chosen/rejected logits for policy and reference; ref has -inf and underflowing entries."""
    ref_c, pol_c, mask_c = _kl_case(seed=seed)
    ref_r, pol_r, mask_r = _kl_case(seed=seed + 1, T=3)
    mask_r[:, 2] = False
    mask_r[0, 0] = True
    g = torch.Generator().manual_seed(seed)
    labels_c = torch.randint(5, mask_c.shape, generator=g)
    labels_r = torch.randint(5, mask_r.shape, generator=g)
    # Labels avoid the reference's zero-probability entries (the log-ratio would be infinite).
    for labels in (labels_c, labels_r):
        labels[0, 1], labels[1, 0], labels[1, 1] = 1, 3, 0
    return (ref_c, pol_c, mask_c, labels_c), (ref_r, pol_r, mask_r, labels_r)


def _tdpo_ours(chosen, rejected, variant, beta, alpha, pol_c, pol_r):
    (ref_c, _, mc, yc), (ref_r, _, mr, yr) = chosen, rejected
    return L.tdpo_loss(
        O.token_logprobs(pol_c, yc, mc, chunk_size=2), O.token_logprobs(pol_r, yr, mr),
        O.token_logprobs(ref_c, yc, mc), O.token_logprobs(ref_r, yr, mr), mc, mr,
        cdpo_head.sequential_kl_from_logits(ref_c, pol_c, mc, chunk_size=3),
        cdpo_head.sequential_kl_from_logits(ref_r, pol_r, mr),
        beta=beta, alpha=alpha, variant=variant,
    )


def _tdpo_naive(chosen, rejected, variant, beta, alpha, pol_c, pol_r, detach_kl_c):
    (ref_c, _, mc, yc), (ref_r, _, mr, yr) = chosen, rejected
    m_c = naive_sum(naive_log_softmax_at(pol_c, yc, mc) - naive_log_softmax_at(ref_c, yc, mc), mc)
    m_r = naive_sum(naive_log_softmax_at(pol_r, yr, mr) - naive_log_softmax_at(ref_r, yr, mr), mr)
    kl_c, kl_r = naive_kl(ref_c, pol_c, mc), naive_kl(ref_r, pol_r, mr)
    if detach_kl_c:
        kl_c = kl_c.detach()
    a = 1.0 if variant == 1 else alpha
    return -naive_logsig(beta * ((m_c - m_r) - a * (kl_r - kl_c))).mean()


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_gradients_match_float64_naive(variant):
    chosen, rejected = _tdpo_inputs()
    beta, alpha = 0.5, 0.5
    pc, pr = chosen[1].clone().requires_grad_(), rejected[1].clone().requires_grad_()
    loss, metrics = _tdpo_ours(chosen, rejected, variant, beta, alpha, pc, pr)
    loss.backward()
    pc64, pr64 = chosen[1].double().requires_grad_(), rejected[1].double().requires_grad_()
    ref = _tdpo_naive(chosen, rejected, variant, beta, alpha, pc64, pr64, detach_kl_c=variant == 2)
    ref.backward()
    assert torch.isfinite(loss)
    _assert_close(loss, ref)
    _assert_close(pc.grad, pc64.grad)
    _assert_close(pr.grad, pr64.grad)
    _assert_close(metrics["kl/chosen"], naive_kl(chosen[0], chosen[1], chosen[2]).mean())
    _assert_close(metrics["kl/rejected"], naive_kl(rejected[0], rejected[1], rejected[2]).mean())


def test_tdpo1_and_tdpo2_differ_in_kl_gradient():
    g = torch.Generator().manual_seed(2)
    batch = _pair_batch(seed=9)
    kl_c0, kl_r0 = torch.rand(3, generator=g), torch.rand(3, generator=g)
    beta, alpha = 0.5, 0.5
    grads = {}
    for variant in (1, 2):
        kl_c, kl_r = kl_c0.clone().requires_grad_(), kl_r0.clone().requires_grad_()
        loss, _ = L.tdpo_loss(
            **batch, kl_chosen=kl_c, kl_rejected=kl_r, beta=beta, alpha=alpha, variant=variant
        )
        loss.backward()
        grads[variant] = (kl_c.grad, kl_r.grad, loss.detach())
    # TDPO2: no gradient through KL_c; TDPO1: d/dKL_c = -d/dKL_r (unit coefficients).
    assert grads[2][0] is None or torch.all(grads[2][0] == 0)  # None: KL_c is not in the graph
    assert torch.all(grads[1][0].abs() > 0)
    _assert_close(grads[1][0], -grads[1][1])
    # Analytic: dL/dKL_r = beta * a * sigmoid(-beta z) / B, with z recomputed in float64.
    mc, mr = batch["mask_chosen"], batch["mask_rejected"]
    m_c = naive_sum(batch["policy_chosen"], mc) - naive_sum(batch["ref_chosen"], mc)
    m_r = naive_sum(batch["policy_rejected"], mr) - naive_sum(batch["ref_rejected"], mr)
    for variant, a in ((1, 1.0), (2, alpha)):
        z = (m_c - m_r) - a * (kl_r0.double() - kl_c0.double())
        _assert_close(grads[variant][1], beta * a * torch.sigmoid(-beta * z) / 3)
    # End to end: TDPO2's policy gradient equals the one with KL_c treated as a constant; TDPO1's not.
    chosen, rejected = _tdpo_inputs(seed=5)
    out = {}
    for variant in (1, 2):
        pc = chosen[1].clone().requires_grad_()
        _tdpo_ours(chosen, rejected, variant, beta, 1.0, pc, rejected[1])[0].backward()
        out[variant] = pc.grad
    pc64 = chosen[1].double().requires_grad_()
    _tdpo_naive(chosen, rejected, 2, beta, 1.0, pc64, rejected[1].double(), detach_kl_c=True).backward()
    _assert_close(out[2], pc64.grad)
    assert (out[1] - out[2]).abs().max() > 1e-4


def test_tdpo_rejects_unknown_variant():
    batch = _pair_batch()
    with pytest.raises(ValueError):
        L.tdpo_loss(**batch, kl_chosen=torch.zeros(3), kl_rejected=torch.zeros(3), variant=3)


# ---------------------------------------------------------------------------- objectives registry


def test_objectives_dispatch_to_the_loss_functions_and_refuse_unknown_methods():
    from cdpo.objectives import METHODS, PairLogps, build

    batch = _pair_batch(seed=12)
    assert {"dpo", "rpo", "cdpo", "tokendpo", "simpo", "ipo"} <= set(METHODS)
    logps = PairLogps(batch["policy_chosen"], batch["policy_rejected"], batch["mask_chosen"], batch["mask_rejected"],
                      ref_chosen=batch["ref_chosen"], ref_rejected=batch["ref_rejected"])
    direct = L.dpo_loss(**batch, beta=0.2)[0]
    assert torch.equal(build("dpo", beta=0.2).loss(logps)[0], direct)
    wr = torch.rand(batch["policy_rejected"].shape)
    logps.weights_rejected = wr
    assert torch.equal(build("cdpo").loss(logps)[0], L.cdpo_loss(**batch, weights_rejected=wr)[0])
    kl = dict(kl_chosen=torch.rand(3), kl_rejected=torch.rand(3))
    logps.kl_chosen, logps.kl_rejected = kl["kl_chosen"], kl["kl_rejected"]
    assert torch.equal(build("tokendpo").loss(logps)[0], L.tdpo_loss(**batch, **kl)[0])
    assert math.isfinite(float(build("rpo").loss(logps)[0]))
    with pytest.raises(ValueError, match="baseline.*sft.*dpo.*tokendpo.*rpo"):
        build("bogus")
