"""Many GPUs and nodes: Lightning strategies from trainer configs, this process's place, adapter gathering.

A trainer config names a strategy the way Lightning does (`strategy: ddp`) or as a mapping whose
`name` picks the Lightning class and whose other keys are that class's arguments:

    strategy:
      name: fsdp                                   # lightning.pytorch.strategies.FSDPStrategy
      auto_wrap_policy: [transformers.models.llama.modeling_llama.LlamaDecoderLayer]
      sharding_strategy: FULL_SHARD

Only what YAML cannot express is converted here: layer classes given by import path, and the FSDP
wrap policy, which also gives every trainable (LoRA) matrix its own FSDP unit (see `_fsdp_policy`).
Processes are started by Lightning (`trainer.devices` > 1), torchrun or SLURM's srun; Lightning's
cluster environments read their variables, and the helpers below read the same ones before any
process group exists.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from cdpo.errors import UserError

STRATEGIES = ("ddp", "fsdp", "deepspeed")
TRAINING_STAGES = ("sft_pos", "sft_neg", "align")


class ScalingError(UserError, ValueError):
    """A trainer / strategy setting that cannot work (unknown strategy, missing package, bad combination)."""


def build_strategy(spec):
    """A Lightning strategy (object or registered name) from `trainer.strategy`."""
    if spec is None or isinstance(spec, str):
        return spec or "auto"
    kwargs = dict(spec)
    name = kwargs.pop("name", None)
    if name not in STRATEGIES:
        raise ScalingError(f"trainer.strategy.name={name!r}: choose one of {', '.join(STRATEGIES)} "
                           "(or give a Lightning strategy name as a string, e.g. trainer.strategy=ddp)")
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(**kwargs)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        layers = _classes(kwargs.pop("auto_wrap_policy", None) or [], "auto_wrap_policy")
        ckpt = _classes(kwargs.pop("activation_checkpointing_policy", None) or [], "activation_checkpointing_policy")
        return FSDPStrategy(auto_wrap_policy=_fsdp_policy(layers), activation_checkpointing_policy=set(ckpt) or None,
                            **kwargs)
    if importlib.util.find_spec("deepspeed") is None:
        raise ScalingError("trainer.strategy.name=deepspeed needs the deepspeed package: pip install 'cdpo[deepspeed]' "
                           "(CUDA machines only), or use trainer=fsdp")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(**kwargs)


def _classes(paths, key: str) -> list[type]:
    out = []
    for path in paths:
        module, _, name = str(path).rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError, ValueError):
            raise ScalingError(f"trainer.strategy.{key}: cannot import {path!r} (give module.ClassName)") from None
    return out


def _is_trainable_leaf(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and isinstance(weight, torch.nn.Parameter) and weight.requires_grad


def _wrap_rule(module: torch.nn.Module, layers: tuple[type, ...]) -> bool:
    return isinstance(module, layers) or _is_trainable_leaf(module)


def _fsdp_policy(layers: list[type]):
    """One FSDP unit per decoder block, and one per trainable leaf (each LoRA A / B matrix).

    FSDP flattens the parameters of a unit into one tensor, which must have a single dtype: the
    frozen base is bf16 while PEFT keeps the adapters in fp32. Separate units also keep the
    frozen flat parameters free of gradient buffers.
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    return functools.partial(lambda_auto_wrap_policy, lambda_fn=functools.partial(_wrap_rule, layers=tuple(layers)))


def strategy_name(trainer_cfg) -> str:
    spec = trainer_cfg.get("strategy")
    if spec is None or isinstance(spec, str):
        return str(spec or "auto")
    return str(spec.get("name"))


def shards_parameters(trainer_cfg) -> bool:
    """FSDP and DeepSpeed place (and shard) the parameters themselves: load the base on the CPU."""
    return strategy_name(trainer_cfg).startswith(("fsdp", "deepspeed"))


def checkpoints_activations(trainer_cfg) -> bool:
    """The strategy checkpoints activations itself (then the model's own checkpointing stays off)."""
    spec = trainer_cfg.get("strategy")
    return not isinstance(spec, (str, type(None))) and bool(spec.get("activation_checkpointing_policy"))


def local_rank() -> int:
    """This process's GPU index on its node (torchrun and Lightning set LOCAL_RANK, srun SLURM_LOCALID)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def is_main_process() -> bool:
    """Global rank 0, also before the process group exists (then read from the launcher's variables)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    # torchrun: RANK; srun: SLURM_PROCID; Lightning's own children: NODE_RANK and LOCAL_RANK
    return all(int(os.environ.get(k, 0)) == 0 for k in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def planned_processes(trainer_cfg) -> int:
    """How many training processes the trainer config starts: WORLD_SIZE when a launcher set it,
    else trainer.devices x trainer.num_nodes as Lightning counts them."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) and devices != "auto":  # "0,1,3": those devices
        count = len([d for d in devices.split(",") if d.strip()])
    elif devices == "auto" or devices == -1:
        gpu = trainer_cfg.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else 1
    elif isinstance(devices, int):
        count = devices
    else:  # a list of device indices
        count = len(devices)
    return max(1, count) * int(trainer_cfg.get("num_nodes", 1) or 1)


def check_stages(trainer_cfg, stages: list[str]) -> None:
    """Several training processes run only the training stages: sampling, scoring and evaluation
    would each be done by every process (generation scales through vLLM's tensor parallelism)."""
    n = planned_processes(trainer_cfg)
    other = [s for s in stages if s not in TRAINING_STAGES]
    if n > 1 and other:
        raise ScalingError(
            f"this trainer starts {n} processes (trainer.devices x trainer.num_nodes, or WORLD_SIZE), which run only "
            f"the training stages {', '.join(TRAINING_STAGES)}; stage(s) {', '.join(other)} run in one process. Run "
            "them one at a time: e.g. `python train.py stage=sample generation=vllm` (one process), then "
            "`python train.py stage=align trainer=fsdp`")


def trained_adapter_state(trainer) -> dict | None:
    """The trainable (adapter) tensors of a fitted module as PeftModel state-dict keys, whole and on the
    CPU of global rank 0; None on the other ranks. Every rank must call it (it gathers shards)."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = trainer.strategy
    module = strategy.lightning_module
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # FSDP gathers unit by unit; on GPUs each whole tensor goes to rank 0's host memory (torch's FSDP
        # crashes offloading from CPU processes, which hold everything in host memory anyway)
        offload = strategy.root_device.type == "cuda"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=True)
        state = get_model_state_dict(strategy.model, options=options)
    elif getattr(strategy, "zero_stage_3", False):  # DeepSpeed ZeRO-3 partitions every parameter
        import deepspeed

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            state = {n: p.detach().cpu().clone() for n, p in named}
    else:
        state = {n: p.detach().cpu() for n, p in module.named_parameters() if p.requires_grad}
    if not trainer.is_global_zero:
        return None
    # LightningModule keys ("model.base_model.model...") -> the PeftModel's own ("base_model.model...");
    # only LoRA tensors (a tied head can come along as an alias of a frozen tensor)
    return {k.removeprefix("model."): v.cpu() for k, v in state.items() if "lora_" in k}
