"""A directory put in place (an export, a saved adapter) survives a kill at every rename: at each instant the
old or the new one is in place, or the next run puts the old one back; no staging or aside folder is left.

Each case runs in a subprocess whose os.rename sends the signal to the process itself at its N-th call,
before that rename or after the last one, for every N until a run ends without being hit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cdpo.io import recover_dir, replace_dir, staging_dir

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}

# Patches os.rename to signal the process at its N-th call (N, the signal and before/after from argv)
KILLER = textwrap.dedent("""
    import os, signal, sys
    N, SIG, WHEN = int(sys.argv[1]), getattr(signal, sys.argv[2]), sys.argv[3]
    _rename, calls = os.rename, [0]
    def rename(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == N and WHEN == "before":
            os.kill(os.getpid(), SIG)
        _rename(src, dst, *a, **k)
        if calls[0] == N and WHEN == "after":
            os.kill(os.getpid(), SIG)
    os.rename = rename
""")


def _run(body: str, n: int, sig: str, when: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER + textwrap.dedent(body), str(n), sig, when],
                          capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def _kill_points(body, cwd, sig="SIGKILL", *, reset, check):
    """Run `body` hit at each rename (before it, and after the last), with `reset()` before and `check()`
    after each run; returns the number of renames."""
    n = 0
    while True:
        n += 1
        for when in ("before", "after"):
            reset()
            proc = _run(body, n, sig, when, cwd)
            hit = proc.returncode != 0
            if hit:
                assert proc.returncode in (-9, 128 + 15, -15), proc.stderr[-2000:]
                check(n, when)
            elif when == "before":
                assert n > 1, proc.stderr[-2000:]  # the body renames at least once
                return n - 1


def _write(directory: Path, version: str) -> None:
    (directory / "sub").mkdir(parents=True, exist_ok=True)
    (directory / "weights.bin").write_text(version * 1000)
    (directory / "sub" / "config.json").write_text(json.dumps({"version": version}))


def _version(directory: Path) -> str | None:
    """old or new when the directory is whole, else None."""
    try:
        version = json.loads((directory / "sub" / "config.json").read_text())["version"]
        return version if (directory / "weights.bin").read_text() == version * 1000 else None
    except (OSError, ValueError):
        return None


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


REPLACE = """
    from pathlib import Path
    from cdpo import signals
    from cdpo.io import replace_dir, staging_dir
    signals.install()
    out = Path("out")
    tmp = staging_dir(out)
    (tmp / "sub").mkdir()
    (tmp / "weights.bin").write_text("new" * 1000)
    (tmp / "sub" / "config.json").write_text('{"version": "new"}')
    try:
        replace_dir(tmp, out)
    except BaseException as e:
        from cdpo.errors import Stopped
        if isinstance(e, Stopped):
            sys.exit(128 + e.signum)
        raise
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_replace_dir_survives_a_signal_at_every_rename(tmp_path, sig):
    """Before: a kill between the two renames left no `out` (the old one only as a hidden -old folder that
    nothing put back), SIGTERM there had the `finally` delete the finished new one, and a kill before them left
    a .tmp- folder of full model size that no later run removed."""
    out = tmp_path / "out"

    def reset():
        for p in tmp_path.iterdir():
            import shutil

            shutil.rmtree(p)
        _write(out, "old")

    def check(n, when):
        if sig == "SIGTERM":  # a stop waits until both renames are done: the new one is in place at once
            assert _version(out) == "new", (n, when)
        else:
            assert _version(out) in ("old", "new") or not out.exists(), (n, when)
        recover_dir(out)  # what the next run does first (staging_dir, export's check, the pipeline's start)
        assert _version(out) in ("old", "new"), (n, when, sorted(os.listdir(tmp_path)))
        assert _leftovers(tmp_path) == [], (n, when)

    assert _kill_points(REPLACE, tmp_path, sig, reset=reset, check=check) == 2


def test_recover_dir_leaves_a_live_writers_staging_alone(tmp_path):
    out = tmp_path / "out"
    _write(out, "old")
    live = staging_dir(out)  # this process: alive, but its own leftovers are cleared by its next staging_dir
    other = tmp_path / f".tmp-out-{os.getppid()}-abcd1234"  # a live process's work in progress
    dead = tmp_path / ".tmp-out-999999999-abcd1234"
    legacy = tmp_path / ".tmp-out-k2j4h5g6"  # the names used before the pid was added
    for d in (other, dead, legacy):
        d.mkdir()
    recover_dir(out)
    assert _leftovers(tmp_path) == [other.name] and not live.exists()
    new = staging_dir(out)
    _write(new, "new")
    replace_dir(new, out)
    assert _version(out) == "new" and _leftovers(tmp_path) == [other.name]


def test_an_export_killed_at_every_rename_is_whole_after_the_next_run(tmp_path):
    """export.py overwrite=true killed at each rename: `out` holds the old or the new export, or the next export
    (or its refusal) puts the old one back first; the next run finishes with no leftovers."""
    from cdpo.export import export
    from cdpo.models import add_lora, load_model, save_adapter, tiny_llama_like_embedded

    tiny_llama_like_embedded(seed=0).save_pretrained(tmp_path / "base")
    adapter = save_adapter(add_lora(load_model(str(tmp_path / "base")), "policy", r=2, alpha=4,
                                    target_modules=["q_proj"]), "policy", tmp_path / "adapter")
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "out"
    body = f"""
        from cdpo.export import export
        export({str(adapter)!r}, {str(out)!r}, overwrite=True, base_model="org/new")
    """

    def base(directory):
        try:
            return json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
        except OSError:
            return None

    def reset():
        export(adapter, out, overwrite=True, base_model="org/old")
        assert base(out) == "org/old" and _leftovers(exports) == []

    def check(n, when):
        assert base(out) in ("org/old", "org/new", None), (n, when)
        export(adapter, out, overwrite=True, base_model="org/next")  # the next run: refuses nothing, leaves nothing
        assert base(out) == "org/next" and _leftovers(exports) == [], (n, when)

    assert _kill_points(body, tmp_path, reset=reset, check=check) == 2


def test_a_save_adapter_killed_between_its_renames_is_put_back(tmp_path):
    """save_adapter (every stage's adapter) killed between the renames: the pipeline's start (recover_dir under
    the run lock) puts the old adapter back; before, it was gone and its stage ran again."""
    from cdpo.models import add_lora, load_model, save_adapter, tiny_llama_like_embedded

    tiny_llama_like_embedded(seed=0).save_pretrained(tmp_path / "base")
    path = save_adapter(add_lora(load_model(str(tmp_path / "base")), "policy", r=2, alpha=4,
                                 target_modules=["q_proj"]), "policy", tmp_path / "run" / "adapter")
    old = {p.name: p.read_bytes() for p in path.iterdir()}
    body = f"""
        import torch
        from cdpo.models import add_lora, load_model, save_adapter
        model = add_lora(load_model({str(tmp_path / "base")!r}), "policy", r=2, alpha=4, target_modules=["q_proj"])
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1.0)
        save_adapter(model, "policy", {str(path)!r})
    """
    proc = _run(body, 2, "SIGKILL", "before", tmp_path)  # rename 1 moved the old one aside; killed before the new
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not path.exists()
    recover_dir(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == old and _leftovers(path.parent) == []
