"""JSONL and JSON artifacts: line-numbered read errors and atomic writes.

Every stage artifact goes through these two functions so that a crash never leaves a half-written
file behind and a bad line is reported with its file and line number.
"""
from __future__ import annotations

import json
import os
import re
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


def staging_dir(path: Path) -> Path:
    """A new empty directory beside `path` to write into and then put in place with `replace_dir`. What an
    interrupted earlier put-in-place of `path` left behind is cleared (or restored) first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    # the pid lets a later run tell a dead writer's leftovers from a live one's work in progress
    return Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-{os.getpid()}-", dir=path.parent))


def _aside(path: Path) -> Path:
    return path.with_name(f".old-{path.name}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def recover_dir(path: Path) -> None:
    """Finish or undo a `replace_dir` of `path` that a kill interrupted: the old directory moved aside while no
    new one took its place is put back, a leftover old one beside the new one is deleted, and the staging
    directories of dead writers (full model size) are removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    asides = [_aside(path)]
    # the names used before: the aside was the staging directory's name + "-old"
    stale = re.compile(rf"\.tmp-{re.escape(path.name)}-(?:(\d+)-)?[a-z0-9_]{{8}}(-old)?")
    for entry in path.parent.iterdir():
        m = stale.fullmatch(entry.name)
        if m and m[2]:
            asides.append(entry)
        elif m and not (m[1] and int(m[1]) != os.getpid() and _alive(int(m[1]))):
            shutil.rmtree(entry, ignore_errors=True)
    for aside in asides:
        if aside.is_dir():
            if path.exists():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(aside, path)


def replace_dir(new: Path, path: Path) -> None:
    """Put the finished directory `new` in place of `path` (on the same filesystem). An old `path` is moved
    aside first and deleted only once `new` is in place; a stop signal waits until both renames are done,
    and a kill between them leaves the old one aside, which `recover_dir` (the next `staging_dir`) puts back."""
    from cdpo import signals

    new.chmod(0o755)  # mkdtemp makes directories private
    aside = _aside(path)
    with signals.held():
        if path.exists():
            if aside.exists():  # an earlier put-in-place's, killed before it deleted it
                shutil.rmtree(aside)
            os.rename(path, aside)
        os.rename(new, path)  # (with no `path` but an aside: the aside is the last good one, deleted below)
    shutil.rmtree(aside, ignore_errors=True)
