"""Batched sampling vs one question at a time, same model (embedded SmolLM2-135M), prompts and CPU.

    python benchmarks/generation.py [--questions 32] [--batch-size 32] [--max-new-tokens 48]

Greedy decoding, so every mode produces the same completions; prints the throughputs and the ratio
(target: batched >= 5x). "batched" is what the pipeline does: batches, plus the prompt prefix every
question shares (the few-shot exemplars) encoded once; the row without it shows what batching
alone gives.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import default_cfg
from cdpo.generation import GenerationStats, generate
from cdpo.pipeline import context


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)  # the pipeline's generation.batch_size
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = default_cfg()
    tok, model = context.tokenizer(cfg), context.base_model(cfg)
    problems = context.problems(cfg, "test", args.questions)
    prompts = [context.prompt_of(cfg, tok, p.question) for p in problems]
    kw = dict(max_new_tokens=args.max_new_tokens, stop=context.stops(cfg), progress=False)
    generate(model, tok, prompts[:2], batch_size=2, **kw)  # warm-up
    rows = []
    modes = (("one at a time", 1, False), (f"batched ({args.batch_size}), no prefix cache", args.batch_size, False),
             (f"batched ({args.batch_size})", args.batch_size, True))
    for label, bs, share in modes:
        stats = GenerationStats()
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts, batch_size=bs, stats=stats, share_prefix=share, **kw)
        wall = time.perf_counter() - t0
        rows.append((label, wall, stats.new_tokens, [o[0].text for o in outs]))
    print(f"embedded SmolLM2-135M-Instruct, {args.questions} arith questions, greedy, max_new_tokens="
          f"{args.max_new_tokens}, {torch.get_num_threads()} threads")
    print(f"{'mode':<36} {'wall s':>8} {'new tokens':>11} {'tokens/s':>9} {'questions/s':>12}")
    for label, wall, toks, _ in rows:
        print(f"{label:<36} {wall:8.1f} {toks:11d} {toks / wall:9.1f} {args.questions / wall:12.2f}")
    for label, wall, _, texts in rows[1:]:
        same = sum(a == b for a, b in zip(rows[0][3], texts))
        print(f"{label}: {rows[0][1] / wall:.1f}x one at a time (target >= 5x); identical completions: "
              f"{same}/{args.questions}")


if __name__ == "__main__":
    main()
