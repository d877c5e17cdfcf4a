"""Torch reference of the three memory-bound steps of index dispatch (autograd by torch).

Shared conventions (the Triton kernels in `triton_ops` follow them exactly):
  * routes are the flattened [K, S] routing tensors: route i = k·S + s belongs to token s;
  * `order` [N] lists the kept routes sorted by expert (N = kept routes), so row r of the
    permuted buffer holds token `order[r] % S`;
  * `inverse` [K, S] is the row of each route in that buffer, -1 for routes that were not kept
    (a token's k beyond its modality's top-k);
  * `w13` rows are [w1; w3]: the first half of an expert's first GEMM output is the gate
    projection, the second half the up projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_rows(x: Tensor, src: Tensor, inverse: Tensor) -> Tensor:
    """out[r] = x[src[r]]; `inverse` [K, len(x)] (unused here) is what the fused backward reads."""
    return x[src]


def swiglu(h13: Tensor) -> Tensor:
    """silu(a) · b for h13 = [a | b] [N, 2f] -> [N, f], in fp32, returned in h13's dtype."""
    a, b = h13.float().chunk(2, dim=-1)
    return (F.silu(a) * b).to(h13.dtype)


def combine(y: Tensor, weight: Tensor, inverse: Tensor, order: Tensor) -> Tensor:
    """out[s] = Σ_k weight[k, s] · y[inverse[k, s]] (routes with inverse -1 add nothing), fp32 sums.

    `order` (unused here) is what the fused backward reads. Returned in y's dtype.
    """
    padded = torch.cat([y.float(), y.new_zeros(1, y.shape[1], dtype=torch.float32)])  # row -1: zeros
    return (padded[inverse] * weight.float()[..., None]).sum(0).to(y.dtype)
