"""LightningModules against independent computations on a tiny Llama with LoRA adapters.

"Independent" means: per row, the unpadded prompt+response goes through `model(input_ids).logits`,
then log_softmax and gather; the reference is a separate copy of the base model that never had an
adapter. The modules instead run the chunked hidden-state path on padded batches.
"""

import math
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cdpo import head, losses  # noqa: E402
from oracles import contrastive_token_probs  # noqa: E402
from cdpo.data.collate import collate_pairs, collate_sequences  # noqa: E402
from cdpo.models import add_lora, reference_model, tiny_llama, use_adapter  # noqa: E402
from cdpo.modules import ContrastiveScorer, PairsDataModule, PreferenceModule, SequencesDataModule, SFTModule  # noqa: E402
from cdpo.objectives import build  # noqa: E402



PAD = 2
LORA = dict(r=4, alpha=8, dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
BETA = 0.1


def _perturb(model, adapter: str, seed: int, scale: float = 0.3):
    """LoRA B starts at zero (policy == reference); give it weights so that the adapter matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _policy(seed=0):
    with torch.random.fork_rng(devices=[]):  # LoRA A is drawn from the global RNG: same policy in any test order
        torch.manual_seed(seed)
        model = add_lora(tiny_llama(seed=0), "policy", **LORA)
    _perturb(model, "policy", seed=seed + 1)
    return model


def _pairs(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, 128, (k,), generator=gen).tolist()  # noqa: E731
    spec = [(4, 5, 7), (7, 3, 2), (2, 6, 4), (5, 4, 5)][:n]
    items = []
    for lp, lc, lr in spec:
        items.append({
            "prompt_ids": rand(lp), "chosen_ids": rand(lc), "rejected_ids": rand(lr),
            "chosen_p_ce": torch.rand(lc, generator=gen).tolist(),
            "rejected_p_ce": torch.rand(lr, generator=gen).tolist(),
        })
    return items


def _row_logits(model, prompt, response):
    with torch.no_grad():
        return model(torch.tensor([prompt + response])).logits[0].float()  # [L, V]


def _row_token_logps(model, prompt, response):
    """Log-probs of the response tokens from a full forward of the unpadded row."""
    logp = torch.log_softmax(_row_logits(model, prompt, response), dim=-1)
    start = len(prompt)
    return torch.stack([logp[start + i - 1, t] for i, t in enumerate(response)])


def _place(per_row, mask):
    """[B, L-1] tensor holding each row's per-token values at its masked positions."""
    out = torch.zeros(mask.shape)
    for b, values in enumerate(per_row):
        out[b, mask[b]] = values
    return out


def _independent(model, ref, items, side):
    pol = [_row_token_logps(model, it["prompt_ids"], it[f"{side}_ids"]) for it in items]
    rf = [_row_token_logps(ref, it["prompt_ids"], it[f"{side}_ids"]) for it in items]
    return pol, rf


@pytest.fixture(scope="module")
def setup():
    policy = _policy()
    ref = tiny_llama(seed=0)  # the base model before any adapter was added
    items = _pairs()
    pc, rc = _independent(policy, ref, items, "chosen")
    pr, rr = _independent(policy, ref, items, "rejected")
    return dict(policy=policy, ref=ref, items=items, pol_c=pc, ref_c=rc, pol_r=pr, ref_r=rr)


def _sums(setup):
    s = lambda rows: torch.stack([r.sum() for r in rows])  # noqa: E731
    return s(setup["pol_c"]) - s(setup["ref_c"]), s(setup["pol_r"]) - s(setup["ref_r"])


# ------------------------------------------------------------------ preference losses


@pytest.mark.parametrize("side", ["right", "left"])
def test_dpo_matches_independent_logps(setup, side):
    batch = collate_pairs(setup["items"], pad_id=PAD, padding_side=side)
    module = PreferenceModule(setup["policy"], build("dpo", beta=BETA))
    with torch.no_grad():
        loss, metrics = module.compute_loss(batch)
    mc, mr = batch["chosen"]["mask"], batch["rejected"]["mask"]
    expected, exp_metrics = losses.dpo_loss(
        _place(setup["pol_c"], mc), _place(setup["pol_r"], mr), _place(setup["ref_c"], mc),
        _place(setup["ref_r"], mr), mc, mr, beta=BETA)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # by hand: -log sigmoid(beta * (sum D_c - sum D_r))
    d_c, d_r = _sums(setup)
    torch.testing.assert_close(loss, -F.logsigmoid(BETA * (d_c - d_r)).mean(), atol=1e-6, rtol=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3  # the adapter moved the policy off the reference
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "nll"):
        torch.testing.assert_close(metrics[k], exp_metrics[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["rewards/chosen"], (BETA * d_c).mean(), atol=1e-6, rtol=1e-5)


def test_dpo_with_precomputed_reference(setup):
    items = [dict(it, ref_chosen=c.tolist(), ref_rejected=r.tolist())
             for it, c, r in zip(setup["items"], setup["ref_c"], setup["ref_r"])]
    module = PreferenceModule(setup["policy"], build("dpo", beta=BETA))
    with torch.no_grad():
        live, _ = module.compute_loss(collate_pairs(setup["items"], pad_id=PAD))
        cached_batch = collate_pairs(items, pad_id=PAD, with_ref=True)
        cached, _ = module.compute_loss(cached_batch)
        torch.testing.assert_close(cached, live, atol=1e-6, rtol=1e-5)
        # the cached values are really what is used
        shifted = dict(cached_batch)
        shifted["rejected"] = dict(cached_batch["rejected"], ref_logps=cached_batch["rejected"]["ref_logps"] - 1.0)
        other, _ = module.compute_loss(shifted)
    assert not torch.allclose(other, live, atol=1e-4)
    # the live reference is the base model: reference_model(policy) reproduces the separate copy
    with torch.no_grad(), reference_model(setup["policy"]):
        it = setup["items"][0]
        torch.testing.assert_close(_row_token_logps(setup["policy"], it["prompt_ids"], it["chosen_ids"]),
                                   setup["ref_c"][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("chosen_weighting", ["only_neg", "p_ce"])
def test_cdpo_weights_from_batch(setup, chosen_weighting):
    batch = collate_pairs(setup["items"], pad_id=PAD, with_weights=True)
    module = PreferenceModule(setup["policy"], build("cdpo", beta=BETA, chosen_weighting=chosen_weighting))
    with torch.no_grad():
        loss, _ = module.compute_loss(batch)
    items = setup["items"]
    # by hand: chosen weight 1 (only_neg) or p_ce(chosen); rejected weight 1 - p_ce(rejected)
    s_c = torch.stack([
        ((pc - rc) * (torch.tensor(it["chosen_p_ce"]) if chosen_weighting == "p_ce" else 1.0)).sum()
        for it, pc, rc in zip(items, setup["pol_c"], setup["ref_c"])])
    s_r = torch.stack([((pr - rr) * (1.0 - torch.tensor(it["rejected_p_ce"]))).sum()
                       for it, pr, rr in zip(items, setup["pol_r"], setup["ref_r"])])
    torch.testing.assert_close(loss, -F.logsigmoid(BETA * (s_c - s_r)).mean(), atol=1e-6, rtol=1e-5)
    mc, mr = batch["chosen"]["mask"], batch["rejected"]["mask"]
    w_r = _place([1.0 - torch.tensor(it["rejected_p_ce"]) for it in items], mr)
    w_c = _place([torch.tensor(it["chosen_p_ce"]) for it in items], mc) if chosen_weighting == "p_ce" else None
    expected, _ = losses.cdpo_loss(
        _place(setup["pol_c"], mc), _place(setup["pol_r"], mr), _place(setup["ref_c"], mc),
        _place(setup["ref_r"], mr), mc, mr, weights_rejected=w_r, weights_chosen=w_c, beta=BETA)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    # and it is not plain DPO
    with torch.no_grad():
        dpo, _ = PreferenceModule(setup["policy"], build("dpo", beta=BETA)).compute_loss(batch)
    assert not torch.allclose(loss, dpo, atol=1e-5)


def test_cdpo_without_weights_raises(setup):
    module = PreferenceModule(setup["policy"], build("cdpo"))
    with pytest.raises(ValueError, match="scored pairs"):
        module.compute_loss(collate_pairs(setup["items"], pad_id=PAD))


def test_rpo(setup):
    module = PreferenceModule(setup["policy"], build("rpo", beta=BETA, nll_weight=0.7))
    with torch.no_grad():
        loss, _ = module.compute_loss(collate_pairs(setup["items"], pad_id=PAD, padding_side="left"))
    d_c, d_r = _sums(setup)
    nll = torch.stack([-pc.sum() / len(pc) for pc in setup["pol_c"]]).mean()
    torch.testing.assert_close(loss, -F.logsigmoid(BETA * (d_c - d_r)).mean() + 0.7 * nll, atol=1e-6, rtol=1e-5)


def _row_kl(policy, ref, prompt, response):
    """sequential_kl of the full logits of one unpadded row over its response-predicting positions."""
    pol, rf = _row_logits(policy, prompt, response), _row_logits(ref, prompt, response)
    mask = torch.zeros(1, pol.shape[0] - 1, dtype=torch.bool)
    mask[0, len(prompt) - 1:] = True
    return head.sequential_kl_from_logits(rf[None, :-1], pol[None, :-1], mask)[0]


@pytest.mark.parametrize("variant", [1, 2])
def test_tokendpo_kl_and_loss(setup, variant):
    policy, ref, items = setup["policy"], setup["ref"], setup["items"]
    batch = collate_pairs(items, pad_id=PAD, padding_side="left")
    module = PreferenceModule(policy, build("tokendpo", beta=BETA, kl_weight=0.5, variant=variant))
    kl = {}
    with torch.no_grad():
        out = module.pair_logps(batch)
        for side in ("chosen", "rejected"):
            pol_lp, kl[side] = getattr(out, f"policy_{side}"), getattr(out, f"kl_{side}")
            expected = torch.stack([_row_kl(policy, ref, it["prompt_ids"], it[f"{side}_ids"]) for it in items])
            torch.testing.assert_close(kl[side], expected, atol=1e-5, rtol=1e-4)
            assert (kl[side] > 1e-4).all()
            pols = setup["pol_c"] if side == "chosen" else setup["pol_r"]
            torch.testing.assert_close(pol_lp, _place(pols, batch[side]["mask"]), atol=1e-5, rtol=0)
        loss, metrics = module.compute_loss(batch)
    d_c, d_r = _sums(setup)
    scale = 1.0 if variant == 1 else 0.5
    z = (d_c - d_r) - scale * (kl["rejected"] - kl["chosen"])
    torch.testing.assert_close(loss, -F.logsigmoid(BETA * z).mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(metrics["kl/chosen"], kl["chosen"].mean())


# ------------------------------------------------------------------ training: only LoRA moves


def _fit(module, datamodule):
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def _check_only_lora_moved(model, before):
    after = dict(model.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert lora
    for name, p in after.items():
        assert torch.isfinite(p).all(), name
        if "lora_" in name:
            continue
        assert torch.equal(p, before[name]), f"base weight {name} changed"
    assert any(not torch.equal(after[n], before[n]) for n in lora if "lora_A" in n)
    assert all(not torch.equal(after[n], before[n]) for n in lora if "lora_B" in n)


def test_sft_training_changes_only_lora():
    model = add_lora(tiny_llama(seed=0), "pos", **LORA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    records = [{"prompt_ids": torch.randint(3, 128, (3 + i,), generator=gen).tolist(),
                "response_ids": torch.randint(3, 128, (6 - i,), generator=gen).tolist()} for i in range(4)]
    trainer = _fit(SFTModule(model, lr=1e-2), SequencesDataModule(records, pad_id=PAD, batch_size=2))
    assert trainer.global_step == 2
    assert math.isfinite(float(trainer.callback_metrics["loss"]))
    _check_only_lora_moved(model, before)


@pytest.mark.parametrize("method", ["cdpo", "tokendpo"])
def test_preference_training_changes_only_lora(method):
    model = add_lora(tiny_llama(seed=0), "policy", **LORA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dm = PairsDataModule(_pairs(seed=4, n=4), pad_id=PAD, batch_size=2, with_weights=method == "cdpo")
    trainer = _fit(PreferenceModule(model, build(method), lr=1e-2, weight_decay=0.0), dm)
    assert trainer.global_step == 2
    for key in ("loss", "rewards/margins", "nll"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    _check_only_lora_moved(model, before)


# ------------------------------------------------------------------ contrastive scoring


def _score_items(seed=9):
    gen = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, 128, (lp,), generator=gen).tolist(),
             "response_ids": torch.randint(3, 128, (lr,), generator=gen).tolist()}
            for lp, lr in [(3, 6), (6, 2), (1, 5)]]


def _manual_p_ce(z_pos, z_neg, prompt, response, b):
    """softmax((1 + b) z_pos - b z_neg)[y_t] at the positions predicting the response tokens."""
    probs = torch.softmax((1 + b) * z_pos - b * z_neg, dim=-1)
    return torch.stack([probs[len(prompt) + i - 1, t] for i, t in enumerate(response)])


@pytest.mark.parametrize("side,b", [("right", 1.0), ("left", 1.0), ("left", 2.5)])
def test_scorer_with_adapters(side, b):
    model = add_lora(tiny_llama(seed=0), "pos", **LORA)
    model = add_lora(model, "neg", **LORA)
    _perturb(model, "pos", seed=11)
    _perturb(model, "neg", seed=12)
    items = _score_items()
    scorer = ContrastiveScorer(model, b=b)
    out = scorer.predict_step(collate_sequences(items, pad_id=PAD, padding_side=side), 0)
    assert len(out) == len(items)
    for row, it in zip(out, items):
        assert row["token_ids"] == it["response_ids"]
        p, r = it["prompt_ids"], it["response_ids"]
        use_adapter(model, "pos")
        z_pos = _row_logits(model, p, r)
        use_adapter(model, "neg")
        z_neg = _row_logits(model, p, r)
        assert not torch.allclose(z_pos, z_neg, atol=1e-3)  # the two adapters really differ
        labels = torch.tensor([p + r])[:, 1:]
        mask = torch.zeros(labels.shape, dtype=torch.bool)
        mask[0, len(p) - 1:] = True
        expected = contrastive_token_probs(z_pos[None, :-1], z_neg[None, :-1], labels, mask, b=b)[0][mask[0]]
        got = torch.tensor(row["p_ce"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got, _manual_p_ce(z_pos, z_neg, p, r, b), atol=1e-5, rtol=1e-4)


def test_scorer_with_two_full_models():
    pos, neg = tiny_llama(seed=0), tiny_llama(seed=1)
    items = _score_items(seed=13)
    out = ContrastiveScorer(pos, neg_model=neg).predict_step(collate_sequences(items, pad_id=PAD), 0)
    for row, it in zip(out, items):
        p, r = it["prompt_ids"], it["response_ids"]
        assert row["token_ids"] == r
        expected = _manual_p_ce(_row_logits(pos, p, r), _row_logits(neg, p, r), p, r, 1.0)
        torch.testing.assert_close(torch.tensor(row["p_ce"]), expected, atol=1e-5, rtol=1e-4)
