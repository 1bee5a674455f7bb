"""JSONL and JSON artifacts: line-numbered read errors and atomic writes.

Every stage artifact goes through these two functions so that a crash never leaves a half-written
file behind and a bad line is reported with its file and line number.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from cdpo.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data; the message names the file and line."""


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) for every non-blank line; 1-based line numbers."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [record for _, record in iter_jsonl(path)]


def _atomic_write_text(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> Path:
    """Write records to `path` atomically (temp file + rename): readers never see a partial file."""
    path = Path(path)

    def write(f):
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    _atomic_write_text(path, write)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    _atomic_write_text(path, lambda f: json.dump(obj, f, indent=2, ensure_ascii=False, default=str))
    return path


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished directory `new` in place of `path` (on the same filesystem). An old `path` is moved
    aside first and deleted only once `new` is in place, so a crash leaves one of the two whole."""
    new.chmod(0o755)  # mkdtemp makes directories private
    old = None
    if path.exists():
        old = new.with_name(f"{new.name}-old")
        path.rename(old)
    new.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
