"""Content addressing: what an artifact is made of, as one hash.

An artifact's identity is a hash of the settings its stage depends on and of the *content* hashes of
its inputs (upstream artifacts, the questions, the model). A finished stage, a shard or a method
result is reused only when its recorded identity equals the one this run computes, so a changed
input or setting gives a new result, never the old one. Each marker also describes its artifacts
(size, JSONL records, sha256), and `verify` checks a file against that before it is used.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

_CHUNK = 1 << 20


def text_digest(obj) -> str:
    """sha256 of a JSON-able object (sorted keys, so equal settings give equal digests)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def describe(path: Path) -> dict:
    """size, record count (JSONL lines) and sha256 of a file, or of a directory's files (names and
    contents, sorted): what a marker records and `verify` checks."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        size = 0
        for f in files:
            d = describe(f)
            size += d["size"]
            digest = _adapter_config_digest(f) if f.name == "adapter_config.json" else d["sha256"]
            h.update(f"{f.relative_to(path).as_posix()}\0{digest}\n".encode())
        return {"size": size, "files": len(files), "sha256": h.hexdigest()}
    h, lines = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            lines += chunk.count(b"\n")
    out = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    if path.suffix == ".jsonl":
        out["records"] = lines
    return out


def _adapter_config_digest(path: Path) -> str:
    """PEFT writes target_modules from a set, in an order that changes with the process's hash seed:
    hashed sorted, so that one adapter retrained elsewhere has the same identity."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return describe(path)["sha256"]
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return text_digest(config)


_verified: dict[tuple, None] = {}  # (path, size, mtime, sha) already checked in this process


def verify(path: Path, expected: dict) -> str | None:
    """What is wrong with `path` against its marker's description, or None when it matches.
    The size is checked first (free); the content hash only when the size matches."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_file():
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns, expected.get("sha256"))
        if key in _verified:
            return None
        if stat.st_size != expected.get("size"):
            return f"{stat.st_size} bytes, its marker says {expected.get('size')} (truncated or edited)"
    actual = describe(path)
    for field in ("files", "records", "size"):
        if field in expected and actual.get(field) != expected[field]:
            return f"{actual.get(field)} {field}, its marker says {expected[field]} (truncated or edited)"
    if actual["sha256"] != expected.get("sha256"):
        return "its content differs from what its marker recorded (edited or replaced)"
    if path.is_file():
        _verified[key] = None
    return None


def model_identity(model_cfg) -> str:
    """The base model by the content of what decides its outputs (weights, config, tokenizer and chat
    template; cdpo.hashing.model_files), and the dtype it computes in, resolved on this machine
    ("bf16-if-native" is bfloat16 on one machine and float32 on another). Tiny models are made by code
    from their name. A file is hashed once per version of it, so this stays cheap after the first time."""
    path, revision, dtype = str(model_cfg.get("path")), model_cfg.get("revision"), model_cfg.get("dtype")
    if path.startswith("tiny:"):
        return text_digest([path, revision, dtype])
    from cdpo.hashing import model_digest

    return text_digest(["content", model_digest(model_directory(path, revision)), resolved_dtype(dtype)])


def model_directory(path: str, revision: str | None = None) -> Path:
    """The checkpoint directory `model.path` loads: the embedded model's verified conversion, a local
    directory, or a hub id's snapshot in the local hub cache (fetched first when the hub can be used)."""
    from cdpo.models.embedded import embedded_model_dir, embedded_name

    key = embedded_name(path)
    if key is not None:
        return embedded_model_dir(key)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    return _hub_snapshot(path, revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    from cdpo import hub
    from cdpo.errors import UserError
    from cdpo.hashing import CONFIG_FILES, TOKENIZER_PREFIXES, TOKENIZER_SUFFIXES

    patterns = ["*.safetensors", "*.safetensors.index.json", *CONFIG_FILES,
                *[p + "*" for p in TOKENIZER_PREFIXES], *["*" + s for s in TOKENIZER_SUFFIXES]]
    try:  # the local hub cache first: no probe of the hub for a model fetched already (every stage asks)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    why = hub.unavailable()
    try:
        if why is not None:
            raise OSError(why)
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline and not cached, unknown repo, gated: loading would fail the same way
        raise UserError(f"model.path={repo_id!r}: its files could not be found in the local hub cache or "
                        f"fetched ({why or type(e).__name__}); give a local directory (model.path=/path/to/model) "
                        "or the embedded default (model.path=embedded:smollm2-135m-instruct)") from e


def resolved_dtype(dtype) -> str | None:
    """The dtype a model loads in on this machine: "bf16-if-native" decided here, other names as given."""
    if dtype != "bf16-if-native":
        return None if dtype is None else str(dtype)
    import torch

    from cdpo.models.loading import torch_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch_dtype(dtype, device)).removeprefix("torch.")


def questions_digest(problems: Iterable) -> str:
    """The questions and gold answers a stage reads (a fixed gold answer changes it)."""
    return text_digest([[p.id, p.question, list(p.answers), p.solution] for p in problems])


def file_identity(path: str | os.PathLike) -> str:
    return describe(Path(path))["sha256"]
