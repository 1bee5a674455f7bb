"""Batched sampling vs one question at a time, same model (embedded SmolLM2-135M), prompts and CPU.

    python benchmarks/generation.py [--questions 16] [--batch-size 16] [--max-new-tokens 48]

Greedy decoding, so both modes produce the same completions; prints both throughputs and the ratio
(target: batched >= 5x).
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
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
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
    for label, bs in (("one at a time", 1), (f"batched ({args.batch_size})", args.batch_size)):
        stats = GenerationStats()
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts, batch_size=bs, stats=stats, **kw)
        wall = time.perf_counter() - t0
        rows.append((label, wall, stats.new_tokens, [o[0].text for o in outs]))
    print(f"embedded SmolLM2-135M-Instruct, {args.questions} arith questions, greedy, max_new_tokens="
          f"{args.max_new_tokens}, {torch.get_num_threads()} threads")
    print(f"{'mode':<16} {'wall s':>8} {'new tokens':>11} {'tokens/s':>9} {'questions/s':>12}")
    for label, wall, toks, _ in rows:
        print(f"{label:<16} {wall:8.1f} {toks:11d} {toks / wall:9.1f} {args.questions / wall:12.2f}")
    same = sum(a == b for a, b in zip(rows[0][3], rows[1][3]))
    print(f"speed-up (questions/s, batched / one at a time): {rows[0][1] / rows[1][1]:.1f}x  "
          f"(target >= 5x); identical completions: {same}/{args.questions}")


if __name__ == "__main__":
    main()
