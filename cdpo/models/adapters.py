"""Named LoRA adapters through PEFT.

One base model carries several named adapters (e.g. the CE positive and negative models,
or the cDPO policy); the DPO reference is the same base with adapters disabled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import warnings

from peft import LoraConfig, PeftModel, get_peft_model



@contextlib.contextmanager
def _peft_wrapping():
    """PEFT asks every model it wraps for `is_gradient_checkpointing`, which transformers 5 deprecated in favour
    of `is_activation_checkpointing`: that FutureWarning is PEFT's to fix and tells a cdpo user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield

from cdpo.errors import CorruptArtifactError, UserError
from cdpo.io import replace_dir, staging_dir, writing

# The paper's LoRA settings (Sec. 3 / Appendix): CE models and the cDPO policy.
PAPER_CE_LORA = dict(r=8, alpha=16, dropout=0.1, target_modules=["gate_proj", "up_proj", "down_proj"])
PAPER_CDPO_LORA = dict(
    r=16,
    alpha=32,
    dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterMismatchError(UserError, ValueError):
    """An adapter directory does not fit the model it is loaded into."""


def add_lora(model, name: str, *, r: int, alpha: int, dropout: float = 0.0, target_modules: list[str]) -> PeftModel:
    """Add a LoRA adapter called ``name`` and make it the active one.

    A plain model is wrapped (PEFT injects the LoRA layers in place, so keep no reference to
    the unwrapped model expecting base outputs from it: use ``reference_model``). On a
    PeftModel another named adapter is added beside the existing ones.
    """
    check_adapter_name(name)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} already exists (have: {adapter_names(model)})")
        model.add_adapter(name, config)
    else:
        with _peft_wrapping():
            model = get_peft_model(model, config, adapter_name=name)
    use_adapter(model, name)
    return model


def check_adapter_name(name: str) -> None:
    """Refuse names PEFT cannot use. It keeps each adapter's layers under its name in torch ModuleDicts
    beside their methods, so a name such as "eval", "train" or "keys" would shadow one: torch then fails
    deep inside PEFT with a bare ``KeyError: "attribute 'eval' already exists"``."""
    import torch

    if not name or "." in name or any(hasattr(d, name) for d in (torch.nn.ModuleDict(), torch.nn.ParameterDict())):
        raise ValueError(f"adapter name {name!r} cannot be used: it is empty, holds a dot or is the name of a "
                         "torch.nn.ModuleDict attribute (eval, train, keys, ...); choose another, e.g. 'adapter'")


def adapter_names(model) -> list[str]:
    return list(model.peft_config) if isinstance(model, PeftModel) else []


def use_adapter(model: PeftModel, name: str) -> PeftModel:
    """Make ``name`` the active adapter; only its weights are trainable afterwards."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; have: {adapter_names(model)}")
    model.set_adapter(name)
    return model


@contextlib.contextmanager
def reference_model(model):
    """Within this block ``model`` computes the base model (all adapters off): the DPO reference."""
    if not isinstance(model, PeftModel):
        yield model  # no adapters: the model is its own reference
        return
    with model.disable_adapter():
        yield model


def save_adapter(model: PeftModel, name: str, path: str | Path, state_dict: dict | None = None) -> Path:
    """Write adapter ``name`` (config + safetensors) directly into ``path``, atomically.

    PEFT puts every adapter but "default" in a sub-directory named after it; here the
    directory always holds the adapter itself, whatever its name. ``state_dict``: the adapter's
    tensors gathered from multi-process training (cdpo.distributed.trained_adapter_state, PeftModel
    keys) instead of the model's own, which then may hold only this process's shard.
    """
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; have: {adapter_names(model)}")
    path = Path(path)
    with writing(path):
        tmp = staging_dir(path)
        try:
            if state_dict is None:
                # save_embedding_layers=False: "auto" would look the base up on the hub (a network call) to spot
                # resized vocabularies, which cdpo never makes; LoRA weights on embeddings are saved either way
                model.save_pretrained(tmp, selected_adapters=[name], save_embedding_layers=False)
                written = tmp if name == "default" else tmp / name
            else:
                written = _write_adapter(model, name, state_dict, tmp)
            replace_dir(written, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_adapter(model: PeftModel, name: str, state_dict: dict, directory: Path) -> Path:
    """PEFT's adapter files from given tensors. (PEFT's own save selects tensors by walking the model's
    modules, whose names under FSDP carry the wrappers' segments, and then finds none of them.)"""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[name])
    config.inference_mode = True  # as PEFT saves it
    config.save_pretrained(str(directory))
    marker = f".{name}."  # on disk the adapter name is dropped: ...q_proj.lora_A.policy.weight -> ...lora_A.weight
    tensors = {k.replace(marker, "."): v.detach().cpu().contiguous() for k, v in state_dict.items() if marker in k}
    if not tensors:
        raise ValueError(f"no tensors of adapter {name!r} among {len(state_dict)} given")
    save_file(tensors, str(directory / _ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def load_adapter(model, path: str | Path, name: str, *, trainable: bool = False) -> PeftModel:
    """Load the adapter saved in ``path`` under ``name`` (and make it active).

    Adapters whose LoRA shapes or target modules do not fit the model are refused with an
    error naming the directory and the mismatch, before PEFT sees them.
    """
    path = Path(path)
    check_adapter_name(name)
    check_adapter_fits(model, path)
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            raise ValueError(f"adapter {name!r} already exists (have: {adapter_names(model)})")
        model.load_adapter(str(path), adapter_name=name, is_trainable=trainable)
    else:
        with _peft_wrapping():
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name, is_trainable=trainable)
    use_adapter(model, name)
    if not trainable:
        # set_adapter marks the active adapter trainable; a loaded-for-inference one stays frozen
        for pname, p in model.named_parameters():
            if "lora_" in pname and f".{name}." in pname:
                p.requires_grad_(False)
    return model


def merge_and_unload(model):
    """Fold the active adapter into the base weights and return the plain model."""
    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def check_adapter_fits(model, path: Path) -> None:
    """Raise AdapterMismatchError unless every LoRA tensor in ``path`` fits a module of ``model``."""
    config_file, weights_file = path / _ADAPTER_CONFIG, path / _ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterMismatchError(f"{path} is not an adapter directory (needs {_ADAPTER_CONFIG} and {_ADAPTER_WEIGHTS})")
    try:
        saved_base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise CorruptArtifactError(f"{config_file}: damaged adapter config ({str(e)[:120]}): save or copy the "
                                   "adapter again") from None
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = dict(base.named_modules())
    this_base = getattr(base.config, "_name_or_path", None) or type(base).__name__

    problems = []
    for key, shape in safetensors_shapes(weights_file).items():
        module_name, kind = _lora_target(key)
        if kind is None:
            continue  # modules_to_save and the like: PEFT checks those itself
        module = modules.get(module_name)
        if module is None or not hasattr(module, "in_features"):
            problems.append(f"module {module_name} does not exist in this model")
            continue
        # lora_A: [r, in_features], lora_B: [out_features, r]
        want, got = (module.in_features, shape[1]) if kind == "lora_A" else (module.out_features, shape[0])
        if want != got:
            side = "in" if kind == "lora_A" else "out"
            problems.append(f"{module_name}: adapter has {side}_features={got}, model has {want}")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; ... ({len(problems)} mismatches)" if len(problems) > 3 else "")
        origin = f"adapter base {saved_base!r}, this model {this_base!r}" if saved_base else f"this model {this_base!r}"
        raise AdapterMismatchError(f"adapter in {path} does not fit this model ({origin}): {shown}")


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a .safetensors file; a damaged file (cut short, overwritten, not safetensors)
    is a CorruptArtifactError naming it. The header and the file's length are checked: the data's bytes are not."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # SafetensorError, OSError
        raise CorruptArtifactError(f"{path}: damaged safetensors file ({str(e).strip()[:160]}): save or copy the "
                                   "adapter again (a run's stage writes it anew once the file is deleted)") from None


def _lora_target(key: str) -> tuple[str, str | None]:
    """("model.layers.0.mlp.up_proj", "lora_A") from a saved adapter tensor name."""
    for kind in ("lora_A", "lora_B"):
        marker = f".{kind}."
        if marker in key:
            module = key.split(marker)[0].removeprefix("base_model.model.")
            return module, kind
    return key, None
