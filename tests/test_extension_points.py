"""Open extension points: any Trainer argument, a logger or a callback from config without code,
ckpt_path to resume a fit, the CE hold-out set with its best adapter, and logging to the job's file."""
import json
import logging
import subprocess
import sys

import lightning as L
import pytest
import torch
from test_pipeline import REPO, TINY, _cfg, _inject_correct_samples

from cdpo.errors import ConfigError
from cdpo.models import load_tokenizer
from cdpo.modules.callbacks import KeepBestAdapter
from cdpo.pipeline import run_pipeline, trainers
from cdpo.pipeline.artifacts import RunPaths
from cdpo.validation import problems

FITS = []


class RecordingCallback(L.Callback):
    """A user's callback: records each fit it saw (name given in its config)."""

    def __init__(self, label: str):
        self.label = label

    def on_fit_end(self, trainer, pl_module):
        FITS.append((self.label, trainer.global_step))


class RecordingLogger(L.pytorch.loggers.CSVLogger):
    """A user's logger class, named by _target_ with its own arguments."""

    rows: list = []

    def log_metrics(self, metrics, step=None):
        RecordingLogger.rows.append((self.version, dict(metrics)))
        super().log_metrics(metrics, step)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Samples with correct and wrong answers and a selection (a random tiny model has none)."""
    run = tmp_path_factory.mktemp("run")
    run_pipeline(_cfg(run, "stage=sample"))
    _inject_correct_samples(RunPaths(_cfg(run)), load_tokenizer("embedded:smollm2-135m-instruct"))
    run_pipeline(_cfg(run, "stage=select"))
    return run


def test_trainer_arguments_logger_and_callbacks_come_from_config(prepared):
    FITS.clear()
    RecordingLogger.rows = []
    cfg = _cfg(prepared, "stage=sft_pos", "+trainer.limit_train_batches=1",
               "logger._target_=test_extension_points.RecordingLogger", f"logger.save_dir={prepared}/mylog",
               "+callbacks.rec._target_=test_extension_points.RecordingCallback", "+callbacks.rec.label=mine")
    summary = run_pipeline(cfg)["stages"]["sft_pos"]
    assert summary["steps"] == 2  # limit_train_batches=1 per epoch, ce.epochs=2
    assert FITS == [("mine", 2)]
    assert {version for version, _ in RecordingLogger.rows} == {"sft_pos"}  # the stage's own version
    assert any("loss" in row for _, row in RecordingLogger.rows)
    assert (prepared / "mylog" / "csv" / "sft_pos" / "metrics.csv").exists()  # its save_dir, csv.yaml's name


@pytest.mark.parametrize("override,message", [
    ("+trainer.bogus_flag=1", "trainer.bogus_flag: not an argument of lightning's Trainer"),
    ("+trainer.max_epochs=3", "trainer.max_epochs: set by each stage from ce.epochs / align.epochs"),
    ("+callbacks.x.every=3", "callbacks.x="),
    ("ckpt_path=/nonexistent.ckpt", "ckpt_path='/nonexistent.ckpt': a checkpoint of the one training stage"),
])
def test_bad_extension_settings_are_named_before_any_work(tmp_path, override, message):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={tmp_path}/run", override,
                           f"hydra.run.dir={tmp_path}/h"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # refused before any work (no run directory, no model loaded)
    with pytest.raises(ConfigError, match="trainer.max_epochs"):
        trainers.trainer_arguments({"max_epochs": 3})


def test_ckpt_path_resumes_the_fit_from_a_users_checkpoint(prepared, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cdpo")
    ck = tmp_path / "ck"
    first = run_pipeline(_cfg(prepared, "stage=sft_neg", "+callbacks.ck._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                              f"+callbacks.ck.dirpath={ck}", "+callbacks.ck.save_last=true"))["stages"]["sft_neg"]
    assert (ck / "last.ckpt").exists() and first["steps"] > 0
    (prepared / "sft_neg.done.json").unlink()  # redo the stage, from the checkpoint of its last step
    again = run_pipeline(_cfg(prepared, "stage=sft_neg", f"ckpt_path={ck / 'last.ckpt'}"))["stages"]["sft_neg"]
    assert f"resuming from {ck / 'last.ckpt'}" in caplog.text
    assert again["steps"] == first["steps"]  # restored at the end of training: no step left to take
    assert problems(_cfg(prepared, f"ckpt_path={ck / 'last.ckpt'}")) == [
        f"ckpt_path='{ck / 'last.ckpt'}': a checkpoint of the one training stage this run runs: set stage=sft_pos, "
        "sft_neg or align"]


def test_keep_best_adapter_restores_the_weights_of_the_lowest_held_out_loss():
    module = L.LightningModule()
    module.w = torch.nn.Parameter(torch.zeros(2))
    module.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    keep = KeepBestAdapter()
    trainer = type("T", (), {"callback_metrics": {}, "sanity_checking": False, "global_step": 0})()
    for step, (value, loss) in enumerate([(1.0, 3.0), (2.0, 1.0), (3.0, 2.0), (4.0, 1.5)]):
        with torch.no_grad():
            module.w.fill_(value)
        trainer.global_step, trainer.callback_metrics = step, {"val_loss": torch.tensor(loss)}
        keep.on_validation_end(trainer, module)
    keep.restore(module)
    assert module.w.tolist() == [2.0, 2.0] and keep.best_step == 1 and keep.best == 1.0
    assert "frozen" not in {n.split(".")[-1] for n in keep._weights}  # only trainable (adapter) weights


def test_ce_holdout_keeps_the_best_adapter_by_held_out_loss(prepared, tmp_path):
    run = tmp_path / "run"
    run_pipeline(_cfg(run, "stage=sample", f"reuse_from={prepared}"))
    run_pipeline(_cfg(run, "stage=select", f"reuse_from={prepared}"))
    positives = len((run / "positives.jsonl").read_text().splitlines())
    summary = run_pipeline(_cfg(run, "stage=sft_pos", "ce.holdout=1", "ce.eval_every_n_steps=1"))["stages"]["sft_pos"]
    assert summary["held_out"] == 1 and summary["records"] == positives - 1
    assert 0 <= summary["best_step"] <= summary["steps"] and summary["best_val_loss"] > 0
    marker = json.loads((run / "sft_pos.done.json").read_text())
    assert marker["best_step"] == summary["best_step"]
    with pytest.raises(ValueError, match=r"ce.holdout=\d+: the pos set has only"):
        run_pipeline(_cfg(run, "stage=sft_pos", f"ce.holdout={positives}"))


def test_train_logs_plain_lines_to_the_console_and_records_to_the_job_file(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={tmp_path}/run", "stage=sample",
                           f"hydra.run.dir={tmp_path}/h"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\n[sample] running\n" in "\n" + proc.stdout
    job_log = (tmp_path / "h" / "train.log").read_text()
    assert "[cdpo.pipeline.runner][INFO] - [sample] running" in job_log
    assert "[cdpo.pipeline.runner][INFO] - [sample] finished" in job_log


def test_a_stage_without_a_held_out_set_fits_without_library_warnings(prepared):
    """`python train.py` printed Lightning's "Total length of `list` across ranks is zero" (a validation every
    ce.eval_every_n_steps batches of an empty held-out set) and transformers' is_gradient_checkpointing
    FutureWarning (asked by PEFT when it wraps the model); align, Lightning's "You passed in a `val_dataloader` but
    have no `validation_step`" and torch's LeafSpec FutureWarning (from Lightning). None shows now."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline(_cfg(prepared, "stage=sft_neg", "+trainer.limit_train_batches=1", "ce.holdout=0"))
        run_pipeline(_cfg(prepared, "stage=align", "method=dpo", "+trainer.limit_train_batches=1"))
    shown = [str(w.message) for w in caught]
    noise = ("Total length of", "is_gradient_checkpointing", "val_dataloader", "LeafSpec")
    assert not [m for m in shown if any(n in m for n in noise)], shown


def test_the_wandb_logger_passes_no_anonymous_setting(tmp_path, monkeypatch):
    """Lightning's WandbLogger passes anonymous=None to wandb.init, whose every value warns that "the anonymous
    setting has no effect"."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = trainers.make_logger(_cfg(tmp_path / "run", "logger=wandb"), "sft_pos")
    assert "anonymous" not in logger._wandb_init and logger._wandb_init["mode"] == "offline"
