"""export.py: an adapter as a standard PEFT adapter or a merged transformers model, with a model card;
pushing to the hub against a stand-in HfApi; every refusal one line before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from the tests (set before huggingface_hub loads)

from cdpo.models import add_lora, load_model, load_tokenizer, save_adapter, tiny_llama_like_embedded  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


def _export(*args, cwd, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "export.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={k: v for k, v in env.items() if v is not None})


def _perturb(model, seed=1):
    """LoRA B starts at zero (no effect): random B weights make the adapter change the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama saved to a local directory (with the embedded tokenizer) and a LoRA adapter
    trained on it as the pipeline saves adapters (the model loaded with load_model: it records its base)."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_llama_like_embedded(seed=0).save_pretrained(root / "base")
    load_tokenizer("embedded:smollm2-135m-instruct", as_saved=True).save_pretrained(root / "base")
    policy = add_lora(load_model(str(root / "base")), "policy", **LORA)
    _perturb(policy)
    return root / "base", save_adapter(policy, "policy", root / "adapter")


def _ids():
    return torch.randint(3, 49152, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _card(path: Path) -> tuple[dict, str]:
    text = (path / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_merged_export_loads_in_plain_transformers_with_the_adapters_logits(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter = tiny
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    proc = _export(f"adapter={adapter}", "out=merged", "merge=true", cwd=tmp_path)  # base: the recorded one
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "merged"
    assert f"exported merged model -> {out}" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

    # plain transformers, in a process that never imported cdpo's code... here: only transformers + peft calls
    merged = AutoModelForCausalLM.from_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    # independent reference: PEFT's own unmerged forward of base + adapter
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    ids = _ids()
    expected = _logits(reference, ids)
    assert (expected - _logits(AutoModelForCausalLM.from_pretrained(base_dir), ids)).abs().max() > 1e-2  # it matters
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template is not None
    prompt = tok("Question: 2 + 3?\nAnswer: ", return_tensors="pt")
    with torch.no_grad():
        got = merged.generate(**prompt, max_new_tokens=5, do_sample=False)
        want = reference.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert got.shape[1] == prompt["input_ids"].shape[1] + 5 and torch.equal(got, want)

    front, body = _card(out)
    assert front["library_name"] == "transformers" and "cdpo" in front["tags"]
    assert "base_model" not in front  # a local directory is no hub id: named in the text
    assert f"`{base_dir}` with a LoRA adapter merged" in body


def test_adapter_export_records_the_hub_id_and_loads_in_peft(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter = tiny
    proc = _export(f"adapter={adapter}", "out=exported", "base_model=my-org/tiny-base", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "exported"
    assert sorted(p.name for p in out.iterdir()) == [".cdpo-export.json", "README.md", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-org/tiny-base" and config["inference_mode"] is True
    front, _ = _card(out)
    assert front["base_model"] == "my-org/tiny-base" and front["library_name"] == "peft"

    ids = _ids()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(out))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter))
    assert torch.equal(_logits(loaded, ids), _logits(reference, ids))

    # a base given as a hub id is recorded as it is (no model is loaded for an adapter export)
    from cdpo.export import export

    hub = tmp_path / "hub_adapter"
    hub.mkdir()
    (hub / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (hub / "adapter_config.json").write_text(json.dumps(
        {**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B"}))
    export(hub, tmp_path / "hub_out")
    assert json.loads((tmp_path / "hub_out/adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Meta-Llama-3-8B"


def test_embedded_adapter_records_the_smollm2_hub_id_and_exports_offline(tmp_path):
    """A pipeline adapter on the embedded model records its hub id, not the conversion under ~/.cache/cdpo;
    exporting it offline loads the embedded copy for that id (about 1 s from the cache)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cdpo.models import embedded_model_dir

    policy = add_lora(load_model("embedded:smollm2-135m-instruct"), "policy", r=2, alpha=4, target_modules=["q_proj"])
    _perturb(policy)
    adapter = save_adapter(policy, "policy", tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2

    # an adapter of an earlier version records the conversion's path: exported with the hub id too
    old = tmp_path / "old_adapter"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (old / "adapter_config.json").write_text(json.dumps(
        {**json.loads((adapter / "adapter_config.json").read_text()),
         "base_model_name_or_path": "/home/someone/.cache/cdpo/smollm2-135m-instruct"}))
    proc = _export(f"adapter={old}", "out=out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOLLM2
    front, body = _card(out)
    assert front["base_model"] == SMOLLM2 and "dequantised" in body

    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir())
    ids = torch.tensor([[1, 504, 3458, 28, 216, 17, 1232]])
    with torch.no_grad():
        expected = policy(ids).logits
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, str(out)), ids), expected)


def test_model_card_holds_the_runs_settings_and_results(tiny, tmp_path, caplog):
    """An adapter in a method_dir: the card reads the align stage's saved config and marker and the eval
    results whose signature holds this adapter (written by the pipeline's own functions)."""
    from test_pipeline import _cfg

    from cdpo.export import export
    from cdpo.pipeline.artifacts import RunPaths, mark_done
    from cdpo.pipeline.evaluate import eval_signature, evaluate_model

    base_dir, adapter = tiny
    cfg = _cfg(tmp_path / "run", "method=dpo", "method.beta=0.25", "peft.r=4", "align.lr=3e-4", "data.test_limit=2",
               "generation.max_new_tokens=4")
    paths = RunPaths(cfg)
    paths.method.mkdir(parents=True)
    (paths.aligned_adapter).mkdir()
    for f in adapter.iterdir():
        (paths.aligned_adapter / f.name).write_bytes(f.read_bytes())
    mark_done(paths, "align", cfg, {"steps": 12, "records": 6, "final": {"loss": 0.61}})
    from cdpo.models import load_adapter

    model = load_adapter(load_model(str(base_dir)), paths.aligned_adapter, "aligned")
    result = evaluate_model(cfg, model, load_tokenizer(str(base_dir)), paths.eval_file("aligned"), "dpo",
                            eval_signature(cfg, paths.aligned_adapter))
    mark_done(paths, "eval", cfg, {"results": {"base": {**result, "correct": 0, "accuracy": 0.0}, "dpo": result}})

    card = (export(paths.aligned_adapter, tmp_path / "out") / "README.md").read_text()
    assert "tags:\n- cdpo\n- dpo\n" in card
    assert "| method | name dpo, beta 0.25, label_smoothing 0.0 |" in card
    assert "| LoRA | r 4, alpha 32" in card and "lr 0.0003" in card and "| run | steps 12, records 6 |" in card
    assert f"| this model (dpo) | {100 * result['accuracy']:.1f}% | {result['correct']} / 2 |" in card
    assert "| base | 0.0% | 0 / 2 |" in card

    # an adapter edited after its run: its settings no longer describe it, and are left out
    config_file = paths.aligned_adapter / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "lora_alpha": 99}))
    card = (export(paths.aligned_adapter, tmp_path / "out2") / "README.md").read_text()
    assert "settings are unknown" in card and "beta" not in card
    assert "(truncated or edited): the model card leaves out the settings of its run" in caplog.text


class FakeHub:
    """A stand-in for huggingface_hub.HfApi that records what would be sent."""

    def __init__(self, whoami_error: Exception | None = None):
        self.calls, self.uploaded, self.whoami_error = [], {}, whoami_error

    def whoami(self, token=None):
        self.calls.append(("whoami", token))
        if self.whoami_error:
            raise self.whoami_error
        return {"name": "me"}

    def create_repo(self, repo_id, *, token=None, private=False, repo_type=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, token, private, repo_type, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, token=None, commit_message=None,
                      ignore_patterns=()):
        import fnmatch

        self.calls.append(("upload_folder", repo_id, token, repo_type))
        folder = Path(folder_path)
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        self.uploaded = {f: (folder / f).read_bytes() for f in files
                         if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore_patterns)}


def test_push_uploads_the_exported_folder_to_the_repo(tiny, tmp_path, monkeypatch):
    from cdpo.export import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    _, adapter = tiny
    hub = FakeHub()
    out = export(adapter, tmp_path / "out", push_to="me/tiny-dpo", private=True, api=hub)
    assert [c[0] for c in hub.calls] == ["whoami", "create_repo", "upload_folder"]
    assert hub.calls[1] == ("create_repo", "me/tiny-dpo", "hf_test_token", True, "model", True)
    assert hub.calls[2] == ("upload_folder", "me/tiny-dpo", "hf_test_token", "model")
    assert sorted(hub.uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert hub.uploaded["adapter_model.safetensors"] == (adapter / "adapter_model.safetensors").read_bytes()
    assert hub.uploaded["README.md"] == (out / "README.md").read_bytes()
    assert 'PeftModel.from_pretrained(base, "me/tiny-dpo")' in hub.uploaded["README.md"].decode()

    # the hub unreachable: one error before anything is written
    from cdpo.export import ExportError

    with pytest.raises(ExportError, match=r"push_to=me/x: cannot reach the Hugging Face hub \(ConnectionError: refused"):
        export(adapter, tmp_path / "never", push_to="me/x", api=FakeHub(ConnectionError("refused")))
    assert not (tmp_path / "never").exists()

    class Unauthorized(Exception):
        response = type("Response", (), {"status_code": 401})()

    with pytest.raises(ExportError, match=r"push_to=me/x: the hub rejected the token \(HF_TOKEN or `hf auth login`\)"):
        export(adapter, tmp_path / "never", push_to="me/x", api=FakeHub(Unauthorized("401 Client Error")))
    assert not (tmp_path / "never").exists()


def _one_line_error(proc, tmp_path, *, expect: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("export.py") or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("export.py: error: ") and expect in lines[0], proc.stderr[-2000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_push_offline_or_without_token_is_one_line_before_any_work(tiny, tmp_path):
    _, adapter = tiny
    proc = _export(f"adapter={adapter}", "out=out", "merge=true", "push_to=me/tiny", cwd=tmp_path)
    _one_line_error(proc, tmp_path, expect="push_to=me/tiny: the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1)")
    assert not (tmp_path / "out").exists() and "Loading weights" not in proc.stderr  # before the base was loaded

    no_token = {"HF_HUB_OFFLINE": None, "HF_TOKEN": None, "HF_HOME": str(tmp_path / "hf_home")}
    proc = _export(f"adapter={adapter}", "out=out", "push_to=me/tiny", cwd=tmp_path, env=no_token)
    _one_line_error(proc, tmp_path, expect="no Hugging Face token: set HF_TOKEN or run `hf auth login`")



def test_push_to_an_unreachable_hub_stops_before_any_work(tiny, tmp_path, monkeypatch):
    """The real HfApi against an endpoint where nothing listens (no network needed)."""
    from huggingface_hub import HfApi

    from cdpo.errors import UserError
    from cdpo.export import export

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(UserError, match=r"push_to=me/tiny: cannot reach the Hugging Face hub \(\w+"):
        export(tiny[1], tmp_path / "out", merge=True, push_to="me/tiny", api=HfApi(endpoint="http://127.0.0.1:9"))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused_before_any_work(tiny, tmp_path):
    from cdpo.errors import UserError
    from cdpo.export import export

    base_dir, adapter = tiny
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "x.txt").write_text("x")
    for args, expect in [
        ((tmp_path / "missing", tmp_path / "o"), "no such directory"),
        ((tmp_path / "notes", tmp_path / "o"), "is not a PEFT adapter directory: adapter_config.json, "
                                               "adapter_model.safetensors missing"),
        ((adapter, tmp_path / "notes"), "exists and is not empty: choose another directory, or overwrite=true"),
        ((adapter, adapter), "is, is inside or holds the adapter directory"),
        ((adapter, adapter / "sub"), "is, is inside or holds the adapter directory"),
        # out=<the method dir> with overwrite: replacing it would delete the adapter (and the run's results)
        ((adapter, adapter.parent), "is, is inside or holds the adapter directory"),
    ]:
        with pytest.raises(UserError) as err:
            export(*args, merge=True, overwrite=True) if args[1] == adapter.parent else export(*args, merge=True)
        assert expect in str(err.value)
    with pytest.raises(UserError, match="dtype=float8: unknown dtype"):
        export(adapter, tmp_path / "o", merge=True, dtype="float8")
    assert (tmp_path / "notes" / "x.txt").read_text() == "x" and not (tmp_path / "o").exists()

    # through the entry point: one line, exit 2
    _one_line_error(_export("out=o", cwd=tmp_path), tmp_path, expect="adapter=<dir> is required")
    # a base stored quantized cannot take the adapter in: refused before its weights are loaded
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((base_dir / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}}))
    proc = _export(f"adapter={adapter}", "out=o", "merge=true", "model=tiny", f"model.path={quantized}", cwd=tmp_path)
    _one_line_error(proc, tmp_path, expect=f"merge=true: the base {quantized} is stored quantized (bitsandbytes)")
    assert not (tmp_path / "o").exists()


def test_overwrite_replaces_out_only_once_the_new_export_is_complete(tiny, tmp_path, monkeypatch):
    from cdpo import export as export_mod

    _, adapter = tiny
    out = export_mod.export(adapter, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(adapter, source, directory, dtype):  # a failure half-way through writing the model
        (directory / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_mod, "_write_merged", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_mod.export(adapter, out, merge=True, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with pytest.raises(RuntimeError, match="disk full"):
        export_mod.export(adapter, tmp_path / "new", merge=True)
    assert not (tmp_path / "new").exists()

    export_mod.export(adapter, out, overwrite=True, base_model="org/other")
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert "org/other" in (out / "adapter_config.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["parent of the working directory", "working directory", "foreign files",
                                   "home", "a file added to an export"])
def test_overwrite_never_deletes_what_export_did_not_write(tiny, tmp_path, where):
    """overwrite=true used to replace whatever `out` named: run from inside a folder with out=.., the parent went,
    the current directory and unrelated files with it (exit 0). Now only an empty folder or an earlier export
    (with nothing added to it) is replaced; anything else is one line, exit 2, and every file stays."""
    _, adapter = tiny
    root = tmp_path / "root"
    (root / "work").mkdir(parents=True)
    (root / "notes.txt").write_text("mine")
    (root / "work" / "draft.txt").write_text("mine too")
    cwd, out, env, expect = root / "work", "..", None, "the working directory or one of its parents"
    if where == "working directory":
        out = "."
    elif where == "foreign files":
        cwd, out, expect = tmp_path, str(root), "holds files no cdpo export wrote (notes.txt, work)"
    elif where == "home":
        cwd, out, env, expect = tmp_path, str(root), {"HOME": str(root)}, "is your home directory"
    elif where == "a file added to an export":
        assert _export(f"adapter={adapter}", f"out={root / 'exp'}", cwd=tmp_path).returncode == 0
        (root / "exp" / "eval.txt").write_text("my notes")
        cwd, out, expect = tmp_path, str(root / "exp"), "holds files no cdpo export wrote (eval.txt)"
    before = _tree(root)
    proc = _export(f"adapter={adapter}", f"out={out}", "overwrite=true", cwd=cwd, env=env)
    _one_line_error(proc, tmp_path, expect=expect)
    assert _tree(root) == before and cwd.is_dir()


def test_overwrite_replaces_an_empty_folder_or_an_earlier_export(tiny, tmp_path):
    _, adapter = tiny
    (tmp_path / "empty").mkdir()
    for out in ("empty", "empty", "new"):  # an empty folder, then the export just written there, then a new one
        proc = _export(f"adapter={adapter}", f"out={out}", "overwrite=true", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads((tmp_path / out / ".cdpo-export.json").read_text())["files"] == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]
