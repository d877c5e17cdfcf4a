"""Index-dispatch kernels: the torch reference and fused Triton versions of the same three ops.

`ops_for(tensor)` picks the implementation: Triton on CUDA devices of compute capability 9.0
or newer (H100/H200) when Triton imports, the torch reference everywhere else (never Triton on
the CPU: there the kernels run only under TRITON_INTERPRET=1, in the tests).
"""
from __future__ import annotations

import functools
from types import ModuleType

import torch

from . import reference


@functools.lru_cache(maxsize=None)
def load_triton() -> ModuleType | None:
    """The Triton module, or None where Triton does not import (no wheel for this platform)."""
    try:
        from . import triton_ops as ops
    except ImportError:
        return None
    return ops


@functools.lru_cache(maxsize=None)
def _fused_device(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and load_triton() is not None


def ops_for(x: torch.Tensor, fused: bool | None = None) -> ModuleType:
    """The module whose `gather_rows`, `swiglu`, `combine` run on x's device.

    fused: None chooses (Triton on CUDA sm90+), True requires Triton (a clear error if it cannot
    run here), False forces the torch reference.
    """
    if fused is None:
        fused = x.is_cuda and _fused_device(x.device.index)
    if not fused:
        return reference
    ops = load_triton()
    if ops is None:
        raise RuntimeError("fused index-dispatch kernels need Triton (pip install triton); pass fused=None or False.")
    return ops
