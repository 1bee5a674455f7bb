"""Fused linear log-prob (cdpo_kernels.logprob) against float64 full-logits references.

Both paths are checked: the chunked torch path and the Triton kernels (under TRITON_INTERPRET=1
on CPU, set by tests/conftest.py). Shapes are tiny because the interpreter is slow; they are
chosen to be ragged (not multiples of any block size) and to span several vocabulary tiles.
"""

import importlib.util

import pytest
import torch

import cdpo_kernels as ck
from cdpo_kernels import reference, torch_tiles
from cdpo_kernels.testing import leaf, random_problem, rel_err

HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton missing"))]
# Tolerances: fp32 inputs -> near fp32 rounding; bf16 inputs -> bf16 rounding of grads / dz tiles.
TOL = {torch.float32: dict(lp=2e-5, grad=1e-4), torch.bfloat16: dict(lp=2e-4, grad=2e-2)}


def _reference_weighted(p, upstream):
    """float64 autograd of the naive formula: sum_b upstream_b * sum_t w_t log p_t."""
    h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
    lp = reference.token_logprobs(h, w, p["labels"], p["mask"], bias=b, dtype=torch.float64)
    weights = p["weights"].nan_to_num(0.0).double()
    sums = (lp * weights).sum(-1)
    (sums * upstream.double()).sum().backward()
    return lp.detach(), sums.detach(), (h.grad, w.grad, b.grad if b is not None else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_weighted_sums_forward_and_grads(backend, dtype, bias):
    p = random_problem(dtype=dtype, bias=bias, seed=1)
    upstream = torch.tensor([1.0, -2.5])
    h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
    sums, lp = ck.weighted_logprob_sums(h, w, p["labels"], p["mask"], p["weights"], bias=b, backend=backend)
    (sums * upstream).sum().backward()
    lp64, sums64, grads64 = _reference_weighted(p, upstream)

    tol = TOL[dtype]
    assert lp.dtype == torch.float32 and lp.shape == p["mask"].shape
    assert torch.all(lp[~p["mask"]] == 0)
    assert (lp.double() - lp64).abs().max() < tol["lp"] * 10
    assert rel_err(sums, sums64) < tol["lp"]
    for got, want in zip((h.grad, w.grad, b.grad if b is not None else None), grads64):
        if want is None:
            continue
        assert got.dtype == dtype
        assert rel_err(got, want) < tol["grad"]
    # masked positions get no gradient at all
    assert torch.all(h.grad[~p["mask"]] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_matches_cdpo_reference(backend):
    head = pytest.importorskip("cdpo.head")
    p = random_problem(bias=True, seed=2)
    got = ck.token_logprobs(p["hidden"], p["weight"], p["labels"], p["mask"], bias=p["bias"], backend=backend)
    want = head.token_logprobs_from_hidden(p["hidden"], p["weight"], p["labels"], p["mask"], bias=p["bias"])
    assert (got - want).abs().max() < 1e-5


def test_torch_path_many_tiles_and_row_chunks(monkeypatch):
    """Tiny tiles force several row chunks (grad_W accumulated across them) and vocabulary chunks."""
    monkeypatch.setattr(torch_tiles, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(torch_tiles, "ROW_CHUNK", 5)
    monkeypatch.setattr(torch_tiles, "MIN_COLS", 16)
    for dtype in (torch.float32, torch.bfloat16):
        p = random_problem(T=13, V=103, dtype=dtype, bias=True, seed=3)
        upstream = torch.tensor([0.5, 2.0])
        h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
        sums, _ = ck.weighted_logprob_sums(h, w, p["labels"], p["mask"], p["weights"], bias=b, backend="torch")
        (sums * upstream).sum().backward()
        _, sums64, grads64 = _reference_weighted(p, upstream)
        assert rel_err(sums, sums64) < TOL[dtype]["lp"]
        for got, want in zip((h.grad, w.grad, b.grad), grads64):
            assert rel_err(got, want) < TOL[dtype]["grad"]


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_triton_backward_several_vocab_chunks(monkeypatch):
    from cdpo_kernels import triton_tiles

    monkeypatch.setattr(triton_tiles, "GRAD_TILE_ELEMENTS", 16 * 40)  # a few BN columns per chunk
    monkeypatch.setattr(triton_tiles, "INTERPRET_SPLITS", 2)
    p = random_problem(T=9, V=130, bias=True, seed=4)
    upstream = torch.tensor([1.0, 1.0])
    h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
    sums, _ = ck.weighted_logprob_sums(h, w, p["labels"], p["mask"], p["weights"], bias=b, backend="triton")
    (sums * upstream).sum().backward()
    _, sums64, grads64 = _reference_weighted(p, upstream)
    assert rel_err(sums, sums64) < 1e-5
    for got, want in zip((h.grad, w.grad, b.grad), grads64):
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_mask_frozen_head_and_noncontiguous_hidden(backend):
    """No masked positions (no row copy), a frozen head (LoRA) and a sliced hidden view."""
    p = random_problem(T=8, masked=0.0, seed=5)
    full = p["hidden"].clone().requires_grad_()
    hidden = full[:, :-1]  # as in logprobs.py: hidden[:, :-1] scores the next token
    labels, mask = p["labels"][:, 1:], p["mask"][:, 1:]
    lp = ck.token_logprobs(hidden, p["weight"], labels, mask, backend=backend)
    lp.sum().backward()
    h64 = p["hidden"].double().requires_grad_()
    want = reference.token_logprobs(h64[:, :-1], p["weight"], labels, mask, dtype=torch.float64)
    want.sum().backward()
    assert (lp.double() - want).abs().max() < 1e-4
    assert rel_err(full.grad, h64.grad) < 1e-4
    assert torch.all(full.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_selected_is_zero_and_differentiable(backend):
    p = random_problem(seed=6)
    h, w = leaf(p["hidden"], p["weight"])
    mask = torch.zeros_like(p["mask"])
    sums, lp = ck.weighted_logprob_sums(h, w, p["labels"], mask, p["weights"], backend=backend)
    assert torch.all(lp == 0) and torch.all(sums == 0)
    sums.sum().backward()
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """Online log-sum-exp must not overflow where exp(z) does."""
    p = random_problem(T=6, V=70, scale=40.0, seed=7)
    h, w = leaf(p["hidden"], p["weight"])
    lp = ck.token_logprobs(h, w, p["labels"], p["mask"], backend=backend)
    lp.sum().backward()
    want = reference.token_logprobs(p["hidden"], p["weight"], p["labels"], p["mask"], dtype=torch.float64)
    assert torch.isfinite(lp).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert rel_err(lp, want) < 1e-5


def test_backends_agree_and_switch():
    p = random_problem(bias=True, seed=8)
    args = (p["hidden"], p["weight"], p["labels"], p["mask"])
    with ck.use_backend("torch"):
        assert ck.get_backend() == "torch"
        a = ck.token_logprobs(*args, bias=p["bias"])
    assert ck.get_backend() == "auto"
    if HAS_TRITON:
        b = ck.token_logprobs(*args, bias=p["bias"], backend="triton")
        assert (a - b).abs().max() < 1e-5
    assert ck.resolve(torch.device("cpu")) == "torch"  # auto on CPU is the torch path
    with pytest.raises(ValueError):
        ck.set_backend("cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton missing")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ck.resolve(torch.device("cpu"), "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_and_head_dtypes_may_differ(backend):
    """bf16 hidden states with an fp32 head (and the reverse) score like the float64 formula."""
    p = random_problem(seed=9)
    for h_dtype, w_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        h = p["hidden"].to(h_dtype).requires_grad_()
        w = p["weight"].to(w_dtype)
        lp = ck.token_logprobs(h, w, p["labels"], p["mask"], backend=backend)
        lp.sum().backward()
        h64 = h.detach().double().requires_grad_()
        want = reference.token_logprobs(h64, w.double(), p["labels"], p["mask"], dtype=torch.float64)
        want.sum().backward()
        assert (lp.double() - want).abs().max() < 2e-2
        assert h.grad.dtype == h_dtype and rel_err(h.grad, h64.grad) < 2e-2


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_fp32_head_uses_tf32_only_on_request(monkeypatch):
    """Default fp32 heads score at fp32 precision; with TF32 requested the interpreter rounds the
    dot operands as a TF32 tensor core would (low 13 mantissa bits dropped), within TF32 tolerance."""
    from cdpo_kernels import triton_tiles

    p = random_problem(H=64, dtype=torch.float32, bias=True, seed=10, scale=0.5)
    h64, w64, b64 = leaf(p["hidden"].double(), p["weight"].double(), p["bias"].double())
    want = reference.token_logprobs(h64, w64, p["labels"], p["mask"], bias=b64, dtype=torch.float64)
    want.sum().backward()
    errors = {}
    for tf32 in (False, True):
        monkeypatch.setattr(triton_tiles, "tf32_requested", lambda tf32=tf32: tf32)
        h, w, b = leaf(p["hidden"], p["weight"], p["bias"])
        lp = ck.token_logprobs(h, w, p["labels"], p["mask"], bias=b, backend="triton")
        lp.sum().backward()
        errors[tf32] = [rel_err(lp, want), rel_err(h.grad, h64.grad), rel_err(w.grad, w64.grad)]
    assert max(errors[False]) < 1e-5
    # TF32 (10-bit mantissa, unit roundoff 2^-11 ~ 5e-4 per operand): measured ~6e-4 here
    assert max(errors[True]) < 3e-3
    assert errors[True][0] > 30 * errors[False][0]  # the rounding really happens


TF32_SWITCHES = {
    "default": ("", False),
    "legacy flag": ("torch.backends.cuda.matmul.allow_tf32 = True", True),
    "matmul precision": ("torch.set_float32_matmul_precision('high')", True),
    "new cuda switch": ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),
    "new global switch": ("torch.backends.fp32_precision = 'tf32'", True),
}


@pytest.mark.skipif(not HAS_TRITON, reason="triton missing")
def test_tf32_request_follows_every_torch_switch():
    """Each of torch's TF32 switches is honoured and none makes the launch config raise (reading the
    legacy flag raises once the new API was used). The switches are process-wide: one subprocess
    imports the kernels, then each case runs in a fork of it."""
    import subprocess
    import sys

    cases = dict(TF32_SWITCHES)
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch < 2.9
        cases = {k: v for k, v in cases.items() if "fp32_precision" not in v[0]}
    code = "\n".join([
        "import os, sys, torch",
        "from cdpo_kernels import triton_tiles as t",
        f"for name, setting in {[(k, v[0]) for k, v in cases.items()]!r}:",
        "    pid = os.fork()",
        "    if pid == 0:",
        "        exec(setting)",
        "        c = t._config(torch.float32)",
        "        print(name, t.tf32_requested(), c['PRECISION'], c['ROUND_TF32'], sep='|', flush=True)",
        "        os._exit(0)",
        "    os.waitpid(pid, 0)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = {line.split("|")[0]: line.split("|")[1:] for line in out.stdout.splitlines()}
    assert set(got) == set(cases), out.stderr
    for name, (_, expected) in cases.items():
        assert got[name] == (["True", "tf32", "True"] if expected else ["False", "ieee", "False"]), name


def test_mm_accumulate_cpu_fallback_keeps_fp32_products():
    """CPU has no 16-bit GEMM with fp32 output: the fallback upcasts, so the sum is not bf16-rounded."""
    from cdpo_kernels.tiling import mm_accumulate

    g = torch.Generator().manual_seed(11)
    a = torch.randn(33, 70, generator=g).bfloat16()
    b = torch.randn(70, 20, generator=g).bfloat16()
    acc0 = torch.randn(33, 20, generator=g)
    want = acc0.double() + a.double() @ b.double()
    acc = acc0.clone()
    mm_accumulate(acc, a, b)
    assert acc.dtype == torch.float32
    assert rel_err(acc, want) < 1e-6
    assert rel_err(acc0 + (a @ b).float(), want) > 1e-4  # what a bf16-rounded product would cost


def test_mm_accumulate_cuda_path_calls_a_gemm_cuda_has(monkeypatch):
    """On CUDA the product must come from ``mm(bf16, bf16, out_dtype=float32)``: CUDA's out_dtype
    ``addmm`` wants the addend in the inputs' dtype, so an fp32 accumulator there raises (and the
    old code silently fell back to an fp32 GEMM). Run on meta tensors with the op calls recorded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from cdpo_kernels import tiling

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            dtypes = [x.dtype for x in args if isinstance(x, torch.Tensor)]
            calls.append((str(func), dtypes, (kwargs or {}).get("out_dtype", args[2] if len(args) > 2 else None)))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(tiling, "FP32_OUT_DEVICES", ("meta",))
    acc = torch.empty(8, 4, device="meta")
    for dtype in (torch.bfloat16, torch.float16):
        a = torch.empty(8, 16, dtype=dtype, device="meta")
        b = torch.empty(16, 4, dtype=dtype, device="meta")
        calls.clear()
        with Record():
            tiling.mm_accumulate(acc, a, b)
        gemms = [c for c in calls if "mm" in c[0]]
        assert [c[0] for c in gemms] == ["aten.mm.dtype"]
        assert gemms[0][1] == [dtype, dtype] and gemms[0][2] == torch.float32
        assert not any("_to_copy" in c[0] for c in calls)  # no upcast of the inputs
