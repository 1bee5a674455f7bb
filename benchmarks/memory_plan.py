"""Print the per-GPU memory plan of README "Scaling" (computed by cdpo.memory, nothing measured).

    python benchmarks/memory_plan.py [--gpus 8] [--max-length 1500] [--pairs-per-gpu 2] [--r 16]
"""
from __future__ import annotations

import argparse

from cdpo.memory import LLAMA3_8B, LLAMA3_70B, breakdown_table, plan_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1500)
    ap.add_argument("--pairs-per-gpu", type=int, default=2)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    kw = dict(max_length=args.max_length, pairs_per_gpu=args.pairs_per_gpu, r=args.r)
    for arch in (LLAMA3_8B, LLAMA3_70B):
        print(f"{arch.name}: {arch.params / 1e9:.2f} B parameters, LoRA r={args.r} on all projections: "
              f"{arch.lora_params(args.r) / 1e6:.1f} M")
    print()
    print(plan_table(gpus=args.gpus, **kw))
    for arch in (LLAMA3_8B, LLAMA3_70B):
        print()
        print(breakdown_table(arch, gpus=args.gpus, **kw))


if __name__ == "__main__":
    main()
