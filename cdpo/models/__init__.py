"""Models: loading (hub id, local directory, embedded default), tiny test models, LoRA adapters.

    model = load_model("embedded:smollm2-135m-instruct")
    tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")   # padding_side="left"
    policy = add_lora(model, "policy", **PAPER_CDPO_LORA)
    with reference_model(policy):                                   # adapters off = DPO reference
        ...
"""

from .adapters import (
    PAPER_CDPO_LORA,
    PAPER_CE_LORA,
    AdapterMismatchError,
    adapter_names,
    add_lora,
    check_adapter_name,
    check_adapter_fits,
    load_adapter,
    merge_and_unload,
    reference_model,
    save_adapter,
    use_adapter,
)
from .embedded import (
    DEFAULT_EMBEDDED,
    DEFAULT_EMBEDDED_ALIAS,
    EMBEDDED_ALIASES,
    EMBEDDED_MODELS,
    EmbeddedModelMissingError,
    cache_root,
    embedded_model_dir,
    embedded_name,
    embedded_of_dir,
    embedded_of_hub_id,
    gguf_path,
)
from .loading import (
    OfflineHubError,
    QuantizationUnavailableError,
    base_for_recorded,
    hub_offline,
    load_config,
    load_model,
    load_tokenizer,
    native_bf16,
    model_summary,
    recorded_base,
    resolve_source,
    tiny_llama,
    tiny_llama_like_embedded,
    torch_dtype,
)

__all__ = [name for name in dir() if not name.startswith("_")]
