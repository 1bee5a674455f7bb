"""One GPU, well under 10 minutes: the pipeline at a larger size in bf16, HF vs vLLM, FSDP, QLoRA, memory.

    python benchmarks/gpu_check.py [--out DIR] [--questions 64] [--samples 16] [--budget-s 420]
    python benchmarks/gpu_check.py --dry-run          # CPU: the same code paths on the tiny model

Sections (each timed; a failing or unavailable one is reported and the rest go on; optional ones are
skipped when the time budget is spent):
1. pipeline: SmolLM2-135M-Instruct (embedded) in bf16 on a GSM8K training subset (sample -> select ->
   sft_pos / sft_neg -> score -> align -> eval), one stage at a time: wall time, tokens/s, peak GPU memory.
2. vLLM (if installed): the sample stage again through generation=vllm (engine start and tokens/s vs
   HF), then the eval stage through vLLM serving the SFT and cDPO adapters as LoRA requests (accuracy
   vs HF greedy).
3. memory: one alignment fit on pairs of the paper's lengths (512 prompt + 988 response tokens) in
   bf16 with gradient checkpointing, measured peak vs cdpo.memory's plan, under the single-GPU
   trainer, trainer=fsdp on one GPU (wrap policy, mixed precision, activation checkpointing, adapter
   gathering) and peft=qlora (NF4 base, needs bitsandbytes).
4. the vLLM pytest (tests/test_generation_vllm.py), which skips without vLLM.
Writes <out>/gpu_check.json and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "kernels")]

from _common import default_cfg  # noqa: E402
from cdpo.pipeline import run_pipeline  # noqa: E402

RESULTS: list[dict] = []
T0 = time.perf_counter()


def section(name: str, fn, *, optional_after: float | None = None) -> dict | None:
    """Run one check, time it, keep going on failure."""
    if optional_after is not None and time.perf_counter() - T0 > optional_after:
        RESULTS.append({"section": name, "status": "skipped (time budget)"})
        print(f"== {name}: skipped, {time.perf_counter() - T0:.0f} s spent", flush=True)
        return None
    print(f"== {name}", flush=True)
    reset_peak()
    t0 = time.perf_counter()
    try:
        out = fn() or {}
        status = "ok"
    except Exception as e:  # noqa: BLE001 - report and go on with the other checks
        traceback.print_exc()
        out, status = {"error": f"{type(e).__name__}: {e}"[:500]}, "failed"
    row = {"section": name, "status": status, "wall_s": round(time.perf_counter() - t0, 1),
           "peak_gpu_gib": peak_gib(), **out}
    RESULTS.append(row)
    print(f"   {json.dumps(row)[:600]}", flush=True)
    return row


def reset_peak() -> None:
    if torch.cuda.is_available():
        gc.collect()  # models of the previous section: their memory back to the allocator, then to the GPU
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None


def pipeline_overrides(args, run_dir: Path, data: str) -> list[str]:
    if args.dry_run:
        return ["model=tiny", "data=arith", "data.train_limit=4", "data.test_limit=4", "sample.n=3",
                "generation.max_new_tokens=8", "logger=none", f"run_dir={run_dir}", "align.epochs=1", "ce.epochs=1"]
    return ["model=smollm2_135m", "model.dtype=bfloat16", f"data={data}", f"data.train_limit={args.questions}",
            f"data.test_limit={args.questions}", f"sample.n={args.samples}", "sample.temperature=0.7",
            "generation.max_new_tokens=256", "generation.batch_size=256", "trainer=gpu", "logger=csv",
            f"run_dir={run_dir}", "ce.epochs=1", "ce.batch_size=8", "align.epochs=1", "align.batch_size=4",
            "align.grad_accum=1", "align.lr=1e-4"]


STAGES = ("sample", "select", "sft_pos", "sft_neg", "score", "align", "eval")


def run_stages(overrides: list[str], stages=STAGES, *, after_sample=None) -> dict:
    """One stage at a time: wall time and peak GPU memory of each, and what each reports."""
    rows = {}
    for stage in stages:
        if stage == "select" and after_sample:
            after_sample(default_cfg(*overrides))
        reset_peak()
        t0 = time.perf_counter()
        summary = run_pipeline(default_cfg(*overrides, f"stage={stage}"))["stages"][stage]
        rows[stage] = {"wall_s": round(time.perf_counter() - t0, 1), "peak_gpu_gib": peak_gib(),
                       **{k: v for k, v in summary.items() if k in (
                           "samples", "correct", "accuracy", "tokens_per_s", "generate_seconds", "new_tokens",
                           "pairs", "steps", "results", "records", "mean_p_ce_rejected")}}
        print(f"   [{stage}] {json.dumps(rows[stage])[:400]}", flush=True)
    return rows


def check_pipeline(args, out: Path) -> dict:
    from cdpo.pipeline.select import EmptySelectionError

    if args.dry_run:  # a random tiny model never solves a question: give each its gold solution as a sample
        args.pipeline_data = "arith"
        return {"data": "arith", "stages": run_stages(pipeline_overrides(args, out / "run-hf", "arith"),
                                                      after_sample=_add_gold_samples)}
    data = args.data
    try:
        stages = run_stages(pipeline_overrides(args, out / "run-hf", data))
    except EmptySelectionError as e:  # SmolLM2-135M solves ~3 % of GSM8K: a small subset can lack pairs
        print(f"   {e}\n   -> falling back to data=arith", flush=True)
        data = "arith"
        stages = run_stages(pipeline_overrides(args, out / "run-hf-arith", data))
    args.pipeline_data = data
    return {"data": data, "stages": stages}


def _add_gold_samples(cfg) -> None:
    from cdpo.io import read_jsonl, write_jsonl
    from cdpo.pipeline import context
    from cdpo.pipeline.artifacts import RunPaths

    tok, path = context.tokenizer(cfg), RunPaths(cfg).trajectories
    gold = {p.id: p for p in context.problems(cfg, cfg.data.train_split, cfg.data.train_limit)}
    records = read_jsonl(path)
    for r in records:
        sol = gold[r["id"]].solution
        r["samples"].append({"response": sol, "response_ids": tok(sol, add_special_tokens=False)["input_ids"]
                             + [tok.eos_token_id], "finish_reason": "stop", "extracted": r["answers"][0],
                             "correct": True})
    write_jsonl(path, records)


def check_vllm(args, out: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vllm is not installed"}
    data = getattr(args, "pipeline_data", args.data)
    hf_dir = out / ("run-hf" if data == args.data else "run-hf-arith")
    vllm = ["generation=vllm", "generation.gpu_memory_utilization=0.6"]
    sample = run_stages(pipeline_overrides(args, out / "run-vllm", data) + vllm, ("sample",))["sample"]
    # eval through vLLM on the HF run's adapters (its eval results are replaced by vLLM's)
    hf_eval = json.loads((hf_dir / "cdpo-seed0" / "eval.done.json").read_text())["results"]
    ev = run_stages(pipeline_overrides(args, hf_dir, data) + vllm, ("eval",))["eval"]
    return {"sample_vllm": sample,
            "engine_start_and_grading_s": round(sample["wall_s"] - sample["generate_seconds"], 1),
            "eval_accuracy_hf": {k: v["accuracy"] for k, v in hf_eval.items()},
            "eval_accuracy_vllm": {k: v["accuracy"] for k, v in ev["results"].items()}}


def _pairs(n: int, prompt: int, response: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = lambda k: torch.randint(10, vocab, (k,), generator=g).tolist()  # noqa: E731
    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(response), "rejected_ids": ids(response),
             "chosen_p_ce": [0.9] * response, "rejected_p_ce": [0.5] * response} for _ in range(n)]


def check_memory(args, out: Path, trainer: str, peft: str) -> dict:
    """One alignment fit on pairs of exactly the paper's lengths: measured peak vs the plan."""
    from cdpo.memory import Arch, plan, total_gib
    from cdpo.models import add_lora
    from cdpo.modules import PairsDataModule, PreferenceModule
    from cdpo.objectives import build
    from cdpo.pipeline import context
    from cdpo.pipeline.training import _fit

    if args.dry_run:
        if trainer != "gpu" or peft != "cdpo_lora":
            return {"skipped": "needs a CUDA GPU"}
        cfg = default_cfg("model=tiny", "logger=none", f"run_dir={out / 'mem'}", "peft.r=4")
        prompt, response, steps = 16, 16, 2
    else:
        if peft == "qlora":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                return {"skipped": "bitsandbytes is not installed (pip install 'cdpo[qlora]')"}
        cfg = default_cfg("model=smollm2_135m", "model.dtype=bfloat16", "model.gradient_checkpointing=true",
                          f"trainer={trainer}", "trainer.devices=1", f"peft={peft}", "logger=none",
                          f"run_dir={out / ('mem-' + trainer + '-' + peft)}", "data.max_length=1500",
                          "data.max_prompt_length=512",
                          # under FSDP also write sharded checkpoints (removed once the adapter is saved)
                          f"trainer.checkpoint_every_n_steps={2 if trainer == 'fsdp' else 'null'}")
        prompt, response, steps = 512, 988, 4
    reset_peak()
    policy = add_lora(context.base_model(cfg, for_training=True), "policy", r=cfg.peft.r, alpha=cfg.peft.alpha,
                      dropout=0.0, target_modules=list(cfg.peft.target_modules))
    arch = Arch.from_hf_config(policy.get_base_model().config, cfg.model.name)
    pairs = _pairs(2 * steps, prompt, response, arch.vocab)
    module = PreferenceModule(policy, build("cdpo"), lr=1e-4)
    dm = PairsDataModule(pairs, pad_id=0, batch_size=2, shuffle=False, with_weights=True,
                         max_length=prompt + response, max_prompt_length=prompt)
    t0 = time.perf_counter()
    summary = _fit(cfg, f"memory-{trainer}-{peft}", module, dm, adapter="policy",
                   path=out / f"adapter-{trainer}-{peft}", epochs=1)
    wall = time.perf_counter() - t0
    strategy = "qlora" if peft == "qlora" else ("fsdp" if trainer == "fsdp" else "ddp")
    predicted = total_gib(plan(arch, strategy, 1, r=cfg.peft.r, max_length=prompt + response, pairs_per_gpu=2))
    tokens = steps * 4 * (prompt + response)
    from safetensors.torch import load_file

    saved = load_file(out / f"adapter-{trainer}-{peft}" / "adapter_model.safetensors")
    return {"trainer": trainer, "peft": peft, "steps": summary["steps"], "loss": summary["final"].get("loss"),
            "tokens_per_s": round(tokens / wall, 1), "planned_gib": round(predicted, 3),
            "adapter_tensors_saved": len(saved),
            "adapter_tensors_expected": 2 * arch.layers * len(cfg.peft.target_modules),
            "adapter_b_nonzero": any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)}


def check_pytest() -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_generation_vllm.py"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'kernels'}"})
    return {"returncode": proc.returncode, "summary": proc.stdout.strip().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    ap.add_argument("--data", default="gsm8k")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--budget-s", type=float, default=420, help="optional sections start only before this")
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny model, tiny sizes, no vLLM / FSDP / QLoRA")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA GPU (use --dry-run to check the script on a CPU)")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    for pkg in ("vllm", "bitsandbytes", "deepspeed", "flash_attn"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:  # noqa: BLE001 - absent or broken: reported as such
            env[pkg] = None
    print(json.dumps(env), flush=True)
    section("pipeline (HF, bf16)", lambda: check_pipeline(args, out))
    if not args.dry_run:
        section("vLLM sample + eval", lambda: check_vllm(args, out), optional_after=args.budget_s)
    for trainer, peft in (("gpu", "cdpo_lora"), ("fsdp", "cdpo_lora"), ("gpu", "qlora")):
        section(f"memory: align at 1500 tokens, trainer={trainer} peft={peft}",
                lambda t=trainer, p=peft: check_memory(args, out, t, p), optional_after=args.budget_s)
    if not args.dry_run:
        section("pytest tests/test_generation_vllm.py", check_pytest, optional_after=args.budget_s)
    total = round(time.perf_counter() - T0, 1)
    (out / "gpu_check.json").write_text(json.dumps({"env": env, "total_s": total, "sections": RESULTS}, indent=1))
    print("\n| section | status | wall s | peak GPU GiB |\n|---|---|---|---|")
    for r in RESULTS:
        print(f"| {r['section']} | {r['status']} | {r.get('wall_s', '')} | {r.get('peak_gpu_gib', '')} |")
    print(f"total {total} s -> {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
