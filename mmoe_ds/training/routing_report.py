"""Routing report: expert utilization by modality per MoE layer, as a PNG and a markdown summary."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..moe.router import RoutingStats


def utilization_percent(stats: RoutingStats) -> np.ndarray:
    """[M, E]: % of each modality's routes that went to each expert (rows sum to 100)."""
    routed = stats.routed.double().cpu().numpy()
    return 100.0 * routed / np.maximum(routed.sum(1, keepdims=True), 1)


def write_routing_report(layer_stats: list[RoutingStats], layer_ids: list[int], modalities: tuple[str, ...],
                         out_dir: str | os.PathLike, title: str = "") -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(layer_stats)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.6 * n), squeeze=False)
    lines = [f"# Routing report{': ' + title if title else ''}", "",
             "Share of each modality's routes per expert (%), tokens dropped by capacity, mean routing entropy,",
             "and the total-variation distance between the modalities' expert distributions (0 = same",
             "experts, 100 = disjoint experts).", ""]
    for ax, stats, layer in zip(axes[:, 0], layer_stats, layer_ids):
        util = utilization_percent(stats)
        E = util.shape[1]
        width = 0.8 / len(modalities)
        for i, m in enumerate(modalities):
            ax.bar(np.arange(E) + (i - (len(modalities) - 1) / 2) * width, util[i], width, label=m)
        ax.set_title(f"layer {layer}")
        ax.set_ylabel("% of modality's routes")
        ax.set_xticks(range(E))
        ax.legend(fontsize=8)
        tv = 50.0 * np.abs(util[0] - util[1]).sum() / 100.0 if len(modalities) == 2 else float("nan")
        tokens = stats.tokens.cpu().tolist()
        dropped, entropy = stats.dropped.cpu().tolist(), stats.entropy.cpu().tolist()
        lines += [f"## Layer {layer}  (specialization TV distance: {tv:.1f})", "",
                  "| modality | tokens | dropped routes | entropy (nats) | "
                  + " | ".join(f"e{e}" for e in range(E)) + " |",
                  "|---|---|---|---|" + "---|" * E]
        for i, m in enumerate(modalities):
            lines.append(f"| {m} | {int(tokens[i])} | {int(dropped[i])} | {entropy[i]:.3f} | "
                         + " | ".join(f"{v:.1f}" for v in util[i]) + " |")
        lines.append("")
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    png, md = out_dir / "routing_report.png", out_dir / "routing_report.md"
    tmp_png = out_dir / ".routing_report.tmp.png"
    fig.savefig(tmp_png, dpi=110)
    plt.close(fig)
    os.replace(tmp_png, png)
    tmp_md = out_dir / ".routing_report.md.tmp"
    tmp_md.write_text("\n".join(lines) + "\n")
    os.replace(tmp_md, md)
    return png, md
