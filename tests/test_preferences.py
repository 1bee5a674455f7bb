"""Preference data of your own (data=preference): reading every format, bad rows, and the pipeline on it."""
import json
import logging

import pytest

from cdpo.data import load_problems
from cdpo.data.preferences import BadRow, load_preferences, parse_row, render_prompt
from cdpo.errors import ConfigError, StaleInputError, UserError
from cdpo.io import DataError, read_jsonl
from cdpo.models import load_tokenizer
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths
from cdpo.validation import validate
from test_artifact_datasets import assert_loads_as_datasets
from test_pipeline import _cfg

FIELDS = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": "id"}
# where the bad rows of `_write_user_file` are (1-based lines) and what the report must say
BAD = {5: "missing field 'rejected'", 12: "empty 'chosen'", 20: "prompt + rejected has"}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


def _wrong(solution: str, answer: str) -> str:
    return solution.replace(f"The answer is {answer}.", f"The answer is {int(answer) + 1}.")


def _rows(n: int = 30) -> list[dict]:
    """Conversational rows as a user would export them: arith questions, the worked answer chosen, a
    worked answer with a wrong final number rejected."""
    rows = []
    for p in load_problems("arith", "train", limit=n):
        rows.append({"prompt": [{"role": "user", "content": p.question}],
                     "chosen": [{"role": "assistant", "content": p.solution}],
                     "rejected": [{"role": "assistant", "content": _wrong(p.solution, p.answer)}]})
    return rows


def _write_user_file(path, rows=None):
    """The rows as JSONL, with a missing field (line 5), an empty response (line 12) and an over-length
    rejected response (line 20) put in; returns the good rows."""
    rows = [dict(r) for r in (rows or _rows())]
    del rows[4]["rejected"]
    rows[11]["chosen"] = [{"role": "assistant", "content": "  "}]
    rows[19]["rejected"] = [{"role": "assistant", "content": "Let me think. " * 200}]
    lines = [json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return [r for i, r in enumerate(rows) if i + 1 not in BAD]


def _pref_cfg(tmp_path, path, *overrides):
    return _cfg(tmp_path / "run", "data=preference", f"data.path={path}", "data.train_limit=null",
                "data.max_length=192", "data.max_prompt_length=96", *overrides)


# ---------------------------------------------------------------- rows

def test_row_formats_and_what_is_wrong_with_bad_rows():
    std = parse_row({"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}, FIELDS)
    conv = parse_row({"prompt": [{"role": "user", "content": "2 + 3?"}], "chosen": [{"role": "assistant", "content": "5"}],
                      "rejected": [{"role": "assistant", "content": "6"}]}, FIELDS)
    assert (std.chosen, std.rejected, std.question) == (conv.chosen, conv.rejected, conv.question) == ("5", "6", "2 + 3?")
    # UltraFeedback: a text prompt, responses that repeat it as a user turn; TRL's implicit prompt: no prompt field
    turn = [{"role": "user", "content": "2 + 3?"}]
    uf = parse_row({"prompt": "2 + 3?", "chosen": turn + [{"role": "assistant", "content": "5"}],
                    "rejected": turn + [{"role": "assistant", "content": "6"}]}, FIELDS)
    implicit = parse_row({"chosen": turn + [{"role": "assistant", "content": "5"}],
                          "rejected": turn + [{"role": "assistant", "content": "6"}]}, FIELDS)
    assert (uf.chosen, implicit.prompt, implicit.question) == ("5", turn, "2 + 3?")

    def why(record, fields=FIELDS):
        with pytest.raises(BadRow) as e:
            parse_row(record, fields)
        return e.value.kind, str(e.value)

    assert why({"prompt": "q", "chosen": "a"}) == (
        "missing field", "missing field 'rejected' (data.fields.rejected; the row has chosen, prompt)")
    assert why({"instruction": "q", "chosen": "a", "rejected": "b"})[1].startswith("missing field 'prompt' (")
    assert why({"prompt": "q", "chosen": "", "rejected": "b"}) == ("empty", "empty 'chosen'")
    assert why({"prompt": "q", "chosen": 5, "rejected": "b"})[0] == "wrong type"
    assert why({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"})[0] == "wrong type"
    assert why({"prompt": "q", "chosen": "a", "rejected": "a"})[0] == "same responses"
    assert why({"prompt": ["q"], "chosen": "a", "rejected": "b"})[0] == "wrong type"
    assert why([1, 2])[0] == "wrong type"
    assert why({"instruction": "q", "output": "a", "rejected": "b"}, {**FIELDS, "prompt": "instruction"}) == (
        "missing field", "missing field 'chosen' (data.fields.chosen; the row has instruction, output, rejected)")


def test_chat_and_plain_prompts_tokenize_as_the_pipeline_does(tmp_path, tok):
    rows = _rows(3)
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, bad = load_preferences(str(path), tok, max_length=512, max_prompt_length=256)
    assert bad == [] and [p["source"] for p in pairs] == [f"{path}:{i}" for i in (1, 2, 3)]
    for p, r in zip(pairs, rows):
        # independent reference: the chat template over the whole conversation, rendered as text
        whole = tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        assert whole == tok.decode(p["prompt_ids"] + p["chosen_ids"]) + "\n"
        assert p["chosen_ids"][-1] == tok.eos_token_id == p["rejected_ids"][-1]
        assert tok.decode(p["rejected_ids"][:-1]) == r["rejected"][0]["content"]
    # the standard format (strings) gives the same token ids: a text prompt is one user message
    std = tmp_path / "std.jsonl"
    std.write_text("".join(json.dumps({"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                                       "rejected": r["rejected"][0]["content"]}) + "\n" for r in rows))
    same, _ = load_preferences(str(std), tok, max_length=512, max_prompt_length=256)
    assert [(p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in same] == [
        (p["prompt_ids"], p["chosen_ids"], p["rejected_ids"]) for p in pairs]
    # plain: the template around the text, the tokenizer's own special tokens (none for this one) in front
    plain, _ = load_preferences(str(std), tok, prompt_format="plain", template="Question: {prompt}\nAnswer: ",
                                max_length=512, max_prompt_length=256)
    assert plain[0]["prompt"] == f"Question: {rows[0]['prompt'][0]['content']}\nAnswer: "
    assert plain[0]["prompt_ids"] == tok(plain[0]["prompt"])["input_ids"]
    assert render_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], tok,
                         prompt_format="plain", template="<{prompt}>") == "<Be brief.\n\nHi>"


def test_parquet_disk_and_json_array_load_the_rows_of_the_jsonl(tmp_path, tok):
    import datasets

    path = tmp_path / "prefs.jsonl"
    _write_user_file(path)
    kw = dict(max_length=192, max_prompt_length=96)
    ref, ref_bad = load_preferences(str(path), tok, **kw)
    rows = read_jsonl(path)  # to the other formats through datasets, as users make them
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "prefs.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    ds.save_to_disk(str(tmp_path / "plain_ds"))
    (tmp_path / "prefs.json").write_text(json.dumps(rows))

    def content(pairs):
        return [{k: v for k, v in p.items() if k not in ("source", "id")} for p in pairs]  # named by the file

    for name in ("prefs.parquet", "dict", "plain_ds", "prefs.json"):
        pairs, bad = load_preferences(str(tmp_path / name), tok, **kw)
        assert content(pairs) == content(ref), name
        assert [b["reason"] for b in bad] == [b["reason"] for b in ref_bad], name
        assert bad[0]["where"] == {"prefs.parquet": f"{tmp_path}/prefs.parquet[4]", "dict": f"{tmp_path}/dict[train][4]",
                                   "plain_ds": f"{tmp_path}/plain_ds[4]", "prefs.json": f"{tmp_path}/prefs.json[4]"}[name]
    test_split, _ = load_preferences(str(tmp_path / "dict"), tok, split="test", **kw)
    assert content(test_split) == content(ref[:3])
    with pytest.raises(ValueError, match="no split 'dev' .*train, test"):
        load_preferences(str(tmp_path / "dict"), tok, split="dev", **kw)


def test_every_row_bad_is_a_clear_error(tmp_path, tok):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"instruction": "q", "output": "a", "bad": "b"}\n' * 3 + "not json\n")
    with pytest.raises(DataError, match=r"no usable row: all 4 are bad \(3 missing field, 1 malformed JSON\), e\.g\. "
                                        r".*prefs.jsonl:1: missing fields 'prompt', 'chosen', 'rejected' \(data.fields.prompt, "
                                        r"data.fields.chosen, data.fields.rejected; the row has bad, instruction, output\)"):
        run_pipeline(_pref_cfg(tmp_path, path, "stage=select"))
    assert len(read_jsonl(tmp_path / "run" / "bad_rows.jsonl")) == 4
    path.write_text("\n")
    with pytest.raises(DataError, match=r"prefs.jsonl: no rows$"):
        run_pipeline(_pref_cfg(tmp_path, path, "stage=select"))


def test_settings_are_checked_first(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("")
    with pytest.raises(ConfigError) as e:
        validate(_pref_cfg(tmp_path, tmp_path / "missing.jsonl", "+data.fields.instruction=x", "data.prompt_format=xml",
                           "stage=sample"))
    msg = str(e.value)
    for expected in ("missing.jsonl: no such file", "unknown: instruction", "data.prompt_format='xml'",
                     "preference data is not sampled"):
        assert expected in msg
    with pytest.raises(ConfigError, match="data.eval_source=None: a source of questions"):
        validate(_pref_cfg(tmp_path, path, "stage=eval"))
    validate(_pref_cfg(tmp_path, path, "data.fields.prompt=instruction", "data.eval_source=arith"))


def test_hub_preferences_offline_is_one_clear_line(tmp_path, monkeypatch):
    from cdpo import hub

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)  # what a failed probe returns
    cfg = _pref_cfg(tmp_path, "hf:trl-lib/ultrafeedback_binarized", "stage=select")
    validate(cfg)  # the hub id is a valid setting; reading it is what fails, before any model is loaded
    with pytest.raises(UserError, match=r"^hf:trl-lib/ultrafeedback_binarized: the Hugging Face hub is unreachable "
                                        r"\(no connection within a few seconds\).*set data.path=x.jsonl\.$"):
        run_pipeline(cfg)


# ---------------------------------------------------------------- the pipeline

def test_pipeline_on_user_preferences_cdpo_and_dpo(tmp_path, caplog, tok):
    caplog.set_level(logging.INFO, logger="cdpo")
    path = tmp_path / "prefs.jsonl"
    good = _write_user_file(path)
    cfg = _pref_cfg(tmp_path, path)
    paths = RunPaths(cfg)
    result = run_pipeline(cfg)
    assert list(result["seconds"]) == ["select", "sft_pos", "sft_neg", "score", "align"]  # no sample, no eval
    select = result["stages"]["select"]
    assert (select["rows"], select["pairs"], select["bad_rows"]) == (30, 27, 3)
    assert select["bad_where"] == [f"{path}:{line}" for line in BAD]
    log = caplog.text
    assert "3 of 30 rows" in log and "preference data has no gold answers" in log
    for line, reason in BAD.items():
        assert f"{path}:{line}: {reason}" in log
    bad = read_jsonl(paths.bad_rows)
    assert [(b["where"], b["kind"]) for b in bad] == [(f"{path}:5", "missing field"), (f"{path}:12", "empty"),
                                                      (f"{path}:20", "over-length")]
    pairs = read_jsonl(paths.pairs)
    assert [p["chosen"] for p in pairs] == [r["chosen"][0]["content"] for r in good]
    assert [p["response"] for p in read_jsonl(paths.negatives)] == [r["rejected"][0]["content"] for r in good]
    scored = read_jsonl(paths.scored_pairs)
    assert [s["rejected_ids"] for s in scored] == [p["rejected_ids"] for p in pairs]
    for adapter in (paths.pos_adapter, paths.neg_adapter, paths.aligned_adapter):
        assert (adapter / "adapter_model.safetensors").exists()

    # DPO on the same pairs (reused: no CE model, no scores), evaluated on questions of another source
    dpo = _pref_cfg(tmp_path, path, "method=dpo", "data.eval_source=arith")
    result = run_pipeline(dpo)
    assert list(result["seconds"]) == ["align", "eval"]
    assert (RunPaths(dpo).aligned_adapter / "adapter_model.safetensors").exists()
    assert {k: v["questions"] for k, v in result["stages"]["eval"]["results"].items()} == {"base": 3, "sft": 3, "dpo": 3}
    # asked in the data's own prompt format: the chat template around the question, nothing added
    q = load_problems("arith", "test", limit=1)[0].question
    [first, *_] = read_jsonl(paths.eval_file("base"))
    assert first["prompt"] == tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                      add_generation_prompt=True)
    assert_loads_as_datasets(paths.run, expect=("bad_rows.jsonl", "pairs.jsonl", "scored_pairs.jsonl",
                                                "eval/base.jsonl", "dpo-seed0/eval.jsonl"))

    # the user edits the file: a stage further down (align on scores of the old rows, eval of a policy trained
    # on them) refuses to run until select is redone
    path.write_text(path.read_text().replace("Tom", "Tim", 1))
    for stage, method in (("align", "cdpo"), ("score", "cdpo"), ("eval", "dpo")):
        with pytest.raises(StaleInputError, match=r"pairs.jsonl was imported from other contents of .*prefs.jsonl"):
            run_pipeline(_pref_cfg(tmp_path, path, f"stage={stage}", f"method={method}", "data.eval_source=arith"))


def test_the_users_file_keys_the_imported_pairs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    path = tmp_path / "prefs.jsonl"
    _write_user_file(path)
    select = _pref_cfg(tmp_path, path, "stage=select")
    paths = RunPaths(select)
    run_pipeline(select)
    first = read_jsonl(paths.pairs)
    assert run_pipeline(select)["seconds"] == {}  # unchanged: reused
    # the user fixes a chosen answer: the imported pairs are stale, and a later stage refuses them
    edited = read_jsonl(path)
    edited[0]["chosen"][0]["content"] = "Fixed. " + edited[0]["chosen"][0]["content"]
    path.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(StaleInputError, match=r"pairs.jsonl was imported from other contents of .*prefs.jsonl: run "
                                              r"stage=select first"):
        run_pipeline(_pref_cfg(tmp_path, path, "stage=score"))
    caplog.clear()
    run_pipeline(select)
    assert "preferences changed" in caplog.text
    again = read_jsonl(paths.pairs)
    assert again[0]["chosen"].startswith("Fixed. ") and again[1:] == first[1:]
    # a field mapping or prompt format is part of what the pairs are made of
    assert "select" in run_pipeline(_pref_cfg(tmp_path, path, "stage=select", "data.prompt_format=plain"))["seconds"]
    # the bad rows are fixed (removed): no list of bad rows is left, and the stage is complete without one
    good = [r for r in read_jsonl(path) if r.get("rejected") and r["chosen"][0]["content"].strip()
            and len(r["rejected"][0]["content"]) < 1000]
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    summary = run_pipeline(select)["stages"]["select"]
    assert summary["bad_rows"] == 0 and not paths.bad_rows.exists()
    assert run_pipeline(select)["seconds"] == {}


def test_tokenizers_without_or_with_a_strict_chat_template_and_a_byte_order_mark(tmp_path):
    import copy

    rows = _rows(4)
    rows[2]["prompt"] = [{"role": "system", "content": "Be brief."}, *rows[2]["prompt"]]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")  # a BOM first
    lengths = dict(max_length=512, max_prompt_length=256)
    tok = copy.deepcopy(load_tokenizer("embedded:smollm2-135m-instruct"))
    pairs, bad = load_preferences(str(path), tok, **lengths)
    assert len(pairs) == 4 and not bad  # the BOM is not part of the first row

    # a template that refuses system turns (as Gemma's does): that row is a bad row, the others are imported
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role "
                         "not supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
    pairs, bad = load_preferences(str(path), tok, **lengths)
    assert len(pairs) == 3 and [(b["where"], b["kind"]) for b in bad] == [(f"{path}:3", "chat template")]
    assert "System role not supported" in bad[0]["reason"]

    # a base model's tokenizer has no chat template: one clear error naming the setting to use instead
    tok.chat_template = None
    with pytest.raises(DataError, match=r"data.prompt_format=chat, but the tokenizer .* has no chat template .*"
                                        r"data.prompt_format=plain"):
        load_preferences(str(path), tok, **lengths)
    pairs, bad = load_preferences(str(path), tok, prompt_format="plain", template="Q: {prompt}\nA: ", **lengths)
    assert len(pairs) == 4 and pairs[0]["prompt"].startswith("Q: ")
