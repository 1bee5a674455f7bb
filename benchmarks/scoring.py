"""Contrastive scoring throughput and peak memory: ours vs the paper's approach.

    python benchmarks/scoring.py [--pairs 16] [--batch-size 16] [--dtype float32|bfloat16]

paper's approach: two full models (positive and negative, adapters merged into two copies of the
    base), one sequence at a time, full-vocabulary logits of both, softmax((1+b) z_pos - b z_neg).
ours: one base model carrying both LoRA adapters, batches of sequences, and the combined hidden
    state (1+b) h_pos - b h_neg through the output head once, in row chunks (`ContrastiveScorer`);
    with `ours+prefix`, the prompt prefix every sequence shares (the few-shot exemplars) is encoded
    once per model and each batch continues its KV cache; with `ours+prefix+prompt`, each pair's
    prompt is also encoded once for its chosen and rejected response (what the score stage does).
Same model (embedded SmolLM2-135M), same sequences (arith prompts + sampled-length responses), same
CPU; each mode runs in a fresh process so its peak RSS is its own. Target: ours >= 10x tokens/s,
lower peak memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from _common import default_cfg, peak_rss_mib, run_worker


def _sequences(cfg, tok, n: int) -> list[dict]:
    from cdpo.pipeline import context

    problems = context.problems(cfg, "train", n)
    seqs = []
    for p in problems:
        prompt = context.prompt_of(cfg, tok, p.question)
        for response in (p.solution, p.solution.replace("The answer is", "So the answer is maybe")):
            seqs.append({"prompt_ids": context.prompt_ids(cfg, tok, prompt),
                         "response_ids": tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]})
    return seqs


def _adapted(cfg, seed: int):
    """Base model + 'pos' and 'neg' LoRA adapters with non-zero (random) weights, like trained CE models."""
    from cdpo.models import add_lora
    from cdpo.pipeline import context

    lora = dict(r=cfg.ce_lora.r, alpha=cfg.ce_lora.alpha, dropout=0.0, target_modules=list(cfg.ce_lora.target_modules))
    torch.manual_seed(seed)  # lora_A is initialised from the global RNG: same adapters in every worker
    model = add_lora(add_lora(context.base_model(cfg), "pos", **lora), "neg", **lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _work(mode: str, seqs: list[dict]) -> tuple[int, int]:
    """(token rows through the decoder, rows through the output head) that `mode` computes: the
    matmul work, which bounds the speed-up where the CPU is compute-bound."""
    from cdpo.kv_cache import shared_prefix_ids

    full = sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in seqs)
    responses = sum(len(s["response_ids"]) for s in seqs)
    if mode == "paper":  # both models, every position, full logits everywhere
        return 2 * full, 2 * full
    if mode == "ours":
        return 2 * full, responses
    prefix = len(shared_prefix_ids([s["prompt_ids"] for s in seqs]))
    if mode == "ours+prefix":
        return 2 * (prefix + full - prefix * len(seqs)), responses
    prompts = sum(len(s["prompt_ids"]) - prefix for s in seqs[::2])  # pairs share their prompt
    return 2 * (prefix + prompts + responses), responses


def worker(mode: str, n_pairs: int, batch_size: int, dtype: str) -> dict:
    from cdpo.data.collate import collate_sequences
    from cdpo.models import use_adapter
    from cdpo.modules import ContrastiveScorer
    from cdpo.pipeline import context

    cfg = default_cfg(f"model.dtype={dtype}")
    tok = context.tokenizer(cfg)
    seqs = _sequences(cfg, tok, n_pairs)
    model = _adapted(cfg, seed=0)
    n_tokens = sum(len(s["response_ids"]) for s in seqs)
    decoder_rows, head_rows = _work(mode, seqs)
    from cdpo.logprobs import backbone_and_head

    decoder, head = backbone_and_head(model)
    per_token = sum(p.numel() for n, p in decoder.layers.named_parameters() if "lora_" not in n)
    macs = decoder_rows * per_token + head_rows * head.weight.numel()
    dtype = str(head.weight.dtype).removeprefix("torch.")
    b = cfg.ce.b
    if mode == "paper":
        import copy

        pos = copy.deepcopy(model)
        use_adapter(pos, "pos")
        pos = pos.merge_and_unload()
        use_adapter(model, "neg")
        neg = model.merge_and_unload()
        del model
        probs = []
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in seqs:
                ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
                z_pos, z_neg = pos(ids).logits.float(), neg(ids).logits.float()
                p = torch.softmax((1 + b) * z_pos - b * z_neg, dim=-1)  # full vocabulary
                start = len(s["prompt_ids"]) - 1
                targets = ids[0, start + 1:]
                probs.append(p[0, start:-1].gather(-1, targets[:, None])[:, 0])
        seconds = time.perf_counter() - t0
    else:
        from cdpo.kv_cache import shared_prefix_ids

        scorer = ContrastiveScorer(model, b=b)
        prefix = shared_prefix_ids([x["prompt_ids"] for x in seqs]) if mode != "ours" else []
        scorer.set_prefix(prefix)
        rest = [{"prompt_ids": x["prompt_ids"][len(prefix):], "response_ids": x["response_ids"]} for x in seqs]
        probs = []
        t0 = time.perf_counter()
        for i in range(0, len(rest), batch_size):
            chunk = rest[i:i + batch_size]
            if mode == "ours+prefix+prompt":  # sequences come in pairs that share a prompt
                scored = scorer.score_grouped([x["prompt_ids"] for x in chunk[::2]], [x["response_ids"] for x in chunk],
                                              pad_id=tok.pad_token_id)
            else:
                scored = scorer.predict_step(collate_sequences(chunk, pad_id=tok.pad_token_id, max_length=4096,
                                                               max_prompt_length=4096), 0)
            probs += [torch.tensor(r["p_ce"]) for r in scored]
        seconds = time.perf_counter() - t0
    checksum = float(torch.cat(probs).double().sum())
    return {"mode": mode, "seconds": seconds, "tokens": n_tokens, "sequences": len(seqs), "gmac": macs / 1e9,
            "dtype": dtype,
            "peak_rss_mib": peak_rss_mib(), "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="bf16-if-native",
                    help="model dtype for every mode (default: the embedded model's, bfloat16 where the CPU has AVX512-BF16/AMX)")
    ap.add_argument("--worker", nargs=4)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.worker[3])))
        return
    rows = [run_worker(__file__, mode, args.pairs, args.batch_size, args.dtype) for mode in ("paper", "ours", "ours+prefix", "ours+prefix+prompt")]
    print(f"contrastive scoring, embedded SmolLM2-135M, {rows[0]['sequences']} sequences "
          f"({rows[0]['tokens']} response tokens), {rows[0]['dtype']}, {torch.get_num_threads()} threads")
    print(f"{'mode':<44} {'seconds':>8} {'tokens/s':>9} {'peak RSS MiB':>13} {'matmul GMAC':>12}")
    labels = {"paper": "paper: 2 full models, 1 seq, full softmax",
              "ours": f"ours: 1 base + 2 adapters, batch {args.batch_size}, chunked",
              "ours+prefix": "ours + shared prefix encoded once",
              "ours+prefix+prompt": "ours + prefix + each pair's prompt once"}
    for r in rows:
        print(f"{labels[r['mode']]:<44} {r['seconds']:8.2f} {r['tokens'] / r['seconds']:9.1f} {r['peak_rss_mib']:13.0f} {r['gmac']:12.1f}")
    paper = rows[0]
    for r in rows[1:]:
        print(f"{r['mode']}: throughput {paper['seconds'] / r['seconds']:.1f}x the paper's (target >= 10x); "
              f"peak memory {r['peak_rss_mib'] / paper['peak_rss_mib']:.2f} of the paper's; "
              f"sum of p_ce {r['checksum']:.4f} (paper {paper['checksum']:.4f}); "
              f"{paper['gmac'] / r['gmac']:.1f}x less matmul work (the ceiling where compute-bound)")


if __name__ == "__main__":
    sys.exit(main())
