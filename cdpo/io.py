"""JSONL and JSON artifacts: line-numbered read errors and atomic writes.

Every stage artifact goes through these two functions so that a crash never leaves a half-written
file behind and a bad line is reported with its file and line number.
"""
from __future__ import annotations

import contextlib
import errno
import gzip
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


class WriteError(UserError, OSError):
    """A file or directory that cannot be written (full or read-only disk, missing permission)."""


# errno -> what the user can do; safetensors and others report these as text ("... (os error 28)")
DISK_PROBLEMS = {errno.ENOSPC: "no space left on the disk: free some, or choose a directory on another disk",
                 errno.EDQUOT: "disk quota exceeded: free some space, or choose a directory on another disk",
                 errno.EROFS: "the file system is read-only: choose a writable directory",
                 errno.EACCES: "permission denied: fix the permissions, or choose a directory you can write",
                 errno.EPERM: "operation not permitted: fix the permissions, or choose a directory you can write"}


def disk_problem(e: BaseException) -> str | None:
    """What to do about `e` when a full or read-only disk or a missing permission caused it, else None."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    if code is None:
        found = re.search(r"os error (\d+)\)", str(e))
        code = int(found[1]) if found else None
    return DISK_PROBLEMS.get(code)


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Around the writing of `path`: a full or read-only disk or a missing permission becomes one WriteError
    naming it (what was there before is untouched: every writer here writes beside it and renames)."""
    try:
        yield
    except Exception as e:
        why = disk_problem(e)
        if why is None or isinstance(e, UserError):
            raise
        raise WriteError(f"{path}: cannot write it: {why}") from None


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, str | DataError]]:
    """(line number, text) for every line of a JSON Lines file, split as the format defines them: at "\n" only
    (str.splitlines() would also split at U+2028, U+0085 and others, which JSON strings may hold raw), so the
    numbers are the ones an editor shows. A line that is not UTF-8 comes as a DataError naming its place; a
    byte-order mark at the start (some Windows tools write one) is not data. A `.gz` file is read through gzip
    (results kept in the repository, cdpo.report.archive)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with (gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")) as f:
        for lineno, raw in enumerate(f, start=1):  # binary files split at b"\n" only
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                                        f"{e.start + 1} of the line): save the file as UTF-8")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) for every non-blank line; 1-based line numbers."""
    for lineno, line in jsonl_lines(path):
        if isinstance(line, DataError):
            raise line
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
    with writing(path):
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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

    new.chmod(0o755)  # mkdtemp makes directories private, and some writers their files (transformers' weights)
    mode = 0o666 & ~_umask()
    for f in new.rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(mode)
    aside = _aside(path)
    with signals.held():
        if path.exists():
            if aside.exists():  # an earlier put-in-place's, killed before it deleted it
                shutil.rmtree(aside)
            os.rename(path, aside)
        os.rename(new, path)  # (with no `path` but an aside: the aside is the last good one, deleted below)
    shutil.rmtree(aside, ignore_errors=True)
