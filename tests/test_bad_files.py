"""Every failure a user can cause or meet is one line naming the file and what to do (exit 2 at the entry
points) and damages nothing already written: a full disk (a small tmpfs), a read-only one, a byte that is
not UTF-8, a .parquet that is empty or no Parquet, a damaged safetensors file, a ckpt_path torch refuses.
And JSON Lines are read as JSON Lines: split at "\\n" only, whatever Unicode the strings hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cdpo.errors import CorruptArtifactError
from cdpo.io import DataError, read_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}

# characters str.splitlines() splits at, besides "\n" and "\r" (which JSON strings cannot hold raw)
LINE_BREAKS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def _entry(script: str, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=300)


def _one_line(proc, name: str, *expect: str) -> str:
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith(f"{name}: error: ")]
    for text in expect:
        assert text in line, line
    return line


@pytest.fixture
def mount(tmp_path):
    """mount(size, readonly) -> a fresh tmpfs (root only; elsewhere the test is skipped)."""
    mounted = []

    def make(size="1m", readonly=False):
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()[:80]}): needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------- item 5: JSON Lines as JSON Lines


def test_jsonl_rows_with_unicode_line_breaks_are_read_whole_with_an_editors_line_numbers(tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"a{c}b", "chosen": f"x{c}", "rejected": "y"} for i, c in enumerate(LINE_BREAKS)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)  # ensure_ascii=False: the characters are written raw
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_jsonl(path) == rows
    with path.open("a", encoding="utf-8") as f:
        f.write("\n{broken\n")
    with pytest.raises(DataError, match=rf"rows.jsonl:{len(rows) + 2}: malformed JSON"):
        read_jsonl(path)  # the line an editor shows: rows, a blank line, then the broken one

    from cdpo.data.preferences import read_rows

    read = list(read_rows(str(path)))
    assert [r for _, r in read[:-1]] == rows  # str.splitlines() cut every one of these rows in two
    where, bad = read[-1]
    assert where == f"{path}:{len(rows) + 2}" and bad.kind == "malformed JSON"


def test_metrics_history_and_exemplars_read_rows_holding_line_breaks(tmp_path):
    from cdpo.pipeline.trainers import JsonlHistory

    history = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "note": "a\u2028b"}, {"step": 2, "note": "c\x85d"}]
    write_jsonl(history, rows)
    assert JsonlHistory(history, resume=True)._kept == rows


# ---------------------------------------------------------------- item 4: bad files


def test_a_byte_that_is_not_utf8_is_a_bad_row_with_its_place_not_the_end_of_the_run(tmp_path):
    from cdpo.data.preferences import read_rows

    path = tmp_path / "prefs.jsonl"
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good.replace(b'"a"', b'"\xff"') + b"\n" + good + b"\n")
    rows = list(read_rows(str(path)))
    assert [w for w, _ in rows] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert rows[0][1]["prompt"] == "p" and rows[2][1]["chosen"] == "a"  # the BOM is no data; row 3 still read
    assert rows[1][1].kind == "not UTF-8" and "byte 0xff" in str(rows[1][1])
    with pytest.raises(DataError, match=rf"prefs.jsonl:2: not UTF-8 text \(byte 0xff at byte 28 of the line\)"):
        read_jsonl(path)


def test_a_predictions_file_with_a_bad_byte_is_one_line_through_eval(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_bytes(b'{"response": "5", "answer": "5"}\n{"response": "\xc3(", "answer": "5"}\n')
    _one_line(_entry("eval.py", f"predictions={path}", cwd=tmp_path), "eval.py", "preds.jsonl:2: not UTF-8")


@pytest.mark.parametrize("content, expect", [(b"", "not a readable Parquet file (Parquet file size is 0 bytes)"),
                                             (b"prompt,chosen,rejected\np,a,b\n", "not a readable Parquet file"),
                                             (None, "the Parquet file holds no rows")])
def test_a_parquet_that_is_empty_or_no_parquet_is_one_line(tmp_path, content, expect):
    from cdpo.data.preferences import read_rows

    path = tmp_path / "prefs.parquet"
    if content is None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({k: pa.array([], pa.string()) for k in ("prompt", "chosen", "rejected")}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as err:
        list(read_rows(str(path)))
    assert str(err.value).startswith(f"{path}: ") and expect in str(err.value)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from cdpo.models import add_lora, load_model, save_adapter, tiny_llama_like_embedded

    root = tmp_path_factory.mktemp("adapter")
    tiny_llama_like_embedded(seed=0).save_pretrained(root / "base")
    model = add_lora(load_model(str(root / "base")), "policy", r=2, alpha=4, target_modules=["q_proj"])
    return model, save_adapter(model, "policy", root / "adapter")


@pytest.mark.parametrize("damage", ["cut short", "not safetensors", "header overwritten"])
def test_a_damaged_safetensors_adapter_is_one_line(adapter, tmp_path, damage):
    import shutil

    from cdpo.models import check_adapter_fits

    model, good = adapter
    bad = tmp_path / "adapter"
    shutil.copytree(good, bad)
    weights = bad / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"cut short": data[: len(data) // 2], "not safetensors": b"<html>404</html>",
                         "header overwritten": data[:8] + b"\x00" * 40 + data[48:]}[damage])
    with pytest.raises(CorruptArtifactError, match=rf"{weights}: damaged safetensors file"):
        check_adapter_fits(model, bad)
    line = _one_line(_entry("export.py", f"adapter={bad}", "out=out", cwd=tmp_path), "export.py",
                     f"{weights}: damaged safetensors file")
    assert "save or copy the adapter again" in line and not (tmp_path / "out").exists()


class _Custom:  # a class torch's weights_only loading refuses
    pass


@pytest.mark.parametrize("kind", ["text", "pickle of a class", "cut zip"])
def test_a_ckpt_path_torch_refuses_is_one_line(tmp_path, kind):
    import torch

    from cdpo.pipeline.training import _check_checkpoint

    path = tmp_path / "last.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "pickle of a class":
        torch.save({"state_dict": {}, "extra": _Custom()}, path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(100)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CorruptArtifactError, match=rf"ckpt_path={path}: torch cannot load it \(\w+"):
        _check_checkpoint(str(path))
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 0}, path)
    _check_checkpoint(str(path))  # a good one passes


def test_a_full_disk_is_one_line_and_the_old_file_is_untouched(tmp_path, mount):
    from cdpo.io import WriteError

    disk = mount("64k")
    path = write_jsonl(disk / "pairs.jsonl", [{"id": 1}])
    with pytest.raises(WriteError, match=rf"{path}: cannot write it: no space left on the disk"):
        write_jsonl(path, [{"id": i, "text": "x" * 1000} for i in range(200)])
    assert read_jsonl(path) == [{"id": 1}] and sorted(os.listdir(disk)) == ["pairs.jsonl"]

    # the entry point: grading writes its output beside the predictions, on the full disk
    preds = disk / "preds.jsonl"
    preds.write_text("".join(json.dumps({"response": "The answer is 5." + " " * 300, "answer": "5"}) + "\n"
                             for _ in range(110)))  # ~40 kB: its graded copy does not fit beside it
    _one_line(_entry("eval.py", f"predictions={preds}", cwd=tmp_path), "eval.py",
              f"{disk / 'preds.graded.jsonl'}: cannot write it: no space left on the disk")


def test_a_merged_export_onto_a_full_or_read_only_disk_is_one_line_and_keeps_the_old_export(adapter, tmp_path,
                                                                                             mount):
    _, good = adapter
    disk = mount("2m")
    out = disk / "out"
    assert _entry("export.py", f"adapter={good}", f"out={out}", cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _entry("export.py", f"adapter={good}", f"out={out}", "merge=true", "overwrite=true", cwd=tmp_path)
    _one_line(proc, "export.py", f"{out}: cannot write it: no space left on the disk")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and sorted(os.listdir(disk)) == ["out"]

    readonly = mount(readonly=True)
    proc = _entry("export.py", f"adapter={good}", f"out={readonly / 'out'}", cwd=tmp_path)
    _one_line(proc, "export.py", f"{readonly / 'out'}: cannot write it: the file system is read-only")


def test_disk_errors_without_a_named_file_are_still_one_line(tmp_path):
    """A library that reports the disk full as text (safetensors: "... (os error 28)") at a place no writer
    wraps: the entry point's last resort still prints one line and exits 2."""
    script = ("from cdpo.cli import run_entry\n"
              "def work():\n"
              "    raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28)')\n"
              "run_entry('train.py', work)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=120)
    _one_line(proc, "train.py", "no space left on the disk")


def test_a_missing_permission_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """As root no chmod stops a write, so the refusal is injected where every artifact writer creates its file."""
    import tempfile

    from cdpo.io import WriteError

    path = write_jsonl(tmp_path / "pairs.jsonl", [{"id": 1}])

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(WriteError, match=rf"{path}: cannot write it: permission denied: fix the permissions"):
        write_jsonl(path, [{"id": 2}])
    assert read_jsonl(path) == [{"id": 1}]
