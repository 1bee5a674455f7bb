"""The one config switch `loss_impl=fused` routes training and scoring through cdpo_kernels with the
same numbers as the pure-torch path (the kernels' own tests check them against float64 references)."""
import pytest
import torch

from cdpo.data.collate import collate_pairs, collate_sequences
from cdpo.models import add_lora, tiny_llama
from cdpo.modules import ContrastiveScorer, PreferenceModule
from cdpo.objectives import METHODS, TrainsOn, build

PAIR_METHODS = [m for m in METHODS if build(m).trains_on is TrainsOn.PAIRS]  # every one, a new one too


def _policy():
    model = add_lora(tiny_llama(vocab_size=96, seed=3), "policy", r=4, alpha=8,
                     target_modules=["q_proj", "v_proj", "gate_proj"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _pairs():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 96, (n,), generator=g).tolist()  # noqa: E731
    items = []
    for n_p, n_c, n_r in ((3, 5, 7), (6, 4, 2)):
        c, r = ids(n_c), ids(n_r)
        items.append({"prompt_ids": ids(n_p), "chosen_ids": c, "rejected_ids": r,
                      "chosen_p_ce": torch.rand(n_c, generator=g).tolist(),
                      "rejected_p_ce": torch.rand(n_r, generator=g).tolist()})
    return collate_pairs(items, pad_id=0, with_weights=True)


@pytest.mark.parametrize("method", PAIR_METHODS)
def test_preference_loss_fused_equals_torch(method):
    model, batch = _policy(), _pairs()
    results = {}
    for impl in ("torch", "fused"):
        model.zero_grad()
        loss, metrics = PreferenceModule(model, build(method), loss_impl=impl).compute_loss(batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[impl] = (loss.detach(), metrics, grads)
    (lt, mt, gt), (lf, mf, gf) = results["torch"], results["fused"]
    torch.testing.assert_close(lf, lt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, gt, rtol=1e-4, atol=1e-6)
    for key in mt:
        torch.testing.assert_close(mf[key], mt[key], rtol=1e-5, atol=1e-6)


def test_contrastive_scorer_fused_equals_torch():
    lora = dict(r=4, alpha=8, target_modules=["gate_proj", "up_proj"])
    model = add_lora(add_lora(tiny_llama(vocab_size=96, seed=5), "pos", **lora), "neg", **lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    items = [{"prompt_ids": [5, 6, 7], "response_ids": [8, 9, 10, 11]}, {"prompt_ids": [12], "response_ids": [13, 14]}]
    batch = collate_sequences(items, pad_id=0)
    out = {impl: ContrastiveScorer(model, b=1.5, loss_impl=impl).predict_step(batch, 0) for impl in ("torch", "fused")}
    for a, b in zip(out["torch"], out["fused"]):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(b["p_ce"]), torch.tensor(a["p_ce"]), rtol=1e-5, atol=1e-7)


def test_fused_without_cuda_says_what_runs_instead_once(caplog, monkeypatch):
    from cdpo import head

    monkeypatch.setattr(head, "_said_fallback", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="cdpo.head"):
        assert head.head_ops("fused") is head.FusedHead and head.head_ops("fused") is head.FusedHead
    said = [r.getMessage() for r in caplog.records if r.name == "cdpo.head"]
    assert len(said) == 1 and "chunked torch tiles" in said[0]
    assert head.head_ops("torch") is head.TorchHead
    with pytest.raises(ValueError, match="loss_impl='triton': choose one of torch, fused"):
        head.head_ops("triton")
