"""Benchmark of the fused output-head kernels: one table per run.

    python kernels/bench.py            CPU table at full shapes (slow on 2 cores: minutes)
    python kernels/bench.py --quick    CPU table at small shapes
    python kernels/bench.py --gpu      GPU table (needs CUDA; see kernels/bench_gpu.sh)

Workload: the token-weighted DPO loss of cDPO on one batch of pairs, chosen and rejected rows
stacked, with per-token weights and precomputed reference log-probs; loss forward + backward,
gradients for the hidden states and the head W.

CPU mode: peak memory, measured honestly
-----------------------------------------
Each (shape, method) runs in a fresh subprocess, because a process's memory high-water mark
cannot be reset. The child

1. sets ``MALLOC_MMAP_THRESHOLD_`` (a fixed threshold disables glibc's dynamic one), so every
   large buffer is mmapped and handed back to the OS when freed: RSS then tracks live tensors
   instead of keeping freed chunks in the heap;
2. runs the method once on a tiny problem, so lazy imports, BLAS/oneDNN workspaces and thread
   pools are in place before measuring;
3. allocates the inputs (hidden states, W, labels, weights, reference log-probs) in place,
   without temporaries, and records its current RSS (/proc/self/statm) as the baseline;
4. runs forward + backward once and reads ``ru_maxrss`` (the kernel's high-water mark).

"peak" = ru_maxrss - baseline: everything the loss needed at its worst moment. It includes the
gradients that remain afterwards (dL/dW is [V, H] fp32 for every method alike), so the table also
shows "extra" = peak - bytes of those gradients: the memory the loss needs beyond its outputs,
which is what the naive path's logits inflate. The ratio and the targets use "extra". If the
high-water mark was not raised by the run, the value is an upper bound and is marked "<=".

Methods: naive (full fp32 logits, log_softmax, gather: what a plain HF forward does), ours
(``cdpo_kernels.token_logprobs`` + the cDPO objective on the chunked torch path, the CPU side of backend "auto"), and
TRL 1.16's ``ChunkedLogProbFunction`` (its CPU fallback folds tiles in torch) with the vocabulary
chunk its DPOTrainer uses (``_CHUNKED_LOGPROB_CHUNK_SIZE``). Our Triton kernels are not timed on
CPU: under TRITON_INTERPRET=1 every tile is a numpy call, hours at these shapes.

GPU mode: median time of forward, backward and forward+backward (CUDA events) and
``torch.cuda.max_memory_allocated`` above the inputs, bf16 inputs, for naive torch, torch.compile
of the naive function, Liger (fused linear cross-entropy and fused linear DPO), Cut Cross-Entropy,
TRL's chunked log-prob, ours (Triton), and the bare lm_head GEMM forward+backward as the floor.
Libraries that are not installed are skipped with a printed reason. Liger's two losses cannot take
per-token weights (FLCE only accepts a scalar upstream gradient, its DPO has no token weights), so
they run the closest unweighted loss; their rows are a speed/memory bar, not the same loss.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

FULL_SHAPES = [(576, 49152), (576, 128256), (4096, 49152), (4096, 128256)]
QUICK_SHAPES = [(64, 4096), (128, 8192)]
CPU_METHODS = ["naive", "ours", "trl"]
METHOD_LABEL = {
    "naive": "naive (full logits)",
    "ours": "ours, chunked torch",
    "trl": "TRL ChunkedLogProb",
    "torch_compile": "torch.compile(naive)",
    "liger_flce": "Liger FLCE (unweighted)",
    "liger_dpo": "Liger fused DPO (no wts)",
    "cce": "Cut Cross-Entropy",
    "ours_triton": "ours, Triton",
    "gemm_floor": "lm_head GEMM (floor)",
}


# ---------------------------------------------------------------------------------------------
# the workload


def make_inputs(H, V, T, pairs=1, dtype=torch.float32, device="cpu", head_grad=True, seed=0):
    """One concatenated batch [2 * pairs, T, H] (chosen rows first, as in TRL's / Liger's DPO
    forward), head W, labels, mask, per-token weights (cDPO: 1 on chosen, 1 - p_ce on rejected)
    and reference log-probs. Allocated in place, so the memory baseline is exactly the inputs.
    """
    torch.manual_seed(seed)
    f32 = dict(dtype=torch.float32, device=device)
    rows = 2 * pairs
    hidden = torch.empty(rows, T, H, dtype=dtype, device=device).normal_().requires_grad_()
    w = torch.empty(V, H, dtype=dtype, device=device).normal_(std=H ** -0.5).requires_grad_(head_grad)
    weights = torch.rand(rows, T, **f32)
    weights[:pairs] = 1.0
    return dict(hidden=hidden, w=w, labels=torch.randint(0, V, (rows, T), device=device),
                mask=torch.ones(rows, T, dtype=torch.bool, device=device),  # response tokens only
                weights=weights, ref=-5 * torch.rand(rows, T, **f32))


def _params(inp):
    return [t for t in (inp["hidden"], inp["w"]) if t.requires_grad]


def _dpo(inp, lp):
    """The cDPO loss on [2 * pairs, T] per-token policy log-probs (the project's reference formula)."""
    from cdpo.losses import dpo_loss

    half = lp.shape[0] // 2
    m, r, wt = inp["mask"], inp["ref"], inp["weights"]
    return dpo_loss(lp[:half], lp[half:], r[:half], r[half:], m[:half], m[half:], beta=0.1,
                    weights_chosen=wt[:half], weights_rejected=wt[half:])[0]


def naive_logps(h, w, labels):
    logits = h @ w.t()
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def loss_naive(inp, logps_fn=naive_logps):
    return _dpo(inp, logps_fn(inp["hidden"], inp["w"], inp["labels"]))


def loss_ours(inp, backend="torch"):
    import cdpo_kernels as ck

    from cdpo.objectives import build

    # the fused path of cdpo's training: the kernel's log-probs, then the objective (cdpo.objectives)
    from cdpo.objectives import PairLogps

    half = inp["hidden"].shape[0] // 2
    lp = ck.token_logprobs(inp["hidden"], inp["w"], inp["labels"], inp["mask"], backend=backend)
    m, r, wt = inp["mask"], inp["ref"], inp["weights"]
    return build("cdpo", beta=0.1).loss(PairLogps(lp[:half], lp[half:], m[:half], m[half:], ref_chosen=r[:half],
                                                  ref_rejected=r[half:], weights_chosen=wt[:half],
                                                  weights_rejected=wt[half:]))[0]


def _rows(inp):
    # Full response mask: every position is scored, so the rows are a view (no copy) for everyone.
    return inp["hidden"].reshape(-1, inp["hidden"].shape[-1]), inp["labels"].reshape(-1)


def loss_trl(inp):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    x, y = _rows(inp)
    lp = ChunkedLogProbFunction.apply(x, inp["w"], None, y, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ())[0]
    return _dpo(inp, lp.view(inp["labels"].shape))


def loss_cce(inp):
    from cut_cross_entropy import linear_cross_entropy

    x, y = _rows(inp)
    return _dpo(inp, -linear_cross_entropy(x, inp["w"], y, reduction="none").view(inp["labels"].shape))


def loss_liger_flce(inp):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    x, y = _rows(inp)
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")(inp["w"], x, y)


def loss_liger_dpo(inp):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    out = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)(inp["w"], inp["hidden"], inp["labels"])
    return out[0] if isinstance(out, tuple) else out


def loss_gemm_floor(inp):
    # Returns the logits themselves; _backward uses them as their own upstream gradient, so
    # fwd + bwd is exactly the three lm_head GEMMs and nothing else.
    return inp["hidden"] @ inp["w"].t()


def _backward(loss):
    loss.backward(gradient=loss.detach() if loss.dim() else None)


CPU_LOSSES = {"naive": loss_naive, "ours": loss_ours, "trl": loss_trl}


# ---------------------------------------------------------------------------------------------
# CPU: one measurement per fresh subprocess


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_worker(method: str, H: int, V: int, T: int, head_grad: bool) -> dict:
    fn = CPU_LOSSES[method]
    warm = make_inputs(H, 512, 8, head_grad=head_grad)
    fn(warm).backward()  # lazy imports, BLAS/oneDNN workspaces, thread pools
    del warm
    gc.collect()
    inp = make_inputs(H, V, T, head_grad=head_grad)
    gc.collect()
    base, high_before = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    loss = fn(inp)
    loss.backward()
    seconds = time.perf_counter() - t0
    high = _maxrss_bytes()
    grads = sum(t.grad.nbytes for t in _params(inp))
    return dict(peak=high - base, grads=grads, bound=high <= high_before, seconds=seconds, loss=loss.item())


def run_cpu_case(method, H, V, T, head_grad) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRITON_INTERPRET="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps([method, H, V, T, head_grad])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return dict(error=(out.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:9.1f}"


def cpu_table(shapes, T):
    print(f"CPU: token-weighted DPO (cDPO) loss fwd+bwd, fp32, one concatenated batch of N = 2 x {T} tokens "
          f"(1 pair); torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("head frozen = LoRA (paper setting, grads for hidden only); trained = grads for hidden and W [V, H]")
    print("peak = ru_maxrss - RSS after inputs (fresh process each); extra = peak - final gradients; MiB;")
    print("* naive with a trained head: its peak comes before dL/dW exists, so its extra is a lower bound")
    header = (f"{'H':>5} {'V':>7} {'head':<8} {'method':<22} {'peak':>10} {'extra':>10} {'naive/extra':>12} "
              f"{'time s':>8}")
    print(header)
    print("-" * len(header))
    verdicts = []
    for H, V in shapes:
        for head_grad in (False, True):
            head = "trained" if head_grad else "frozen"
            rows = {m: run_cpu_case(m, H, V, T, head_grad) for m in CPU_METHODS}
            extra = {m: r["peak"] - r["grads"] for m, r in rows.items() if "error" not in r}
            for m, r in rows.items():
                label = f"{H:>5} {V:>7} {head:<8} {METHOD_LABEL[m]:<22}"
                if "error" in r:
                    print(f"{label} failed: {r['error']}")
                    continue
                mark = "<=" if r["bound"] else "  "
                star = "*" if m == "naive" and head_grad else " "
                ratio = extra["naive"] / max(extra[m], 1) if "naive" in extra else float("nan")
                print(f"{label} {mark}{_mib(r['peak'])[2:]:>8} {_mib(extra[m])}{star}{ratio:11.1f}x "
                      f"{r['seconds']:8.1f}")
            if set(CPU_METHODS) <= set(extra):
                loss = {m: rows[m]["loss"] for m in extra}
                verdicts.append(
                    f"H={H} V={V} head {head}: ours extra <= naive/20: "
                    f"{'yes' if extra['ours'] * 20 <= extra['naive'] else 'NO'}; "
                    f"<= TRL: {'yes' if extra['ours'] <= extra['trl'] else 'NO'}; "
                    f"loss naive/ours/trl = {loss['naive']:.6f} / {loss['ours']:.6f} / {loss['trl']:.6f}")
    print()
    print("\n".join(verdicts))
    print("not run on CPU: ours (Triton): only under TRITON_INTERPRET=1, where each tile is a numpy call "
          "(hours at these shapes); the tests check it at tiny shapes instead")


# ---------------------------------------------------------------------------------------------
# GPU


def _gpu_methods():
    """name -> loss function, or a string saying why it is skipped."""
    have = lambda mod: importlib.util.find_spec(mod) is not None  # noqa: E731
    methods = {"gemm_floor": loss_gemm_floor, "naive": loss_naive}
    methods["torch_compile"] = lambda inp, f=torch.compile(naive_logps): loss_naive(inp, f)
    methods["liger_flce"] = loss_liger_flce if have("liger_kernel") else "liger-kernel not installed"
    methods["liger_dpo"] = loss_liger_dpo if have("liger_kernel") else "liger-kernel not installed"
    methods["cce"] = loss_cce if have("cut_cross_entropy") else "cut-cross-entropy not installed"
    methods["trl"] = loss_trl if have("trl") else "trl not installed"
    methods["ours_triton"] = lambda inp: loss_ours(inp, backend="triton")
    return methods


def _time_gpu(fn, inp, warmup, iters):
    params = _params(inp)
    fwd, bwd = [], []
    for i in range(warmup + iters):
        for p in params:
            p.grad = None
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        torch.cuda.synchronize()
        start.record()
        loss = fn(inp)
        mid.record()
        _backward(loss)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            fwd.append(start.elapsed_time(mid))
            bwd.append(mid.elapsed_time(end))
    for p in params:
        p.grad = None
    return statistics.median(fwd), statistics.median(bwd), statistics.median(a + b for a, b in zip(fwd, bwd))


def _loss_and_grad(fn, inp):
    for p in _params(inp):
        p.grad = None
    loss = fn(inp)
    _backward(loss)
    return loss.detach().float(), inp["hidden"].grad.detach().float().clone()


def _memory_gpu(fn, inp):
    for p in _params(inp):
        p.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _backward(fn(inp))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# Methods computing the very same cDPO loss as naive (Liger's rows and the GEMM floor do not).
SAME_LOSS = {"torch_compile", "cce", "trl", "ours_triton"}


def gpu_table(args):
    if not torch.cuda.is_available():
        print("--gpu: CUDA is not available; nothing measured")
        return
    cases = [("Liger", 4096, 128256, 1024, b) for b in (2, 4, 8, 16)] + [("CCE", 2304, 256000, 1024, 8)]
    if args.quick:
        cases = [("quick", 1024, 32768, 512, 2)]
    methods = _gpu_methods()
    for name, why in methods.items():
        if isinstance(why, str):
            print(f"skip {METHOD_LABEL[name]}: {why}")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 inputs, "
          f"W {'frozen' if args.frozen_head else 'trainable'}; median of {args.iters} after {args.warmup} warm-up; "
          f"peak = max_memory_allocated above inputs; dloss / dgrad = |loss - naive| and rel. error of dL/dhidden "
          f"vs naive (same cDPO loss only)")
    header = (f"{'shape':<6} {'B':>3} {'N':>6} {'H':>5} {'V':>7}  {'method':<25} {'fwd ms':>8} {'bwd ms':>8} "
              f"{'f+b ms':>8} {'peak MiB':>10} {'dloss':>9} {'dgrad':>9}")
    print(header)
    print("-" * len(header))
    for shape, H, V, T, B in cases:
        # B sequences = B/2 pairs of (chosen, rejected), each T tokens: N = B * T tokens.
        inp = make_inputs(H, V, T, pairs=max(1, B // 2), dtype=torch.bfloat16, device="cuda",
                          head_grad=not args.frozen_head)
        try:
            ref_loss, ref_grad = _loss_and_grad(loss_naive, inp)
        except torch.cuda.OutOfMemoryError:
            ref_loss = ref_grad = None
        for name, fn in methods.items():
            if isinstance(fn, str):
                continue
            label = f"{shape:<6} {B:>3} {B * T:>6} {H:>5} {V:>7}  {METHOD_LABEL[name]:<25}"
            try:
                f, b, fb = _time_gpu(fn, inp, args.warmup, args.iters)
                mem = _memory_gpu(fn, inp)
                check = f"{'n/a':>9} {'n/a':>9}"
                if name in SAME_LOSS and ref_loss is not None:
                    loss, grad = _loss_and_grad(fn, inp)
                    dgrad = ((grad - ref_grad).norm() / ref_grad.norm()).item()
                    check = f"{abs(loss - ref_loss).item():9.2e} {dgrad:9.2e}"
                print(f"{label} {f:8.2f} {b:8.2f} {fb:8.2f} {_mib(mem)} {check}", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{label} {'OOM':>8}", flush=True)
            except Exception as exc:  # a library failing at a shape must not stop the table
                print(f"{label} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}", flush=True)
            finally:
                for p in _params(inp):
                    p.grad = None
                gc.collect()
                torch.cuda.empty_cache()
        del inp
        torch.cuda.empty_cache()


def gpu_check(device="cuda", B=3, T=333, H=200, V=5003) -> int:
    """The Triton path on CUDA against float64 full-logits references (values and gradients).

    Shapes are ragged and span many tiles and vocabulary splits; tolerances as in the CPU tests.
    Returns the number of failed checks.
    """
    if device == "cuda" and not torch.cuda.is_available():
        print("--check: CUDA is not available")
        return 1
    import cdpo_kernels as ck
    from cdpo_kernels import reference
    from cdpo_kernels.testing import leaf, random_problem, rel_err

    failed = 0

    def report(name, err, tol):
        nonlocal failed
        ok = err < tol
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name:<48} {err:9.2e} (tol {tol:.0e})")

    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        torch.backends.cuda.matmul.allow_tf32 = False
        p = random_problem(B=B, T=T, H=H, V=V, dtype=dtype, bias=True, seed=1)
        p = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in p.items()}
        up = torch.linspace(-2.0, 1.0, B, device=device)
        tag = str(dtype).replace("torch.", "")
        h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
        sums, lp = ck.weighted_logprob_sums(h, w, p["labels"], p["mask"], p["weights"], bias=b, backend="triton")
        (sums * up).sum().backward()
        h64, w64, b64 = leaf(p["hidden"], p["weight"], p["bias"])
        lp64 = reference.token_logprobs(h64, w64, p["labels"], p["mask"], bias=b64, dtype=torch.float64)
        s64 = (lp64 * p["weights"].nan_to_num(0.0).double()).sum(-1)
        (s64 * up.double()).sum().backward()
        report(f"logprob {tag} weighted sums", rel_err(sums, s64), tol / 10)
        for name, got, want in (("hidden", h.grad, h64.grad), ("W", w.grad, w64.grad), ("bias", b.grad, b64.grad)):
            report(f"logprob {tag} grad {name}", rel_err(got, want), tol)
        h_ref = (p["hidden"].float() + 0.5 * torch.randn_like(p["hidden"].float())).to(dtype)
        h, w = leaf(p["hidden"], p["weight"])
        kl, lp = ck.sequential_kl_and_logprobs(h_ref, h, w, p["labels"], p["mask"], backend="triton")
        (kl.sum() + lp.sum()).backward()
        h64, w64 = leaf(p["hidden"], p["weight"])
        kl64 = reference.sequential_kl(h_ref, h64, w64, p["mask"], dtype=torch.float64)
        (kl64.sum() + reference.token_logprobs(h64, w64, p["labels"], p["mask"], dtype=torch.float64).sum()).backward()
        report(f"kl {tag} value", rel_err(kl, kl64), tol / 10)
        report(f"kl {tag} grad hidden", rel_err(h.grad, h64.grad), tol)
        report(f"kl {tag} grad W", rel_err(w.grad, w64.grad), tol)
        w_neg = p["weight"].flip(0)
        for heads, kw in (("shared", {}), ("two heads", dict(weight_neg=w_neg))):
            got = ck.contrastive_token_probs(p["hidden"], h_ref, p["weight"], p["labels"], p["mask"], b=1.0,
                                             bias=p["bias"], backend="triton", **kw)
            want = reference.contrastive_token_probs(p["hidden"], h_ref, p["weight"], p["labels"], p["mask"], b=1.0,
                                                     bias=p["bias"], dtype=torch.float64, **kw)
            report(f"contrastive {tag} {heads} (max abs)", (got.double() - want).abs().max().item(),
                   1e-5 if dtype == torch.float32 else 5e-3)
    print(f"{failed} check(s) failed")
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--gpu", action="store_true", help="GPU timing/memory table")
    parser.add_argument("--tokens", type=int, default=1024, help="CPU: tokens per sequence (N = 2 x this)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--frozen-head", action="store_true", help="GPU: W without gradient (LoRA)")
    parser.add_argument("--check", action="store_true", help="GPU: Triton path vs float64 references")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(cpu_worker(*json.loads(args.worker))))
    elif args.check:
        sys.exit(gpu_check())
    elif args.gpu:
        gpu_table(args)
    else:
        cpu_table(QUICK_SHAPES if args.quick else FULL_SHAPES, 128 if args.quick else args.tokens)


if __name__ == "__main__":
    main()
