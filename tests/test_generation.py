"""Batched generation: left padding, stop strings, EOS, token ids that decode to the text, seeds, stats.

A tiny random Llama over the embedded tokenizer's vocabulary (untied head, scaled-up layer weights so
that the continuation depends on the whole context, not only on the last token) runs real text in
milliseconds. Stop strings never occur in a random model's output, so the cut logic is tested through
`_finish` on known token ids and through `generate` with a scripted model.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig  # noqa: E402

from cdpo.generation import Completion, GenerationStats, _finish, generate  # noqa: E402
from cdpo.kv_cache import CACHE_ARG  # noqa: E402
from cdpo.models import load_tokenizer, tiny_llama_like_embedded  # noqa: E402



STOP = "\n\nQuestion:"
PROMPTS = [
    "Question: what is 2 + 3?\nAnswer: ",
    "Hi",
    "A much longer prompt with many more tokens than the others, so that the batch needs padding.\n",
    "Question: what is 7 + 3?\nAnswer: ",  # same ending as the first: only attention tells them apart
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def model():
    m = tiny_llama_like_embedded(seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
                              "gate_proj.weight", "up_proj.weight", "down_proj.weight")):
                p.mul_(8)
    return m.eval()


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ real model


def test_greedy_batched_equals_one_prompt_at_a_time(model, tok):
    lengths = [len(tok(p)["input_ids"]) for p in PROMPTS]
    assert len(set(lengths)) >= 3  # really different lengths: the batch is left-padded
    stats = GenerationStats()
    batched = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False, stats=stats)
    assert len(batched) == len(PROMPTS) and all(len(c) == 1 for c in batched)
    alone = [generate(model, tok, [p], max_new_tokens=8, progress=False)[0][0] for p in PROMPTS]
    for b, a in zip(batched, alone):
        assert b[0].token_ids == a.token_ids
        assert b[0].text == a.text
        assert b[0].finish_reason == a.finish_reason
    # the continuation depends on more than the last prompt token
    assert batched[0][0].token_ids != batched[3][0].token_ids
    for (c,) in batched:
        assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
        if c.finish_reason == "length":
            assert len(c.token_ids) == 8 and tok.eos_token_id not in c.token_ids
        else:
            assert c.token_ids[-1] == tok.eos_token_id
    assert stats.sequences == len(PROMPTS)
    assert stats.new_tokens == sum(len(c[0].token_ids) for c in batched)
    assert stats.new_tokens > 0 and stats.seconds > 0 and len(stats.per_batch) == 1
    assert stats.tokens_per_s == pytest.approx(stats.new_tokens / stats.seconds)


def test_batch_size_does_not_change_greedy_output(model, tok):
    a = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=3, progress=False)
    b = generate(model, tok, PROMPTS, max_new_tokens=4, batch_size=2, progress=False)
    assert [c[0].token_ids for c in a] == [c[0].token_ids for c in b]


def test_sampling_seeded(model, tok):
    kw = dict(n=2, max_new_tokens=4, temperature=1.0, top_p=1.0, batch_size=3, progress=False)
    stats = GenerationStats()
    a = generate(model, tok, PROMPTS[:2], seed=0, stats=stats, **kw)
    b = generate(model, tok, PROMPTS[:2], seed=0, **kw)
    c = generate(model, tok, PROMPTS[:2], seed=1, **kw)
    ids = lambda out: [[x.token_ids for x in comps] for comps in out]  # noqa: E731
    assert len(a) == 2 and all(len(comps) == 2 for comps in a)
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    # the n samples of one prompt are not copies of each other
    assert len({tuple(x.token_ids) for x in a[0]}) > 1
    assert stats.sequences == 4
    assert len(stats.per_batch) == 2  # 4 rows in batches of 3
    assert stats.new_tokens == sum(len(x.token_ids) for comps in a for x in comps)


def test_greedy_with_n_above_one_raises(model, tok):
    with pytest.raises(ValueError, match="n > 1"):
        generate(model, tok, PROMPTS[:1], n=2, temperature=0.0, progress=False)


# ------------------------------------------------------------------ _finish: the cut logic


def test_finish_cuts_at_stop_string_and_appends_eos(tok):
    ids = _ids(tok, "The answer is 5.\n\nQuestion: next")
    c = _finish(tok, ids, [STOP])
    assert c.finish_reason == "stop"
    assert c.text == "The answer is 5."
    assert c.token_ids[-1] == tok.eos_token_id
    assert tok.decode(c.token_ids, skip_special_tokens=True) == "The answer is 5."
    assert tok.decode(c.token_ids[:-1]) == "The answer is 5."
    # the ids are the generated ones, not a re-tokenisation
    assert c.token_ids[:-1] == ids[: len(c.token_ids) - 1]


def test_finish_stop_inside_a_token_retokenises_only_the_tail(tok):
    ids = _ids(tok, "The answer is 5.")
    assert tok.decode(ids[:2]) == "The answer"  # " answer" is one token, the stop cuts it
    c = _finish(tok, ids, ["swer"])
    assert c.finish_reason == "stop"
    assert c.text == "The an"
    assert c.token_ids[0] == ids[0]
    assert tok.decode(c.token_ids[:-1]) == "The an"
    assert c.token_ids[-1] == tok.eos_token_id


def test_finish_earliest_of_several_stop_strings(tok):
    ids = _ids(tok, "a b\n\nProblem: c\n\nQuestion: d")
    c = _finish(tok, ids, [STOP, "\n\nProblem:"])
    assert (c.text, c.finish_reason) == ("a b", "stop")


def test_finish_eos(tok):
    eos = tok.eos_token_id
    body = _ids(tok, "The answer is 5.")
    # everything after the first EOS is dropped, even a stop string there
    c = _finish(tok, body + [eos] + _ids(tok, STOP + " x"), [STOP])
    assert c.finish_reason == "eos"
    assert c.text == "The answer is 5."
    assert c.token_ids == body + [eos]


def test_finish_length_appends_nothing(tok):
    body = _ids(tok, "The answer is 5")
    c = _finish(tok, body, [STOP])
    assert c == Completion("The answer is 5", body, "length")
    assert _finish(tok, body, []).token_ids == body


# ------------------------------------------------------------------ generate with a scripted model


class ScriptedLM(torch.nn.Module):
    """Appends a fixed continuation per prompt text (padded with pad_token_id like HF does)."""

    def __init__(self, tok, continuations: dict[str, list[int]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.continuations, self.calls = tok, continuations, []
        self.config = LlamaConfig(num_hidden_layers=2)  # what generate's preallocated KV cache is shaped from

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append(kw)
        rows = []
        for ids, att in zip(input_ids, attention_mask):
            assert att[-1] == 1  # left padding: every prompt ends at the last column
            prompt = self.tok.decode(ids[att.bool()])
            rows.append(self.continuations[prompt][: kw["max_new_tokens"]])
        width = max(len(r) for r in rows)
        new = torch.full((len(rows), width), kw["pad_token_id"], dtype=torch.long)
        for i, r in enumerate(rows):
            new[i, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)


def test_generate_stop_eos_length_through_batches(tok):
    eos = tok.eos_token_id
    prompts = ["Question: 1 + 4?\nAnswer: ", "Q: 2?", "Question: what is long?\nAnswer: "]
    script = {
        prompts[0]: _ids(tok, "The answer is 5.\n\nQuestion: next one"),
        prompts[1]: _ids(tok, "It ends here.") + [eos],
        prompts[2]: _ids(tok, " and on and on and on"),
    }
    lm = ScriptedLM(tok, script)
    stats = GenerationStats()
    out = generate(lm, tok, prompts, max_new_tokens=32, stop=[STOP], batch_size=2, progress=False, stats=stats)
    (a,), (b,), (c,) = out
    assert (a.text, a.finish_reason) == ("The answer is 5.", "stop")
    assert a.token_ids == _ids(tok, "The answer is 5.") + [eos]
    assert (b.text, b.finish_reason) == ("It ends here.", "eos")
    assert b.token_ids == _ids(tok, "It ends here.") + [eos]
    assert (c.text, c.finish_reason) == (" and on and on and on", "length")
    assert c.token_ids == script[prompts[2]]
    assert stats.sequences == 3 and len(stats.per_batch) == 2
    from transformers import StaticCache

    cache = lm.calls[0][CACHE_ARG]  # decoding writes into a cache allocated once for prompt + max_new_tokens
    assert isinstance(cache, StaticCache) and len(cache.layers) == 2
    assert cache.layers[0].max_cache_len == len(tok(prompts[0])["input_ids"]) + 32
    assert stats.new_tokens == len(a.token_ids) + len(b.token_ids) + len(c.token_ids)
    # greedy, with the stop strings handed to HF so that generation halts there
    assert all(k["do_sample"] is False and k["stop_strings"] == [STOP] for k in lm.calls)


def test_shared_prefix_cache_gives_the_same_completions(model, tok):
    """Few-shot prompts share their exemplars: encoding them once must not change any completion."""
    exemplars = "Question: Tom has 3 apples and buys 2 more. How many?\nAnswer: 3 + 2 = 5. The answer is 5.\n\n"
    prompts = [exemplars + p for p in PROMPTS]
    assert len(tok(exemplars)["input_ids"]) >= 16  # long enough to be shared
    kw = dict(max_new_tokens=6, batch_size=3, progress=False)
    plain = generate(model, tok, prompts, share_prefix=False, **kw)
    shared = generate(model, tok, prompts, share_prefix=True, **kw)
    assert [c[0].token_ids for c in shared] == [c[0].token_ids for c in plain]
    sampled = [generate(model, tok, prompts, n=2, temperature=1.0, seed=3, share_prefix=s, **kw) for s in (False, True)]
    assert [[c.token_ids for c in r] for r in sampled[0]] == [[c.token_ids for c in r] for r in sampled[1]]
