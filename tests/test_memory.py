"""The memory plan's parameter counts against real models, and its strategy rules."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cdpo.memory import GIB, LLAMA3_8B, LLAMA3_70B, PAPER_TARGETS, STRATEGIES, Arch, plan, plan_table, total_gib
from cdpo.models import add_lora


def _config(a: Arch) -> LlamaConfig:
    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                       tie_word_embeddings=a.tied)


@pytest.mark.parametrize("arch", [LLAMA3_8B, LLAMA3_70B], ids=lambda a: a.name)
def test_parameter_counts_match_the_transformers_model(arch):
    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(_config(arch))
    assert arch.params == sum(p.numel() for p in model.parameters())
    assert Arch.from_hf_config(model.config, arch.name) == arch
    assert round(arch.params / 1e9, 2) in (8.03, 70.55)  # the published sizes


@pytest.mark.parametrize("targets", [PAPER_TARGETS, ("gate_proj", "up_proj", "down_proj")])
def test_lora_counts_match_peft(targets):
    arch = Arch("gqa", layers=2, hidden=64, intermediate=96, heads=8, kv_heads=2, vocab=100, tied=True)
    model = add_lora(LlamaForCausalLM(_config(arch)), "p", r=4, alpha=8, target_modules=list(targets))
    assert arch.lora_params(4, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert arch.params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_strategy_rules():
    gpus = 8
    p = {s: plan(LLAMA3_70B, s, 1 if s == "qlora" else gpus) for s in STRATEGIES}
    assert p["fsdp"]["base weights"] == p["ddp"]["base weights"] / gpus == LLAMA3_70B.params * 2 / gpus
    assert p["zero3_offload"]["base weights"] == 0 and p["zero3_offload"]["AdamW state (fp32)"] == 0
    assert p["zero2"]["base weights"] == p["ddp"]["base weights"]  # ZeRO-2 replicates the weights
    assert p["zero2"]["AdamW state (fp32)"] == p["ddp"]["AdamW state (fp32)"] / gpus
    # the 70B: a whole bf16 copy per GPU cannot fit 80 GB; sharded or 4-bit it does
    assert total_gib(p["ddp"]) > 80 > max(total_gib(p["fsdp"]), total_gib(p["qlora"]))
    assert 35 < p["qlora"]["base weights"] / GIB < 40  # ~70.6 B x 4.1 bits + bf16 embeddings and head
    # activations scale with the tokens of a micro-batch, not with the strategy
    longer = plan(LLAMA3_8B, "fsdp", gpus, max_length=3000)
    assert longer["checkpointed block inputs"] == 2 * plan(LLAMA3_8B, "fsdp", gpus)["checkpointed block inputs"]
    assert "| qlora | 1 |" in plan_table() and len(plan_table().splitlines()) == 2 + len(STRATEGIES)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan(LLAMA3_8B, "tp", 8)
