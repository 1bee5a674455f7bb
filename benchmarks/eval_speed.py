"""Evaluation throughput options, side by side on one model, one set of questions and one CPU.

    python benchmarks/eval_speed.py [--questions 64] [--rounds 2]

The eval stage generates greedily with the base model plus a LoRA adapter (generation.batch_size
rows per batch, the few-shot prefix encoded once). Each option runs on the same questions, the
options interleaved round by round so that a load change on a shared machine hits them alike;
prints questions/s, the ratio to the pipeline's setting and how many greedy answers are identical
to it (merging the adapter or another batch shape changes float32 rounding, which can flip a token).
"""
from __future__ import annotations

import argparse
import time

import torch
from peft import LoraConfig, get_peft_model

from _common import default_cfg
from cdpo.generation import generate
from cdpo.pipeline import context


def adapted(cfg, merged: bool):
    """The base model with a LoRA adapter of the cDPO policy's shape and non-zero weights (a trained
    adapter's stand-in), merged into the weights or not."""
    p = cfg.peft
    model = context.base_model(cfg)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=p.r, lora_alpha=p.alpha, target_modules=list(p.target_modules),
                                                 init_lora_weights=False))
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.data.mul_(0.02)  # a trained adapter moves the outputs a little, not a lot
    return model.merge_and_unload().eval() if merged else model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = default_cfg()
    tok = context.tokenizer(cfg)
    problems = context.problems(cfg, "test", args.questions)
    prompts = [context.prompt_of(cfg, tok, p.question) for p in problems]
    kw = dict(max_new_tokens=cfg.generation.max_new_tokens, stop=context.stops(cfg), progress=False)
    pipeline_bs = cfg.generation.batch_size
    models = {False: adapted(cfg, merged=False), True: adapted(cfg, merged=True)}
    options = [(f"adapter, batch {bs}{' (pipeline)' if bs == pipeline_bs and not merged else ''}"
                f"{', merged' if merged else ''}", merged, bs)
               for merged in (False, True) for bs in (pipeline_bs, 2 * pipeline_bs, 4 * pipeline_bs)]
    generate(models[False], tok, prompts[:2], batch_size=2, **kw)  # warm-up
    wall = {label: 0.0 for label, _, _ in options}
    texts = {}
    for _ in range(args.rounds):
        for label, merged, bs in options:
            t0 = time.perf_counter()
            outs = generate(models[merged], tok, prompts, batch_size=bs, **kw)
            wall[label] += time.perf_counter() - t0
            texts[label] = [o[0].text for o in outs]
    base_label = options[0][0]
    print(f"embedded SmolLM2-135M-Instruct + LoRA r {cfg.peft.r}, {args.questions} arith questions, greedy, "
          f"{cfg.model.dtype}, {torch.get_num_threads()} threads, {args.rounds} rounds interleaved")
    print(f"{'option':<36} {'questions/s':>12} {'vs pipeline':>12} {'same answers':>13}")
    for label, _, _ in options:
        qps = args.rounds * args.questions / wall[label]
        same = sum(a == b for a, b in zip(texts[base_label], texts[label]))
        print(f"{label:<36} {qps:12.2f} {wall[base_label] / wall[label]:11.2f}x {same:>8}/{args.questions}")


if __name__ == "__main__":
    main()
