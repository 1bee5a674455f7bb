"""Training-step time of every Table-1 method on the embedded model, for sizing the embedded grid.

    python benchmarks/align_methods.py [--steps 4]

Same pairs (arith prompts, a correct and a wrong solution), same LoRA policy (conf/peft/cdpo_lora)
and batch size (align.batch_size) for every method; DPO, RPO and cDPO use precomputed reference
log-probs as the align stage does (not timed: one forward per pair, once per run_dir); TokenDPO runs
the reference forward and the vocabulary KL every step; SFT trains on the chosen responses only.
Prints seconds per micro-batch and the align-stage estimate for the embedded default's step count.
"""
from __future__ import annotations

import argparse
import time

import torch

from _common import default_cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed micro-batches per method (after one warm-up)")
    ap.add_argument("--micro-batches", type=int, default=78,
                    help="micro-batches of the embedded align stage (52 pairs / batch 2 x 3 epochs)")
    args = ap.parse_args()

    from cdpo.data.collate import collate_pairs, collate_sequences
    from cdpo.logprobs import response_logps
    from cdpo.losses import sft_loss
    from cdpo.models import add_lora
    from cdpo.pipeline import context
    from cdpo.pipeline.align import preference_module
    from cdpo.pipeline.training import _lora

    cfg = default_cfg()
    tok = context.tokenizer(cfg)
    pairs = []
    for p in context.problems(cfg, "train", 2 * (args.steps + 1) * cfg.align.batch_size):
        prompt = context.prompt_ids(cfg, tok, context.prompt_of(cfg, tok, p.question))
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]  # noqa: E731
        chosen, rejected = enc(p.solution), enc(p.solution.replace("The answer is", "So the answer is maybe"))
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
                      "chosen_p_ce": [0.8] * len(chosen), "rejected_p_ce": [0.6] * len(rejected),
                      "ref_chosen": [-1.0] * len(chosen), "ref_rejected": [-1.0] * len(rejected)})
    bs = cfg.align.batch_size
    print(f"embedded model, {len(pairs)} pairs, batch {bs}, prompt {len(pairs[0]['prompt_ids'])} tokens, "
          f"responses ~{len(pairs[0]['chosen_ids'])} tokens, {torch.get_num_threads()} threads")
    print("| method | s / micro-batch | align estimate for the embedded default (s) |")
    print("|---|---|---|")
    from cdpo.objectives import METHODS, TrainsOn, build

    for method in METHODS:
        objective = build(method)
        if not objective.trains:
            continue
        mcfg = default_cfg(f"method={method}")
        torch.manual_seed(0)
        policy = add_lora(context.base_model(mcfg, for_training=True), "policy", **_lora(mcfg.peft))
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=mcfg.align.lr)
        module = None if objective.trains_on is TrainsOn.POSITIVES else preference_module(mcfg, policy)
        times = []
        for i in range(args.steps + 1):
            items = pairs[i * bs:(i + 1) * bs]
            t0 = time.perf_counter()
            if objective.trains_on is TrainsOn.POSITIVES:
                batch = collate_sequences([{"prompt_ids": it["prompt_ids"], "response_ids": it["chosen_ids"]}
                                           for it in items], pad_id=tok.pad_token_id)
                loss, _ = sft_loss(response_logps(policy, batch), batch["mask"])
            else:
                batch = collate_pairs(items, pad_id=tok.pad_token_id, with_weights=objective.needs_scores,
                                      with_ref=objective.uses_cached_reference)
                loss, _ = module.compute_loss(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
        per = sum(times) / len(times)
        print(f"| {method} | {per:.2f} | {per * args.micro_batches:.0f} |", flush=True)


if __name__ == "__main__":
    main()
