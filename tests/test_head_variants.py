"""Models whose logits are not a plain hidden @ lm_head (issue 11, item 7): logit scaling is applied,
logit soft-capping and a wrapped head (LoRA / modules_to_save on lm_head) are refused. Tiny random
models built from transformers' config classes; references are float64 log-softmaxes of the
models' own full logits."""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForCausalLM, CohereConfig, Gemma2Config, Gemma3TextConfig, GraniteConfig,
                          LlamaConfig)

from cdpo.contrastive import contrastive_token_probs_from_hidden
from cdpo.data.collate import collate_sequences
from cdpo.logprobs import UnsupportedHeadError, backbone_and_head, hidden_states, response_logps
from oracles import contrastive_token_probs

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _model(config_cls, seed=0, **extra):
    torch.manual_seed(seed)
    kwargs = {**TINY, **extra}
    if config_cls in (Gemma2Config, Gemma3TextConfig):
        kwargs["head_dim"] = 8
    model = AutoModelForCausalLM.from_config(config_cls(**kwargs), torch_dtype=torch.float32).eval()
    with torch.no_grad():  # random heads give near-uniform softmaxes; make the logits matter
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _batch():
    g = torch.Generator().manual_seed(3)
    items = [{"prompt_ids": torch.randint(3, 96, (p,), generator=g).tolist(),
              "response_ids": torch.randint(3, 96, (r,), generator=g).tolist()} for p, r in ((4, 6), (7, 3))]
    return items, collate_sequences(items, pad_id=0, padding_side="right")


def _reference(model, items):
    """float64 log-softmax of the model's own logits (its forward applies any scale or cap)."""
    out = []
    for item in items:
        ids = torch.tensor([item["prompt_ids"] + item["response_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), dim=-1)[0]
        start = len(item["prompt_ids"])
        out.append(torch.stack([logp[start + i - 1, t] for i, t in enumerate(item["response_ids"])]))
    return out


SUPPORTED = {
    "llama": (LlamaConfig, {}),
    "gemma3_no_cap": (Gemma3TextConfig, {}),
    "cohere_logit_scale": (CohereConfig, {"logit_scale": 0.25}),
    "granite_logits_scaling": (GraniteConfig, {"logits_scaling": 4.0}),
}


@pytest.mark.parametrize("arch", SUPPORTED)
def test_log_probs_follow_the_models_own_logits(arch):
    config_cls, extra = SUPPORTED[arch]
    model = _model(config_cls, **extra)
    items, batch = _batch()
    with torch.no_grad():
        got = response_logps(model, batch)
    for row, want in enumerate(_reference(model, items)):
        torch.testing.assert_close(got[row][batch["mask"][row]].double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["cohere_logit_scale", "granite_logits_scaling"])
def test_unscaled_head_would_be_wrong(arch):
    """The scale matters here: hidden @ W^T without it is far from the model's log-probs."""
    config_cls, extra = SUPPORTED[arch]
    model = _model(config_cls, **extra)
    items, batch = _batch()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        h = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        naive = torch.log_softmax(h[:, :-1].double() @ base.get_output_embeddings().weight.double().T, -1)
    naive = naive.gather(-1, batch["targets"].clamp(min=0)[..., None]).squeeze(-1)
    want = _reference(model, items)[0]
    assert (naive[0][batch["mask"][0]] - want).abs().max() > 1e-2


def test_contrastive_scores_use_the_scaled_logits():
    """p_ce from hidden states equals softmax((1+b) z_pos - b z_neg) of the models' own logits."""
    pos, neg = _model(CohereConfig, seed=0, logit_scale=0.25), _model(CohereConfig, seed=1, logit_scale=0.25)
    _, batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        h_pos, h_neg = hidden_states(pos, ids, mask)[:, :-1], hidden_states(neg, ids, mask)[:, :-1]
        got = contrastive_token_probs_from_hidden(h_pos, h_neg, backbone_and_head(pos)[1].weight, batch["targets"],
                                                  batch["mask"], weight_neg=backbone_and_head(neg)[1].weight)
        z_pos, z_neg = pos(ids, attention_mask=mask).logits[:, :-1], neg(ids, attention_mask=mask).logits[:, :-1]
        want = contrastive_token_probs(z_pos, z_neg, batch["targets"], batch["mask"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config_cls, extra", [(Gemma2Config, {}), (Gemma3TextConfig, {"final_logit_softcapping": 30.0})])
def test_soft_capped_logits_are_refused(config_cls, extra):
    model = _model(config_cls, **extra)
    _, batch = _batch()
    with pytest.raises(UnsupportedHeadError, match="final_logit_softcapping=30"):
        response_logps(model, batch)


@pytest.mark.parametrize("peft_kwargs", [{"target_modules": ["q_proj", "lm_head"]},
                                         {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}])
def test_a_wrapped_head_is_refused(peft_kwargs):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(LlamaConfig), LoraConfig(r=4, lora_alpha=8, **peft_kwargs))
    _, batch = _batch()
    with pytest.raises(UnsupportedHeadError, match="not a plain linear layer.*lm_head"):
        response_logps(model, batch)


def test_lora_elsewhere_is_fine():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(LlamaConfig), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    items, batch = _batch()
    with torch.no_grad():
        got = response_logps(model, batch)
    for row, want in enumerate(_reference(model, items)):
        torch.testing.assert_close(got[row][batch["mask"][row]].double(), want, atol=2e-5, rtol=0)
