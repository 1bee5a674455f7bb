"""Preference data of your own: prompt / chosen / rejected rows, the shape TRL, OpenRLHF and LLaMA-Factory use.

Row formats (TRL's names), field names mapped by `fields`:
- standard: {"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}
- conversational: {"prompt": [{"role": "user", "content": "2 + 3?"}],
  "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]};
  chosen / rejected may repeat the prompt's messages before the assistant's (as UltraFeedback does), and
  without a prompt field those shared messages are the prompt (TRL's implicit prompt).
Read from JSONL / JSON, Parquet, a folder written by `datasets`' save_to_disk, or the hub (`hf:<id>[:<config>]`).
Each row either becomes a tokenized pair or a bad row that says where it is (file:line, or dataset[row]) and
why: none is dropped silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..io import DataError, jsonl_lines

FIELDS = ("prompt", "chosen", "rejected", "id")  # id is optional: rows are named by their place otherwise
PROMPT_FORMATS = ("chat", "plain")
# The settings (keys of the data section) the imported pairs depend on, besides the file's content
IMPORT_SETTINGS = ("kind", "split", "train_limit", "fields", "prompt_format", "prompt_template", "max_length",
                   "max_prompt_length")


def is_preference_data(data) -> bool:
    """Whether a data section (config or dict) is user preference data rather than questions with answers."""
    return bool(data) and data.get("kind") == "preference"


def eval_dataset(data) -> str:
    """The name of the data set an evaluation of `data` (config or dict) asks: preference rows have no answers,
    so theirs is data.eval_source's; other data sets are evaluated on their own test split."""
    if is_preference_data(data):
        return f"{data.get('name')}, evaluated on {data.get('eval_source')}"
    return str(data.get("name"))


class BadRow(ValueError):
    """Why one row cannot be used; `kind` groups the reasons in the summary."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------ reading

def path_kind(path: str) -> str:
    """hub, json, parquet or disk; DataError (what is accepted) otherwise."""
    if path.startswith("hf:"):
        return "hub"
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        return "disk"
    if p.suffix in (".jsonl", ".json"):
        return "json"
    if p.suffix == ".parquet":
        return "parquet"
    raise DataError(f"{path}: not a .jsonl/.json or .parquet file, a folder written by datasets' save_to_disk "
                    "or hf:<dataset_id>")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        array = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    if array:  # one JSON array
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start + 1}): save the file as UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON array ({e.msg} at column {e.colno})") from None
        yield from ((f"{path}[{i}]", r) for i, r in enumerate(rows))
        return
    for lineno, line in jsonl_lines(path):
        if isinstance(line, DataError):  # this row only: the others are read
            yield f"{path}:{lineno}", BadRow("not UTF-8", str(line).split(": ", 1)[1])
            continue
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", BadRow("malformed JSON", f"malformed JSON ({e.msg} at column {e.colno})")


def _dataset_rows(path: str, kind: str, split: str) -> tuple[str, Any]:
    """(where each row is, as a prefix; the dataset)."""
    import datasets

    if kind == "parquet":
        _check_parquet(Path(path).expanduser())
        return path, datasets.load_dataset("parquet", data_files=str(Path(path).expanduser()), split="train")
    if kind == "hub":
        from .sources import load_hub_dataset

        return f"{path}[{split}]", load_hub_dataset(path[len("hf:"):], split, hint="set data.path=x.jsonl")
    ds = datasets.load_from_disk(str(Path(path).expanduser()))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r} (data.split); it has {', '.join(ds)}")
        return f"{path}[{split}]", ds[split]
    return path, ds


def _check_parquet(path: Path) -> None:
    """Its footer read (datasets would end in a traceback): not Parquet, damaged or without rows is one line."""
    import pyarrow.parquet as pq

    try:
        rows = pq.read_metadata(path).num_rows
    except Exception as e:  # pyarrow's ArrowInvalid, OSError
        raise DataError(f"{path}: not a readable Parquet file ({str(e).strip().splitlines()[0][:160]}): "
                        "give a .parquet file written by pandas, pyarrow or datasets, or a .jsonl file") from None
    if rows == 0:
        raise DataError(f"{path}: the Parquet file holds no rows")


def read_rows(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    """(where, record) for every row; an unreadable line comes as a BadRow instead of a record."""
    kind = path_kind(path)
    if kind == "json":
        yield from _json_rows(Path(path).expanduser())
        return
    prefix, ds = _dataset_rows(path, kind, split)
    yield from ((f"{prefix}[{i}]", r) for i, r in enumerate(ds))


def hub_fingerprint(path: str, split: str = "train") -> str:
    """A hub dataset's content fingerprint (as `datasets` computes it from the files it downloaded)."""
    return _dataset_rows(path, "hub", split)[1]._fingerprint


# ------------------------------------------------------------------ checking one row

@dataclass(frozen=True)
class Preference:
    id: str | None
    prompt: str | list[dict]  # text (standard) or messages (conversational)
    chosen: str
    rejected: str

    @property
    def question(self) -> str:
        """The prompt as a person wrote it: the text, or the last user message."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


def _messages(value: Any, name: str) -> list[dict] | None:
    """value as [{role, content}] when it is a list of messages, None when it is no list."""
    if not isinstance(value, list):
        return None
    if not value:
        raise BadRow("empty", f"empty {name!r} (no messages)")
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise BadRow("wrong type", f"{name!r}: every message needs a string 'role' and 'content', got {m!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value: Any, name: str, prompt: list[dict] | None) -> tuple[str, list[dict]]:
    """(the response text, the messages before it)."""
    if isinstance(value, str):
        text, before = value, []
    else:
        messages = _messages(value, name)
        if messages is None or messages[-1]["role"] != "assistant":
            raise BadRow("wrong type", f"{name!r}: expected a string or a list of messages ending with the "
                                       f"assistant's, got {type(value).__name__}"
                                       + (f" ending with a {messages[-1]['role']!r} message" if messages else ""))
        text, before = messages[-1]["content"], messages[:-1]
        if before and prompt is not None and before != prompt:
            raise BadRow("prompt mismatch", f"{name!r}: the messages before the assistant's are not the prompt")
    if not text.strip():
        raise BadRow("empty", f"empty {name!r}")
    return text, before


def parse_row(record: Any, fields: dict[str, str]) -> Preference:
    """One row as a Preference, or BadRow naming the field (and its mapping) and what is wrong."""
    if not isinstance(record, dict):
        raise BadRow("wrong type", f"expected an object with {', '.join(fields[f] for f in FIELDS[:3])}, "
                                   f"got {type(record).__name__}")
    missing = [key for key in FIELDS[:3] if record.get(fields[key]) is None]
    if missing and missing != ["prompt"]:  # without a prompt field, the responses' earlier turns may be the prompt
        raise BadRow("missing field", _missing(record, fields, missing))
    raw_prompt = record.get(fields["prompt"])
    if isinstance(raw_prompt, str):
        if not raw_prompt.strip():
            raise BadRow("empty", f"empty {fields['prompt']!r}")
        prompt: str | list[dict] = raw_prompt
        as_messages = [{"role": "user", "content": raw_prompt}]
    elif raw_prompt is None:
        prompt = as_messages = None
    else:
        prompt = as_messages = _messages(raw_prompt, fields["prompt"])
        if prompt is None:
            raise BadRow("wrong type", f"{fields['prompt']!r}: expected a string or a list of messages, "
                                       f"got {type(raw_prompt).__name__}")
        if not any(m["content"].strip() for m in prompt):
            raise BadRow("empty", f"empty {fields['prompt']!r}")
    chosen, before_c = _response(record[fields["chosen"]], fields["chosen"], as_messages)
    rejected, before_r = _response(record[fields["rejected"]], fields["rejected"], as_messages)
    if prompt is None:  # the implicit prompt: the messages chosen and rejected share before the answer
        if not before_c or before_c != before_r:
            raise BadRow("missing field", _missing(record, fields, ["prompt"]))
        prompt = before_c
    if chosen == rejected:
        raise BadRow("same responses", "chosen and rejected are the same text")
    rec_id = record.get(fields["id"])
    return Preference(id=None if rec_id is None else str(rec_id), prompt=prompt, chosen=chosen, rejected=rejected)


def _missing(record: dict, fields: dict[str, str], keys: list[str]) -> str:
    present = sorted(str(k) for k, v in record.items() if v is not None)  # a table's absent values are None
    names = ", ".join(repr(fields[k]) for k in keys)
    return (f"missing field{'s' * (len(keys) > 1)} {names} ({', '.join(f'data.fields.{k}' for k in keys)}; "
            f"the row has {', '.join(present) or 'no fields'})")


# ------------------------------------------------------------------ prompts and tokens

def render_prompt(prompt: str | list[dict], tok, *, prompt_format: str, template: str = "{prompt}") -> str:
    """The text the model continues. chat: the tokenizer's chat template (a text prompt is one user message);
    plain: `template` with {prompt} replaced by the text (a conversation's contents, one per paragraph)."""
    if prompt_format == "chat":
        if not getattr(tok, "chat_template", None):
            raise DataError(f"data.prompt_format=chat, but the tokenizer of {tok.name_or_path} has no chat template "
                            "(a base model): use data.prompt_format=plain with data.prompt_template, e.g. "
                            "'Question: {prompt}\nAnswer: '")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # e.g. a template that refuses a system turn: this row's problem, not the run's
            raise BadRow("chat template", f"the chat template refuses this prompt ({type(e).__name__}: {e})") from None
    if prompt_format != "plain":
        raise ValueError(f"data.prompt_format={prompt_format!r}: choose one of {', '.join(PROMPT_FORMATS)}")
    text = prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)
    return template.replace("{prompt}", text)


def response_ids(tok, text: str) -> list[int]:
    """A response's tokens as a sampled one that ended is stored: its text's tokens, then EOS."""
    eos = [] if tok.eos_token_id is None else [tok.eos_token_id]
    return tok(text, add_special_tokens=False)["input_ids"] + eos


def load_preferences(path: str, tok, *, split: str = "train", limit: int | None = None, fields: dict | None = None,
                     prompt_format: str = "chat", template: str = "{prompt}", max_length: int,
                     max_prompt_length: int) -> tuple[list[dict], list[dict]]:
    """(pairs, bad rows) of the first `limit` rows (all: None). A pair holds the texts and their token ids
    (prompt_ids as the pipeline tokenizes prompts: chat templates carry their own special tokens); a bad
    row is {where, kind, reason, record}."""
    unknown = set(fields or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"data.fields: unknown keys {sorted(unknown)}; known: {', '.join(FIELDS)}")
    fields = {**{f: f for f in FIELDS}, **(fields or {})}
    stem = Path(path).stem if not path.startswith("hf:") else path[3:].rsplit("/", 1)[-1]
    pairs, bad, seen = [], [], {}
    for n, (where, record) in enumerate(read_rows(path, split)):
        if limit is not None and n >= limit:
            break
        try:
            if isinstance(record, BadRow):
                raise record
            pref = parse_row(record, fields)
            pair_id = pref.id if pref.id is not None else f"{stem}-{n:05d}"
            if pair_id in seen:
                raise BadRow("duplicate id", f"duplicate id {pair_id!r} (first at {seen[pair_id]})")
            prompt = render_prompt(pref.prompt, tok, prompt_format=prompt_format, template=template)
            ids = tok(prompt, add_special_tokens=prompt_format != "chat")["input_ids"]
            chosen, rejected = response_ids(tok, pref.chosen), response_ids(tok, pref.rejected)
            if len(ids) > max_prompt_length:
                raise BadRow("over-length", f"prompt has {len(ids)} tokens > data.max_prompt_length={max_prompt_length}")
            for side, resp in (("chosen", chosen), ("rejected", rejected)):
                if len(ids) + len(resp) > max_length:
                    raise BadRow("over-length", f"prompt + {side} has {len(ids) + len(resp)} tokens > "
                                                f"data.max_length={max_length}")
        except BadRow as e:
            bad.append({"where": where, "kind": e.kind, "reason": str(e),
                        "record": json.dumps(record if not isinstance(record, BadRow) else None, ensure_ascii=False,
                                             default=str)})
            continue
        seen[pair_id] = where
        pairs.append({"id": pair_id, "question": pref.question, "answers": [], "prompt": prompt, "prompt_ids": ids,
                      "pair": 0, "chosen": pref.chosen, "chosen_ids": chosen, "rejected": pref.rejected,
                      "rejected_ids": rejected, "rejected_answer": None, "source": where})
    return pairs, bad
