"""The experiments' figures, drawn from a results dict (what results.json holds) and nothing else:
bars are the tables' means with their 95% CI half-widths as whiskers, so a figure shows the numbers
its table prints. `draw` writes an experiment's PNGs (the names its results list under "plots").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mmoe_ds.errors import ExperimentError
from mmoe_ds.moe.config import MODALITIES


def new_figure(ncols: int, nrows: int = 1, width: float = 4.2, height: float = 3.4):
    """A matplotlib figure (Agg backend) with an nrows x ncols grid of axes (always 2-D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)


def save_figure(fig, path: Path) -> str:
    """Save a matplotlib figure atomically as PNG; returns the file name."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path.name


def bar_panel(ax, labels: Sequence[str], summaries: Sequence[dict], ylabel: str, colors=None) -> None:
    """Bars of means with 95% CI error bars (none for a single seed) and the per-seed values as dots."""
    x = np.arange(len(labels))
    means = [s["mean"] for s in summaries]
    errs = [s["ci95"] or 0.0 for s in summaries]
    ax.bar(x, means, yerr=errs, capsize=3, color=colors or "#4c72b0", alpha=0.85)
    for i, s in enumerate(summaries):
        ax.plot([i] * len(s["values"]), s["values"], "k.", ms=3)
    ax.set_xticks(x, labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(ylabel, fontsize=8)


def grouped_bars(ax, ticks: Sequence[str], series: Sequence[tuple[str, Sequence[dict]]], ylabel: str,
                 colors: Sequence[str] | None = None, rotate: bool = True) -> None:
    """Side-by-side bars per tick, one series each ((legend label, one summary per tick)), whiskers 95% CIs."""
    x = np.arange(len(ticks))
    width = 0.8 / len(series)
    for j, (label, summaries) in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * width, [s["mean"] for s in summaries], width,
               yerr=[s["ci95"] or 0 for s in summaries], capsize=2, label=label,
               **({"color": colors[j]} if colors else {}))
    ax.set_xticks(x, ticks, fontsize=7, **({"rotation": 30, "ha": "right"} if rotate else {}))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def _rows(table: dict) -> dict[str, dict]:
    """A results table's rows: label -> {column key: summary}."""
    return {row["label"]: row["cells"] for row in table["rows"]}


def e1_figures(results: dict, folder: Path) -> None:
    """Caption loss and routing TV per cell (E1's first table)."""
    rows = results["tables"][0]["rows"]
    labels = [row["label"].rsplit(" (n=", 1)[0] for row in rows]
    fig, axes = new_figure(2, width=5.2)
    bar_panel(axes[0, 0], labels, [row["cells"]["caption_loss"] for row in rows], "caption loss (nats)")
    bar_panel(axes[0, 1], labels, [row["cells"]["tv"] for row in rows], "routing TV image vs text (0-1)")
    fig.tight_layout()
    save_figure(fig, folder / "e1_matched.png")


E2_PANELS = ((("dist_same_step", "dist_aware_1x", "dist_aware_self"), "pattern distance"),
             (("tv_agnostic", "tv_aware"), "routing TV"), (("loss_agnostic", "loss_aware"), "caption loss"))


def e2_figures(results: dict, folder: Path) -> None:
    """Pattern distances, routing TV and caption loss against training steps (E2's table, one row per N×)."""
    table = results["tables"][0]
    names = dict(table["columns"])
    x = np.array(results["multiples"])
    fig, axes = new_figure(3, width=4.0)
    for ax, (keys, ylabel) in zip(axes[0], E2_PANELS):
        for k in keys:
            ss = [row["cells"][k] for row in table["rows"]]
            mean = np.array([v["mean"] for v in ss])
            ci = np.array([v["ci95"] or 0.0 for v in ss])
            ax.plot(x, mean, "o-", label=names[k])
            ax.fill_between(x, mean - ci, mean + ci, alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{N}×" for N in results["multiples"]])
        ax.set_xlabel(f"training steps (× {results['scale']['steps']})", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, folder / "e2_convergence.png")


def e3_figures(results: dict, folder: Path) -> None:
    """The expert × expert CKA matrices of one seed per design and layer (results["cka"]), and the per-layer
    modality probe accuracy and routing TV per design (E3's second table)."""
    if "cka" not in results:
        raise ExperimentError("e3_function/results.json has no CKA matrices ('cka', 'layers': written since the "
                              "figures are drawn from results.json); rerun: " + results["command"])
    names, layer_ids = results["designs"], results["layers"]
    cka = results["cka"]["all"]
    fig, axes = new_figure(len(layer_ids), nrows=len(names), width=2.6, height=2.4)
    for i, d in enumerate(names):
        for j, matrix in enumerate(cka[d]):
            ax = axes[i, j]
            im = ax.imshow(np.asarray(matrix, dtype=float), vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{d}, layer {layer_ids[j]}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="debiased linear CKA")
    save_figure(fig, folder / "e3_cka.png")
    rows = _rows(results["tables"][1])
    fig, axes = new_figure(2, width=5.0)
    for ax, key, ylabel in ((axes[0, 0], "probe_acc", "modality probe accuracy (held out)"),
                            (axes[0, 1], "tv", "routing TV on the probe set")):
        grouped_bars(ax, names, [(f"layer {layer}", [rows[d][f"{key}_L{j}"] for d in names])
                                 for j, layer in enumerate(layer_ids)], ylabel)
    fig.tight_layout()
    save_figure(fig, folder / "e3_probe.png")


def e5_figures(results: dict, folder: Path) -> None:
    """Zero-shot drift of p(e|m) per MoE layer (E5's first table, its layer rows) and the routing change
    after fine-tuning per variant (its second table)."""
    layers = results["tables"][0]["rows"][1:]
    variants = results["tables"][1]["rows"]
    fig, axes = new_figure(2, width=5.0)
    grouped_bars(axes[0, 0], [row["label"] for row in layers],
                 [(m, [row["cells"][f"tv_{m}"] for row in layers]) for m in MODALITIES],
                 "zero-shot drift of p(e|m), A → B (TV)", rotate=False)
    grouped_bars(axes[0, 1], [row["label"] for row in variants],
                 [(m, [row["cells"][f"change_{m}"] for row in variants]) for m in MODALITIES],
                 "routing change on B after fine-tuning (TV)", rotate=False)
    fig.tight_layout()
    save_figure(fig, folder / "e5_transfer.png")


def e6_figures(results: dict, folder: Path) -> None:
    """Per-modality drop rate and the image share of expert compute per router and mix (E6's audit table)."""
    rows = results["tables"][0]["rows"]
    labels = [row["label"] for row in rows]
    fig, axes = new_figure(2, width=5.0)
    grouped_bars(axes[0, 0], labels, [(m, [row["cells"][f"drop_{m}"] for row in rows]) for m in MODALITIES],
                 "share of routes dropped by capacity", colors=("#4c72b0", "#dd8452"))
    bar_panel(axes[0, 1], labels, [row["cells"]["share_image"] for row in rows], "image share of expert compute")
    fig.tight_layout()
    save_figure(fig, folder / "e6_audit.png")


FIGURES = {"e1": e1_figures, "e2": e2_figures, "e3": e3_figures, "e5": e5_figures, "e6": e6_figures}


def draw(results: dict, folder: str | os.PathLike) -> list[str]:
    """Write the figures of `results` (an E1, E2, E3, E5 or E6 results dict) into `folder`; returns the
    file names its "plots" list."""
    FIGURES[results["experiment"]](results, Path(folder))
    return [p["file"] for p in results.get("plots", [])]
