"""Small helpers for the kernel tests and the benchmark: random problems and error measures."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm()
    return (a - e).norm().item() / denom.item() if denom > 0 else (a - e).norm().item()


def random_problem(B=2, T=11, H=40, V=150, *, dtype=torch.float32, bias=False, seed=0, masked=0.3,
                   scale=0.3):
    """Hidden states, head, labels and a mask with holes (labels -100 there) plus non-uniform weights.

    Values are rounded to ``dtype`` first, so float64 references see exactly the kernel's inputs.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = (scale * torch.randn(V, H, generator=g)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) >= masked
    mask[:, 0] = True  # every row scores at least one token
    labels = labels.masked_fill(~mask, -100)
    weights = torch.rand(B, T, generator=g) * 2
    weights = weights.masked_fill(~mask, float("nan"))  # must never leak from masked slots
    return dict(hidden=hidden, weight=weight, bias=b, labels=labels, mask=mask, weights=weights)


def leaf(*tensors):
    """Fresh leaves requiring grad (None passes through)."""
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
