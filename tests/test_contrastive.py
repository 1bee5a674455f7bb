"""cdpo.contrastive against a naive float64 full-softmax computation, token by token."""

import pytest
import torch

from cdpo.contrastive import contrastive_token_probs_from_hidden, scored_responses
from oracles import contrastive_token_probs

B, T, H, V = 3, 6, 5, 9


def _case(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(B, T, V, generator=g) * scale
    neg = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0, 2:] = True  # left-padded / prompt first
    mask[1, :4] = True  # right-padded
    mask[2, 1:5] = True
    return pos, neg, labels, mask


def naive_p_ce(pos, neg, labels, mask, b):
    """float64, one token at a time: exp(z_y) / sum_v exp(z_v) with z = (1+b) z_pos - b z_neg."""
    out = torch.zeros(pos.shape[:2], dtype=torch.float64)
    for i in range(pos.shape[0]):
        for t in range(pos.shape[1]):
            if not mask[i, t]:
                continue
            z = [(1 + b) * float(p) - b * float(n) for p, n in zip(pos[i, t], neg[i, t])]
            top = max(z)
            num = torch.exp(torch.tensor(z[int(labels[i, t])] - top, dtype=torch.float64))
            den = sum(torch.exp(torch.tensor(v - top, dtype=torch.float64)) for v in z)
            out[i, t] = num / den
    return out


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("b", [0.0, 1.0, 2.0])
def test_matches_naive_float64(b):
    pos, neg, labels, mask = _case(seed=int(b))
    p = contrastive_token_probs(pos, neg, labels, mask, b=b, chunk_size=4)
    assert p.dtype == torch.float32 and p.shape == (B, T)
    _close(p, naive_p_ce(pos, neg, labels, mask, b))
    assert torch.all(p[~mask] == 0)
    assert torch.all((p[mask] > 0) & (p[mask] < 1))


def test_b0_is_positive_model_probability():
    pos, neg, labels, mask = _case(seed=5)
    neg = torch.full_like(neg, float("inf"))  # b = 0 must not even look at the negative model
    p = contrastive_token_probs(pos, neg, labels, mask, b=0.0)
    ref = torch.softmax(pos.double(), -1).gather(-1, labels[..., None]).squeeze(-1)
    _close(p, torch.where(mask, ref, 0.0))


def test_b_changes_the_estimate_in_the_contrastive_direction():
    # A token the negative model likes more than the positive one loses probability as b grows.
    pos = torch.zeros(1, 1, 4)
    neg = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]])
    labels, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    ps = [float(contrastive_token_probs(pos, neg, labels, mask, b=b)) for b in (0.0, 1.0, 2.0)]
    assert ps[0] == pytest.approx(0.25)
    assert ps[0] > ps[1] > ps[2]


def test_chunk_size_does_not_change_results():
    pos, neg, labels, mask = _case(seed=7)
    full = contrastive_token_probs(pos, neg, labels, mask, b=1.0, chunk_size=1000)
    for cs in (1, 2, 3):
        _close(contrastive_token_probs(pos, neg, labels, mask, b=1.0, chunk_size=cs), full, tol=1e-7)


def test_masked_positions_are_never_read():
    pos, neg, labels, mask = _case(seed=8)
    clean = contrastive_token_probs(pos, neg, labels, mask)
    m = mask[..., None]
    dirty = contrastive_token_probs(
        torch.where(m, pos, float("nan")), torch.where(m, neg, 1e30),
        torch.where(mask, labels, -100), mask, chunk_size=2,
    )
    assert torch.equal(clean, dirty)


def test_numerically_stable_for_huge_logits_and_half_precision():
    pos, neg, labels, mask = _case(seed=9, scale=3e3)
    p = contrastive_token_probs(pos, neg, labels, mask, b=1.0)
    assert torch.isfinite(p).all()
    _close(p, naive_p_ce(pos, neg, labels, mask, 1.0), tol=1e-5)
    pb, nb = pos.bfloat16() / 1e3, neg.bfloat16() / 1e3
    expected = naive_p_ce(pb.double(), nb.double(), labels, mask, 1.0)
    _close(contrastive_token_probs(pb, nb, labels, mask), expected)
    # A vocabulary entry impossible under both models (log-probs as logits) stays impossible.
    pos2, neg2 = torch.log_softmax(pos / 1e3, -1), torch.log_softmax(neg / 1e3, -1)
    pos2[..., 0] = neg2[..., 0] = -float("inf")
    labels2 = labels.clamp(min=1)
    p2 = contrastive_token_probs(pos2, neg2, labels2, mask)
    assert torch.isfinite(p2).all()
    _close(p2, naive_p_ce(pos2[..., 1:], neg2[..., 1:], labels2 - 1, mask, 1.0))


def _hidden_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_pos, h_neg = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g)
    w, w_neg = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    bias, bias_neg = torch.randn(V, generator=g), torch.randn(V, generator=g)
    _, _, labels, mask = _case(seed)
    return h_pos, h_neg, w, w_neg, bias, bias_neg, labels, mask


@pytest.mark.parametrize("b", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_shared_head_matches_logits_version(b, with_bias):
    h_pos, h_neg, w, _, bias, _, labels, mask = _hidden_case(seed=3)
    bias = bias if with_bias else None
    logits = lambda h: h.double() @ w.double().T + (bias.double() if bias is not None else 0)  # noqa: E731
    expected = naive_p_ce(logits(h_pos), logits(h_neg), labels, mask, b)
    got = contrastive_token_probs_from_hidden(h_pos, h_neg, w, labels, mask, b=b, bias=bias, chunk_size=2)
    _close(got, expected, tol=1e-5)
    via_logits = contrastive_token_probs(logits(h_pos).float(), logits(h_neg).float(), labels, mask, b=b)
    _close(got, via_logits, tol=1e-5)


@pytest.mark.parametrize("b", [1.0, 2.0])
def test_two_heads_and_distinct_biases(b):
    h_pos, h_neg, w, w_neg, bias, bias_neg, labels, mask = _hidden_case(seed=4)
    zp = h_pos.double() @ w.double().T + bias.double()
    zn = h_neg.double() @ w_neg.double().T + bias_neg.double()
    got = contrastive_token_probs_from_hidden(
        h_pos, h_neg, w, labels, mask, b=b, bias=bias, weight_neg=w_neg, bias_neg=bias_neg, chunk_size=3
    )
    _close(got, naive_p_ce(zp, zn, labels, mask, b), tol=1e-5)
    # Shared weight, different biases: still one matmul, bias combined as (1+b) bias - b bias_neg.
    zn_shared = h_neg.double() @ w.double().T + bias_neg.double()
    got_shared = contrastive_token_probs_from_hidden(
        h_pos, h_neg, w, labels, mask, b=b, bias=bias, bias_neg=bias_neg, chunk_size=1
    )
    _close(got_shared, naive_p_ce(zp, zn_shared, labels, mask, b), tol=1e-5)


def test_hidden_version_ignores_masked_rows_and_chunking():
    h_pos, h_neg, w, _, bias, _, labels, mask = _hidden_case(seed=6)
    ref = contrastive_token_probs_from_hidden(h_pos, h_neg, w, labels, mask, bias=bias, chunk_size=100)
    m = mask[..., None]
    for cs in (1, 4):
        got = contrastive_token_probs_from_hidden(
            torch.where(m, h_pos, float("nan")), torch.where(m, h_neg, float("inf")), w,
            torch.where(mask, labels, -100), mask, bias=bias, chunk_size=cs,
        )
        _close(got, ref, tol=1e-7)
        assert torch.all(got[~mask] == 0)


def test_scored_responses_aligns_ids_and_probs():
    pos, neg, labels, mask = _case(seed=10)
    labels = torch.where(mask, labels, -100)  # padding/prompt labels as a collator would leave them
    p = contrastive_token_probs(pos, neg, labels, mask)
    rows = scored_responses(labels, mask, p)
    assert len(rows) == B
    # Row 0 is left-padded (positions 2..5), row 1 right-padded (0..3), row 2 in the middle (1..4).
    spans = [range(2, 6), range(0, 4), range(1, 5)]
    for i, (row, span) in enumerate(zip(rows, spans)):
        assert set(row) == {"token_ids", "p_ce"}
        assert row["token_ids"] == [int(labels[i, t]) for t in span]
        assert row["p_ce"] == [float(p[i, t]) for t in span]
        assert len(row["token_ids"]) == len(row["p_ce"])
        assert -100 not in row["token_ids"]
        assert all(type(x) is int for x in row["token_ids"])
        assert all(type(x) is float for x in row["p_ce"])
    with pytest.raises(ValueError):
        scored_responses(labels, mask, p[:, :-1])
