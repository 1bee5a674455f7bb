"""Many processes: strategies built from the trainer configs, DDP and FSDP against one process on the
same global batch (2 CPU processes, gloo), and the pipeline's rules for several processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cdpo import distributed
from cdpo.distributed import ScalingError, build_strategy, planned_processes

REPO = Path(__file__).resolve().parents[1]
LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
TRAINERS = sorted(p.stem for p in (REPO / "conf" / "trainer").glob("*.yaml"))


def _trainer_cfg(name, *overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=[f"trainer={name}", *overrides]).trainer


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'kernels'}", **extra}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)  # the children are told by their launcher
    return env


# ---------------------------------------------------------------------------------------------
# strategies from configs


@pytest.mark.parametrize("name", TRAINERS)
def test_every_trainer_config_builds_its_strategy(name):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    t = _trainer_cfg(name)
    if name.startswith("deepspeed") and __import__("importlib").util.find_spec("deepspeed") is None:
        with pytest.raises(ScalingError, match=r"pip install 'cdpo\[deepspeed\]'"):
            build_strategy(t.strategy)
        return
    strategy = build_strategy(t.get("strategy"))
    expected = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}.get(name)
    if expected is None and not name.startswith("deepspeed"):
        assert strategy == "auto", name  # cpu, gpu: Lightning picks the single-device strategy
    elif expected is not None:
        assert isinstance(strategy, expected)


def test_fsdp_config_wraps_decoder_blocks_and_each_lora_matrix_and_checkpoints_blocks():
    from torch.distributed.fsdp import ShardingStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from cdpo.models import add_lora, tiny_llama

    t = _trainer_cfg("fsdp")
    strategy = build_strategy(t.strategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] and t.precision == "bf16-mixed"
    policy = strategy.kwargs["auto_wrap_policy"]
    model = add_lora(tiny_llama(), "policy", r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    wrapped = {name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)}
    layers = {name for name, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)}
    loras = {name for name, m in model.named_modules() if name.endswith((".lora_A.policy", ".lora_B.policy"))}
    assert len(layers) == 2 and len(loras) == 2 * 2 * 2 and wrapped == layers | loras
    # activation checkpointing per decoder block (then the model's own checkpointing stays off)
    assert distributed.checkpoints_activations(t) and not distributed.checkpoints_activations(_trainer_cfg("ddp"))
    assert distributed.shards_parameters(t) and not distributed.shards_parameters(_trainer_cfg("ddp"))


def test_bad_strategy_settings_are_named():
    with pytest.raises(ScalingError, match="trainer.strategy.name='horovod'"):
        build_strategy({"name": "horovod"})
    with pytest.raises(ScalingError, match=r"auto_wrap_policy: cannot import 'transformers.NoSuchLayer'"):
        build_strategy({"name": "fsdp", "auto_wrap_policy": ["transformers.NoSuchLayer"]})
    assert build_strategy("ddp") == "ddp" and build_strategy(None) == "auto"


def test_planned_processes_and_main_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    cpu = _trainer_cfg("cpu")
    assert planned_processes(cpu) == 1
    assert planned_processes(_trainer_cfg("ddp", "trainer.accelerator=cpu", "trainer.devices=2")) == 2
    assert planned_processes(_trainer_cfg("ddp", "trainer.devices=4", "trainer.num_nodes=2")) == 8
    assert planned_processes(_trainer_cfg("ddp", "trainer.devices=[0,2]")) == 2
    assert planned_processes(_trainer_cfg("ddp", "trainer.accelerator=cpu")) == 1  # auto on a CPU: one
    monkeypatch.setenv("WORLD_SIZE", "16")  # torchrun / srun know better than the config
    assert planned_processes(cpu) == 16
    assert distributed.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.is_main_process() and distributed.local_rank() == 1
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "8")  # srun: rank 8 is GPU 0 of the second node
    assert not distributed.is_main_process()


def test_qlora_with_a_sharding_strategy_is_refused_before_loading():
    from cdpo.pipeline import context

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=llama3_70b_cdpo", "trainer=fsdp"])
    with pytest.raises(ScalingError, match="QLoRA.*trainer=ddp"):
        context.base_model(cfg, for_training=True)


def test_adapter_written_from_gathered_tensors_equals_peft_own_save(tmp_path):
    from safetensors.torch import load_file

    from cdpo.models import add_lora, save_adapter, tiny_llama

    model = add_lora(tiny_llama(), "policy", r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    save_adapter(model, "policy", tmp_path / "peft")
    save_adapter(model, "policy", tmp_path / "ours", state_dict=gathered)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("peft", "ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "ours" / "adapter_config.json").read_text())


# ---------------------------------------------------------------------------------------------
# DDP and FSDP on 2 CPU processes against one process


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "runs.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "tests" / "dist_worker.py"), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out.read_text()), "dir": out.parent}


@pytest.fixture(scope="module")
def one_process_run():
    sys.path.insert(0, str(REPO / "tests"))
    import dist_worker

    return dist_worker.fit(world=1, order=dist_worker.distributed_order())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(max(abs(x - y) for x, y in zip(a[k], b[k])) for k in a)


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_processes_follow_one_process_on_the_same_global_batch(kind, two_process_runs, one_process_run):
    run, ref = two_process_runs[kind], one_process_run
    assert run["steps"] == ref["steps"] == 4
    # per-step loss (mean over processes) and the gathered adapter match one process with batch 4
    assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-5, (run["losses"], ref["losses"])
    assert _max_diff(run["adapter"], ref["adapter"]) < 1e-5
    # only the adapters trained: the optimizer holds the 28 LoRA tensors, the base is frozen (and unchanged)
    assert run["optimizer_tensors"] == ref["optimizer_tensors"] == 28 == len(run["adapter"])
    assert all("lora_" in n for n in run["trainable"]) and run["adapter_dtypes"] == ["torch.float32"]
    if kind == "ddp":
        assert run["frozen_max_change"] == 0.0
    # the adapter directory written from the gathered tensors loads back into a fresh policy, equal
    import dist_worker
    from cdpo.models import load_adapter, tiny_llama

    loaded = load_adapter(tiny_llama(seed=0), two_process_runs["dir"] / kind, "policy")
    state = {n: p.detach().flatten().tolist() for n, p in loaded.named_parameters() if "lora_" in n}
    assert _max_diff(state, ref["adapter"]) < 1e-5 and dist_worker.LORA["r"] == loaded.peft_config["policy"].r


@pytest.mark.skipif(__import__("importlib").util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (pip install 'cdpo[deepspeed]')")
def test_deepspeed_zero2_on_two_cpu_processes_follows_one_process(tmp_path, one_process_run):
    """DeepSpeed ZeRO-2 (its CPU accelerator, gloo) on the same global batch as one process."""
    out = tmp_path / "runs.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(REPO / "tests" / "dist_worker.py"), str(out), "deepspeed"],
                          capture_output=True, text=True, timeout=600, cwd=REPO, env=_env(DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    run, ref = json.loads(out.read_text())["zero2"], one_process_run
    assert run["steps"] == ref["steps"] == 4
    assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 1e-5, (run["losses"], ref["losses"])
    assert _max_diff(run["adapter"], ref["adapter"]) < 1e-5 and run["frozen_max_change"] == 0.0
    assert all("lora_" in n for n in run["trainable"])


def test_without_gradient_all_reduce_the_losses_diverge(two_process_runs, one_process_run):
    """The control that shows the comparison above can fail: same first step, different updates."""
    run, ref = two_process_runs["ddp_no_sync"], one_process_run
    assert abs(run["losses"][0] - ref["losses"][0]) < 1e-5
    assert max(abs(a - b) for a, b in zip(run["losses"][1:], ref["losses"][1:])) > 1e-3


def test_fsdp_with_a_bf16_base_and_fp32_adapters(two_process_runs, one_process_run):
    """The GPU setting: bf16 base, fp32 LoRA masters in their own FSDP units, bf16 mixed precision."""
    run, ref = two_process_runs["fsdp_bf16"], one_process_run
    assert max(abs(a - b) for a, b in zip(run["losses"], ref["losses"])) < 5e-3  # bf16 rounding, same path
    assert run["adapter_dtypes"] == ["torch.float32"] and run["optimizer_tensors"] == 28
    assert _max_diff(run["adapter"], ref["adapter"]) < 5e-2


# ---------------------------------------------------------------------------------------------
# the pipeline with several processes


def test_several_processes_run_only_training_stages(tmp_path):
    from cdpo.pipeline import run_pipeline

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny", f"run_dir={tmp_path}", "trainer=ddp",
                                                      "trainer.accelerator=cpu", "trainer.devices=2"])
    with pytest.raises(ScalingError, match=r"starts 2 processes.*stage\(s\) sample, select, score, eval"):
        run_pipeline(cfg)
    assert not any(tmp_path.iterdir())  # refused before any work


def test_train_py_align_with_ddp_on_two_cpu_processes(tmp_path):
    """`python train.py stage=align trainer=ddp`: Lightning starts the second process (re-running
    train.py), each process trains on its half of every batch, global rank 0 alone writes the adapter
    and the marker."""
    from test_pipeline import TINY, _cfg, _inject_correct_samples

    from cdpo.io import read_jsonl
    from cdpo.models import load_adapter, load_tokenizer, tiny_llama_like_embedded
    from cdpo.pipeline import run_pipeline
    from cdpo.pipeline.artifacts import RunPaths

    paths = RunPaths(_cfg(tmp_path, "method=dpo"))
    run_pipeline(_cfg(tmp_path, "stage=sample"))
    _inject_correct_samples(paths, load_tokenizer("embedded:smollm2-135m-instruct"))
    run_pipeline(_cfg(tmp_path, "stage=select"))
    args = [*TINY, f"run_dir={tmp_path}", "method=dpo", "stage=align", "trainer=ddp", "trainer.accelerator=cpu",
            "trainer.devices=2", "trainer.precision=32-true", "align.batch_size=1", f"hydra.run.dir={tmp_path / 'h'}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "reference log-probs are computed in each training step" in proc.stdout
    marker = json.loads(paths.marker("align").read_text())
    pairs = len(read_jsonl(paths.pairs))
    # 2 processes x batch 1: a global batch of 2 pairs per step, each process seeing half of them
    assert marker["processes"] == 2 and marker["steps"] == -(-pairs // 2)
    assert proc.stdout.count("[align] finished") == 1  # only global rank 0 reports and writes
    adapted = load_adapter(tiny_llama_like_embedded(seed=0), paths.aligned_adapter, "policy")
    trained = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert trained and any(float(p.abs().max()) > 0 for p in trained)  # LoRA B starts at zero: it trained


def test_scaling_packages_are_optional_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"deepspeed", "vllm", "slurm"} <= extras.keys()
    base = " ".join(project["dependencies"])
    assert not any(name in base for name in ("deepspeed", "vllm", "submitit"))
    # and nothing of the pipeline imports them before they are asked for
    code = ("import sys, cdpo.errors, cdpo.pipeline, cdpo.generation_vllm, cdpo.distributed;"
            "print(sorted(m for m in ('vllm', 'deepspeed', 'submitit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=_env(),
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_interrupted_fit_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    """trainer.checkpoint_every_n_steps: a fit that fails after step 2 resumes there on the rerun
    (not from step 0), ends with the same number of steps, and its checkpoints are removed."""
    from test_pipeline import _cfg, _inject_correct_samples

    from cdpo.io import read_jsonl
    from cdpo.models import load_tokenizer
    from cdpo.modules import PreferenceModule
    from cdpo.pipeline import run_pipeline
    from cdpo.pipeline.artifacts import RunPaths

    run = lambda *o: run_pipeline(_cfg(tmp_path, "method=dpo", "align.batch_size=1", *o))  # noqa: E731
    paths = RunPaths(_cfg(tmp_path, "method=dpo"))
    run("stage=sample")
    _inject_correct_samples(paths, load_tokenizer("embedded:smollm2-135m-instruct"))
    run("stage=select")
    total = len(read_jsonl(paths.pairs))  # 1 epoch, batch 1, no accumulation
    assert total >= 3
    steps, original = [], PreferenceModule.training_step

    def step(self, batch, batch_idx):
        steps.append(self.trainer.global_step)
        if fail and self.trainer.global_step == 2:
            raise RuntimeError("node lost")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(PreferenceModule, "training_step", step)
    fail = True
    with pytest.raises(RuntimeError, match="node lost"):
        run("stage=align", "trainer.checkpoint_every_n_steps=1")
    assert steps == [0, 1, 2] and not paths.aligned_adapter.exists()
    assert len(list(paths.method.glob(".checkpoints-adapter-*/last.ckpt"))) == 1
    fail, steps[:] = False, []
    summary = run("stage=align", "trainer.checkpoint_every_n_steps=1")["stages"]["align"]
    assert steps == list(range(2, total)) and summary["steps"] == total  # the remaining steps only
    assert (paths.aligned_adapter / "adapter_model.safetensors").exists()
    assert not list(paths.method.glob(".checkpoints-*"))
