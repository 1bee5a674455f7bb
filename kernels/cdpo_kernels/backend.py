"""The one switch between the Triton kernels and the chunked torch path.

``"auto"`` picks Triton for CUDA tensors (when Triton is installed) and the chunked torch path
otherwise. ``"triton"`` forces the kernels; on CPU tensors that only works under the Triton
interpreter (``TRITON_INTERPRET=1`` set before Triton is imported), which is how CI checks them.
``"torch"`` forces the chunked torch path everywhere. Both paths compute the same quantities with
the same tiling arithmetic (fp32 logits, online log-sum-exp over vocabulary tiles).

Triton is imported lazily, on first use of the Triton path, so that importing this package never
fixes the interpreter setting behind the caller's back.
"""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch")

_default = os.environ.get("CDPO_KERNELS_BACKEND", "auto")


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    return name


_check(_default)


def set_backend(name: str) -> None:
    """Set the process-wide default backend: "auto", "triton" or "torch"."""
    global _default
    _default = _check(name)


def get_backend() -> str:
    return _default


@contextmanager
def use_backend(name: str):
    """Temporarily switch the default backend (restored on exit)."""
    global _default
    previous, _default = _default, _check(name)
    try:
        yield
    finally:
        _default = previous


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(device: torch.device, backend: str | None = None) -> str:
    """The concrete path ("triton" or "torch") for tensors on ``device``."""
    name = _check(backend or _default)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but Triton is not installed")
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before Triton is imported"
            )
    return name


def implementation(device: torch.device, backend: str | None = None) -> ModuleType:
    """The tile module for ``device``: both expose the same functions with the same signatures."""
    if resolve(device, backend) == "triton":
        from . import triton_tiles

        return triton_tiles
    from . import torch_tiles

    return torch_tiles
