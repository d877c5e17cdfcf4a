"""One MoE layer, fwd+bwd: dense-GEMM limit vs DeepSpeed's stock MoE vs mmoe-ds (dropless, grouped GEMM).

    python bench/moe_layer.py                      # GPU: the three issue shapes, 16,384 tokens, bf16
    python bench/moe_layer.py --device cpu --tokens 512 --shapes small --dtype float32   # smoke run

TFLOP/s count the useful expert work only, the same for every row: 3 GEMMs of a SwiGLU expert,
2·tokens·k·d·f FLOPs each, ×3 for forward+backward. The dense row runs one SwiGLU FFN over
tokens·k rows (the same FLOPs as one big GEMM chain). Times are medians over --iters after
--warmup; ratios are within this run. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SHAPES = {"issue": [(1024, 4096, 8, 2), (2048, 8192, 16, 2), (1024, 2816, 64, 8)],
          "small": [(64, 128, 8, 2), (64, 96, 16, 4)]}


def timed(fn, warmup: int, iters: int, device: str) -> tuple[float, float]:
    """(median ms, peak extra MiB) of fn() = forward + backward."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), float("nan")


def fwd_bwd(module, x, *args):
    def step():
        x.grad = None
        out = module(x, *args)
        out = out[0] if isinstance(out, tuple) else out
        out.float().square().mean().backward()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(k, v)
    import deepspeed
    from deepspeed.moe.layer import MoE

    from mmoe_ds.moe import ExpertFFN, RouterConfig, TorchMoE

    if args.device == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo")
    dtype = getattr(torch, args.dtype)
    T = args.tokens
    rows = []
    for d, f, E, k in SHAPES[args.shapes]:
        flops = 3 * 3 * 2 * T * k * d * f
        x = torch.randn(T, d, device=args.device, dtype=dtype, requires_grad=True)
        modality = (torch.arange(T, device=args.device) >= T // 2).long()  # half image, half text
        variants = {"dense": (ExpertFFN(d, f), (torch.randn(T * k, d, device=args.device, dtype=dtype, requires_grad=True),))}
        torch.manual_seed(0)
        ds = MoE(hidden_size=d, expert=ExpertFFN(d, f), num_experts=E, ep_size=1, k=k, capacity_factor=1.25,
                 eval_capacity_factor=1.25, min_capacity=0, drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        ds.set_deepspeed_parallelism()
        variants["deepspeed_stock"] = (ds, (x,))
        half = list(range(E // 2)), list(range(E // 2, E))
        for mode in ("agnostic", "modality_bias", "masked_pools"):
            cfg = RouterConfig(num_experts=E, mode=mode, top_k=k, drop_tokens=False,
                               pools={"image": half[0], "text": half[1]} if mode == "masked_pools" else None)
            variants[f"mmoe_{mode}"] = (TorchMoE(cfg, d, f), (x, modality))
        results = {}
        for name, (module, inputs) in variants.items():
            module.to(args.device, dtype)
            ms, mib = timed(fwd_bwd(module, *inputs), args.warmup, args.iters, args.device)
            results[name] = {"ms": ms, "tflops": flops / ms / 1e9, "peak_mib": mib}
            del module
        for name, r in results.items():
            r["vs_dense"] = results["dense"]["ms"] / r["ms"]
            r["vs_deepspeed"] = results["deepspeed_stock"]["ms"] / r["ms"]
        rows.append({"shape": f"d{d}/f{f}/E{E}/k{k}", "results": results})
    print(f"{'shape':<22} {'variant':<22} {'ms':>9} {'TFLOP/s':>9} {'x dense':>8} {'x DS':>7} {'peak MiB':>9}")
    for row in rows:
        for name, r in row["results"].items():
            print(f"{row['shape']:<22} {name:<22} {r['ms']:>9.2f} {r['tflops']:>9.2f} {r['vs_dense']:>8.2f} "
                  f"{r['vs_deepspeed']:>7.2f} {r['peak_mib']:>9.0f}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"bench": "moe_layer", "device": device, "tokens": T, "dtype": args.dtype, "torch": torch.__version__,
                      "deepspeed": deepspeed.__version__, "flops_convention": "3 GEMMs x 2*T*k*d*f x 3 (fwd+bwd)",
                      "rows": rows}))


if __name__ == "__main__":
    main()
