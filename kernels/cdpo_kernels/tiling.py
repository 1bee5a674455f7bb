"""Helpers shared by both paths: row selection, chunk ranges, and the backward GEMMs.

Every kernel here has the same backward shape: for a vocabulary chunk c, a tile of
dL/dz = dz[rows, c] (recomputed from hidden states and the saved log-sum-exps) feeds

    grad_hidden[rows] += dz @ W[c]        (accumulated over chunks, in fp32)
    grad_W[c]         += dz^T @ hidden     (accumulated over row chunks, in fp32)
    grad_bias[c]      += dz.sum(0)

so the [N, V] matrix exists one tile at a time. The two paths differ only in how they fill dz.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def select_rows(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[n, H] masked-in rows of a [B, T, H] tensor, before any matmul sees them.

    Returns the rows and the bool mask (None when every position is selected: then the rows
    are a plain reshape and no copy of the hidden states is made).
    """
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden {tuple(hidden.shape)} and mask {tuple(mask.shape)} do not match as [B, T, H] / [B, T]")
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    if bool(mask.all()):
        return hidden.reshape(-1, hidden.shape[-1]), None
    return hidden[mask], mask


def select_values(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The [B, T] entries matching :func:`select_rows`' rows (labels, weights...)."""
    return values.reshape(-1) if mask is None else values[mask]


def scatter_rows(values: torch.Tensor, mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """Put per-row values back into a [B, T] tensor with zeros at masked positions (differentiable)."""
    if mask is None:
        return values.reshape(shape)
    # masked_scatter keeps the graph connected even when nothing is selected.
    return values.new_zeros(shape).masked_scatter(mask, values)


# Devices whose GEMM can take 16-bit inputs and write fp32 (torch.mm's out_dtype).
FP32_OUT_DEVICES = ("cuda",)


def mm_accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to a's dtype first.

    Rounding each vocabulary chunk's bf16 product before summing chunks would add one bf16
    rounding per chunk. On CUDA, cuBLAS writes the fp32 product of 16-bit inputs directly
    (``mm(..., out_dtype=float32)``; ``addmm``'s out_dtype form wants the addend in the inputs'
    dtype, so it cannot accumulate into fp32). CPU has neither: there the inputs are upcast.
    """
    if acc.device.type in FP32_OUT_DEVICES and a.dtype in (torch.bfloat16, torch.float16):
        try:
            product = torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch < 2.8: no out_dtype
            product = None
        if product is not None:
            acc.add_(product)
            return
    acc.addmm_(a.float(), b.float())


def linear_backward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
    make_dz: Callable[[int, int, int, int], torch.Tensor],
    row_chunk: int,
    col_chunk: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_x, grad_W, grad_bias) given ``make_dz(r0, r1, c0, c1)`` -> dL/dz for that tile, in x's dtype.

    Vocabulary chunks are the outer loop so that each grad_W chunk is finished (and cast to the
    weight's dtype) before the next starts: no [V, H] fp32 buffer for bf16 heads.
    """
    need_x, need_w, need_b = needs
    n, H = x.shape
    V = weight.shape[0]
    grad_x = torch.zeros(n, H, dtype=torch.float32, device=x.device) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    single_row_chunk = n <= row_chunk
    for c0, c1 in chunks(V, col_chunk):
        w_c = weight[c0:c1]
        # One row chunk: grad_W[c] is a single GEMM over all tokens (fp32 accumulation inside the
        # GEMM, one rounding), written in place when dz, x and grad_W share a dtype.
        direct = need_w and single_row_chunk and grad_w.dtype == x.dtype
        acc_w = None
        if need_w and not direct:
            acc_w = torch.zeros(c1 - c0, H, dtype=torch.float32, device=x.device)
        acc_b = torch.zeros(c1 - c0, dtype=torch.float32, device=x.device) if need_b else None
        for r0, r1 in chunks(n, row_chunk):
            dz = make_dz(r0, r1, c0, c1)
            if need_x:
                mm_accumulate(grad_x[r0:r1], dz, w_c)
            if direct:
                torch.mm(dz.t(), x[r0:r1], out=grad_w[c0:c1])
            elif need_w:
                mm_accumulate(acc_w, dz.t(), x[r0:r1])
            if need_b:
                acc_b += dz.sum(0, dtype=torch.float32)
        if acc_w is not None:
            grad_w[c0:c1].copy_(acc_w)
        if need_b:
            grad_b[c0:c1].copy_(acc_b)
    if n == 0:
        if need_w:
            grad_w.zero_()
        if need_b:
            grad_b.zero_()
    return grad_x, grad_w, grad_b
