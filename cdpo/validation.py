"""Every setting of `train.py`'s config checked at start-up, in one place, before any work.

Pure config and cheap environment checks (no torch import, no model, no data download), so that a
bad value is reported in about a second with its dotted key and its allowed range, instead of after
the samples and both CE models were computed. `validate(cfg)` raises `ConfigError` listing every
problem; `problems(cfg)` returns them. Objectives add their own checks through `method_problems`.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cdpo.data.preferences import FIELDS as PREFERENCE_FIELDS, PROMPT_FORMATS, is_preference_data, path_kind
from cdpo.data.sources import DEFAULT_FIELDS as QUESTION_FIELDS
from cdpo.errors import ConfigError
from cdpo.stages import NAMES

STAGES = ("all", *NAMES)
SOURCES = ("arith", "gsm8k", "math500")  # plus jsonl:<path> and hf:<dataset_id>
SPLITS = {"arith": ("train", "test"), "gsm8k": ("train", "test"), "math500": ("test",)}
PROMPT_STYLES = ("gsm8k", "math", "chat")
DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto", "bf16-if-native")
ACCELERATORS = ("cpu", "gpu", "cuda", "auto", "mps")
PRECISIONS = ("32", "32-true", "16", "16-mixed", "bf16", "bf16-mixed", "bf16-true", "16-true", "64", "64-true",
              "transformer-engine")
GRADING_POLICIES = ("strict", "flexible", "authors_gsm8k", "authors_math")  # cdpo.grading.POLICIES (a test keeps them equal)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name


class _Checker:
    """Collects "key=value: allowed range" lines; a missing optional key is not checked."""

    def __init__(self, cfg: dict):
        self.cfg, self.out = cfg, []

    def get(self, key: str, default: Any = "<missing>") -> Any:
        node = self.cfg
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def bad(self, key: str, allowed: str) -> None:
        self.out.append(f"{key}={self.get(key, None)!r}: {allowed}")

    def number(self, key: str, *, low=None, high=None, low_open=False, high_open=False, integer=False,
               optional=False) -> None:
        v = self.get(key)
        if v == "<missing>" or (v is None and optional):
            return
        kind = "an integer" if integer else "a number"
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        allowed = f"{kind} {' and '.join(x for x in (lo, hi) if x)}".strip() + (" or null" if optional else "")
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            return self.bad(key, allowed)
        if low is not None and (v <= low if low_open else v < low):
            return self.bad(key, allowed)
        if high is not None and (v >= high if high_open else v > high):
            return self.bad(key, allowed)

    def choice(self, key: str, values, optional=False) -> None:
        v = self.get(key)
        if v == "<missing>" or (v is None and optional):
            return
        if v not in values:
            self.bad(key, f"one of {', '.join(map(str, values))}")

    def boolean(self, key: str) -> None:
        v = self.get(key)
        if v != "<missing>" and not isinstance(v, bool):
            self.bad(key, "true or false")


def _has_gpu() -> bool:
    """Whether a CUDA/ROCm device is visible, without importing torch (slow) unless it is loaded."""
    if "torch" in sys.modules:
        return sys.modules["torch"].cuda.is_available()
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def _lora(c: _Checker, section: str) -> None:
    c.number(f"{section}.r", low=1, integer=True)
    c.number(f"{section}.alpha", low=0, low_open=True)
    c.number(f"{section}.dropout", low=0, high=1, high_open=True)
    modules = c.get(f"{section}.target_modules")
    if modules != "<missing>" and (not isinstance(modules, list) or not modules):
        c.bad(f"{section}.target_modules", "a non-empty list of module names")


def _model(c: _Checker) -> None:
    path = c.get("model.path")
    if not isinstance(path, str) or not path:
        return c.bad("model.path", "tiny:llama, embedded:<name>, a model directory or a hub id org/name")
    if not (path.startswith(("tiny:", "embedded:")) or Path(path).is_dir() or _HUB_ID.match(path)):
        c.bad("model.path", "tiny:llama, embedded:<name>, an existing model directory or a hub id org/name "
                            f"({path} does not exist)")
    elif _HUB_ID.match(path) and not Path(path).is_dir():
        _hub_model(c, path)
    c.choice("model.dtype", DTYPES)
    c.boolean("model.gradient_checkpointing")


def _source(c: _Checker, key: str) -> None:
    source = c.get(key, None)
    if not isinstance(source, str) or not (source in SOURCES or source.startswith(("jsonl:", "hf:"))):
        c.bad(key, f"one of {', '.join(SOURCES)}, jsonl:<path> or hf:<dataset_id>")
    elif source.startswith("jsonl:") and not Path(source[len("jsonl:"):]).is_file():
        c.bad(key, f"jsonl:<path> of an existing file ({source[len('jsonl:'):]}: no such file)")


def _fields(c: _Checker, key: str, known, sources: list) -> None:
    """A field mapping {field: the record's key}: known fields, string keys, and a source that takes one."""
    fields = c.get(key, None)
    if fields is None:
        return
    if not isinstance(fields, dict) or not all(isinstance(v, str) and v for v in fields.values()):
        return c.bad(key, f"a mapping of {', '.join(known)} to the records' keys (strings)")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        c.bad(key, f"keys among {', '.join(known)} (unknown: {', '.join(map(str, unknown))})")
    if sources is not None and not any(isinstance(s, str) and s.startswith(("jsonl:", "hf:")) for s in sources):
        c.bad(key, "a mapping for a jsonl:<path> or hf:<dataset_id> source; this source has a fixed layout")


def _lengths(c: _Checker) -> None:
    c.number("data.max_new_tokens", low=1, integer=True)
    c.number("data.max_length", low=2, integer=True)
    c.number("data.max_prompt_length", low=1, integer=True)
    length, prompt = c.get("data.max_length", None), c.get("data.max_prompt_length", None)
    if isinstance(length, int) and isinstance(prompt, int) and prompt >= length:
        c.bad("data.max_prompt_length", f"an integer < data.max_length ({length}): responses need room")


def _preference_data(c: _Checker, training: bool) -> None:
    """data=preference: the user's rows (path, fields, prompt format) and an optional eval source."""
    d, stage = "data", c.get("stage", "all")
    if training:
        path = c.get(f"{d}.path", None)
        if not isinstance(path, str) or not path:
            c.bad(f"{d}.path", "your preference data: a .jsonl/.json or .parquet file, a folder written by datasets' "
                               "save_to_disk, or hf:<dataset_id>")
        else:
            try:
                path_kind(path)
            except ValueError as e:
                c.bad(f"{d}.path", str(e))
    if stage == "sample":
        c.bad("stage", "a stage other than sample: preference data is not sampled (stage=select reads its rows)")
    _fields(c, f"{d}.fields", PREFERENCE_FIELDS, None)
    c.choice(f"{d}.prompt_format", PROMPT_FORMATS)
    template = c.get(f"{d}.prompt_template", None)
    if c.get(f"{d}.prompt_format", None) == "plain" and not (isinstance(template, str) and "{prompt}" in template):
        c.bad(f"{d}.prompt_template", "a string with {prompt} in it (where the prompt text goes)")
    if c.get(f"{d}.eval_source", None) is not None:
        _source(c, f"{d}.eval_source")
        _fields(c, f"{d}.eval_fields", tuple(QUESTION_FIELDS), [c.get(f"{d}.eval_source", None)])
    elif stage == "eval" or not _trains(c):
        c.bad(f"{d}.eval_source", "a source of questions with answers (arith, gsm8k, math500, jsonl:<path>, "
                                  "hf:<id>): preference data has no gold answers to evaluate with")
    c.choice(f"{d}.grading", GRADING_POLICIES)
    c.number(f"{d}.train_limit", low=1, integer=True, optional=True)
    c.number(f"{d}.test_limit", low=1, integer=True, optional=True)
    _lengths(c)


def _hub_model(c: _Checker, repo_id: str) -> None:
    """A hub id must be in the local hub cache or the hub must answer (a probe of a few seconds): else the
    first model load would retry the hub for a minute, after the stages before it ran."""
    from cdpo import hub

    if hub.cached(repo_id):
        return
    why = hub.unavailable("TRANSFORMERS_OFFLINE")
    if why:
        c.bad("model.path", f"a local model directory (model.path=/path/to/{repo_id.rsplit('/', 1)[-1]}), "
                            f"tiny:llama or embedded:<name>: {repo_id} is a Hugging Face hub id that is not in the "
                            f"local hub cache, and the hub cannot be reached ({why})")


def _data(c: _Checker, training: bool) -> None:
    d = "data"
    if is_preference_data(c.get(d, None)):
        return _preference_data(c, training)
    for key in (f"{d}.source", f"{d}.train_source"):
        if c.get(key, None) is not None or key.endswith(".source"):
            _source(c, key)
    source = c.get(f"{d}.source", None)
    _fields(c, f"{d}.fields", tuple(QUESTION_FIELDS), [source, c.get(f"{d}.train_source", None)])
    # training questions are read only when sampling (the baseline and stage=eval need none)
    samples = training and c.get("stage", "all") in ("all", "sample") and _trains(c)
    for split_key in (f"{d}.train_split", f"{d}.test_split"):
        split = c.get(split_key)
        train = split_key.endswith("train_split")
        used = (c.get(f"{d}.train_source", None) if train else None) or source
        if not isinstance(split, str) or not split:
            c.bad(split_key, "a split name")
        elif train and samples and used == source and source in SPLITS and split not in SPLITS[source]:  # math500
            c.bad(f"{d}.train_source", f"the training questions, which {source} lacks (it has only "
                                       f"{', '.join(SPLITS[source])}): e.g. data.train_source=jsonl:/path/train.jsonl "
                                       "or hf:<dataset id>")
        elif used in SPLITS and split not in SPLITS[used] and (samples or not train):
            hint = " (training questions: data.train_source=jsonl:<path> or hf:<id>)" if train else ""
            c.bad(split_key, f"a split of {used}: {', '.join(SPLITS[used])}{hint}")
    c.number(f"{d}.train_limit", low=1, integer=True, optional=True)
    c.number(f"{d}.test_limit", low=1, integer=True, optional=True)
    c.choice(f"{d}.prompt_style", PROMPT_STYLES)
    c.number(f"{d}.n_shot", low=0, integer=True)
    c.number(f"{d}.train_n_shot", low=0, integer=True, optional=True)
    c.boolean(f"{d}.strip_prompt")
    c.choice(f"{d}.grading", GRADING_POLICIES)
    _lengths(c)


def _trainer(c: _Checker) -> None:
    t = "trainer"
    c.choice(f"{t}.accelerator", ACCELERATORS)
    if c.get(f"{t}.accelerator") in ("gpu", "cuda") and not _has_gpu():
        c.bad(f"{t}.accelerator", "cpu on this machine: no CUDA device is visible (use trainer=cpu)")
    devices = c.get(f"{t}.devices")
    if devices != "<missing>" and devices not in ("auto", -1) and not isinstance(devices, list):
        c.number(f"{t}.devices", low=1, integer=True)
    c.number(f"{t}.num_nodes", low=1, integer=True)
    if c.get(f"{t}.precision") != "<missing>" and str(c.get(f"{t}.precision")) not in PRECISIONS:
        c.bad(f"{t}.precision", f"one of {', '.join(PRECISIONS)}")
    c.number(f"{t}.gradient_clip_val", low=0, optional=True)
    c.number(f"{t}.log_every_n_steps", low=1, integer=True)
    c.number(f"{t}.checkpoint_every_n_steps", low=1, integer=True, optional=True)
    if c.get(f"{t}.strategy.name") == "deepspeed" and c.get(f"{t}.strategy.stage") == 3:
        # a two-process run on the CPU fails in the first step (README, "What ran where"); refused before any work
        c.bad(f"{t}.strategy.stage", "1 or 2 (trainer=deepspeed_zero2): ZeRO-3 partitions lm_head.weight, which "
              "cdpo's chunked head uses outside the module's forward; to shard every weight use trainer=fsdp")
    _trainer_keys(c)


OWN_TRAINER_KEYS = ("strategy", "checkpoint_every_n_steps")  # ours: not passed to Trainer as they are
STAGE_TRAINER_KEYS = {"max_epochs": "ce.epochs / align.epochs", "max_steps": "the stage",
                      "accumulate_grad_batches": "align.grad_accum", "logger": "logger=", "callbacks": "callbacks=",
                      "default_root_dir": "run_dir", "enable_checkpointing": "trainer.checkpoint_every_n_steps"}
TRAINER_DEFAULTS = {"enable_model_summary": False, "num_sanity_val_steps": 0}


def trainer_arguments(trainer_cfg: DictConfig | dict) -> dict:
    """The Trainer arguments of the `trainer` section; a key that is none names what to use instead."""
    import inspect

    import lightning as L  # only when a key is not one of the shipped configs' (KNOWN_TRAINER_KEYS)

    spec = (OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig)
            else dict(trainer_cfg or {}))
    args = {k: v for k, v in spec.items() if k not in OWN_TRAINER_KEYS}
    accepted = inspect.signature(L.Trainer.__init__).parameters
    for key in args:
        if key in STAGE_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key}: set by each stage from {STAGE_TRAINER_KEYS[key]}")
        if key not in accepted:
            raise ConfigError(f"trainer.{key}: not an argument of lightning's Trainer "
                              f"(its arguments: {', '.join(k for k in accepted if k != 'self')})")
    return {**TRAINER_DEFAULTS, **args}


# Keys of the shipped trainer configs; any other key is checked against Lightning's Trainer (an import)
KNOWN_TRAINER_KEYS = {"accelerator", "devices", "num_nodes", "precision", "gradient_clip_val", "log_every_n_steps",
                      "checkpoint_every_n_steps", "strategy"}


def _trainer_keys(c: _Checker) -> None:
    extra = set(c.get("trainer", None) or {}) - KNOWN_TRAINER_KEYS
    if extra:
        try:
            trainer_arguments({k: c.cfg["trainer"][k] for k in extra})
        except ConfigError as e:
            c.out.append(str(e))


def _logger_and_callbacks(c: _Checker) -> None:
    target = c.get("logger._target_", None)
    if target is not None and (not isinstance(target, str) or "." not in target):
        c.bad("logger._target_", "a Lightning logger class (e.g. lightning.pytorch.loggers.CSVLogger) or null")
    c.choice("logger.mode", ("auto", "online", "offline", "disabled"))
    callbacks = c.get("callbacks", None) or {}
    if not isinstance(callbacks, dict):
        return c.bad("callbacks", "a mapping of name -> {_target_: <callback class>, ...}")
    for name, node in callbacks.items():
        if not isinstance(node, dict) or not isinstance(node.get("_target_"), str):
            c.bad(f"callbacks.{name}", "{_target_: <a Lightning callback class>, <its arguments>}")


def method_problems(cfg: dict) -> list[str]:
    """The method section, checked by its objective class (cdpo.objectives: each field's allowed values)."""
    from cdpo.objectives import from_config

    try:
        from_config(OmegaConf.create(cfg.get("method") or {}))
    except ConfigError as e:
        return [str(e)]
    return []


def _trains(c: _Checker) -> bool:
    """Whether the method's objective class trains anything (the baseline does not: its LoRA and data
    settings do not matter). A target that cannot be imported counts as training; method_problems says why."""
    from hydra.utils import get_class

    from cdpo.objectives import TrainsOn

    try:
        return get_class(c.get("method._target_", None)).trains_on != TrainsOn.NOTHING
    except Exception:
        return True


def problems(cfg: DictConfig | dict, *, training: bool = True) -> list[str]:
    """Every setting outside its allowed range, as "key=value: allowed" lines (empty: all good).
    training=False (eval.py, score.py, rollout.py): the training questions are not read."""
    c = _Checker(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
    c.choice("stage", STAGES)
    c.number("seed", low=0, integer=True)
    c.choice("loss_impl", ("torch", "fused"))
    compare = c.get("compare")
    if compare != "<missing>" and (not isinstance(compare, list) or not set(compare) <= {"base", "sft"}):
        c.bad("compare", "a list of base, sft")
    c.number("lock_timeout_s", low=0, optional=True)
    _model(c)
    _data(c, training)
    _trainer(c)
    c.choice("generation.backend", ("hf", "vllm"))
    c.number("generation.batch_size", low=1, integer=True)
    c.number("generation.max_new_tokens", low=1, integer=True)
    _logger_and_callbacks(c)
    ckpt = c.get("ckpt_path", None)
    if ckpt is not None:
        if c.get("stage", "all") not in ("sft_pos", "sft_neg", "align"):
            c.bad("ckpt_path", "a checkpoint of the one training stage this run runs: set stage=sft_pos, sft_neg "
                               "or align")
        elif not Path(str(ckpt)).exists():
            c.bad("ckpt_path", f"an existing Lightning checkpoint ({ckpt}: no such file)")

    s = "sample"
    c.number(f"{s}.n", low=1, integer=True)
    c.number(f"{s}.temperature", low=0)
    c.number(f"{s}.top_p", low=0, high=1, low_open=True)
    c.number(f"{s}.max_new_tokens", low=1, integer=True)
    c.number(f"{s}.shard_size", low=1, integer=True)
    c.number(f"{s}.seed", low=0, integer=True)
    s = "select"
    c.number(f"{s}.top_k", low=1, integer=True)
    c.number(f"{s}.top_p", low=0, high=1, low_open=True)
    c.choice(f"{s}.negative_rule", ("top_p", "top_k", "authors"))
    c.number(f"{s}.negative_k", low=1, integer=True)
    c.number(f"{s}.pairs_per_question", low=1, integer=True)
    for s in ("ce", "align"):
        c.number(f"{s}.lr", low=0, low_open=True)
        c.number(f"{s}.epochs", low=1, integer=True)
        c.number(f"{s}.batch_size", low=1, integer=True)
        c.number(f"{s}.warmup_ratio", low=0, high=1, high_open=True)
        c.number(f"{s}.warmup_steps", low=0, integer=True, optional=True)
        c.choice(f"{s}.schedule", ("cosine", "linear"))
        c.number(f"{s}.weight_decay", low=0)
    c.number("ce.b", low=0)
    c.number("ce.holdout", low=0, integer=True, optional=True)
    c.number("ce.eval_every_n_steps", low=1, integer=True, optional=True)
    c.number("ce.shard_size", low=1, integer=True)
    c.boolean("ce.share_prefix")
    c.number("ce.seed", low=0, integer=True)
    c.number("align.grad_accum", low=1, integer=True)
    c.boolean("align.precompute_ref")
    c.choice("align.overlong", ("truncate", "drop"))
    c.number("align.drop_prompt_length", low=1, integer=True)
    c.number("align.drop_length", low=2, integer=True)
    c.choice("cdpo_loss_form", ("sequence", "per_position"))
    e = "eval"
    c.number(f"{e}.n", low=1, integer=True)
    c.number(f"{e}.temperature", low=0)
    c.number(f"{e}.top_p", low=0, high=1, low_open=True)
    c.number(f"{e}.limit", low=1, integer=True, optional=True)
    c.number(f"{e}.batch_size", low=1, integer=True)
    c.boolean(f"{e}.merge_adapter")
    if c.get(f"{e}.merge_adapter", False) is True:
        if c.get("generation.backend", "hf") == "vllm":
            c.bad(f"{e}.merge_adapter", "false with generation=vllm (vLLM serves the adapter as a LoRA request)")
        elif c.get("model.quantization", None) or c.get("peft.quantization", None):
            c.bad(f"{e}.merge_adapter", "false with a quantized base (a LoRA delta cannot be folded into 4-bit weights "
                                        "without changing them)")
    n = c.get(f"{e}.n", 1)
    pass_k = c.get(f"{e}.pass_k")
    if pass_k != "<missing>" and (not isinstance(pass_k, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) and 1 <= k for k in pass_k)):
        c.bad(f"{e}.pass_k", f"a list of integers >= 1 (pass@k needs k <= eval.n={n})")

    name = c.get("method.name")
    if not isinstance(name, str) or not name:
        c.bad("method.name", "a method name")
    if _trains(c):
        _lora(c, "peft")
        _lora(c, "ce_lora")
    return c.out + method_problems(c.cfg)


def validate(cfg: DictConfig | dict, *, training: bool = True) -> None:
    """Raise ConfigError naming every bad setting (its dotted key and allowed range) before any work."""
    found = problems(cfg, training=training)
    if found:
        raise ConfigError("bad setting" + ("s" if len(found) > 1 else "") + ": " + "; ".join(found))
