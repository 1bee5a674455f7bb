"""Loading causal LMs and tokenizers from a hub id, a local directory or the embedded default.

Also the tiny random Llama models the tests use, and ``model_summary`` for logs.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from cdpo import hub, provenance
from cdpo.errors import UserError

from .embedded import (
    DEFAULT_EMBEDDED_ALIAS,
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    embedded_model_dir,
    embedded_name,
    embedded_of_dir,
    embedded_of_hub_id,
)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip
QUANTIZATIONS = ("nf4",)


class OfflineHubError(UserError, OSError):
    """A hub id was asked for while the hub cannot be reached (offline, or no answer) and it is not in the
    local cache."""


class DamagedModelError(UserError, OSError):
    """A local checkpoint whose weights cannot be read (truncated, emptied, not a checkpoint)."""


class QuantizationUnavailableError(UserError, RuntimeError):
    """4-bit loading was asked for where bitsandbytes is missing, cannot run, or the CUDA device is absent."""


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    quantization: str | None = None,
):
    """A transformers causal LM in eval mode.

    ``name_or_path``: a hub id, a local directory, or an embedded alias
    (``"embedded:smollm2-135m-instruct"``, ``"smollm2_135m"``).
    ``dtype``: float32 / bfloat16 / float16, "auto" for the checkpoint's own, or "bf16-if-native"
    (bfloat16 where ``device`` computes it natively, float32 elsewhere; see :func:`native_bf16`).
    ``quantization="nf4"``: 4-bit QLoRA base (bitsandbytes, on a CUDA GPU or the CPU), prepared for k-bit training.
    """
    kwargs: dict = {"dtype": "auto" if dtype == "auto" else torch_dtype(dtype, device)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs.update(_nf4_kwargs(quantization, device))

    model = _from_pretrained(AutoModelForCausalLM, name_or_path, **kwargs)
    model.name_or_path = recorded_base(name_or_path)  # what PEFT writes into saved adapters as their base

    # Non-reentrant checkpointing works with a frozen base (LoRA) without
    # enable_input_require_grads hacks.
    ckpt_kwargs = {"use_reentrant": False}
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    else:
        model.to(device)
        if gradient_checkpointing:
            _enable_checkpointing(model, ckpt_kwargs)
    if gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless (and warned about) when checkpointing
    return model.eval()


def _enable_checkpointing(model, kwargs: dict) -> None:
    # transformers 5.x renamed gradient_* to activation_* (the old name warns); 4.x has only the old
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(name_or_path: str, *, as_saved: bool = False):
    """The tokenizer for ``name_or_path`` with a pad token and ``padding_side="left"``.

    Left padding is what batched ``generate`` needs (new tokens follow the prompt directly);
    callers that build training batches may set ``tokenizer.padding_side = "right"``.
    A missing pad token is set to the EOS token. ``as_saved``: the tokenizer as its checkpoint has it
    (for saving it beside an exported model).
    """
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path)
    if as_saved:
        return tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


BF16_IF_NATIVE = "bf16-if-native"


def native_bf16(device: str = "cpu", cpu_flags: str | None = None) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a CUDA GPU that supports it, or an
    x86 CPU with AVX512-BF16 or AMX (there, bf16 matmuls run about 4x faster than float32; CPUs
    without them emulate bf16, slower than float32)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cpu_flags is None:
        cpu_flags = provenance.cpu_info()
    return any(flag in cpu_flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def torch_dtype(name: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == BF16_IF_NATIVE:
        return torch.bfloat16 if native_bf16(device) else torch.float32
    try:
        return _DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES) + [BF16_IF_NATIVE]}") from None


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set (now, or when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return hub.offline_env("TRANSFORMERS_OFFLINE") or bool(constants.HF_HUB_OFFLINE)


def load_config(name_or_path: str):
    """The model's transformers config (config.json only: no weights)."""
    return _from_pretrained(AutoConfig, name_or_path)


def recorded_base(name_or_path: str) -> str:
    """The name a model loaded from ``name_or_path`` gives as its base in what is saved from it (PEFT's
    ``base_model_name_or_path``, a model card's ``base_model``): one that means the same on other machines.

    An embedded model: the hub id its GGUF was made from (its conversion under ~/.cache/cdpo exists on
    this machine only). A hub id: itself. A local directory: the hub id when it is an embedded conversion
    or a hub-cache snapshot (``.../models--org--name/snapshots/<rev>``), else its absolute path (config.json
    does not say where a checkpoint came from).
    """
    name_or_path = str(name_or_path)
    key = embedded_name(name_or_path)
    if key is not None:
        return EMBEDDED_MODELS[key].hub_id
    local = Path(name_or_path).expanduser()
    if not local.exists():
        return name_or_path
    local = local.resolve()
    key = embedded_of_dir(local)
    if key is not None:
        return EMBEDDED_MODELS[key].hub_id
    if len(local.parts) > 3 and local.parts[-2] == "snapshots" and local.parts[-3].startswith("models--"):
        return local.parts[-3].removeprefix("models--").replace("--", "/")
    return str(local)


def base_for_recorded(recorded: str) -> str:
    """What to load for the base an adapter records: the embedded model for its hub id (the dequantised
    GGUF weights cdpo trains on, which differ slightly from the hub's; and no network needed) or for the
    cache path older adapters recorded; anything else as recorded."""
    key = embedded_of_hub_id(recorded) or embedded_of_dir(recorded)
    return EMBEDDED_PREFIX + key if key else recorded


def resolve_source(name_or_path: str) -> str:
    """A local directory for embedded aliases and paths; hub ids are returned unchanged."""
    name_or_path = str(name_or_path)
    key = embedded_name(name_or_path)
    if key is not None:
        return str(embedded_model_dir(key))
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    if _looks_like_path(name_or_path):
        raise FileNotFoundError(f"model directory {name_or_path} does not exist")
    return name_or_path


def damaged_weight_file(directory: Path) -> Path | None:
    """The first weight file of a checkpoint directory whose header cannot be read, or None."""
    from cdpo.errors import CorruptArtifactError
    from cdpo.models.adapters import safetensors_shapes  # the header and length check adapters get

    for path in sorted(directory.glob("*.safetensors")):
        try:
            safetensors_shapes(path)
        except CorruptArtifactError:
            return path
    for path in sorted(directory.glob("*.bin")):
        try:
            torch.load(path, map_location="meta", weights_only=True, mmap=True)
        except Exception:  # torch raises many kinds (pickle, zip, runtime) for a damaged file
            return path
    return None


def _looks_like_path(name: str) -> bool:
    # hub ids are "name" or "org/name"; anything else is meant as a path
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _from_pretrained(cls, name_or_path: str, **kwargs):
    source = resolve_source(name_or_path)
    if Path(source).exists():
        if cls is AutoTokenizer:
            return cls.from_pretrained(source, **kwargs)
        try:
            return cls.from_pretrained(source, **kwargs)
        except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:
            damaged = damaged_weight_file(Path(source))
            if damaged is None:
                raise
            raise DamagedModelError(
                f"{damaged}: the model's weights cannot be read ({str(e).splitlines()[0][:160]}); the file is "
                "damaged or incomplete: restore it, or download / export the model again") from None
    # Offline, or a hub that does not answer the probe: the local hub cache only. Asking the hub
    # would retry every file for about a minute before failing.
    why = "offline: HF_HUB_OFFLINE is set" if hub_offline() else hub.unavailable()
    if why is not None and cls is not AutoTokenizer:
        # transformers 5 looks for a PEFT adapter config on the hub even with local_files_only (and retries
        # it for 23 s) unless its own adapter_kwargs say so too
        kwargs["adapter_kwargs"] = {**kwargs.get("adapter_kwargs", {}), "local_files_only": True}
    try:
        return cls.from_pretrained(source, local_files_only=why is not None, **kwargs)
    except OSError as e:
        if why is not None:
            raise OfflineHubError(
                f"model.path={source!r}: a Hugging Face hub id that is not in the local hub cache, and the hub "
                f"cannot be reached ({why}). Give a local directory holding the model (model.path=/path/to/model) "
                f"or the embedded default (model.path={DEFAULT_EMBEDDED_ALIAS})."
            ) from e
        raise OSError(
            f"could not load {source!r} from the Hugging Face hub: {e}\nIf this machine has no "
            f"network, set HF_HUB_OFFLINE=1 and pass a local directory or {DEFAULT_EMBEDDED_ALIAS!r}."
        ) from e


def _nf4_kwargs(quantization: str, device: str) -> dict:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; supported: {', '.join(QUANTIZATIONS)} or None")
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise QuantizationUnavailableError(
            f"quantization={quantization!r} on device {device!r}: CUDA is not available "
            "(torch.cuda.is_available() is False). Use the CPU (trainer=cpu) or quantization=null.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            f"quantization={quantization!r} (4-bit QLoRA) needs bitsandbytes, which is not installed "
            "(pip install 'cdpo[qlora]'). Load without quantization (quantization=null) on this machine.")
    if not on_cuda:
        _check_nf4_on_cpu(quantization)
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        # bf16 where the device multiplies it natively; a CPU without AVX512-BF16/AMX emulates it, slower than fp32
        bnb_4bit_compute_dtype=torch_dtype(BF16_IF_NATIVE, device),
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": bnb, "device_map": {"": torch.device(device).index or 0} if on_cuda else {"": "cpu"}}


def _check_nf4_on_cpu(quantization: str) -> None:
    """Recent bitsandbytes releases have a CPU backend for NF4 (0.50.2 is tested here); older ones are
    CUDA only. A round trip of one tiny block says which kind is installed, before the model is read."""
    import bitsandbytes
    import bitsandbytes.functional as F

    try:
        weights = torch.linspace(-1, 1, 64)
        packed, state = F.quantize_4bit(weights, quant_type="nf4", compress_statistics=True)
        ok = (F.dequantize_4bit(packed, state) - weights).abs().max().item() < 0.2
    except Exception as e:  # what a CUDA-only build raises varies by release
        ok, why = False, f"{type(e).__name__}: {e}"
    else:
        why = "its NF4 round trip is wrong"
    if not ok:
        raise QuantizationUnavailableError(
            f"quantization={quantization!r} on the CPU: bitsandbytes {bitsandbytes.__version__} cannot quantize "
            f"to NF4 here ({why.splitlines()[0]}); upgrade it (0.50.2 runs NF4 on the CPU) or use quantization=null.")


def tiny_llama(
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    pad_token_id: int = 2,
) -> LlamaForCausalLM:
    """A random-initialised small Llama (eval mode), identical for equal arguments.

    It has the real module names (q/k/v/o_proj, gate/up/down_proj), so LoRA presets apply.
    The global RNG is left untouched.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def tiny_llama_like_embedded(seed: int = 0, **kwargs) -> LlamaForCausalLM:
    """A tiny random Llama over the embedded model's vocabulary (49152 tokens).

    Pair it with ``load_tokenizer("embedded:smollm2-135m-instruct")`` to run real text
    through a model that costs milliseconds. Converts the embedded GGUF on first use.
    """
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    ids = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return tiny_llama(vocab_size=config["vocab_size"], seed=seed, **{**ids, **kwargs})


def model_summary(model) -> dict:
    """Parameter counts for logs; shared (tied) tensors are counted once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return {
        "class": type(model).__name__,
        "total_params": total,
        "trainable_params": trainable,
        "trainable_pct": 100.0 * trainable / max(total, 1),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
