"""The markdown tables of one `bench/gpu_suite.sh` run, as docs/benchmarks.md quotes them.

    python bench/gpu_suite_tables.py runs/gpu_suite/2026-12-04-h200

Reads the run's moe_layer.txt, summary.json and train_step_<backend>.txt (their last JSON lines) and
prints three tables: every layer row (ms, TFLOP/s of useful expert work, peak MiB, stock's drops),
the issue's targets as ratios from that run, and the training step of recipes/gpu_node.json per
backend. tests/test_benchmarks_doc.py checks that docs/benchmarks.md holds exactly this output.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYER_VARIANTS = ("dense", "grouped_gemm", "deepspeed_stock", "deepspeed_dropless", "mmoe_agnostic", "mmoe_ds_adapter",
                  "dropless_ref", "dropless_fused", "dropless_modality_bias")
TARGETS = {"3x_deepspeed_stock_d1024_f4096_E8_k2": "ours ≥ 3× DeepSpeed stock at d1024/f4096/E8/k2",
           "0.8x_dense_every_shape": "ours ≥ 0.8× the dense limit at every issue shape",
           "modality_bias_within_2pct": "modality_bias within 2% of agnostic (time ratio ≤ 1.02)",
           "mfu_35pct": "end-to-end MFU ≥ 35% (recipes/gpu_node.json, dropless)"}


def last_json(path: Path) -> dict:
    return json.loads([line for line in path.read_text().splitlines() if line.startswith("{")][-1])


def tables(run: Path) -> str:
    layer, summary = last_json(run / "moe_layer.txt"), last_json(run / "summary.json")
    out = [f"{layer['device']}, torch {layer['torch']}, CUDA {layer['cuda']}, DeepSpeed {layer['deepspeed']}, "
           f"Triton {layer['triton']}; {layer['tokens_per_rank']:,} tokens, {layer['dtype']}, fwd+bwd, median of "
           f"{layer['iters']} after {layer['warmup']} warm-up steps. Each cell: ms / TFLOP/s of useful expert work.",
           "", "| shape | routing | " + " | ".join(f"`{v}`" for v in LAYER_VARIANTS) + " | stock drops |",
           "|---|---|" + "---|" * (len(LAYER_VARIANTS) + 1)]
    for row in layer["rows"]:
        r = row["results"]
        cells = [f"{r[v]['ms']:.2f} / {r[v]['tflops']:.0f}" if v in r else "-" for v in LAYER_VARIANTS]
        out.append(f"| {row['shape']} | {row['routing']} | " + " | ".join(cells)
                   + f" | {r['deepspeed_stock']['dropped']:.1%} |")
    out += ["", "Peak MiB above the parameters (activations, gradients, workspace), same run:", "",
            "| shape | routing | `deepspeed_stock` | `deepspeed_dropless` | `dropless_ref` | `dropless_fused` |",
            "|---|---|---|---|---|---|"]
    for row in layer["rows"]:
        r = row["results"]
        out.append(f"| {row['shape']} | {row['routing']} | " + " | ".join(
            f"{r[v]['peak_mib']:.0f}" if v in r else "-"
            for v in ("deepspeed_stock", "deepspeed_dropless", "dropless_ref", "dropless_fused")) + " |")
    out += ["", "The issue's targets, as ratios from this run (balanced routing; ours = `dropless_fused`):", "",
            "| target | measured | met |", "|---|---|---|"]
    shapes = summary["shapes"]
    for name, what in TARGETS.items():
        if name not in summary["targets"]:
            continue
        if name.startswith("3x"):
            value = f"{shapes['d1024/f4096/E8/k2 balanced']['x_deepspeed_stock']:.2f}×"
        elif name.startswith("0.8x"):
            value = ", ".join(f"{k.split()[0]} {v['x_dense']:.2f}×" for k, v in shapes.items()
                              if k.endswith("balanced"))
        elif name.startswith("modality"):
            value = ", ".join(f"{k.split()[0]} {v['modality_bias_time_over_agnostic']:.2f}"
                              for k, v in shapes.items() if k.endswith("balanced"))
        else:
            value = f"{summary['mfu']['dropless']:.1%}"
        out.append(f"| {what} | {value} | {'yes' if summary['targets'][name] else 'no'} |")
    out += ["", "`bench/train_step.py` on `recipes/gpu_node.json` (one GPU, bf16), per MoE backend:", "",
            "| backend | params (M) | step ms | tokens/s | MFU |", "|---|---|---|---|---|"]
    for backend in ("torch", "deepspeed", "dropless"):
        step = last_json(run / f"train_step_{backend}.txt")
        out.append(f"| `{backend}` | {step['params'] / 1e6:.1f} | {step['step_ms']:.1f} | "
                   f"{step['tokens_per_s']:,.0f} | "
                   f"{step['mfu']:.1%} |")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a gpu_suite output folder (e.g. runs/gpu_suite/2026-12-04-h200)")
    print(tables(parser.parse_args().run), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
