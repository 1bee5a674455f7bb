"""score.py and eval.py's model mode on tiny models, and the wandb offline run holding the metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from wandb_offline import offline_run_holding

from cdpo.io import read_jsonl, write_jsonl
from cdpo.models import add_lora, load_tokenizer, save_adapter, tiny_llama_like_embedded

REPO = Path(__file__).resolve().parents[1]


def _run(script, *args, cwd):
    return subprocess.run([sys.executable, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _adapters(tmp_path):
    lora = dict(r=4, alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"])
    model = add_lora(add_lora(tiny_llama_like_embedded(seed=0), "pos", **lora), "neg", **lora)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.full_like(p, 0.05 * (1 if ".pos." in name else -1)))
    return save_adapter(model, "pos", tmp_path / "pos"), save_adapter(model, "neg", tmp_path / "neg")


def test_score_py_scores_a_pairs_file(tmp_path):
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    pos, neg = _adapters(tmp_path)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    pairs = [{"id": f"q{i}", "prompt_ids": enc(f"Question: {i} + 1?\nAnswer: "),
              "chosen_ids": enc(f"{i} + 1 = {i + 1}. The answer is {i + 1}."),
              "rejected_ids": enc(f"{i} + 1 = {i + 2}. The answer is {i + 2}.")} for i in range(3)]
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    out = _run("score.py", "model=tiny", "pairs=pairs.jsonl", f"pos={pos}", f"neg={neg}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    scored = read_jsonl(tmp_path / "pairs.scored.jsonl")
    assert [s["id"] for s in scored] == ["q0", "q1", "q2"]
    for s, p in zip(scored, pairs):
        assert s["rejected_ids"] == p["rejected_ids"] and len(s["rejected_p_ce"]) == len(p["rejected_ids"])
        assert 0 <= s["critical_index"] < len(p["rejected_ids"])
    # the same adapter as positive and negative: p_ce is that model's own probability, a different score
    same = _run("score.py", "model=tiny", "pairs=pairs.jsonl", f"pos={pos}", f"neg={pos}", "output=same.jsonl",
                cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    assert read_jsonl(tmp_path / "same.jsonl")[0]["rejected_p_ce"] != scored[0]["rejected_p_ce"]

    write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt_ids": [1]}])
    bad = _run("score.py", "model=tiny", "pairs=bad.jsonl", f"pos={pos}", f"neg={neg}", cwd=tmp_path)
    assert bad.returncode == 2 and "bad.jsonl:1: missing chosen_ids, rejected_ids" in bad.stderr


def test_score_py_rejects_an_adapter_of_another_model(tmp_path):
    lora = dict(r=4, alpha=8, target_modules=["gate_proj"])
    from cdpo.models import tiny_llama

    other = add_lora(tiny_llama(hidden_size=16), "pos", **lora)
    save_adapter(other, "pos", tmp_path / "pos")
    write_jsonl(tmp_path / "pairs.jsonl", [{"id": "x", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])
    out = _run("score.py", "model=tiny", "pairs=pairs.jsonl", f"pos={tmp_path / 'pos'}", f"neg={tmp_path / 'pos'}",
               cwd=tmp_path)
    assert out.returncode == 2 and "pos" in out.stderr and "Traceback" not in out.stderr


def test_eval_py_model_mode_with_pass_at_k(tmp_path):
    out = _run("eval.py", "model=tiny", "data.test_limit=2", "eval.n=3", "eval.temperature=1.0",
               "eval.pass_k=[1,3]", "generation.max_new_tokens=6", "results=res.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["questions"] == 2 and res["samples_per_question"] == 3 and set(res["pass_at_k"]) == {"1", "3"}
    assert res["config"]["model"]["name"] == "tiny" and "pass@3" in out.stdout
    graded = read_jsonl(tmp_path / "res.jsonl")
    assert [len(r["samples"]) for r in graded] == [3, 3]


def test_eval_py_model_mode_with_an_adapter(tmp_path):
    """eval.py adapter=<dir> evaluates base + adapter. (It loaded the adapter under the PEFT name "eval",
    which shadows nn.Module.eval: KeyError "attribute 'eval' already exists".)"""
    policy = add_lora(tiny_llama_like_embedded(seed=0), "policy", r=4, alpha=8,
                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B = 0 would leave the model as it is
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    pos = save_adapter(policy, "policy", tmp_path / "pos")
    args = ("model=tiny", "data.test_limit=2", "generation.max_new_tokens=6")
    out = _run("eval.py", *args, f"adapter={pos}", "results=adapted.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "adapted.json").read_text())
    assert res["model"] == "pos" and res["questions"] == 2 and "pos: accuracy" in out.stdout
    base = _run("eval.py", *args, "results=base.json", cwd=tmp_path)
    assert base.returncode == 0, base.stderr[-2000:]
    responses = [[s["response_ids"] for s in r["samples"]] for r in read_jsonl(tmp_path / "adapted.jsonl")]
    assert responses != [[s["response_ids"] for s in r["samples"]] for r in read_jsonl(tmp_path / "base.jsonl")]


def test_wandb_offline_run_holds_logged_metrics(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from cdpo.modules import SequencesDataModule, SFTModule
    from cdpo.pipeline import trainers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", "logger=wandb", f"run_dir={tmp_path}"])
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    model = add_lora(tiny_llama_like_embedded(), "pos", r=4, alpha=8, target_modules=["gate_proj"])
    seqs = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 6, 7]}] * 4
    trainer = trainers.make_trainer(cfg, "sft_pos", epochs=1)
    trainer.fit(SFTModule(model), datamodule=SequencesDataModule(seqs, pad_id=tok.pad_token_id, batch_size=2))
    trainers.finish_logger(trainer.logger)
    keys = (b"loss", b"nll", b"method_dir", b"tiny")
    blob = offline_run_holding(tmp_path / "wandb", keys)
    for key in keys:
        assert key in blob, key


def test_wandb_stays_offline_after_an_earlier_run_in_the_process(tmp_path):
    """No API key and no WANDB_MODE: an eval's results run, then a training logger in the same process
    (what a multirun's second job does) must stay offline instead of asking for a login."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_pipeline import _cfg
from cdpo.pipeline import trainers
cfg = _cfg({str(tmp_path / "run")!r}, "logger=wandb")
trainers.log_results(cfg, "eval_x", {{"eval/accuracy": 0.5}})
logger = trainers.make_logger(cfg, "align_x")
logger.experiment.log({{"loss": 1.0}})
trainers.finish_logger(logger)
print("OFFLINE-OK")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parents[1] / "kernels")])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert "OFFLINE-OK" in proc.stdout, proc.stderr[-2000:]
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 2
