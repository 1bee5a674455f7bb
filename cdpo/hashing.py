"""Content hashes of files and of model directories, each file hashed once per version of it.

A run asks for its model's identity in every stage and process, and hashing a model's weights costs about
a second per GB. Each file's sha256 is therefore kept, in memory and in `<CDPO_CACHE_DIR>/file-hashes.json`,
under the file's device, inode, size, mtime and ctime: writing to a file changes its ctime (which no user
tool can set back), so an edited, truncated or replaced file is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

_CHUNK = 1 << 20
_STORE = "file-hashes.json"

# What makes a checkpoint's outputs: its weights, its config and generation defaults, its tokenizer and
# chat template (top-level files only: hub repos also hold e.g. original/consolidated.pth, not loaded).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
CONFIG_FILES = ("config.json", "generation_config.json", "vocab.json", "merges.txt")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens")
TOKENIZER_SUFFIXES = (".jinja", ".model", ".tiktoken")

_memo: dict[str, tuple[list, str]] = {}


def cache_root() -> Path:
    """Where cdpo keeps machine-local caches (converted models, file hashes)."""
    return Path(os.environ.get("CDPO_CACHE_DIR") or Path.home() / ".cache" / "cdpo").expanduser()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of `path`'s content, reusing the hash of this exact version of the file when known."""
    path = Path(path).resolve()
    st = path.stat()
    key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    memo = _memo.get(str(path))
    if memo is not None and memo[0] == key:
        return memo[1]
    stored = _load_store().get(str(path))
    if stored is not None and stored.get("stat") == key:
        digest = stored["sha256"]
    else:
        digest = sha256_of(path)
        _remember(str(path), key, digest)
    _memo[str(path)] = (key, digest)
    return digest


def model_files(directory: str | os.PathLike) -> list[Path]:
    """The files of a checkpoint directory that decide what the model computes (sorted by name)."""
    def counts(p: Path) -> bool:
        name = p.name
        return (p.suffix in WEIGHT_SUFFIXES or name.endswith(".safetensors.index.json") or name in CONFIG_FILES
                or name.startswith(TOKENIZER_PREFIXES) or p.suffix in TOKENIZER_SUFFIXES)

    return sorted((p for p in Path(directory).iterdir() if p.is_file() and counts(p)), key=lambda p: p.name)


def model_digest(directory: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} of a checkpoint directory's model files."""
    return {p.name: file_sha256(p) for p in model_files(directory)}


def _load_store() -> dict:
    try:
        store = json.loads((cache_root() / _STORE).read_text())
        return store if isinstance(store, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: it is only a cache
        return {}


def _remember(path: str, key: list, digest: str) -> None:
    """Add one hash to the store (atomic replace; a lost race with another process loses one entry, which
    is hashed again later). Entries of files that are gone are dropped."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        store = {p: v for p, v in _load_store().items() if os.path.exists(p)}
        store[path] = {"stat": key, "sha256": digest}
        fd, tmp = tempfile.mkstemp(prefix=f".{_STORE}.", dir=root)
    except OSError:  # a read-only cache directory: hash again next time
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(store, f)
        os.replace(tmp, root / _STORE)
    except OSError:  # a full disk: hash again next time
        Path(tmp).unlink(missing_ok=True)
