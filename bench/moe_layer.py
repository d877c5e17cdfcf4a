"""One MoE layer, fwd+bwd: dense-GEMM limit vs DeepSpeed's stock MoE vs mmoe-ds (dropless, grouped GEMM).

    python bench/moe_layer.py                      # GPU: the three issue shapes, 16,384 tokens, bf16
    python bench/moe_layer.py --device cpu --tokens 512 --shapes small --dtype float32   # smoke run

One process, no launcher (RANK/WORLD_SIZE/MASTER_* are set here if unset). Variants, per shape:
  dense             one SwiGLU FFN over tokens*k rows: the same GEMM FLOPs, no routing (the limit)
  deepspeed_stock   deepspeed.moe.layer.MoE, capacity factor 1.25, 2nd-expert sampling off
  mmoe_<mode>       mmoe_ds.moe.TorchMoE, dropless, grouped GEMM, modes agnostic/modality_bias/masked_pools
  mmoe_ds_adapter   mmoe_ds.moe.deepspeed_layer.DeepSpeedMoE (agnostic, dropless): the expert-parallel
                    path at ep_size 1 (DeepSpeed's dispatch, capacity = largest expert load, batched bmm)
TFLOP/s count the useful expert work only, the same for every row: 3 GEMMs of a SwiGLU expert,
2*tokens*k*d*f FLOPs each, x3 for forward+backward (routing, dropped routes and padding not counted).
Loss = mean(y^2) + the layer's aux loss. Times: CUDA events around each step after --warmup steps,
median of --iters. Peak MiB: peak allocated during the timed steps above what was allocated before
(parameters), i.e. activations, gradients and workspace. Before timing, each shape checks that the
grouped path equals the loop path (forward, input and all weight gradients; norm-relative error,
tolerance 1e-2 in bf16/fp16, 1e-5 in fp32). Prints a table and one JSON line; exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch

SHAPES = {"issue": [(1024, 4096, 8, 2), (2048, 8192, 16, 2), (1024, 2816, 64, 8)],
          "small": [(64, 128, 8, 2), (64, 96, 16, 4)]}
MODES = ("agnostic", "modality_bias", "masked_pools")
CAPACITY_FACTOR = 1.25


def init_distributed(device: str):
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a JIT build used only by inference
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")
    return deepspeed


def router_config(mode: str, E: int, k: int, drop_tokens: bool = False):
    from mmoe_ds.moe import RouterConfig

    pools = {"image": list(range(E // 2)), "text": list(range(E // 2, E))} if mode == "masked_pools" else None
    return RouterConfig(num_experts=E, mode=mode, top_k=k, drop_tokens=drop_tokens, pools=pools)


def build(name: str, d: int, f: int, E: int, k: int):
    """(module, forward(module, x, modality) -> (output, aux loss or None))."""
    from mmoe_ds.moe import ExpertFFN, TorchMoE

    if name == "dense":
        return ExpertFFN(d, f), lambda m, x, mod: (m(x), None)
    if name == "deepspeed_stock":
        from deepspeed.moe.layer import MoE

        layer = MoE(hidden_size=d, expert=ExpertFFN(d, f), num_experts=E, ep_size=1, k=k,
                    capacity_factor=CAPACITY_FACTOR, eval_capacity_factor=CAPACITY_FACTOR, min_capacity=0,
                    drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
        layer.set_deepspeed_parallelism()
        return layer, lambda m, x, mod: m(x)[:2]
    if name == "mmoe_ds_adapter":
        from mmoe_ds.moe.deepspeed_layer import DeepSpeedMoE

        layer = DeepSpeedMoE(router_config("agnostic", E, k), d, f)
        layer.set_deepspeed_parallelism()
        return layer, lambda m, x, mod: m(x, mod)[:2]
    return TorchMoE(router_config(name.removeprefix("mmoe_"), E, k), d, f), lambda m, x, mod: m(x, mod)[:2]


def dropped_fraction(name: str, module, T: int, E: int, k: int) -> float:
    """Share of the T*k routes the last step dropped (DeepSpeed: over its capacity; ours: dropless)."""
    if name == "deepspeed_stock":
        counts = module.deepspeed_moe.exp_counts.float()  # routes per expert before capacity
        capacity = max(math.ceil(T / E * CAPACITY_FACTOR * k), 0)
        return float((counts - capacity).clamp(min=0).sum()) / (T * k)
    if name == "dense":
        return 0.0
    return float(module.last_dropped) / (T * k)


def timed(step, warmup: int, iters: int, device: str, reset) -> tuple[float, float | None]:
    """(median ms, peak MiB above the allocation before the timed steps) of step()."""
    for _ in range(warmup):
        step()
    reset()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), None


def check_grouped_vs_loop(d, f, E, k, x, modality) -> dict:
    """Grouped vs loop path of TorchMoE (agnostic, dropless) on the benchmark's inputs."""
    from mmoe_ds.moe import TorchMoE
    from mmoe_ds.moe.experts import _grouped_mm_supported

    torch.manual_seed(0)
    results = []
    grouped = TorchMoE(router_config("agnostic", E, k), d, f).to(x.device, x.dtype)
    for use_grouped in (True, False):
        grouped.use_grouped = use_grouped
        grouped.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = grouped(xi, modality)
        (out.hidden_states.float().square().mean() + out.aux_loss).backward()
        results.append([("output", out.hidden_states.detach()), ("input grad", xi.grad)]
                       + [(n, p.grad) for n, p in grouped.named_parameters() if p.grad is not None])
    worst, where = 0.0, "-"
    for (name, a), (_, b) in zip(*results):
        err = float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))
        if err > worst:
            worst, where = err, name
    w1 = grouped.deepspeed_moe.experts.stacked("w1")
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    return {"kernel": "grouped_mm" if _grouped_mm_supported(x, w1) else "loop", "max_rel_err": worst,
            "worst": where, "tol": tol, "ok": worst <= tol}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="dense,deepspeed_stock," + ",".join(f"mmoe_{m}" for m in MODES)
                        + ",mmoe_ds_adapter", help="comma-separated subset (default: all)")
    args = parser.parse_args()
    deepspeed = init_distributed(args.device)
    dtype, T, device = getattr(torch, args.dtype), args.tokens, args.device
    names = args.variants.split(",")
    rows, checks = [], {}
    for d, f, E, k in SHAPES[args.shapes]:
        shape = f"d{d}/f{f}/E{E}/k{k}"
        flops = 3 * (3 * 2 * T * k * d * f)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, d, generator=g).to(device, dtype)
        modality = (torch.randperm(T, generator=g) >= T // 2).long().to(device)  # half image (0), half text (1)
        checks[shape] = check_grouped_vs_loop(d, f, E, k, x, modality)
        results = {}
        for name in names:
            torch.manual_seed(0)
            module, forward = build(name, d, f, E, k)
            module.to(device, dtype)
            xi = (torch.randn(T * k, d, generator=g).to(device, dtype) if name == "dense" else x.clone()).requires_grad_(True)

            def step():
                module.zero_grad(set_to_none=True)
                xi.grad = None
                out, aux = forward(module, xi, modality)
                loss = out.float().square().mean()
                (loss if aux is None else loss + aux).backward()

            def reset():
                module.zero_grad(set_to_none=True)
                xi.grad = None

            module.last_dropped = 0
            if name.startswith("mmoe"):
                module.register_forward_hook(lambda m, i, o: setattr(m, "last_dropped", o[2].stats.dropped.sum()))
            ms, mib = timed(step, args.warmup, args.iters, device, reset)
            results[name] = {"ms": ms, "tflops": flops / ms / 1e9, "peak_mib": mib,
                             "dropped": dropped_fraction(name, module, T, E, k)}
            del module, xi
            if device == "cuda":
                torch.cuda.empty_cache()
        for r in results.values():
            r["vs_dense"] = results["dense"]["ms"] / r["ms"] if "dense" in results else None
            r["vs_deepspeed"] = results["deepspeed_stock"]["ms"] / r["ms"] if "deepspeed_stock" in results else None
        rows.append({"shape": shape, "flops": flops, "results": results})

    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    meta = {"bench": "moe_layer", "device": gpu, "tokens": T, "dtype": args.dtype, "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "warmup": args.warmup, "iters": args.iters,
            "capacity_factor_deepspeed": CAPACITY_FACTOR,
            "flops_convention": "useful expert GEMM work: 3 GEMMs x 2*T*k*d*f, x3 for fwd+bwd, same for every row"}
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{gpu}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, {T} tokens, {args.dtype}, "
          f"fwd+bwd, median of {args.iters}; TFLOP/s = 3 GEMMs x 2*T*k*d*f x 3 (fwd+bwd)")
    print(f"{'shape':<20} {'variant':<18} {'ms':>8} {'TFLOP/s':>8} {'x dense':>8} {'x DS':>6} "
          f"{'peak MiB':>9} {'dropped':>8}")
    for row in rows:
        for name, r in row["results"].items():
            print(f"{row['shape']:<20} {name:<18} {r['ms']:>8.2f} {r['tflops']:>8.2f} {fmt(r['vs_dense'], '.2f'):>8} "
                  f"{fmt(r['vs_deepspeed'], '.2f'):>6} {fmt(r['peak_mib'], '.0f'):>9} {r['dropped']:>8.1%}")
    for shape, c in checks.items():
        print(f"check {shape}: grouped ({c['kernel']}) vs loop, max norm-rel err {c['max_rel_err']:.2e} "
              f"({c['worst']}), tol {c['tol']:.0e}: {'ok' if c['ok'] else 'FAIL'}")
    print(json.dumps({**meta, "checks": checks, "rows": rows}))
    return 0 if all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
