"""eval.batch_size and eval.merge_adapter: the evaluation's own speed settings. They reach only the eval
stage, enter the evaluation's identity (a cached result made otherwise is evaluated again), a merged model
computes what the adapter-on-base model does, and settings that cannot merge are refused at start-up."""
import json

import pytest
import torch
from peft import PeftModel
from test_pipeline import _cfg, _inject_correct_samples

from cdpo.models import load_tokenizer
from cdpo.pipeline import context, run_pipeline
from cdpo.pipeline.artifacts import RunPaths
from cdpo.pipeline import sample as sample_stage
from cdpo.validation import problems


def _spy_batch_sizes(monkeypatch) -> list:
    """Record the batch size of every generate call the sample and eval stages make."""
    seen, real = [], sample_stage.generate

    def spy(*args, **kw):
        seen.append((kw["desc"].split()[0], kw["batch_size"]))
        return real(*args, **kw)

    monkeypatch.setattr(sample_stage, "generate", spy)
    return seen


def test_eval_batch_size_reaches_eval_only_and_is_part_of_its_identity(tmp_path, monkeypatch):
    seen = _spy_batch_sizes(monkeypatch)
    run_pipeline(_cfg(tmp_path, "method=baseline", "generation.batch_size=3", "eval.batch_size=5"))
    assert seen == [("eval", 5)]
    run_pipeline(_cfg(tmp_path, "stage=sample", "generation.batch_size=3", "eval.batch_size=5"))
    assert seen[1:] and {s for s in seen[1:]} == {("sample", 3)}
    seen.clear()
    run_pipeline(_cfg(tmp_path, "method=baseline", "generation.batch_size=3", "eval.batch_size=5"))
    assert seen == []  # the same settings: the cached evaluation
    run_pipeline(_cfg(tmp_path, "method=baseline", "generation.batch_size=3", "eval.batch_size=2"))
    assert seen == [("eval", 2)]  # another batch shape can move float rounding: evaluated again
    saved = json.loads((tmp_path / "eval" / "base.json").read_text())
    assert saved["signature"]["eval"]["batch_size"] == 2
    seen.clear()  # the default (generation.batch_size) stays out of the identity: older evaluations stay valid
    run_pipeline(_cfg(tmp_path, "method=baseline", "generation.batch_size=3", "eval.batch_size=3"))
    assert seen == [("eval", 3)]
    assert "batch_size" not in json.loads((tmp_path / "eval" / "base.json").read_text())["signature"]["eval"]


def test_the_default_eval_batch_size_is_the_generation_one(tmp_path):
    cfg = _cfg(tmp_path, "generation.batch_size=7")
    assert cfg.eval.batch_size == 7 and cfg.eval.merge_adapter is False


def test_a_merged_adapter_computes_what_the_adapter_on_the_base_computes(tmp_path):
    cfg = _cfg(tmp_path)
    with torch.random.fork_rng():  # an adapter with non-zero weights, saved as the pipeline saves one
        torch.manual_seed(0)
        from peft import LoraConfig, get_peft_model
        p = cfg.peft
        model = get_peft_model(context.base_model(cfg), LoraConfig(r=p.r, lora_alpha=p.alpha, init_lora_weights=False,
                                                                  target_modules=list(p.target_modules)))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 9))
    with context.generation_models(cfg) as model_for:
        adapted = model_for(tmp_path / "adapter")
        with torch.no_grad():
            want = adapted(input_ids=ids).logits
    with context.generation_models(cfg, merge=True) as model_for:
        merged = model_for(tmp_path / "adapter")
        with torch.no_grad():
            got = merged(input_ids=ids).logits
            plain = context.base_model(cfg)(input_ids=ids).logits
    assert isinstance(adapted, PeftModel) and not isinstance(merged, PeftModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the outputs ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # ... and the merged copy computes the same


def test_a_merged_evaluation_is_made_anew_and_the_base_one_is_shared(tmp_path, monkeypatch):
    tok = load_tokenizer("embedded:smollm2-135m-instruct")
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    _inject_correct_samples(RunPaths(_cfg(tmp_path)), tok)
    run_pipeline(_cfg(tmp_path, "method=dpo"))  # the tiny pipeline to the end (sft and aligned adapters)
    evaluated = {m: (tmp_path / "eval" / f"{m}.json").stat().st_mtime_ns for m in ("base", "sft")}
    before = json.loads((tmp_path / "dpo-seed0" / "eval.json").read_text())
    merged = []
    monkeypatch.setattr(context, "merge_and_unload", lambda m: merged.append(m) or m.merge_and_unload())
    run_pipeline(_cfg(tmp_path, "method=dpo", "stage=eval", "eval.merge_adapter=true"))
    assert len(merged) == 2  # the sft and the aligned adapters, folded before generating
    after = json.loads((tmp_path / "dpo-seed0" / "eval.json").read_text())
    assert after["signature"]["eval"]["merge_adapter"] is True and "merge_adapter" not in before["signature"]["eval"]
    assert after["questions"] == before["questions"]
    now = {m: (tmp_path / "eval" / f"{m}.json").stat().st_mtime_ns for m in ("base", "sft")}
    assert now["base"] == evaluated["base"]  # no adapter, nothing to merge: the cached evaluation
    assert now["sft"] != evaluated["sft"]
    assert "merge_adapter" not in json.loads((tmp_path / "eval" / "base.json").read_text())["signature"]["eval"]


@pytest.mark.parametrize("overrides, says", [
    (["eval.batch_size=0"], "eval.batch_size=0: an integer >= 1"),
    (["eval.merge_adapter=yes"], "eval.merge_adapter='yes': true or false"),
    (["eval.merge_adapter=true", "generation=vllm"], "LoRA request"),
    (["eval.merge_adapter=true", "peft=qlora"], "quantized base"),
])
def test_eval_settings_that_cannot_work_are_refused_at_start_up(tmp_path, overrides, says):
    found = [p for p in problems(_cfg(tmp_path, *overrides)) if p.startswith("eval.")]
    assert len(found) == 1 and says in found[0], found
