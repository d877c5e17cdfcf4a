"""Started by tests/test_triton_kernels.py with TRITON_INTERPRET=1 (it must be set before Triton is
first imported, and DeepSpeed imports Triton, so the checks run in a fresh process).

Each case runs one fused op (mmoe_ds/moe/kernels/triton_ops.py) on the CPU through the
interpreter and the torch reference (mmoe_ds/moe/kernels/reference.py) in float64 on the same
values, with the same upstream gradient, and records the largest relative error of the output
and of every input gradient, and the dtypes. Results go to the JSON file named by --out.
"""
from __future__ import annotations

import argparse
import json

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROUTE_SHAPES = [(7, 2, 40), (5, 3, 1040), (0, 2, 24)]  # (tokens S, routes per token K, width): masking, 2 blocks, empty
SWIGLU_SHAPES = [(6, 24), (3, 1030), (0, 16)]  # (rows, f)


def cases() -> list[str]:
    names = [f"gather_rows/{s}x{k}x{d}" for s, k, d in ROUTE_SHAPES] + [f"swiglu/{n}x{f}" for n, f in SWIGLU_SHAPES]
    names += [f"combine/{s}x{k}x{d}" for s, k, d in ROUTE_SHAPES]
    return [f"{name}/{dtype}" for name in names for dtype in DTYPES]


def routes(S: int, K: int, E: int, seed: int, drop_every: int = 3):
    """(order [N], inverse [K, S]) of random routes sorted by expert; every drop_every-th route not kept."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randint(0, E, (K, S), generator=g).reshape(-1)
    index[::drop_every] = -1
    key = torch.where(index >= 0, index, E)
    kept = int((index >= 0).sum())
    order = torch.argsort(key, stable=True)[:kept]
    inverse = torch.full((K * S,), -1, dtype=torch.int64)
    inverse[order] = torch.arange(kept)
    return order, inverse.view(K, S)


def inputs_of(case: str):
    """(op name, [data (run in the case's dtype), gates (fp32)...], index arguments)."""
    op, shape, _ = case.split("/")
    dims = [int(v) for v in shape.split("x")]
    g = torch.Generator().manual_seed(sum(dims) + len(op))
    if op == "swiglu":
        n, f = dims
        return op, [torch.randn(n, 2 * f, generator=g) * 3], ()
    S, K, D = dims
    order, inverse = routes(S, K, E=3, seed=S * 7 + D)
    if op == "gather_rows":
        return op, [torch.randn(S, D, generator=g)], (order % max(S, 1), inverse)
    y = torch.randn(order.numel(), D, generator=g)
    weight = torch.rand(K, S, generator=g) * (inverse >= 0)  # 0 where the route is not kept
    return op, [y, weight], (inverse, order)


def run(fn, inputs, extra, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves, *extra)
    if upstream is None:
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(upstream.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves], upstream


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.shape != expected.shape:
        return float("inf")
    if expected.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp(min=1e-12)
    return float((actual.double() - expected.double()).abs().max() / scale)


def check(case: str, reference, fused) -> dict:
    op, inputs, extra = inputs_of(case)
    dtype = DTYPES[case.rsplit("/", 1)[1]]
    typed = [inputs[0].to(dtype)] + inputs[1:]  # the reference sees the same (rounded) values in float64
    out64, grads64, upstream = run(getattr(reference, op), [t.double() for t in typed], extra, None)
    out, grads, _ = run(getattr(fused, op), typed, extra, upstream)
    return {"out": rel_err(out, out64), "grads": [rel_err(a, b) for a, b in zip(grads, grads64)],
            "out_dtype": str(out.dtype), "grad_dtypes": [str(g.dtype) for g in grads],
            "input_dtypes": [str(t.dtype) for t in typed], "out_shape": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from triton.runtime.interpreter import InterpretedFunction

    from mmoe_ds.moe.kernels import reference, triton_ops

    if not isinstance(triton_ops.gather_rows_kernel, InterpretedFunction):
        raise SystemExit("TRITON_INTERPRET=1 must be set before Triton is imported")
    results = {case: check(case, reference, triton_ops) for case in cases()}
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
