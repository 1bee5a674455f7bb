"""A model's identity is its content: damaged weights are never used and results made with other weights
never reused (fault injection on the embedded cache, local directories and a hub snapshot)."""
import json
import logging
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import cdpo.hashing as hashing
import cdpo.models.embedded as embedded_mod
from cdpo.models import embedded_model_dir
from cdpo.models.loading import DamagedModelError, load_model, tiny_llama
from cdpo.pipeline.identity import model_identity


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(hashing, "_memo", {})
    return tmp_path / "cache"


def _corrupt_in_place(path: Path, offset: int = 100, n: int = 64) -> None:
    """Zero `n` bytes of `path` in place: same size, and the mtime set back to what it was."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\0" * n)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@pytest.fixture
def fake_embedded(cache, monkeypatch):
    """The embedded conversion replaced by one that writes fixed 'weights' (no 25 s GGUF conversion)."""
    calls = []

    def convert(spec, gguf, out):
        calls.append(out)
        (out / "config.json").write_text('{"hidden_size": 8}')
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 64)
        (out / "tokenizer.json").write_text('{"vocab": ["a"]}')

    monkeypatch.setattr(embedded_mod, "_convert_into", convert)
    return calls


@pytest.mark.parametrize("damage", ["in_place", "truncated", "emptied", "missing", "tokenizer"])
def test_a_damaged_embedded_conversion_is_converted_again(fake_embedded, caplog, damage):
    caplog.set_level(logging.WARNING, logger="cdpo")
    final = embedded_model_dir()
    cfg = OmegaConf.create({"path": "embedded:smollm2-135m-instruct", "dtype": "float32"})
    intact = model_identity(cfg)
    assert embedded_model_dir() == final and len(fake_embedded) == 1  # intact: used as it is
    weights = final / ("tokenizer.json" if damage == "tokenizer" else "model.safetensors")
    if damage in ("in_place", "tokenizer"):
        _corrupt_in_place(weights, offset=2, n=8)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "emptied":
        weights.write_bytes(b"")
    else:
        weights.unlink()
    assert embedded_model_dir() == final
    assert len(fake_embedded) == 2, "the damaged conversion was used"
    assert f"{weights.name} " in caplog.text and "converting it again" in caplog.text
    assert (final / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    assert model_identity(cfg) == intact  # the same content again: results made with it stay valid


def test_an_old_conversion_without_hashes_is_converted_again(fake_embedded):
    final = embedded_model_dir()
    marker = json.loads((final / "cdpo_embedded.json").read_text())
    (final / "cdpo_embedded.json").write_text(json.dumps({**marker, "format": 1, "files": None}))
    embedded_model_dir()
    assert len(fake_embedded) == 2


def test_local_model_identity_follows_content_not_names_sizes_and_times(cache, tmp_path):
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    cfg = OmegaConf.create({"path": str(model), "dtype": "float32"})
    first = model_identity(cfg)
    assert model_identity(cfg) == first
    _corrupt_in_place(model / "model.safetensors", offset=4096)  # same size, same mtime, other weights
    second = model_identity(cfg)
    assert second != first
    _corrupt_in_place(model / "tokenizer_config.json", offset=2, n=4)
    assert len({first, second, model_identity(cfg)}) == 3
    (model / "README.md").write_text("notes")  # not part of what the model computes
    assert model_identity(cfg) == model_identity(cfg)


def test_file_hashes_are_reused_across_processes_until_the_file_changes(cache, tmp_path, monkeypatch):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 1000)
    digest = hashing.file_sha256(f)
    reads = []
    monkeypatch.setattr(hashing, "sha256_of", lambda p: reads.append(p) or "recomputed")
    monkeypatch.setattr(hashing, "_memo", {})  # a new process: only the stored hashes
    assert hashing.file_sha256(f) == digest and reads == []
    _corrupt_in_place(f, offset=10, n=3)
    assert hashing.file_sha256(f) == "recomputed" and len(reads) == 1


def test_bf16_if_native_is_resolved_in_the_identity(cache, tmp_path, monkeypatch):
    """One configured dtype, two machines: a bf16 result must not be reused by a float32 machine."""
    import cdpo.models.loading as loading

    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    ident = {dt: model_identity(OmegaConf.create({"path": str(model), "dtype": dt})) for dt in ("float32", "bfloat16")}
    native = OmegaConf.create({"path": str(model), "dtype": "bf16-if-native"})
    monkeypatch.setattr(loading, "native_bf16", lambda device="cpu", cpu_flags=None: False)
    assert model_identity(native) == ident["float32"]
    monkeypatch.setattr(loading, "native_bf16", lambda device="cpu", cpu_flags=None: True)
    assert model_identity(native) == ident["bfloat16"]


def test_a_hub_snapshot_is_identified_by_its_files(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snap / "config.json").write_text('{"hidden_size": 8}')
    (snap / "model.safetensors").write_bytes(b"w" * 100)
    cfg = OmegaConf.create({"path": "org/m", "dtype": "float32"})
    import cdpo.hub as hub

    probes = []
    monkeypatch.setattr(hub, "unavailable", lambda *a: probes.append(1) or "offline: HF_HUB_OFFLINE is set")
    first = model_identity(cfg)
    assert probes == []  # a cached snapshot: the hub is not asked
    _corrupt_in_place(snap / "model.safetensors", offset=1, n=2)
    assert model_identity(cfg) != first
    with pytest.raises(Exception, match="org/missing.*local hub cache"):
        model_identity(OmegaConf.create({"path": "org/missing", "dtype": "float32"}))


@pytest.mark.parametrize("damage", ["truncated", "emptied", "garbage"])
def test_a_damaged_local_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    model = tmp_path / "model"
    tiny_llama().save_pretrained(model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "emptied": b"", "garbage": b"x" * 100}[damage])
    with pytest.raises(DamagedModelError, match=rf"^{weights}: the model's weights cannot be read .*restore it"):
        load_model(str(model))
