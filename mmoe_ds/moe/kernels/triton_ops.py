"""Triton kernels of index dispatch, each wrapped in an autograd Function (conventions: `reference`).

Every kernel is a gather: one program per output row (or route) and block of columns, reading
its inputs by index and writing only its own output, so results are deterministic and no
atomics are needed. The backward of the row permutation sums a token's k gradient rows
(found through `inverse`), the backward of the combine gathers each kept route's gradient row
(found through `order`). Inputs are loaded in their own dtype and upcast to fp32 inside the
kernel; sums and SwiGLU math are fp32, outputs are stored in the input's dtype.

Fixed launch configurations (no autotuning): block = the next power of two of the row width,
at most 1024 columns; 4 warps (8 from 2048 columns up). The language used is kept to what
Triton 3.6 (the GPU machine's) and 3.9 (CI's, interpreter and AOT compile) both have.
Row indices must fit int32 (K·S < 2^31 routes); element offsets are int64. A route that is not
kept (inverse -1) is masked with `cols * 0 + pos >= 0`: a vector mask (the interpreter rejects a
scalar one combined with the column mask), and row 0 is never read for it (y may have no rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK = 1024


def launch_config(width: int) -> tuple[int, int]:
    """(BLOCK columns, num_warps) for rows of `width` elements."""
    block = min(MAX_BLOCK, triton.next_power_of_2(max(width, 16)))
    return block, 8 if block >= 2048 else 4


@triton.jit
def gather_rows_kernel(x_ptr, src_ptr, out_ptr, D, BLOCK: tl.constexpr):
    """out[r, :] = x[src[r], :]."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    src = tl.load(src_ptr + row).to(tl.int64)
    values = tl.load(x_ptr + src * D + cols, mask=mask)
    tl.store(out_ptr + row.to(tl.int64) * D + cols, values, mask=mask)


@triton.jit
def sum_routes_kernel(g_ptr, inverse_ptr, out_ptr, S, D, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[s, :] = Σ_k g[inverse[k, s], :] over routes with inverse >= 0 (fp32 sum)."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(inverse_ptr + k * S + s).to(tl.int64)
        row = tl.load(g_ptr + tl.maximum(pos, 0) * D + cols, mask=mask & (cols * 0 + pos >= 0), other=0.0)
        acc += row.to(tl.float32)
    tl.store(out_ptr + s.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_fwd_kernel(h_ptr, out_ptr, F, BLOCK: tl.constexpr):
    """out[r, :] = silu(h[r, :F]) · h[r, F:] in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    out = a * tl.sigmoid(a) * b
    tl.store(out_ptr + row * F + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(h_ptr, g_ptr, dh_ptr, F, BLOCK: tl.constexpr):
    """dh[r, :F] = g·b·σ(a)·(1 + a(1 - σ(a))), dh[r, F:] = g·silu(a), in fp32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    a = tl.load(h_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(h_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(a)
    da = g * b * sig * (1.0 + a * (1.0 - sig))
    db = g * a * sig
    tl.store(dh_ptr + row * 2 * F + cols, da.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * 2 * F + F + cols, db.to(dh_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_fwd_kernel(y_ptr, w_ptr, inverse_ptr, out_ptr, S, D, K: tl.constexpr, BLOCK: tl.constexpr):
    """out[s, :] = Σ_k w[k, s] · y[inverse[k, s], :] over routes with inverse >= 0 (fp32 sum)."""
    s = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in tl.static_range(K):
        pos = tl.load(inverse_ptr + k * S + s).to(tl.int64)
        w = tl.load(w_ptr + k * S + s).to(tl.float32)
        y = tl.load(y_ptr + tl.maximum(pos, 0) * D + cols, mask=mask & (cols * 0 + pos >= 0), other=0.0).to(tl.float32)
        acc += w * y
    tl.store(out_ptr + s.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_bwd_rows_kernel(g_ptr, w_ptr, order_ptr, dy_ptr, S, D, BLOCK: tl.constexpr):
    """dy[r, :] = w[route] · g[route % S, :] for the route route = order[r] held by row r."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    route = tl.load(order_ptr + row).to(tl.int64)
    w = tl.load(w_ptr + route).to(tl.float32)
    g = tl.load(g_ptr + (route % S) * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dy_ptr + row.to(tl.int64) * D + cols, (w * g).to(dy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def combine_bwd_weights_kernel(g_ptr, y_ptr, inverse_ptr, dw_ptr, S, D, BLOCK: tl.constexpr):
    """dw[i] = <g[i % S, :], y[inverse[i], :]> for route i (0 where inverse is -1), fp32, fixed order."""
    route = tl.program_id(0)
    s = (route % S).to(tl.int64)
    pos = tl.load(inverse_ptr + route).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        g = tl.load(g_ptr + s * D + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + tl.maximum(pos, 0) * D + cols, mask=mask & (cols * 0 + pos >= 0), other=0.0).to(tl.float32)
        acc += g * y
    tl.store(dw_ptr + route, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty))


def _launch(kernel, rows: int, width: int, *args, K: int | None = None) -> None:
    """`kernel` over a (rows, column blocks) grid in the fixed configuration for `width`; nothing to do
    for no rows or no columns. K (routes per token) is a compile-time constant: the loop over a
    token's routes is unrolled (one compiled variant per top-k)."""
    if rows and width:
        block, warps = launch_config(width)
        extra = {} if K is None else {"K": K}
        kernel[(rows, triton.cdiv(width, block))](*args, **extra, BLOCK=block, num_warps=warps)


class GatherRows(torch.autograd.Function):
    """out[r] = x[src[r]]; backward: grad_x[s] = Σ_k grad[inverse[k, s]] (no atomics)."""

    @staticmethod
    def forward(ctx, x: Tensor, src: Tensor, inverse: Tensor) -> Tensor:
        x = x.contiguous()
        out = x.new_empty(src.shape[0], x.shape[1])
        _launch(gather_rows_kernel, out.shape[0], x.shape[1], x, src, out, x.shape[1])
        ctx.save_for_backward(inverse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        grad = grad.contiguous()
        K, S = inverse.shape
        out = grad.new_empty(S, grad.shape[1])
        _launch(sum_routes_kernel, S, grad.shape[1], grad, inverse, out, S, grad.shape[1], K=K)
        return out, None, None


class SwiGLU(torch.autograd.Function):
    """silu(a) · b of h13 = [a | b], fp32 math."""

    @staticmethod
    def forward(ctx, h13: Tensor) -> Tensor:
        h13 = h13.contiguous()
        N, f = h13.shape[0], h13.shape[1] // 2
        out = h13.new_empty(N, f)
        _launch(swiglu_fwd_kernel, N, f, h13, out, f)
        ctx.save_for_backward(h13)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (h13,) = ctx.saved_tensors
        N, f = h13.shape[0], h13.shape[1] // 2
        dh = torch.empty_like(h13)
        _launch(swiglu_bwd_kernel, N, f, h13, grad.contiguous(), dh, f)
        return dh


class Combine(torch.autograd.Function):
    """out[s] = Σ_k weight[k, s] · y[inverse[k, s]]; backward gives grad_y (gathered through
    `order`) and grad_weight (one fp32 dot product per route)."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, inverse: Tensor, order: Tensor) -> Tensor:
        y, weight = y.contiguous(), weight.contiguous()
        K, S = inverse.shape
        D = y.shape[1]
        out = y.new_empty(S, D)
        _launch(combine_fwd_kernel, S, D, y, weight, inverse, out, S, D, K=K)
        ctx.save_for_backward(y, weight, inverse, order)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, weight, inverse, order = ctx.saved_tensors
        grad = grad.contiguous()
        K, S = inverse.shape
        D = y.shape[1]
        dy = dw = None
        if ctx.needs_input_grad[0]:
            dy = torch.empty_like(y)
            _launch(combine_bwd_rows_kernel, y.shape[0], D, grad, weight, order, dy, S, D)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(weight)  # stays 0 without columns
            if dw.numel() and D:
                block, warps = launch_config(D)
                combine_bwd_weights_kernel[(K * S,)](grad, y, inverse, dw, S, D, BLOCK=block, num_warps=warps)
        return dy, dw, None, None


def gather_rows(x: Tensor, src: Tensor, inverse: Tensor) -> Tensor:
    return GatherRows.apply(x, src, inverse)


def swiglu(h13: Tensor) -> Tensor:
    return SwiGLU.apply(h13)


def combine(y: Tensor, weight: Tensor, inverse: Tensor, order: Tensor) -> Tensor:
    return Combine.apply(y, weight, inverse, order)
