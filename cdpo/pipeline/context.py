"""Building blocks every stage needs: the base model and tokenizer, prompts, a Trainer, a logger,
and the model that sample / eval generate with (HF or vLLM: `generation.backend`)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cdpo import distributed
from cdpo.data import arith_exemplars, build_prompt, load_exemplars, load_problems, stop_strings
from cdpo.io import write_jsonl
from cdpo.models import load_adapter, load_model, load_tokenizer, tiny_llama_like_embedded

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
def generation_models(cfg: DictConfig):
    """Yields `model_for(adapter=None, name="eval")`: the model sample / eval generate with, for
    `cdpo.generation.generate`.

    generation.backend=hf: a fresh base model with the adapter directory loaded. vllm: one vLLM
    engine for the whole block (started by the first call), each adapter served as a LoRA request;
    the engine is shut down when the block ends, so that the training stages get the GPU back.
    """
    backend = cfg.generation.get("backend", "hf")
    if backend not in BACKENDS:
        raise ValueError(f"generation.backend={backend!r}: choose one of {', '.join(BACKENDS)} (generation=vllm)")
    if backend == "hf":
        def model_for(adapter=None, name: str = "eval"):
            model = base_model(cfg)
            return load_adapter(model, adapter, name) if adapter else model

        yield model_for
        return
    from cdpo.generation_vllm import VLLMEngine

    engine = None

    def served(adapter=None, name: str = "eval"):
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
    d = cfg.data
    source = d.source
    if split == d.train_split and d.get("train_source"):
        source = d.train_source
    task = dict(d.get("task") or {}) if source == "arith" else {}
    return load_problems(source, split, limit=limit, **task)


def prompt_of(cfg: DictConfig, tok, question: str, *, for_training: bool = False) -> str:
    """The prompt sample and eval generate after (data.n_shot exemplars); `for_training`: the one
    the CE models and the policy are trained and scored with (data.train_n_shot, when set)."""
    d = cfg.data
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
    return tok(prompt, add_special_tokens=cfg.data.prompt_style != "chat")["input_ids"]


def stops(cfg: DictConfig) -> list[str]:
    return list(cfg.data.stop) if cfg.data.get("stop") else stop_strings(cfg.data.prompt_style)


def wandb_mode(cfg: DictConfig) -> str:
    mode = cfg.logger.mode
    return ("online" if os.environ.get("WANDB_API_KEY") else "offline") if mode == "auto" else mode


def make_logger(cfg: DictConfig, name: str):
    kind = cfg.logger.kind
    save_dir = Path(cfg.run_dir)
    if kind == "none":
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(save_dir), name="csv", version=name)
    if kind != "wandb":
        raise ValueError(f"unknown logger.kind {kind!r}; choose wandb, csv or none")
    save_dir.mkdir(parents=True, exist_ok=True)
    # Under a wandb sweep agent the run id in the environment belongs to the eval run, which carries
    # the sweep's metric (log_results); training stages get runs of their own.
    run_id = _new_wandb_id() if os.environ.get("WANDB_SWEEP_ID") else None
    return L.pytorch.loggers.WandbLogger(
        project=cfg.logger.project, entity=cfg.logger.entity, name=f"{save_dir.name}/{name}", save_dir=str(save_dir),
        offline=wandb_mode(cfg) == "offline", config=OmegaConf.to_container(cfg, resolve=True), group=save_dir.name,
        job_type=name, id=run_id, mode=wandb_mode(cfg),  # explicit: after an earlier run in this process
        # (an eval's log_results, a multirun's previous job) `offline` alone no longer kept wandb offline
    )


def _new_wandb_id() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def log_results(cfg: DictConfig, name: str, summary: dict) -> None:
    """Evaluation results as a wandb run of their own (job_type "eval"), for the report and sweeps;
    nothing with the csv or no logger (the report reads the run directories)."""
    if cfg.logger.kind != "wandb":
        return
    import wandb

    save_dir = Path(cfg.run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, name=f"{save_dir.name}/{name}",
                     dir=str(save_dir), mode=wandb_mode(cfg), group=save_dir.name, job_type="eval",
                     config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
    run.summary.update(summary)
    run.finish()


class JsonlHistory(L.pytorch.loggers.Logger):
    """Every logged metrics row appended to a JSONL file, whatever the configured logger: the report
    plots training curves (the paper's Figure 6) from it without wandb or CSV logs.

    A new fit starts a new history; a fit resumed from a checkpoint (`resume=True`) keeps the rows before
    the first step it logs again and drops those from that step on (logged after the checkpoint, before
    the crash, and logged again now): no duplicates, no gaps."""

    def __init__(self, path: Path, resume: bool = False):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._kept = self._rows() if resume else []
        self._first = True
        if not resume:
            self.path.write_text("")

    def _rows(self) -> list[dict]:
        rows = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill: the checkpoint predates it
                    break
        return rows

    name = property(lambda self: "history")
    version = property(lambda self: 0)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self._first:  # rewrite the history up to this step once (atomically), then append
            self._first = False
            kept = [r for r in self._kept if step is None or r.get("step") is None or r["step"] < step]
            write_jsonl(self.path, kept)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def finish_logger(logger) -> None:
    if isinstance(logger, L.pytorch.loggers.WandbLogger):
        import wandb

        logger.finalize("success")
        wandb.finish()


def make_trainer(cfg: DictConfig, name: str, *, epochs: int, grad_accum: int = 1, max_steps: int = -1,
                 checkpoint_dir: Path | None = None, history: Path | None = None,
                 resume_history: bool = False) -> L.Trainer:
    """A Trainer from cfg.trainer; with trainer.checkpoint_every_n_steps and a checkpoint_dir it keeps
    `last.ckpt` there (a folder of shards under FSDP's state_dict_type: sharded) to resume a fit from;
    with `history`, logged metrics also go to that JSONL file whatever the logger (continued, not restarted,
    with `resume_history`: the fit resumes from a checkpoint)."""
    t = cfg.trainer
    every = t.get("checkpoint_every_n_steps")
    callbacks = []
    if every and checkpoint_dir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(checkpoint_dir), every_n_train_steps=every,
                                                              save_top_k=0, save_last=True))
    logger = make_logger(cfg, name)
    if history is not None:  # the configured logger stays first: trainer.logger is what finish_logger ends
        logger = [*([logger] if logger else []), JsonlHistory(history, resume=resume_history)]
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.get("num_nodes", 1), precision=t.precision,
        max_epochs=epochs, max_steps=max_steps, accumulate_grad_batches=grad_accum,
        gradient_clip_val=t.gradient_clip_val, log_every_n_steps=t.log_every_n_steps, logger=logger,
        enable_checkpointing=bool(callbacks), callbacks=callbacks, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=cfg.run_dir, strategy=distributed.build_strategy(t.get("strategy")),
    )
