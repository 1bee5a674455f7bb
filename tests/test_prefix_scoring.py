"""Scoring with a shared prompt prefix encoded once gives the same p_ce as scoring whole sequences."""
import torch
from omegaconf import OmegaConf

from cdpo.data.collate import collate_sequences
from cdpo.kv_cache import common_prefix_length
from cdpo.models import add_lora, tiny_llama
from cdpo.modules import ContrastiveScorer
from cdpo.pipeline.score import shared_prefix


def _scorer():
    lora = dict(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = add_lora(add_lora(tiny_llama(vocab_size=64, seed=2), "pos", **lora), "neg", **lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return ContrastiveScorer(model, b=1.0)


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 1], [6, 1]]) == 0 and common_prefix_length([]) == 0


def test_prefix_scoring_equals_full_sequences():
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    prefix = ids(20)
    items = [{"prompt_ids": prefix + ids(k), "response_ids": ids(r)} for k, r in ((3, 5), (1, 8), (6, 2))]
    scorer = _scorer()
    full = scorer.predict_step(collate_sequences(items, pad_id=0), 0)
    scorer.set_prefix(prefix)
    rest = [{"prompt_ids": it["prompt_ids"][20:], "response_ids": it["response_ids"]} for it in items]
    shared = scorer.predict_step(collate_sequences(rest, pad_id=0), 0)
    again = scorer.predict_step(collate_sequences(rest[:1], pad_id=0), 0)  # the cache is reused, not extended
    for a, b in zip(full, shared):
        assert a["token_ids"] == b["token_ids"]
        torch.testing.assert_close(torch.tensor(b["p_ce"]), torch.tensor(a["p_ce"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.tensor(again[0]["p_ce"]), torch.tensor(full[0]["p_ce"]), rtol=1e-4, atol=1e-6)


def test_shared_prefix_rule():
    cfg = OmegaConf.create({"data": {"max_length": 100, "max_prompt_length": 50}})
    pairs = [{"prompt_ids": list(range(30)) + [90 + i], "chosen_ids": [1] * 5, "rejected_ids": [2] * 9}
             for i in range(3)]
    assert shared_prefix(cfg, pairs) == list(range(30))
    # identical prompts: keep one prompt token out of the prefix (it predicts the first response token)
    same = [{**p, "prompt_ids": list(range(30))} for p in pairs]
    assert shared_prefix(cfg, same) == list(range(29))
    # a prompt longer than max_prompt_length would be cut from the left: no sharing
    long = pairs + [{"prompt_ids": list(range(60)), "chosen_ids": [1], "rejected_ids": [2]}]
    assert shared_prefix(cfg, long) == []
    short = [{**p, "prompt_ids": p["prompt_ids"][:10]} for p in pairs]  # 9 shared tokens < 16
    assert shared_prefix(cfg, short) == []


def test_grouped_scoring_equals_full_sequences():
    """Responses sharing a prompt (a pair's chosen and rejected), with and without a cached prefix."""
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    prefix = ids(18)
    prompts = [prefix + ids(k) for k in (4, 1, 7)]
    responses = [ids(r) for r in (5, 2, 1, 9, 3, 3)]  # two per prompt, lengths differ (one of a single token)
    items = [{"prompt_ids": prompts[i // 2], "response_ids": r} for i, r in enumerate(responses)]
    scorer = _scorer()
    full = scorer.predict_step(collate_sequences(items, pad_id=0), 0)
    for cut in (0, len(prefix)):
        scorer.set_prefix(prefix[:cut])
        grouped = scorer.score_grouped([p[cut:] for p in prompts], responses, pad_id=0)
        assert [r["token_ids"] for r in grouped] == responses
        for a, b in zip(full, grouped):
            torch.testing.assert_close(torch.tensor(b["p_ce"]), torch.tensor(a["p_ce"]), rtol=1e-4, atol=1e-6)


def test_grouped_scoring_rejects_uneven_groups():
    import pytest

    with pytest.raises(ValueError, match="split evenly"):
        _scorer().score_grouped([[5, 6], [7]], [[1], [2], [3]], pad_id=0)


def test_score_stage_same_with_and_without_sharing():
    from types import SimpleNamespace

    from cdpo.pipeline.score import score_pairs

    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(3, 64, (n,), generator=g).tolist()  # noqa: E731
    prefix = ids(20)
    pairs = [{"id": f"q{i}", "prompt_ids": prefix + ids(1 + i), "chosen_ids": ids(2 + i), "rejected_ids": ids(6 - i)}
             for i in range(5)]
    tok = SimpleNamespace(pad_token_id=0, decode=lambda t: str(t))
    out = {}
    for share in (True, False):
        cfg = OmegaConf.create({"ce": {"batch_size": 4, "share_prefix": share},
                                "data": {"max_length": 100, "max_prompt_length": 50}})
        torch.manual_seed(0)  # the same LoRA A matrices in both scorers
        out[share] = score_pairs(cfg, _scorer(), pairs, tok)
    for a, b in zip(out[True], out[False]):
        assert a["rejected_ids"] == b["rejected_ids"] and a["critical_index"] == b["critical_index"]
        for side in ("chosen_p_ce", "rejected_p_ce"):
            torch.testing.assert_close(torch.tensor(a[side]), torch.tensor(b[side]), rtol=1e-4, atol=1e-6)
