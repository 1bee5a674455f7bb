"""What the stages load: the base model and tokenizer, the questions and their prompts, and the model
that sample / eval generate with (HF or vLLM: `generation.backend`). The Trainer and its loggers and
callbacks are built in `cdpo.pipeline.trainers`."""
from __future__ import annotations

import contextlib

import torch
from omegaconf import DictConfig

from cdpo import distributed
from cdpo.data import arith_exemplars, build_prompt, load_exemplars, load_problems, stop_strings
from cdpo.data.preferences import is_preference_data, render_prompt
from cdpo.errors import ConfigError
from cdpo.models import load_adapter, load_model, merge_and_unload, load_tokenizer, tiny_llama_like_embedded

TINY = "tiny:llama"
BACKENDS = ("hf", "vllm")


def device_for(cfg: DictConfig) -> str:
    """This process's device: its own GPU when there are several processes per node."""
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return f"cuda:{distributed.local_rank()}" if wants_gpu and torch.cuda.is_available() else "cpu"


def base_model(cfg: DictConfig, *, for_training: bool = False):
    """A fresh base model (no adapters) on the run's device. For training under FSDP or DeepSpeed it
    stays on the CPU: the strategy shards it and moves each shard to its GPU."""
    m = cfg.model
    quantization = m.get("quantization") or cfg.peft.get("quantization")
    sharded = for_training and distributed.shards_parameters(cfg.trainer)
    if sharded and quantization:
        raise distributed.ScalingError(
            f"quantization={quantization!r} (QLoRA) with trainer.strategy={distributed.strategy_name(cfg.trainer)}: "
            "4-bit bases are not sharded here; use trainer=gpu (one GPU) or trainer=ddp (one 4-bit copy per GPU)")
    device = "cpu" if sharded else device_for(cfg)
    if m.path == TINY:
        return tiny_llama_like_embedded(seed=0).to(device)  # one base model for every seed
    # a strategy that checkpoints activations itself (FSDP's policy) replaces the model's own checkpointing
    checkpointing = m.gradient_checkpointing and for_training and not distributed.checkpoints_activations(cfg.trainer)
    return load_model(m.path, dtype=m.dtype, device=device, attn_implementation=m.attn_implementation,
                      gradient_checkpointing=bool(checkpointing), quantization=quantization)


@contextlib.contextmanager
def generation_models(cfg: DictConfig, *, merge: bool = False):
    """Yields `model_for(adapter=None, name="adapter")`: the model sample / eval generate with, for
    `cdpo.generation.generate`.

    generation.backend=hf: a fresh base model with the adapter directory loaded; with `merge`
    (eval.merge_adapter) the adapter folded into that copy's weights (no LoRA matmuls per token). vllm: one vLLM
    engine for the whole block (started by the first call), each adapter served as a LoRA request;
    the engine is shut down when the block ends, so that the training stages get the GPU back.
    """
    backend = cfg.generation.get("backend", "hf")
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend={backend!r}: choose one of {', '.join(BACKENDS)} (generation=vllm)")
    if backend == "hf":
        def model_for(adapter=None, name: str = "adapter"):
            model = base_model(cfg)
            if not adapter:
                return model
            model = load_adapter(model, adapter, name)
            return merge_and_unload(model) if merge else model

        yield model_for
        return
    from cdpo.generation_vllm import VLLMEngine

    engine = None

    def served(adapter=None, name: str = "adapter"):
        nonlocal engine
        engine = engine or VLLMEngine.from_config(cfg)
        return engine.model_for(adapter, name)

    try:
        yield served
    finally:
        if engine is not None:
            engine.close()


def tokenizer(cfg: DictConfig):
    return load_tokenizer("embedded:smollm2-135m-instruct" if cfg.model.path == TINY else cfg.model.path)


def problems(cfg: DictConfig, split: str, limit) -> list:
    """Questions with gold answers: the data source's (with preference data, data.eval_source's), mapped
    by data.fields (data.eval_fields) when it is a jsonl: or hf: source."""
    d = cfg.data
    if is_preference_data(d):
        source, fields = d.get("eval_source"), d.get("eval_fields")
        if not source:
            raise ConfigError("data=preference has no questions with answers: set data.eval_source (e.g. gsm8k, "
                              "arith or jsonl:<path>) to evaluate")
    else:
        source, fields = d.source, d.get("fields")
        if split == d.train_split and d.get("train_source"):
            source = d.train_source
    task = dict(d.get("task") or {}) if source == "arith" else {}
    fields = dict(fields) if fields and source.startswith(("jsonl:", "hf:")) else None
    return load_problems(source, split, limit=limit, fields=fields, **task)


def chat_prompts(cfg: DictConfig) -> bool:
    """Whether prompts come from the tokenizer's chat template (which carries its own special tokens)."""
    d = cfg.data
    return (d.prompt_format if is_preference_data(d) else d.prompt_style) == "chat"


def prompt_of(cfg: DictConfig, tok, question: str, *, for_training: bool = False) -> str:
    """The prompt sample and eval generate after (data.n_shot exemplars); `for_training`: the one
    the CE models and the policy are trained and scored with (data.train_n_shot, when set). With
    preference data: the question in the data's own prompt format."""
    d = cfg.data
    if is_preference_data(d):
        return render_prompt(question, tok, prompt_format=d.prompt_format,
                             template=d.get("prompt_template") or "{prompt}")
    n_shot = d.n_shot if not for_training or d.get("train_n_shot") is None else d.train_n_shot
    exemplars, name = None, d.get("exemplars")
    if name == "arith":  # the task's own worked examples instead of GSM8K's
        exemplars = arith_exemplars(n_shot, **dict(d.get("task") or {}))
    elif name:  # a shipped set, e.g. the authors' 8-shot GSM8K / 4-shot MATH prompts
        exemplars = load_exemplars(name)
    return build_prompt(question, d.prompt_style, n_shot=n_shot, tokenizer=tok, exemplars=exemplars,
                        strip=bool(d.get("strip_prompt", False)))


def separate_training_prompt(cfg: DictConfig) -> bool:
    """Whether training uses another prompt than sampling (the authors: few-shot vs zero-shot)."""
    return cfg.data.get("train_n_shot") is not None and cfg.data.train_n_shot != cfg.data.n_shot


def prompt_ids(cfg: DictConfig, tok, prompt: str) -> list[int]:
    # chat templates carry their own special tokens; plain prompts get the tokenizer's BOS if any
    return tok(prompt, add_special_tokens=not chat_prompts(cfg))["input_ids"]


def stops(cfg: DictConfig) -> list[str]:
    if cfg.data.get("stop"):
        return list(cfg.data.stop)
    # preference data: the end of the turn (EOS) ends an answer, as in the chosen responses
    return [] if is_preference_data(cfg.data) else stop_strings(cfg.data.prompt_style)
