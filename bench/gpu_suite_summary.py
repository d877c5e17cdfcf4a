"""Summary of one `bench/gpu_suite.sh` run: the issue's ratios, targets met or not, MFU; a table and one JSON line.

    python bench/gpu_suite_summary.py OUT_DIR [--seconds N]

Reads the last JSON line of OUT_DIR/checks.txt, moe_layer.txt and train_step_<backend>.txt. The
layer compared with DeepSpeed and the dense limit is `dropless_fused` where it ran, else
`dropless_ref` (named in the output). Targets (issue 21, ratios from one run): ours ≥ 3× DeepSpeed
stock at d1024/f4096/E8/k2; ours ≥ 0.8× the dense limit at every issue shape; modality_bias within
2% of agnostic; end-to-end MFU ≥ 35% (the dropless backend). Balanced routing rows.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def last_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seconds", type=int, default=None)
    args = parser.parse_args()
    checks, layer = last_json(args.out_dir / "checks.txt"), last_json(args.out_dir / "moe_layer.txt")
    steps = {b: last_json(args.out_dir / f"train_step_{b}.txt") for b in ("torch", "deepspeed", "dropless")}
    summary: dict = {"bench": "gpu_suite", "seconds": args.seconds, "device": (layer or {}).get("device"),
                     "versions": {k: (layer or {}).get(k) for k in ("torch", "cuda", "deepspeed", "triton")},
                     "checks_ok": None, "shapes": {}, "mfu": {}, "targets": {}}
    if checks:
        summary["checks_ok"] = all(c["ok"] for shape in checks["checks"].values() for c in shape.values())
    print(f"gpu_suite: device {summary['device']}, {summary['versions']}, {args.seconds} s; "
          f"numerics checks {'ok' if summary['checks_ok'] else 'FAILED or missing'}")
    print(f"{'shape':<20} {'routing':<9} {'ours':<15} {'TFLOP/s':>8} {'x DS stock':>10} {'x DS dropless':>13} "
          f"{'x dense':>8} {'mb/agn':>7} {'syncs fwd':>9}")
    for row in (layer or {}).get("rows", []):
        r = row["results"]
        ours = "dropless_fused" if "dropless_fused" in r else "dropless_ref"
        if ours not in r:
            continue
        ratio = lambda name: r[name]["ms"] / r[ours]["ms"] if name in r else None  # noqa: E731
        bias = r["dropless_modality_bias"]["ms"] / r[ours]["ms"] if "dropless_modality_bias" in r else None
        syncs = r[ours].get("host_syncs", {}).get("forward")
        entry = {"ours": ours, "tflops": r[ours]["tflops"], "x_deepspeed_stock": ratio("deepspeed_stock"),
                 "x_deepspeed_dropless": ratio("deepspeed_dropless"), "x_dense": ratio("dense"),
                 "modality_bias_time_over_agnostic": bias, "forward_host_syncs": syncs}
        summary["shapes"][f"{row['shape']} {row['routing']}"] = entry
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"{row['shape']:<20} {row['routing']:<9} {ours:<15} {entry['tflops']:>8.1f} "
              f"{fmt(entry['x_deepspeed_stock']):>10} {fmt(entry['x_deepspeed_dropless']):>13} "
              f"{fmt(entry['x_dense']):>8} {fmt(bias):>7} {'-' if syncs is None else syncs:>9}")
    for backend, step in steps.items():
        if step:
            summary["mfu"][backend] = step["mfu"]
            mfu = "-" if step["mfu"] is None else f"{step['mfu']:.1%}"
            print(f"train_step {backend:<10} {step['tokens_per_s']:>10.0f} tokens/s  MFU {mfu}")
    shapes = summary["shapes"]
    main_shape = shapes.get("d1024/f4096/E8/k2 balanced")
    targets = summary["targets"]
    if main_shape and main_shape["x_deepspeed_stock"] is not None:
        targets["3x_deepspeed_stock_d1024_f4096_E8_k2"] = main_shape["x_deepspeed_stock"] >= 3.0
    dense = {k: v["x_dense"] for k, v in shapes.items() if k.endswith("balanced") and v["x_dense"] is not None}
    if dense:
        targets["0.8x_dense_every_shape"] = all(v >= 0.8 for v in dense.values())
    bias = [v["modality_bias_time_over_agnostic"] for k, v in shapes.items() if k.endswith("balanced")
            and v["modality_bias_time_over_agnostic"] is not None]
    if bias:
        targets["modality_bias_within_2pct"] = all(v <= 1.02 for v in bias)
    if summary["mfu"].get("dropless") is not None:
        targets["mfu_35pct"] = summary["mfu"]["dropless"] >= 0.35
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
