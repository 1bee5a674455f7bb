"""Every config group option and every experiment preset composes, without loading any model."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}
REQUIRED = {
    "model": {"smollm2_135m", "llama3_8b", "llama3_70b", "deepseek_math_7b", "tiny"},
    "data": {"gsm8k", "math500", "arith"},
    "method": {"baseline", "sft", "dpo", "tokendpo", "rpo", "cdpo"},
    "peft": {"ce_lora", "cdpo_lora", "none", "qlora"},
    "trainer": {"cpu", "gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "deepspeed_zero3_offload"},
    "generation": {"default", "vllm"},
    "logger": {"wandb", "csv", "none"},
}


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    OmegaConf.resolve(cfg)  # every interpolation must resolve
    return cfg


def test_required_options_exist():
    for group, names in REQUIRED.items():
        assert names <= set(GROUPS[group]), (group, names - set(GROUPS[group]))


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() if g not in ("experiment", "sweep")
                                          for o in opts])
def test_every_group_option_composes(group, option):
    cfg = _compose([f"{group}={option}"] if group != "peft" else [f"peft={option}", f"peft@ce_lora={option}"])
    assert cfg.stage == "all"


@pytest.mark.parametrize("preset", GROUPS["experiment"])
def test_every_experiment_preset_composes(preset):
    cfg = _compose([f"+experiment={preset}"])
    assert cfg.model.name and cfg.data.name and cfg.method.name


def test_default_is_the_embedded_pipeline():
    cfg = _compose()
    assert (cfg.model.path, cfg.data.source, cfg.method._target_, cfg.trainer.accelerator) == (
        "embedded:smollm2-135m-instruct", "arith", "cdpo.objectives.CDPO", "cpu")


def test_paper_settings_in_llama3_8b_cdpo():
    cfg = _compose(["+experiment=llama3_8b_cdpo"])
    assert cfg.model.path == "meta-llama/Meta-Llama-3-8B" and cfg.data.name == "gsm8k"
    assert (cfg.sample.n, cfg.sample.temperature) == (64, 0.5)
    assert (cfg.select.top_k, cfg.select.top_p) == (1, 0.5)
    assert (cfg.ce_lora.r, cfg.ce_lora.alpha, cfg.ce_lora.dropout) == (8, 16, 0.1)
    assert set(cfg.ce_lora.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    assert (cfg.ce.lr, cfg.ce.epochs, cfg.ce.b) == (3e-4, 1, 1.0)
    assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout, len(cfg.peft.target_modules)) == (16, 32, 0.0, 7)
    assert (cfg.method.beta, cfg.method.chosen_weighting) == (0.1, "only_neg")
    a = cfg.align
    assert (a.lr, a.epochs, a.batch_size, a.grad_accum, a.warmup_ratio, a.weight_decay) == (4e-5, 3, 2, 4, 0.1, 0.01)
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (1500, 512)


def test_70b_uses_qlora_and_temperatures_follow_the_paper():
    assert _compose(["+experiment=llama3_70b_cdpo"]).peft.quantization == "nf4"
    temps = {p: _compose([f"+experiment={p}_cdpo"]).sample.temperature
             for p in ("llama3_8b", "llama3_70b", "deepseek_math_7b")}
    assert temps == {"llama3_8b": 0.5, "llama3_70b": 0.85, "deepseek_math_7b": 1.0}


def test_strategy_presets_compose_with_the_paper_experiments():
    """Each multi-GPU trainer and the vLLM backend on top of each preset (what a 70B run composes)."""
    for preset in GROUPS["experiment"]:
        for trainer in ("ddp", "fsdp", "deepspeed_zero3_offload"):
            cfg = _compose([f"+experiment={preset}", f"trainer={trainer}", "generation=vllm"])
            assert cfg.trainer.strategy.name in ("ddp", "fsdp", "deepspeed") and cfg.generation.backend == "vllm"
            assert cfg.generation.max_new_tokens == cfg.data.max_new_tokens  # vllm extends the default generation
    s = _compose(["trainer=deepspeed_zero3_offload"]).trainer.strategy
    assert (s.stage, s.offload_optimizer, s.offload_parameters) == (3, True, True)
    cfg = _compose(["trainer=deepspeed_zero3_offload"])
    assert cfg.trainer.num_nodes == 1 and cfg.trainer.accelerator == "gpu"


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 1 and "submitit_folder" in launcher


def test_method_dir_separates_methods_and_seeds():
    a, b = _compose(["method=dpo", "seed=1"]), _compose(["method=cdpo", "seed=1"])
    assert a.run_dir == b.run_dir and a.method_dir != b.method_dir


# --- Table 1: every cell at the paper's settings ----------------------------------------------------
PAPER_MODELS = ("llama3_8b", "llama3_70b", "deepseek_math_7b")
TABLE1_METHODS = ("baseline", "sft", "dpo", "tokendpo", "rpo", "cdpo")
PAPER_TEMPERATURES = {("llama3_8b", "gsm8k"): 0.5, ("llama3_70b", "gsm8k"): 0.85, ("deepseek_math_7b", "gsm8k"): 1.0,
                      ("llama3_8b", "math500"): 0.1, ("llama3_70b", "math500"): 0.15,
                      ("deepseek_math_7b", "math500"): 0.3}  # docs/design.md §1, step 1 (the paper)
CELL_PRESETS = [f"{m}_{d}" for m in PAPER_MODELS for d in ("gsm8k", "math500")] + [
    "smollm2_135m_arith", "smollm2_135m_gsm8k"]


def test_every_table1_cell_has_a_preset():
    assert set(CELL_PRESETS) <= set(GROUPS["experiment"])
    assert {f"{m}_cdpo" for m in (*PAPER_MODELS, "smollm2_135m")} <= set(GROUPS["experiment"])  # kept names


@pytest.mark.parametrize("preset", CELL_PRESETS)
@pytest.mark.parametrize("method", TABLE1_METHODS)
def test_every_cell_and_method_composes(preset, method):
    cfg = _compose([f"+experiment={preset}", f"method={method}", "seed=2"])
    model, data = preset.rsplit("_", 1)
    assert (cfg.model.name, cfg.data.name, cfg.method.name) == (model, data, method)
    assert cfg.run_dir == f"runs/{model}-{data}" and cfg.method_dir == f"runs/{model}-{data}/{method}-seed2"


@pytest.mark.parametrize("cell,temperature", PAPER_TEMPERATURES.items())
def test_paper_cells_read_like_the_paper(cell, temperature):
    model, data = cell
    cfg = _compose([f"+experiment={model}_{data}"])
    assert (cfg.sample.n, cfg.sample.temperature) == (64, temperature)
    assert (cfg.select.top_k, cfg.select.negative_rule, cfg.select.top_p) == (1, "authors", 0.5)
    assert (cfg.ce_lora.r, cfg.ce_lora.alpha, cfg.ce.lr, cfg.ce.epochs, cfg.ce.b) == (8, 16, 3e-4, 1, 1.0)
    assert (cfg.peft.r, cfg.peft.alpha, cfg.align.lr, cfg.align.epochs, cfg.align.grad_accum) == (16, 32, 4e-5, 3, 4)
    assert cfg.peft.get("quantization") == ("nf4" if model == "llama3_70b" else None)
    assert (cfg.trainer.accelerator, cfg.data.max_length, cfg.data.max_prompt_length) == ("gpu", 1500, 512)
    # the authors' prompts, sampling and answer rule (issue 11, items 2-4)
    shots = {"gsm8k": (8, "gsm8k_cot_8shot", "authors_gsm8k"), "math500": (4, "math_minerva_4shot", "authors_math")}
    assert (cfg.data.n_shot, cfg.data.exemplars, cfg.data.grading) == shots[data]
    assert (cfg.data.train_n_shot, cfg.data.strip_prompt, cfg.data.max_new_tokens) == (0, True, 1024)
    assert (cfg.sample.top_p, cfg.eval.top_p, cfg.sample.max_new_tokens, cfg.eval.temperature) == (0.95, 0.95, 1024, 0.0)
    assert list(cfg.data.stop) == ["\n\nQuestion:", "\n\nProblem:"]
    for method in ("dpo", "tokendpo", "rpo", "cdpo"):
        assert _compose([f"+experiment={model}_{data}", f"method={method}"]).method.beta == 0.1
    # the kept name with another data set follows the data set's temperature too
    assert _compose([f"+experiment={model}_cdpo", f"data={data}"]).sample.temperature == temperature


def test_embedded_default_keeps_its_prompts_and_grading():
    cfg = _compose()
    assert (cfg.data.n_shot, cfg.data.exemplars, cfg.data.train_n_shot, cfg.data.strip_prompt) == (3, "arith", None, False)
    assert (cfg.sample.top_p, cfg.eval.top_p, cfg.sample.max_new_tokens) == (1.0, 1.0, 64)
    assert (cfg.data.grading, cfg.select.negative_rule) == ("strict", "top_p")


def test_kept_preset_names_equal_the_cell_presets():
    for model in PAPER_MODELS:
        assert _compose([f"+experiment={model}_cdpo"]) == _compose([f"+experiment={model}_gsm8k", "method=cdpo"])
    assert _compose(["+experiment=smollm2_135m_cdpo"]) == _compose(["+experiment=smollm2_135m_arith"]) == _compose()


def test_math_training_questions_from_the_environment(monkeypatch):
    assert _compose(["+experiment=llama3_8b_math500"]).data.train_source is None
    monkeypatch.setenv("CDPO_MATH_TRAIN", "jsonl:/data/math_train.jsonl")
    assert _compose(["+experiment=llama3_8b_math500"]).data.train_source == "jsonl:/data/math_train.jsonl"
    assert _compose(["+experiment=llama3_8b_gsm8k"]).data.get("train_source") is None  # GSM8K has its own


def test_embedded_gsm8k_preset_is_cpu_sized():
    cfg = _compose(["+experiment=smollm2_135m_gsm8k"])
    assert (cfg.model.name, cfg.data.name, cfg.trainer.accelerator) == ("smollm2_135m", "gsm8k", "cpu")
    assert (cfg.data.train_limit, cfg.data.test_limit, cfg.sample.n) == (64, 100, 8)


def test_shared_stages_have_their_own_seeds():
    cfg = _compose(["seed=3"])
    assert (cfg.seed, cfg.sample.seed, cfg.ce.seed) == (3, 0, 0)


def test_paper_presets_use_the_authors_cdpo_loss_form_and_the_default_the_papers():
    from cdpo.objectives import from_config

    assert from_config(_compose(["+experiment=llama3_8b_gsm8k", "method=cdpo"]).method).loss_form == "per_position"
    assert from_config(_compose(["+experiment=llama3_8b_gsm8k", "method=dpo"]).method).name == "dpo"  # no stray key
    assert from_config(_compose().method).loss_form == "sequence"
    assert from_config(_compose(["+experiment=llama3_8b_gsm8k", "method.loss_form=sequence"]).method).loss_form == "sequence"


def test_paper_presets_train_like_the_authors_code():
    cfg = _compose(["+experiment=deepseek_math_7b_math500", "method=cdpo"])
    assert (cfg.ce.warmup_steps, cfg.ce.schedule, cfg.align.schedule) == (100, "cosine", "linear")
    assert (cfg.align.overlong, cfg.align.drop_prompt_length, cfg.align.drop_length) == ("drop", 512, 1024)
    default = _compose()
    assert (default.ce.warmup_steps, default.align.schedule, default.align.overlong) == (None, "cosine", "truncate")


@pytest.mark.parametrize("trainer", ["deepspeed_zero3", "deepspeed_zero3_offload"])
def test_zero3_is_refused_before_any_work(trainer, monkeypatch):
    """ZeRO-3 fails in the first training step (lm_head.weight is partitioned; cdpo's head uses it outside the
    module): one line naming trainer.strategy.stage, also on a GPU machine; ZeRO-2 passes."""
    import cdpo.validation as validation

    monkeypatch.setattr(validation, "_has_gpu", lambda: True)
    with pytest.raises(validation.ConfigError, match=r"trainer.strategy.stage=3: 1 or 2 .*trainer=fsdp"):
        validation.validate(_compose([f"trainer={trainer}"]))
    validation.validate(_compose(["trainer=deepspeed_zero2"]))
