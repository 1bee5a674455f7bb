"""Fault injection on the tiny pipeline: signals at random points of every stage, damaged artifacts,
two jobs on one run_dir, changed inputs and settings. Each fault is real (a subprocess killed with
os.kill, files truncated or edited, two processes at once) and the outcome is checked: the same
artifacts as an uninterrupted run, a recomputation, or one clear error line with a remedy."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from test_pipeline import REPO, TINY, _cfg, _inject_correct_samples

from cdpo.errors import CorruptArtifactError, SettingsConflictError, StaleInputError
from cdpo.io import read_jsonl, write_jsonl
from cdpo.models import load_tokenizer
from cdpo.pipeline import run_pipeline
from cdpo.pipeline.artifacts import RunPaths, accept, stage_identity
from cdpo.lock import run_lock

# Byte-level results: the comparison runs (in this process, one torch thread) and the killed
# subprocesses must compute alike, so the subprocesses get one thread too.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "kernels"), os.environ.get("PYTHONPATH", "")])}
SHARED = ("trajectories.jsonl", "positives.jsonl", "negatives.jsonl", "pairs.jsonl", "scored_pairs.jsonl",
          "adapters/pos/adapter_model.safetensors", "adapters/neg/adapter_model.safetensors",
          "cdpo-seed0/adapter/adapter_model.safetensors", "eval/base.jsonl", "eval/sft.jsonl", "cdpo-seed0/eval.jsonl")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tok):
    """An uninterrupted run: `sampled` is the run_dir after sample (+ injected correct samples, which a
    random model never produces), `done` the finished run; `raw` the trajectories before the injection."""
    root = tmp_path_factory.mktemp("ref")
    done = root / "done"
    run_pipeline(_cfg(done, "stage=sample"))
    raw = (done / "trajectories.jsonl").read_bytes()
    _inject_correct_samples(RunPaths(_cfg(done)), tok)
    shutil.copytree(done, root / "sampled")
    run_pipeline(_cfg(done))
    return {"done": done, "sampled": root / "sampled", "raw": raw}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _train(run: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-u", str(REPO / "train.py"), *TINY, f"run_dir={run}",
                             f"hydra.run.dir={run}/hydra", *overrides], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=run.parent, env=ENV)


def _kill_during(proc: subprocess.Popen, stage: str, delay: float, sig: int) -> tuple[int, str]:
    """Wait for `[stage] running`, then `delay` seconds, then send `sig`; return (exit code, output)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"[{stage}] running"):
            break
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out


def _stopped_codes(sig: int, out: str) -> tuple[int, ...]:
    """The exit code a stopped train.py must have: 128 + signal (SIGKILL: killed). A signal that lands
    after all the work, while Python shuts down (default handlers again), may kill it: -signal."""
    if sig == signal.SIGKILL:
        return (-sig,)
    return (128 + sig, -sig) if "wall time per stage" in out and "stopped by" not in out else (128 + sig,)


def _assert_same(run: Path, ref: Path, names=SHARED) -> None:
    for name in names:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name


# Two runs, each stopped three times (a new process each time); together they stop every stage after
# sample (tested below) with each signal, and align, whose SIGTERM used to exit 0, twice.
KILLS = {0: [("sft_pos", signal.SIGKILL), ("score", signal.SIGINT), ("align", signal.SIGTERM)],
         1: [("sft_neg", signal.SIGINT), ("align", signal.SIGTERM), ("eval", signal.SIGKILL)]}


@pytest.mark.parametrize("seed", sorted(KILLS))
def test_signals_at_random_points_of_every_stage_resume_to_the_same_result(tmp_path, ref, seed):
    """Each stage is stopped by SIGKILL, SIGTERM or SIGINT at a random point; exit codes are 128 + signal
    (SIGKILL: killed), and the rerun's artifacts equal those of an uninterrupted run, byte for byte."""
    rng = random.Random(seed)
    run = _copy(ref["sampled"], tmp_path / "run")
    paths, stopped = RunPaths(_cfg(run)), 0
    for stage, sig in KILLS[seed]:
        delay = rng.uniform(0.0, 1.5)
        if paths.marker(stage).exists():  # a signal that landed late (the tiny stages take about a second)
            continue                      # let the stage finish: there is nothing left to stop in it
        code, out = _kill_during(_train(run), stage, delay, sig)
        assert code in _stopped_codes(sig, out), (stage, sig, out[-2000:])
        if sig != signal.SIGKILL:  # (a stop raised inside a finaliser is printed as "Exception ignored")
            assert f"train.py: stopped by {signal.Signals(sig).name}; " in out, out[-2000:]
        stopped += 1
    assert stopped >= 2  # most stops land in the stage they were aimed at
    run_pipeline(_cfg(run))
    _assert_same(run, ref["done"])
    results = json.loads((run / "cdpo-seed0" / "eval.json").read_text())
    assert results["accuracy"] == json.loads((ref["done"] / "cdpo-seed0" / "eval.json").read_text())["accuracy"]


@pytest.mark.parametrize("seed", [0, 1])
def test_signals_during_sample_resume_to_the_same_samples(tmp_path, ref, seed):
    rng = random.Random(seed)
    run = tmp_path / "run"
    run.mkdir()
    sig = [signal.SIGTERM, signal.SIGKILL][seed]
    code, out = _kill_during(_train(run, "stage=sample"), "sample", rng.uniform(0.0, 1.5), sig)
    assert code in _stopped_codes(sig, out), out[-2000:]
    if "[sample] finished" not in out:  # stopped before its end: no marker, so no stage taken as done
        assert not (run / "sample.done.json").exists()
    run_pipeline(_cfg(run, "stage=sample"))
    assert (run / "trajectories.jsonl").read_bytes() == ref["raw"]


def test_damaged_artifacts_are_recomputed_or_refused_with_a_remedy(tmp_path, ref):
    run = _copy(ref["done"], tmp_path / "run")
    paths = RunPaths(_cfg(run))

    # a JSONL cut at a line boundary is no longer read as valid: one line, the file, the remedy
    lines = paths.trajectories.read_text().splitlines(keepends=True)
    paths.trajectories.write_text("".join(lines[:-1]))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={run}", "stage=select",
                           f"hydra.run.dir={run}/hydra"], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert str(paths.trajectories) in err[0] and "truncated or edited" in err[0]
    assert f"Delete {paths.marker('sample')}" in err[0] and f"python -m cdpo.pipeline.accept {run} sample" in err[0]
    paths.trajectories.write_text("".join(lines))  # restored

    # scored pairs cut at a line boundary: align refuses them
    scored = paths.scored_pairs.read_text().splitlines(keepends=True)
    paths.scored_pairs.write_text("".join(scored[:-1]))
    with pytest.raises(CorruptArtifactError, match="scored_pairs.jsonl: .*truncated or edited"):
        run_pipeline(_cfg(run, "stage=align"))
    paths.scored_pairs.write_text("".join(scored))

    # a truncated adapter is refused; a missing one is retrained (the same bytes: seeded)
    weights = paths.neg_adapter / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptArtifactError, match=r"adapters/neg: .*Delete .*sft_neg.done.json"):
        run_pipeline(_cfg(run))
    weights.write_bytes(good)
    shutil.rmtree(paths.pos_adapter)
    with pytest.raises(StaleInputError, match=r"adapters/pos: missing: run stage=sft_pos first"):
        run_pipeline(_cfg(run, "stage=score"))  # not "mixing an adapter and a full model"
    out = run_pipeline(_cfg(run))
    assert set(out["seconds"]) == {"sft_pos", "eval"}  # score's inputs are the same bytes: not redone
    _assert_same(run, ref["done"])

    # a missing aligned adapter: stage=eval says what to run; stage=all retrains it
    shutil.rmtree(paths.aligned_adapter)
    with pytest.raises(StaleInputError, match=r"cdpo-seed0/adapter: missing: run stage=align first"):
        run_pipeline(_cfg(run, "stage=eval"))
    run_pipeline(_cfg(run))
    _assert_same(run, ref["done"])

    # a checkpoint cut during its write is discarded (it blocked every rerun), the fit completes
    cfg = _cfg(run, "trainer.checkpoint_every_n_steps=1")
    key = stage_identity(cfg, paths, "align")["hash"][:12]
    shutil.rmtree(paths.aligned_adapter)
    paths.marker("align").unlink()
    ckpt = paths.method / f".checkpoints-adapter-{key}" / "last.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"PK\x03\x04 cut")
    run_pipeline(cfg)
    assert (paths.aligned_adapter / "adapter_model.safetensors").exists() and not ckpt.exists()

    # a truncated cached evaluation or marker is recomputed (caches), with the same result
    base = run / "eval" / "base.json"
    base.write_text(base.read_text()[:40])
    paths.marker("select").write_text('{"questions": ')
    out = run_pipeline(_cfg(run))
    assert "select" in out["seconds"] and json.loads(base.read_text())["questions"] == 3
    _assert_same(run, ref["done"], ["pairs.jsonl", "eval/base.jsonl"])


def test_two_jobs_on_one_run_dir_never_mix(tmp_path):
    """sample.n=3 and sample.n=5 at once on one run_dir: one waits for the other (the lock), so the
    trajectories hold one n throughout, the one their marker and config say."""
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run / ".lock"):  # both start while the run_dir is busy, then race for it
        jobs = [_train(run, "stage=sample", f"sample.n={n}") for n in (3, 5)]
        heads = [next(line for line in j.stdout if line.startswith("[lock]")) for j in jobs]
    assert all("waiting" in h and f"pid {os.getpid()}" in h for h in heads), heads
    outs = [j.communicate(timeout=300)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    counts = {len(r["samples"]) for r in read_jsonl(run / "trajectories.jsonl")}
    marker = json.loads((run / "sample.done.json").read_text())
    assert len(counts) == 1 and marker["samples"] == 4 * counts.pop()
    assert OmegaConf.load(run / "sample.config.yaml").sample.n == marker["samples"] // 4
    # a job that may not wait is refused with who holds the lock
    with run_lock(run / ".lock"):
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, f"run_dir={run}", "stage=sample",
                               "lock_timeout_s=0", f"hydra.run.dir={run}/hydra"], capture_output=True, text=True,
                              cwd=tmp_path, env=ENV, timeout=300)
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr and "Traceback" not in proc.stderr


def test_changed_inputs_and_settings_change_every_downstream_result(tmp_path, ref, tok):
    def files(run):
        return {n: (run / n).read_bytes() for n in SHARED if (run / n).exists()}

    before = files(ref["done"])
    aligned_eval = lambda run: json.loads((run / "cdpo-seed0" / "eval.json").read_text())["signature"]  # noqa: E731

    # the samples change (an edited trajectory, accepted): selection, scores, policy and its eval follow
    run = _copy(ref["done"], tmp_path / "traj")
    records = read_jsonl(run / "trajectories.jsonl")
    for r in records:
        r["samples"] = [s for s in r["samples"] if not s["correct"]] + [s for s in r["samples"] if s["correct"]]
        r["samples"][-1]["response_ids"] = r["samples"][-1]["response_ids"][:-2] + r["samples"][-1]["response_ids"][-1:]
    write_jsonl(run / "trajectories.jsonl", records)
    accept(RunPaths(_cfg(run)), "sample")
    out = run_pipeline(_cfg(run))
    assert {"select", "sft_pos", "score", "align"} <= set(out["seconds"])
    assert out["stages"]["score"]["pairs_resumed"] == 0  # no stale shard
    after = files(run)
    for name in ("pairs.jsonl", "scored_pairs.jsonl", "adapters/pos/adapter_model.safetensors",
                 "cdpo-seed0/adapter/adapter_model.safetensors"):
        assert after[name] != before[name], name
    assert aligned_eval(run) != aligned_eval(ref["done"])

    # a replaced CE adapter (deleting no marker by hand): new scores, a new policy
    run = _copy(ref["done"], tmp_path / "adapter")
    paths = RunPaths(_cfg(run))
    shutil.copy(paths.neg_adapter / "adapter_model.safetensors", paths.pos_adapter / "adapter_model.safetensors")
    accept(paths, "sft_pos")
    out = run_pipeline(_cfg(run))
    assert set(out["seconds"]) == {"score", "align", "eval"}
    after = files(run)
    assert after["scored_pairs.jsonl"] != before["scored_pairs.jsonl"]
    policy = "cdpo-seed0/adapter/adapter_model.safetensors"
    assert after[policy] != before[policy]

    # a setting upstream (ce.b): scores and policy recomputed in the same run_dir
    run = _copy(ref["done"], tmp_path / "b")
    out = run_pipeline(_cfg(run, "ce.b=2.0"))
    assert set(out["seconds"]) == {"score", "align", "eval"}
    assert files(run)["scored_pairs.jsonl"] != before["scored_pairs.jsonl"]

    # a method setting in the same method_dir is refused (it would overwrite the other result) ...
    with pytest.raises(SettingsConflictError, match=r"method.beta: 0.1 -> 0.3.*method_dir="):
        run_pipeline(_cfg(run, "ce.b=2.0", "method.beta=0.3"))
    # ... and gets a result of its own in its own method_dir
    other = run / "cdpo-beta0.3"
    run_pipeline(_cfg(run, "ce.b=2.0", "method.beta=0.3", f"method_dir={other}"))
    assert (other / "adapter" / "adapter_model.safetensors").read_bytes() != (
        run / "cdpo-seed0" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((other / "eval.json").read_text())["config"]["method"]["beta"] == 0.3


def test_a_stage_run_alone_refuses_inputs_made_from_older_upstream_results(tmp_path, ref):
    """stage=align after the pairs changed (edited and accepted) but before score was redone: the scores are
    intact and of the same settings, yet made from the old pairs, so align refuses them (and eval the policy
    made from them); stage=score, then stage=align run."""
    run = _copy(ref["done"], tmp_path / "run")
    paths = RunPaths(_cfg(run))
    pairs = read_jsonl(paths.pairs)
    pairs[0]["chosen_ids"] = pairs[0]["chosen_ids"][:-2] + pairs[0]["chosen_ids"][-1:]
    write_jsonl(paths.pairs, pairs)
    accept(paths, "select")
    scores_before = paths.scored_pairs.read_bytes()
    with pytest.raises(StaleInputError, match=r"scored_pairs.jsonl was made from inputs that have changed since "
                                              r"\(pairs.jsonl changed\): run stage=score first"):
        run_pipeline(_cfg(run, "stage=align"))
    run_pipeline(_cfg(run, "stage=score"))
    with pytest.raises(StaleInputError, match=r"adapter was made from inputs that have changed since "
                                              r"\(scored_pairs.jsonl changed\): run stage=align first"):
        run_pipeline(_cfg(run, "stage=eval"))  # the policy was trained on the old scores
    assert paths.scored_pairs.read_bytes() != scores_before  # score was redone from the new pairs ...
    assert "align" in run_pipeline(_cfg(run, "stage=align"))["seconds"]  # ... and align accepts them
    run_pipeline(_cfg(run, "stage=eval"))


def test_data_file_change_redoes_the_samples(tmp_path):
    """A fixed gold answer in the training file: sampling is redone (graded against the new answer)."""
    from cdpo.data import load_problems

    data = tmp_path / "train.jsonl"
    problems = load_problems("arith", "train", limit=4)
    write_jsonl(data, [{"id": p.id, "question": p.question, "answer": p.answers[0]} for p in problems])
    run = tmp_path / "run"
    cfg = lambda: _cfg(run, "stage=sample", f"+data.train_source=jsonl:{data}")  # noqa: E731
    run_pipeline(cfg())
    first = read_jsonl(run / "trajectories.jsonl")
    rows = read_jsonl(data)
    rows[1]["answer"] = "999"
    write_jsonl(data, rows)
    out = run_pipeline(cfg())
    assert out["stages"]["sample"]["questions_resumed"] == 0  # every shard redone: its identity changed
    assert read_jsonl(run / "trajectories.jsonl")[1]["answers"] == ["999"] != first[1]["answers"]


@pytest.mark.parametrize("bad, key", [("align.lr=-1", "align.lr"), ("align.batch_size=0", "align.batch_size"),
                                      ("ce.b=-1", "ce.b"), ("sample.n=0", "sample.n"),
                                      ("data.test_limit=0", "data.test_limit"), ("trainer=gpu", "trainer.accelerator"),
                                      ("model.path=./no-model", "model.path"), ("stage=scoer", "stage")])
def test_bad_settings_fail_before_any_work(tmp_path, bad, key):
    if bad == "trainer=gpu" and Path("/dev/nvidia0").exists():
        pytest.skip("a GPU is visible")
    # train.py run as __main__ with a note at exit of whether the pipeline (every stage, every model load) was imported
    probe = ("import atexit, runpy, sys; atexit.register(lambda: print('pipeline imported:', 'cdpo.pipeline' in "
             f"sys.modules, file=sys.stderr)); sys.argv[0] = {str(REPO / 'train.py')!r}; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", probe, *TINY, f"run_dir={tmp_path / 'run'}", bad,
                           f"hydra.run.dir={tmp_path}/hydra"], capture_output=True, text=True, cwd=tmp_path, env=ENV,
                          timeout=300)
    assert proc.returncode == 2 and f"{key}=" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "pipeline imported: False" in proc.stderr  # refused before any work, checked instead of a clock
    assert not (tmp_path / "run").exists()  # nothing was done


def test_resumed_fit_continues_its_metrics_history(tmp_path, ref, monkeypatch):
    """A fit that fails at step 2 and resumes from its checkpoint: metrics.jsonl holds every step once."""
    from cdpo.modules import PreferenceModule

    run = _copy(ref["done"], tmp_path / "run")
    paths = RunPaths(_cfg(run))
    shutil.rmtree(paths.method)
    cfg = _cfg(run, "align.batch_size=1", "trainer.checkpoint_every_n_steps=1")
    original = PreferenceModule.training_step

    def step(self, batch, batch_idx):
        if self.trainer.global_step == 2:
            raise RuntimeError("node lost")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PreferenceModule, "training_step", step)
    with pytest.raises(RuntimeError, match="node lost"):
        run_pipeline(cfg)
    with paths.history.open("a") as f:
        f.write('{"step": 2, "loss": 0.')  # a line cut by the crash
    monkeypatch.setattr(PreferenceModule, "training_step", original)
    run_pipeline(cfg)
    steps = [r["step"] for r in read_jsonl(paths.history) if "loss" in r]
    assert steps == list(range(len(steps))) and len(steps) == 4  # 4 pairs, batch 1: every step, once


def test_adapter_identity_ignores_peft_set_order(tmp_path):
    """PEFT writes target_modules in set order (it changes with the hash seed): one identity for both."""
    from cdpo.pipeline.identity import describe

    for name, modules in (("a", ["q_proj", "down_proj"]), ("b", ["down_proj", "q_proj"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": modules}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes(b"weights")
    assert describe(tmp_path / "a")["sha256"] == describe(tmp_path / "b")["sha256"]
    (tmp_path / "b" / "adapter_model.safetensors").write_bytes(b"other weights")
    assert describe(tmp_path / "a")["sha256"] != describe(tmp_path / "b")["sha256"]


def test_model_identity_follows_a_local_model(tmp_path):
    from omegaconf import OmegaConf as OC

    from cdpo.pipeline.identity import model_identity

    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    cfg = OC.create({"path": str(tmp_path), "dtype": "float32"})
    first = model_identity(cfg)
    (tmp_path / "model.safetensors").write_bytes(b"w" * 11)  # other weights
    second = model_identity(cfg)
    (tmp_path / "config.json").write_text('{"hidden_size": 16}')
    assert len({first, second, model_identity(cfg)}) == 3
    assert model_identity(OC.create({"path": "tiny:llama", "dtype": "float32"})) != first


def test_a_stop_swallowed_by_a_finaliser_still_exits_128_plus_signal():
    """Python ignores an exception raised in __del__ (the signal handler's Stopped), and Lightning then
    ends the fit with SIGTERMException, a SystemExit(None) that exits 0: the wrapper still stops with 143."""
    from cdpo import cli, signals

    saved = {s: signal.getsignal(s) for s in signals.SIGNALS}

    def lightning_after_a_swallowed_stop():
        signals.received.append(signal.SIGTERM)
        raise SystemExit(None)

    def finished_after_a_swallowed_stop():
        signals.received.append(signal.SIGINT)
        return "done"

    try:
        for work, code in ((lightning_after_a_swallowed_stop, 143), (finished_after_a_swallowed_stop, 130)):
            with pytest.raises(SystemExit) as stop:
                cli.run_entry("train.py", work)
            assert stop.value.code == code
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        signals.received.clear()


def test_a_long_holder_command_is_cut_and_says_so(tmp_path):
    """The holder's command line is cut to one readable line; a cut shows "…" so a sweep's list of methods is
    not read as complete."""
    import fcntl

    from cdpo.errors import LockError
    from cdpo.lock import read_lock

    command = "train.py -m method=" + ",".join(f"m{i}" for i in range(60))
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": 7, "host": "h", "since": "then", "command": command}))
    with lock.open("r") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the job
        with pytest.raises(LockError) as err:
            with read_lock(lock):
                pass
    assert err.value.holder.startswith("pid 7 on h since then (train.py -m method=m0,m1,")
    assert err.value.holder.endswith("…)") and len(err.value.holder) < 160 and command not in err.value.holder
    lock.write_text(json.dumps({"pid": 7, "host": "h", "since": "then", "command": "train.py"}))
    with lock.open("r") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(LockError, match=r"\(train.py\)$"):
            with read_lock(lock):
                pass
