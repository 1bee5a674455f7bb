"""Collation alignment: weight i of a response lands on response token i, whatever the padding side.

Also: truncation (end of prompt, start of response), the weights-length error, pairs with weights and
cached reference log-probs, and `response_logps` against a plain full forward of each unpadded row.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cdpo.data.collate import TruncationCounter, collate_pairs, collate_sequences, truncate  # noqa: E402
from cdpo.logprobs import response_logps  # noqa: E402
from cdpo.models import tiny_llama  # noqa: E402



PAD = 0


def _items(lengths, seed=0, vocab=(3, 120)):
    """Records with distinct prompt/response lengths and weights w_i = 1000 * row + i."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for row, (lp, lr) in enumerate(lengths):
        items.append({
            "id": f"r{row}",
            "prompt_ids": torch.randint(*vocab, (lp,), generator=gen).tolist(),
            "response_ids": torch.randint(*vocab, (lr,), generator=gen).tolist(),
            "w": [1000.0 * row + i for i in range(lr)],
        })
    return items


LENGTHS = [(3, 5), (7, 2), (1, 6), (4, 4)]


def _masked_pairs(batch, row):
    m = batch["mask"][row]
    return list(zip(batch["targets"][row][m].tolist(), batch["weights"][row][m].tolist()))


@pytest.mark.parametrize("side", ["left", "right"])
def test_weight_i_lands_on_response_token_i(side):
    items = _items(LENGTHS)
    batch = collate_sequences(items, pad_id=PAD, padding_side=side, weights_key="w")
    width = max(lp + lr for lp, lr in LENGTHS)
    assert batch["input_ids"].shape == (4, width)
    for key in ("targets", "mask", "weights"):
        assert batch[key].shape == (4, width - 1)
    for row, item in enumerate(items):
        expected = [(t, float(w)) for t, w in zip(item["response_ids"], item["w"])]
        assert _masked_pairs(batch, row) == expected
        # targets at the masked positions are exactly the next input tokens
        m = batch["mask"][row]
        assert torch.equal(batch["input_ids"][row, 1:][m], batch["targets"][row][m])
        # the unpadded row is prompt + response, placed on the requested side
        n = len(item["prompt_ids"]) + len(item["response_ids"])
        att = batch["attention_mask"][row]
        assert int(att.sum()) == n
        real = slice(width - n, width) if side == "left" else slice(0, n)
        assert att[real].all()
        assert batch["input_ids"][row, real].tolist() == item["prompt_ids"] + item["response_ids"]
        assert (batch["input_ids"][row][att == 0] == PAD).all()
        # weights are zero off the mask; mask covers exactly the response length
        assert int(m.sum()) == len(item["response_ids"])
        assert (batch["weights"][row][~m] == 0).all()


def test_left_and_right_padding_agree_on_per_row_content():
    items = _items(LENGTHS, seed=3)
    left = collate_sequences(items, pad_id=PAD, padding_side="left", weights_key="w")
    right = collate_sequences(items, pad_id=PAD, padding_side="right", weights_key="w")
    for row in range(len(items)):
        assert _masked_pairs(left, row) == _masked_pairs(right, row)
    # the padding side actually differs (otherwise the test above proves nothing)
    assert not torch.equal(left["input_ids"], right["input_ids"])


def test_no_weights_key_gives_no_weights():
    batch = collate_sequences(_items(LENGTHS), pad_id=PAD)
    assert "weights" not in batch
    assert set(batch) == {"input_ids", "attention_mask", "targets", "mask"}


def test_bad_padding_side():
    with pytest.raises(ValueError, match="padding_side"):
        collate_sequences(_items(LENGTHS), pad_id=PAD, padding_side="middle")


def test_truncate_keeps_prompt_end_and_response_start():
    counter = TruncationCounter()
    prompt, response = list(range(100, 110)), list(range(200, 220))
    ids, kept = truncate(prompt, response, max_length=12, max_prompt_length=4, counter=counter)
    assert ids == [106, 107, 108, 109] + list(range(200, 208))
    assert kept == 8
    assert (counter.seen, counter.truncated) == (1, 1)
    # fits: untouched, counted as seen only
    ids, kept = truncate([1, 2], [3, 4, 5], max_length=12, max_prompt_length=4, counter=counter)
    assert (ids, kept) == ([1, 2, 3, 4, 5], 3)
    assert (counter.seen, counter.truncated) == (2, 1)
    # only the prompt is cut: still counted as truncated
    ids, kept = truncate([1, 2, 3, 4, 5, 6], [7], max_length=12, max_prompt_length=2, counter=counter)
    assert (ids, kept) == ([5, 6, 7], 1)
    assert (counter.seen, counter.truncated) == (3, 2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation_cuts_weights_with_the_response(side):
    lengths = [(6, 9), (2, 3), (8, 2)]
    items = _items(lengths, seed=5)
    counter = TruncationCounter()
    max_length, max_prompt = 8, 4
    batch = collate_sequences(items, pad_id=PAD, padding_side=side, weights_key="w",
                              max_length=max_length, max_prompt_length=max_prompt, counter=counter)
    # row 0: prompt 6 -> last 4, response 9 -> first 4; row 1 untouched; row 2: prompt 8 -> 4, response 2 fits
    assert (counter.seen, counter.truncated) == (3, 2)
    assert batch["input_ids"].shape[1] == max_length
    expected_kept = [4, 3, 2]
    for row, item in enumerate(items):
        prompt = item["prompt_ids"][-max_prompt:]
        kept = expected_kept[row]
        response = item["response_ids"][:kept]
        assert _masked_pairs(batch, row) == [(t, float(w)) for t, w in zip(response, item["w"][:kept])]
        att = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][att].tolist() == prompt + response


def test_weights_length_mismatch_raises():
    items = _items(LENGTHS)
    items[2]["w"] = items[2]["w"][:-2]  # 4 weights for 6 tokens
    with pytest.raises(ValueError, match=r"r2: 4 weights for 6 response tokens"):
        collate_sequences(items, pad_id=PAD, weights_key="w")
    # a list already cut to the kept tokens is accepted (cached reference log-probs)
    items = _items([(2, 6)])
    items[0]["w"] = items[0]["w"][:3]
    batch = collate_sequences(items, pad_id=PAD, weights_key="w", max_length=5, max_prompt_length=2)
    assert batch["weights"][0][batch["mask"][0]].tolist() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pairs_with_weights_and_ref(side):
    gen = torch.Generator().manual_seed(7)
    spec = [(3, 4, 6), (5, 2, 3), (2, 7, 1)]  # prompt, chosen, rejected lengths
    items = []
    for row, (lp, lc, lr) in enumerate(spec):
        items.append({
            "prompt_ids": torch.randint(3, 120, (lp,), generator=gen).tolist(),
            "chosen_ids": torch.randint(3, 120, (lc,), generator=gen).tolist(),
            "rejected_ids": torch.randint(3, 120, (lr,), generator=gen).tolist(),
            "chosen_p_ce": [0.001 * (100 * row + i) for i in range(lc)],
            "rejected_p_ce": [0.5 + 0.001 * (100 * row + i) for i in range(lr)],
            "ref_chosen": [-(10.0 * row + i) for i in range(lc)],
            "ref_rejected": [-(10.0 * row + i) - 0.5 for i in range(lr)],
        })
    counter = TruncationCounter()
    out = collate_pairs(items, pad_id=PAD, padding_side=side, with_weights=True, with_ref=True, counter=counter)
    assert set(out) == {"chosen", "rejected"}
    for s in ("chosen", "rejected"):
        b = out[s]
        assert b["ref_logps"].shape == b["targets"].shape == b["weights"].shape == b["mask"].shape
        for row, item in enumerate(items):
            m = b["mask"][row]
            assert b["targets"][row][m].tolist() == item[f"{s}_ids"]
            assert torch.allclose(b["weights"][row][m], torch.tensor(item[f"{s}_p_ce"]))
            assert torch.allclose(b["ref_logps"][row][m], torch.tensor(item[f"ref_{s}"]))
            assert (b["ref_logps"][row][~m] == 0).all()
            att = b["attention_mask"][row].bool()
            assert b["input_ids"][row][att].tolist() == item["prompt_ids"] + item[f"{s}_ids"]
    # each sequence counted once (chosen and rejected), not again for the ref tensor
    assert counter.seen == 2 * len(items)
    plain = collate_pairs(items, pad_id=PAD, padding_side=side)
    assert "weights" not in plain["chosen"] and "ref_logps" not in plain["rejected"]


# ------------------------------------------------------------------ response_logps


def _independent_logps(model, item):
    """log softmax of a full forward of the unpadded prompt+response, gathered at the response tokens."""
    ids = torch.tensor([item["prompt_ids"] + item["response_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    start = len(item["prompt_ids"])
    return torch.stack([logp[start + i - 1, tok] for i, tok in enumerate(item["response_ids"])])


def test_response_logps_padding_invariant_and_matches_full_forward():
    model = tiny_llama(seed=0)
    items = _items([(3, 5), (8, 2), (1, 7), (5, 5)], seed=11)
    per_side = {}
    for side in ("left", "right"):
        batch = collate_sequences(items, pad_id=2, padding_side=side)
        with torch.no_grad():
            lp = response_logps(model, batch)
        assert lp.shape == batch["targets"].shape
        assert (lp[~batch["mask"]] == 0).all()
        per_side[side] = [lp[row][batch["mask"][row]] for row in range(len(items))]
        for row, item in enumerate(items):
            expected = _independent_logps(model, item)
            assert per_side[side][row].shape == expected.shape
            torch.testing.assert_close(per_side[side][row], expected, atol=1e-5, rtol=0)
            assert (per_side[side][row] < 0).all()
    for a, b in zip(per_side["left"], per_side["right"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
