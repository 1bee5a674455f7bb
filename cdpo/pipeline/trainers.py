"""The Trainer of a training stage, with its logger and callbacks, all from config.

- `trainer`: every key is a Lightning `Trainer` argument (`+trainer.deterministic=true`,
  `+trainer.limit_train_batches=0.5`) except `strategy` (built by `cdpo.distributed`) and
  `checkpoint_every_n_steps` (a resumable last checkpoint); the stage sets epochs, gradient
  accumulation, logger and callbacks itself.
- `logger`: `_target_` names a Lightning logger class and the other keys are its arguments; each
  stage logs as its own run (`version=<stage>` where the class takes a version; for wandb a run
  named and grouped by the run directory). `_target_: null` logs nothing.
- `callbacks`: a mapping of name -> `{_target_: ..., ...}`, each instantiated for every fit.
Metrics of every fit also go to a JSONL history (`JsonlHistory`) whatever the logger.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from cdpo import distributed
from cdpo.errors import ConfigError
from cdpo.io import jsonl_lines, write_jsonl
from cdpo.validation import trainer_arguments  # the Trainer arguments of `trainer`: checked there too

def _spec(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def logger_class(cfg: DictConfig):
    """The configured logger's class, or None (`_target_: null`)."""
    from hydra.utils import get_class

    target = _spec(cfg.logger).get("_target_")
    if not target:
        return None
    try:
        return get_class(target)
    except Exception as e:  # an import error or a missing name: say which key
        raise ConfigError(f"logger._target_={target!r}: cannot import it ({e})") from None


def is_wandb(cfg: DictConfig) -> bool:
    cls = logger_class(cfg)
    return cls is not None and issubclass(cls, L.pytorch.loggers.WandbLogger)


def wandb_mode(cfg: DictConfig) -> str:
    mode = _spec(cfg.logger).get("mode", "auto")
    return ("online" if os.environ.get("WANDB_API_KEY") else "offline") if mode == "auto" else mode


def make_logger(cfg: DictConfig, name: str):
    """The configured logger for the stage `name`, or False."""
    from hydra.utils import instantiate

    cls = logger_class(cfg)
    if cls is None:
        return False
    spec = _spec(cfg.logger)
    if issubclass(cls, L.pytorch.loggers.WandbLogger):
        return _wandb_logger(cfg, spec, name)
    if "version" in inspect.signature(cls).parameters and spec.get("version") is None:
        spec["version"] = name  # each stage its own folder / run
    return instantiate(spec, _convert_="all")


def _wandb_logger(cfg: DictConfig, spec: dict, name: str):
    from hydra.utils import instantiate

    save_dir = Path(cfg.run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    spec.pop("mode", None)
    mode = wandb_mode(cfg)
    # Under a wandb sweep agent the run id in the environment belongs to the eval run, which carries
    # the sweep's metric (log_results); training stages get runs of their own.
    run_id = _new_wandb_id() if os.environ.get("WANDB_SWEEP_ID") else None
    stage = dict(name=f"{save_dir.name}/{name}", save_dir=str(save_dir), offline=mode == "offline",
                 config=OmegaConf.to_container(cfg, resolve=True), group=save_dir.name, job_type=name, id=run_id,
                 mode=mode)  # explicit: after an earlier run in this process (an eval's log_results, a
    # multirun's previous job) `offline` alone no longer kept wandb offline
    logger = instantiate({**spec, **{k: v for k, v in stage.items() if spec.get(k) is None}}, _convert_="all")
    # Lightning passes wandb.init anonymous=None when not asked, and wandb warns at any value that "the anonymous
    # setting has no effect": not passed unless set
    if getattr(logger, "_wandb_init", {}).get("anonymous", True) is None:
        del logger._wandb_init["anonymous"]
    return logger


def _new_wandb_id() -> str:
    import uuid

    return uuid.uuid4().hex[:8]


def log_results(cfg: DictConfig, name: str, summary: dict) -> None:
    """Evaluation results as a wandb run of their own (job_type "eval"), for the report and sweeps;
    nothing with another logger (the report reads the run directories)."""
    if not is_wandb(cfg):
        return
    import wandb

    spec = _spec(cfg.logger)
    save_dir = Path(cfg.run_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=spec.get("project"), entity=spec.get("entity"), name=f"{save_dir.name}/{name}",
                     dir=str(save_dir), mode=wandb_mode(cfg), group=save_dir.name, job_type="eval",
                     config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
    run.summary.update(summary)
    run.finish()


def make_callbacks(cfg: DictConfig) -> list:
    """The `callbacks` section's callbacks, new ones for each fit."""
    from hydra.utils import instantiate

    out = []
    for key, node in _spec(cfg.get("callbacks")).items():
        if not isinstance(node, dict) or not node.get("_target_"):
            raise ConfigError(f"callbacks.{key}: needs _target_ (a Lightning callback class) and its arguments")
        try:
            out.append(instantiate(node, _convert_="all"))
        except Exception as e:
            raise ConfigError(f"callbacks.{key} ({node['_target_']}): {e.__cause__ or e}") from None
    return out
class JsonlHistory(L.pytorch.loggers.Logger):
    """Every logged metrics row appended to a JSONL file, whatever the configured logger: the report
    plots training curves (the paper's Figure 6) from it without wandb or CSV logs.

    A new fit starts a new history; a fit resumed from a checkpoint (`resume=True`) keeps the rows before
    the first step it logs again and drops those from that step on (logged after the checkpoint, before
    the crash, and logged again now): no duplicates, no gaps."""

    def __init__(self, path: Path, resume: bool = False):
        super().__init__()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._kept = self._rows() if resume else []
        self._first = True
        if not resume:  # a new history; none at all until a row is logged (an empty JSONL file is no dataset)
            self.path.unlink(missing_ok=True)

    def _rows(self) -> list[dict]:
        rows = []
        if self.path.exists():
            for _, line in jsonl_lines(self.path):  # split at "\n" only: a logged text may hold U+2028
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, TypeError):  # a line cut by a kill: the checkpoint predates it
                    break
        return rows

    name = property(lambda self: "history")
    version = property(lambda self: 0)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if self._first:  # rewrite the history up to this step once (atomically), then append
            self._first = False
            kept = [r for r in self._kept if step is None or r.get("step") is None or r["step"] < step]
            write_jsonl(self.path, kept)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def finish_logger(logger) -> None:
    if isinstance(logger, L.pytorch.loggers.WandbLogger):
        import wandb

        logger.finalize("success")
        wandb.finish()


def make_trainer(cfg: DictConfig, name: str, *, epochs: int, grad_accum: int = 1, max_steps: int = -1,
                 checkpoint_dir: Path | None = None, history: Path | None = None, resume_history: bool = False,
                 callbacks: list | None = None, val_every: int | None = None) -> L.Trainer:
    """A Trainer from cfg.trainer, cfg.logger and cfg.callbacks (+ the stage's own `callbacks`). With
    trainer.checkpoint_every_n_steps and a checkpoint_dir it keeps `last.ckpt` there (a folder of shards
    under FSDP's state_dict_type: sharded) to resume a fit from; with `history`, logged metrics also go
    to that JSONL file (continued, not restarted, with `resume_history`); with `val_every`, the
    validation set is evaluated every that many training batches (else never)."""
    t = cfg.trainer
    every = t.get("checkpoint_every_n_steps")
    stage_callbacks = [*make_callbacks(cfg), *(callbacks or [])]
    if every and checkpoint_dir is not None:
        stage_callbacks.append(L.pytorch.callbacks.ModelCheckpoint(
            dirpath=str(checkpoint_dir), every_n_train_steps=every, save_top_k=0, save_last=True))
    logger = make_logger(cfg, name)
    if history is not None:  # the configured logger stays first: trainer.logger is what finish_logger ends
        logger = [*([logger] if logger else []), JsonlHistory(history, resume=resume_history)]
    validation = (dict(val_check_interval=val_every, check_val_every_n_epoch=None) if val_every
                  else dict(limit_val_batches=0))
    return L.Trainer(**{**validation, **trainer_arguments(t)}, max_epochs=epochs, max_steps=max_steps,
                     accumulate_grad_batches=grad_accum, logger=logger, callbacks=stage_callbacks,
                     enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint)
                                              for c in stage_callbacks),
                     default_root_dir=cfg.run_dir, strategy=distributed.build_strategy(t.get("strategy")))
