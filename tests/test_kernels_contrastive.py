"""Contrastive scoring p_ce from hidden states (shared head: one GEMM; two heads) against
float64 full-logits references and cdpo.contrastive."""

import importlib.util

import pytest
import torch

import cdpo_kernels as ck
from cdpo_kernels import reference
from cdpo_kernels.testing import random_problem

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton missing"))]


def _neg(p, dtype, seed, bias):
    q = random_problem(dtype=dtype, bias=bias, seed=seed)
    return q["hidden"], q["weight"], q["bias"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", ["shared", "shared+bias_neg", "two"])
def test_contrastive_probs(backend, dtype, heads):
    p = random_problem(dtype=dtype, bias=True, seed=21)
    h_neg, w_neg, b_neg = _neg(p, dtype, 22, bias=True)
    kw = dict(bias=p["bias"])
    if heads == "shared+bias_neg":
        kw["bias_neg"] = b_neg
    if heads == "two":
        kw.update(weight_neg=w_neg, bias_neg=b_neg)
    for b in (1.0, 0.5, 0.0):
        got = ck.contrastive_token_probs(p["hidden"], h_neg, p["weight"], p["labels"], p["mask"], b=b,
                                         backend=backend, **kw)
        want = reference.contrastive_token_probs(p["hidden"], h_neg, p["weight"], p["labels"], p["mask"], b=b,
                                                 dtype=torch.float64, **kw)
        assert got.dtype == torch.float32 and torch.all(got[~p["mask"]] == 0)
        # bf16 too: (1+b) h_pos - b h_neg is combined in fp32, never rounded to bf16 (issue 11, item 8).
        assert (got.double() - want).abs().max() < 1e-5, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_cdpo_contrastive(backend):
    contrastive = pytest.importorskip("cdpo.contrastive")
    p = random_problem(bias=True, seed=23)
    h_neg, w_neg, b_neg = _neg(p, torch.float32, 24, bias=True)
    for kw in (dict(), dict(weight_neg=w_neg, bias_neg=b_neg)):
        got = ck.contrastive_token_probs(p["hidden"], h_neg, p["weight"], p["labels"], p["mask"], b=1.0,
                                         bias=p["bias"], backend=backend, **kw)
        want = contrastive.contrastive_token_probs_from_hidden(p["hidden"], h_neg, p["weight"], p["labels"],
                                                               p["mask"], b=1.0, bias=p["bias"], **kw)
        assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_neg", [False, True])
def test_bf16_shared_head_matches_torch_path(backend, bias_neg):
    """bf16 hidden states and head: the fused scoring and cdpo.contrastive's torch path both combine
    (1+b) h_pos - b h_neg in fp32, so they agree with each other and with float64 to fp32 accuracy.
    Rounding the combination to bf16 first (the old fused path) is off by 1e-4 to 4e-4 here."""
    contrastive = pytest.importorskip("cdpo.contrastive")
    size = dict(B=3, T=17, H=64, V=300, dtype=torch.bfloat16, bias=True, scale=0.3)
    p, q = random_problem(seed=31, **size), random_problem(seed=32, **size)
    h_neg, b_neg = q["hidden"], q["bias"]
    kw = dict(bias=p["bias"], bias_neg=b_neg if bias_neg else None)
    for b in (1.0, 0.5, 2.0):
        fused = ck.contrastive_token_probs(p["hidden"], h_neg, p["weight"], p["labels"], p["mask"], b=b,
                                           backend=backend, **kw)
        torch_path = contrastive.contrastive_token_probs_from_hidden(p["hidden"], h_neg, p["weight"], p["labels"],
                                                                     p["mask"], b=b, **kw)
        # independent reference: naive float64 softmax over the full logits
        hp, hn, w = p["hidden"].double(), h_neg.double(), p["weight"].double()
        bias64 = p["bias"].double()
        comb_bias = (1 + b) * bias64 - b * b_neg.double() if bias_neg else bias64
        z = ((1 + b) * hp - b * hn) @ w.T + comb_bias
        want = torch.softmax(z, -1).gather(-1, p["labels"].clamp(min=0)[..., None]).squeeze(-1)
        want = want.masked_fill(~p["mask"], 0)
        assert (fused.double() - want).abs().max() < 1e-5, b
        assert (torch_path.double() - want).abs().max() < 1e-5, b
        assert (fused - torch_path).abs().max() < 1e-5, b


def test_same_model_gives_plain_probs():
    """pos == neg: (1+b) z - b z = z, so p_ce is the model's own softmax probability."""
    p = random_problem(seed=25)
    got = ck.contrastive_token_probs(p["hidden"], p["hidden"], p["weight"], p["labels"], p["mask"], b=1.0)
    lp = reference.token_logprobs(p["hidden"], p["weight"], p["labels"], p["mask"], dtype=torch.float64)
    assert (got.double() - torch.where(p["mask"], lp.exp(), 0.0)).abs().max() < 1e-5


def test_no_autograd_graph():
    p = random_problem(seed=26)
    h = p["hidden"].requires_grad_()
    got = ck.contrastive_token_probs(h, p["hidden"].detach(), p["weight"], p["labels"], p["mask"])
    assert not got.requires_grad
