"""Train every recipe in recipes/modes/ (same model, data and steps; only the router differs)
and compare: caption loss, text perplexity, caption-ranking accuracy, and how differently the
modalities use the experts (total-variation distance of their expert distributions, 0-100).

    python bench/compare_modes.py [--nproc 2] [--seed 0] [--out runs/modes]

Writes <out>/comparison.json, <out>/comparison.png and prints a markdown table and a JSON line.
One seed per run unless you repeat with --seed: differences of a point or two are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tv_distance(routing_layer: dict) -> float:
    image = np.array(routing_layer["image"]["routed_per_expert"], dtype=float)
    text = np.array(routing_layer["text"]["routed_per_expert"], dtype=float)
    return 50.0 * np.abs(image / max(image.sum(), 1) - text / max(text.sum(), 1)).sum()


def run(recipe: Path, out: Path, nproc: int, seed: int) -> dict:
    raw = json.loads(recipe.read_text())
    raw["train"].update(output_dir=str(out / recipe.stem), seed=seed, progress_bar=False)
    patched = out / f"{recipe.stem}.recipe.json"
    patched.write_text(json.dumps(raw))
    if not (out / recipe.stem / "report" / "routing_report.md").exists():
        subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--module",
                        "mmoe_ds.train", "--recipe", str(patched), "--deepspeed_config",
                        str(REPO / "ds_configs/cpu_zero1_fp32.json")], check=True, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / recipe.stem / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    last_train = [r for r in records if r["kind"] == "train"][-10:]
    tv = [float(np.mean([tv_distance(r["routing"][layer]) for r in last_train])) for layer in range(len(last_train[0]["routing"]))]
    dropped = sum(r["routing"][layer][m]["dropped"] for r in last_train for layer in range(len(tv)) for m in ("image", "text"))
    routed = sum(sum(r["routing"][layer][m]["routed_per_expert"]) for r in last_train for layer in range(len(tv)) for m in ("image", "text"))
    return {"mode": recipe.stem, "caption_rank_acc": final_eval["caption_rank_acc"],
            "caption_loss": final_eval["caption_loss"], "text_ppl": final_eval["text_ppl"],
            "specialization_tv": tv, "dropped_pct": 100.0 * dropped / max(routed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/modes")
    args = parser.parse_args()
    out = Path(args.out) / f"seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(r, out, args.nproc, args.seed) for r in sorted((REPO / "recipes/modes").glob("*.json"))]
    (out / "comparison.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [r["mode"].replace("_", "\n") for r in rows]
    axes[0].bar(names, [100 * r["caption_rank_acc"] for r in rows], color="#4c72b0")
    axes[0].axhline(10, color="gray", ls="--", lw=1)
    axes[0].set_ylabel("caption ranking accuracy (%)")
    for layer in range(len(rows[0]["specialization_tv"])):
        axes[1].bar(np.arange(len(rows)) + 0.4 * layer - 0.2, [r["specialization_tv"][layer] for r in rows], 0.4,
                    label=f"MoE layer {layer + 1}")
    axes[1].set_xticks(range(len(rows)), names)
    axes[1].set_ylabel("image vs text expert usage, TV distance")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    print("| mode | caption rank acc | caption loss | text ppl | specialization TV per MoE layer | dropped % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {100 * r['caption_rank_acc']:.1f}% | {r['caption_loss']:.3f} | {r['text_ppl']:.0f} | "
              f"{', '.join(f'{v:.1f}' for v in r['specialization_tv'])} | {r['dropped_pct']:.2f} |")
    print(json.dumps({"bench": "compare_modes", "seed": args.seed, "rows": rows}))


if __name__ == "__main__":
    main()
