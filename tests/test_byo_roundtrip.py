"""The issue's whole path for a newcomer: their own preference file (chat-formatted, with bad rows) goes
through score and align on a model of theirs stored on disk, and `export.py merge=true` turns the aligned
adapter into a model that plain transformers loads and generates with, the adapter's effect included."""
import json
import os
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cdpo.io import read_jsonl
from cdpo.models import load_tokenizer, tiny_llama_like_embedded
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths
from test_pipeline import REPO, _cfg
from test_preferences import BAD, _write_user_file


def test_users_preferences_to_a_merged_model_plain_transformers_loads(tmp_path):
    base = tmp_path / "my-base"
    tiny_llama_like_embedded(seed=0).save_pretrained(base)
    load_tokenizer("embedded:smollm2-135m-instruct", as_saved=True).save_pretrained(base)
    prefs = tmp_path / "prefs.jsonl"
    good = _write_user_file(prefs)

    cfg = _cfg(tmp_path / "run", "data=preference", f"data.path={prefs}", "data.train_limit=null",
               "data.max_length=192", "data.max_prompt_length=96", f"model.path={base}", "model.name=mine",
               "align.lr=5e-3")  # a visible effect after one short epoch on a random model
    out = run_pipeline(cfg)["stages"]
    assert out["select"]["pairs"] == len(good) and out["select"]["bad_rows"] == len(BAD)
    assert {"sft_pos", "sft_neg", "score", "align"} <= set(out) and "eval" not in out
    paths = RunPaths(cfg)
    assert len(read_jsonl(paths.scored_pairs)) == len(good)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "export.py"), f"adapter={paths.aligned_adapter}",
                           "out=merged", "merge=true"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged_dir = tmp_path / "merged"
    assert not (merged_dir / "adapter_config.json").exists()  # a plain model, not an adapter

    # the reference: the base with the adapter applied by PEFT itself, not by our merge
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), paths.aligned_adapter).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    plain_base = AutoModelForCausalLM.from_pretrained(base).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                     add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        got, want, before = merged(ids).logits, reference(ids).logits, plain_base(ids).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got - before).abs().max() > 1e-3  # the aligned adapter is in the merged weights
        generated = merged.generate(ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 5 or generated[0, -1] == tok.eos_token_id
    card = (merged_dir / "README.md").read_text()
    assert "cdpo" in card and "preference" in card  # the run's method and data are on the card
    assert json.loads((merged_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
