"""Where the modality_bias router's extra time goes: one DroplessMoE layer, agnostic vs modality_bias.

    python bench/router_profile.py                      # GPU: d1024/f4096/E8/k2 and d1024/f2816/E64/k8, bf16
    python bench/router_profile.py --device cpu --tokens 256 --shapes small --dtype float32 --top 8   # smoke

For each shape and router mode: fwd+bwd median ms (bench/moe_layer.py's timing and inputs: half image,
half text tokens, random gate), then torch.profiler's table of the `--top` kernels by device time for one
step, and the ops whose total device time differs most between the two modes. Prints tables and one
JSON line (ms per mode and the largest per-op differences).
"""
from __future__ import annotations

import argparse
import json

import torch
from moe_layer import SHAPES, build, construct, init_distributed, timed, training_step


def profile_step(step, device: str):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    return prof.key_averages()


def device_us(event, device: str) -> float:
    return float(getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0))) if device == "cuda" \
        else float(event.cpu_time_total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--shapes", default="issue", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    init_distributed(args.device)
    dtype, T = getattr(torch, args.dtype), args.tokens
    shapes = [s for s in SHAPES[args.shapes] if args.shapes != "issue" or s[2] in (8, 64)]
    record = {"bench": "router_profile", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "tokens": T, "dtype": args.dtype, "shapes": {}}
    for d, f, E, k in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, d, generator=g).to(args.device, dtype)
        modality = (torch.randperm(T, generator=g) >= T // 2).long().to(args.device)
        per_mode, ops = {}, {}
        for name in ("dropless_fused" if args.device == "cuda" else "dropless_ref", "dropless_modality_bias"):
            torch.manual_seed(0)
            module, forward = construct(args.device, lambda: build(name, d, f, E, k, 1))
            module.to(args.device, dtype)
            step = training_step(module, forward, x.clone().requires_grad_(True), modality)
            ms, _ = timed(step, args.warmup, args.iters, args.device, lambda: None)
            events = profile_step(step, args.device)
            mode = "modality_bias" if name.endswith("modality_bias") else "agnostic"
            per_mode[mode] = ms
            ops[mode] = {e.key: device_us(e, args.device) for e in events}
            print(f"== d{d}/f{f}/E{E}/k{k} {mode}: {ms:.2f} ms fwd+bwd (median of {args.iters})")
            sort = "cuda_time_total" if args.device == "cuda" else "cpu_time_total"
            print(events.table(sort_by=sort, row_limit=args.top, max_name_column_width=70))
        diff = sorted(((ops["modality_bias"].get(k_, 0.0) - ops["agnostic"].get(k_, 0.0), k_)
                       for k_ in set(ops["modality_bias"]) | set(ops["agnostic"])), reverse=True)
        top = [(k_, round(v / 1e3, 3)) for v, k_ in diff[:args.top]]
        print(f"-- d{d}/f{f}/E{E}/k{k}: ops with the most extra time under modality_bias "
              "(ms; totals include children):")
        for key, v in top:
            print(f"   {v:+8.3f}  {key}")
        record["shapes"][f"d{d}/f{f}/E{E}/k{k}"] = {"ms": per_mode, "extra_ms_by_op": top}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
