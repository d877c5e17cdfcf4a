"""The analysis files: analysis.json, analysis.md and PNGs (matplotlib, Agg backend).

PNGs: `utilization.png` (per layer, a modality × expert heatmap of p(e | m)), `cka.png` (per
layer, E×E CKA of expert outputs on all / each modality's tokens and of the weights),
`layers.png` (probe accuracy, TV and NMI per layer), and `compare.png` with a comparison run
(cross-run CKA with the matched pairs marked). Every file is written under a temporary name
and renamed into place.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_bytes, atomic_write_text


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


def _heatmap(ax, values, title: str, vmin=0.0, vmax=1.0, xlabels=None, ylabels=None, cmap="viridis"):
    a = np.array(values, dtype=float)
    im = ax.imshow(a, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(a.shape[1]), labels=xlabels if xlabels is not None else range(a.shape[1]), fontsize=7)
    ax.set_yticks(range(a.shape[0]), labels=ylabels if ylabels is not None else range(a.shape[0]), fontsize=7)
    if a.size <= 100:
        for (i, j), v in np.ndenumerate(a):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if v < (vmin + vmax) / 2 else "black")
    return im


def utilization_png(d: dict, path: Path) -> Path:
    plt = _plt()
    layers, mods = d["layers"], d["modalities"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(1.2 + 0.6 * d["num_experts"], 1.2 + 1.0 * len(layers)),
                             squeeze=False)
    for ax, la in zip(axes[:, 0], layers):
        util = [la["per_modality"][m].get("utilization", [np.nan] * d["num_experts"]) for m in mods]
        im = _heatmap(ax, util, f"layer {la['layer']}: p(expert | modality)  TV={_fmt(la['tv'], 2)}", ylabels=mods)
        fig.colorbar(im, ax=ax, fraction=0.04)
    axes[-1, 0].set_xlabel("expert")
    fig.tight_layout()
    return _save(fig, path)


def cka_png(d: dict, path: Path) -> Path:
    plt = _plt()
    layers = d["layers"]
    kinds = ["all", *d["modalities"], "weights"]
    fig, axes = plt.subplots(len(layers), len(kinds), figsize=(2.6 * len(kinds), 2.4 * len(layers)), squeeze=False)
    for row, la in zip(axes, layers):
        for ax, kind in zip(row, kinds):
            values = la["cka"].get(kind)
            if values is None:
                ax.axis("off")
                continue
            label = "weights" if kind == "weights" else f"outputs, {kind} tokens"
            _heatmap(ax, [[np.nan if v is None else v for v in r] for r in values],
                     f"layer {la['layer']}: CKA {label}", vmin=0.0, vmax=1.0)
    fig.suptitle("Debiased linear CKA between experts (1 = same function up to rotation/scale)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def layers_png(d: dict, path: Path) -> Path:
    plt = _plt()
    layers = d["layers"]
    x = [la["layer"] for la in layers]

    def series(key):
        return [np.nan if la[key] is None else la[key] for la in layers]

    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(x, series("probe_acc"), "o-", label="probe accuracy (modality from router input)")
    ax.plot(x, series("probe_chance"), "k:", label="probe chance (majority class)")
    ax.plot(x, series("tv"), "s-", label="TV(p(e|image), p(e|text))")
    ax.plot(x, series("nmi"), "^-", label="NMI = I(M;E) / H(M)")
    ax.set_xticks(x)
    ax.set_xlabel("decoder layer (MoE layers)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{d['mode']} router: what the router input carries vs. what routing uses", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def compare_png(d: dict, path: Path) -> Path:
    plt = _plt()
    layers = d["compare"]["layers"]
    fig, axes = plt.subplots(1, len(layers), figsize=(3.0 * len(layers), 3.0), squeeze=False)
    for ax, la in zip(axes[0], layers):
        _heatmap(ax, [[np.nan if v is None else v for v in r] for r in la["cka"]],
                 f"layer {la['layer']}: mean matched {_fmt(la['mean_matched_cka'], 2)}")
        for a, b in enumerate(la["partner"]):
            ax.add_patch(plt.Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_xlabel("expert (other run)")
        ax.set_ylabel("expert (this run)")
    fig.suptitle("Cross-run CKA of expert outputs; red: Hungarian matching", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def markdown(d: dict) -> str:
    mods = d["modalities"]
    lines = [f"# Routing analysis: {d['source']}", "",
             f"Router mode `{d['mode']}`, {d['num_experts']} experts, modality embedding "
             f"{'on' if d['settings'].get('modality_embedding', True) else 'off'}. Probe set: "
             f"{d['n_probe_samples']} held-out test image+caption samples of `{d['data_dir']}` "
             f"({', '.join(f'{n} {m}' for m, n in d['n_probe_tokens'].items())} tokens; router inputs of the first "
             f"{d['feature_tokens']} tokens feed the probe and CKA). Analysis took {d['seconds']:.1f} s.", "",
             "## Per layer", "",
             "| layer | TV | I(M;E) bits (MM) | plug-in | null p | NMI | soft MI bits | probe acc | probe chance | "
             "logit var share E[m] |", "|---|---|---|---|---|---|---|---|---|---|"]
    for la in d["layers"]:
        lines.append(f"| {la['layer']} | {_fmt(la['tv'])} | {_fmt(la['mi_bits'])} | {_fmt(la['mi_bits_plugin'])} | "
                     f"{_fmt(la['mi_null_p'], 4)} | {_fmt(la['nmi'])} | {_fmt(la['soft_mi_bits'])} | "
                     f"{_fmt(la['probe_acc'])} | {_fmt(la['probe_chance'])} | {_fmt(la['logit_var_share_modality'])} |")
    lines += ["", "## Per layer and modality", "",
              "| layer | modality | tokens | utilization p(e\\|m) | effective experts | Gini | drop rate | "
              "compute share | token share | mean top-1 prob |", "|---|---|---|---|---|---|---|---|---|---|"]
    for la in d["layers"]:
        for m in mods:
            p = la["per_modality"][m]
            if not p:
                lines.append(f"| {la['layer']} | {m} | 0 | – | – | – | – | – | – | – |")
                continue
            util = " ".join(f"{v:.2f}" for v in p["utilization"])
            lines.append(f"| {la['layer']} | {m} | {p['tokens']} | {util} | {_fmt(p['effective_experts'], 2)} | "
                         f"{_fmt(p['gini'])} | {_fmt(p['drop_rate'])} | {_fmt(p['compute_share'])} | "
                         f"{_fmt(p['token_share'])} | {_fmt(p['mean_top1_prob'])} |")
    lines += ["", "## Expert similarity (debiased linear CKA)", "",
              "Mean off-diagonal CKA between experts of a layer (1: experts compute the same function up to rotation "
              "and scale; about 0: unrelated).", "", "| layer | " + " | ".join(["all", *mods, "weights"]) + " |",
              "|---|" + "---|" * (len(mods) + 2)]
    for la in d["layers"]:
        cells = []
        for kind in ["all", *mods, "weights"]:
            a = np.array([[np.nan if v is None else v for v in r] for r in la["cka"].get(kind, [[np.nan]])], float)
            off = a[~np.eye(a.shape[0], dtype=bool)] if a.shape[0] > 1 else np.array([np.nan])
            cells.append(_fmt(float(np.nanmean(off)) if np.isfinite(off).any() else float("nan")))
        lines.append(f"| {la['layer']} | " + " | ".join(cells) + " |")
    t = d["thresholds"]
    lines += ["", "## Alarms", "",
              f"Thresholds: dead expert below {t['dead_fraction_of_uniform']:g} of an even share of the routes; "
              f"monopoly above {t['monopoly_share']:g} of a modality's tokens on one expert; fewer than "
              f"{t['min_effective_experts']:g} effective experts for a modality.", ""]
    lines += [f"- {a['message']}" for a in d["alarms"]] or ["None."]
    if d.get("compare"):
        lines += ["", f"## Matching experts with {d['compare']['other']}", "",
                  "| layer | partner of expert 0..E-1 | matched CKA | mean |", "|---|---|---|---|"]
        for la in d["compare"]["layers"]:
            lines.append(f"| {la['layer']} | {la['partner']} | {' '.join(_fmt(v, 2) for v in la['matched_cka'])} | "
                         f"{_fmt(la['mean_matched_cka'])} |")
    lines += ["", "## Reading it", "",
              "- I(M;E) uses each chosen route (top-k tokens count k times), Miller–Madow corrected; `null p` is the "
              "share of modality-label shuffles reaching the plug-in value (add-one).",
              "- The probe is logistic regression on the router input, held out by probe sample. Image tokens sit at "
              "fixed positions, so the position embedding alone can reveal the modality even without the modality "
              "embedding.",
              "- Compute share: FLOPs of the routes that reached their expert (dropped routes cost none); compare it "
              "with the token share.",
              "- Logit var share: the aware router's bias E[m] against W·x, each centred across experts per token, "
              "variance across experts averaged over tokens.", "",
              "Files: utilization.png, cka.png, layers.png" + (", compare.png" if d.get("compare") else "") + "."]
    return "\n".join(lines) + "\n"


def write_analysis_report(a, out_dir: Path) -> list[Path]:
    """Write every file of the analysis `a` (an `Analysis`) into `out_dir` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    d = a.to_dict()
    paths = [out_dir / "analysis.json", out_dir / "analysis.md"]
    atomic_write_text(paths[0], json.dumps(d, indent=1, allow_nan=False) + "\n")
    atomic_write_text(paths[1], markdown(d))
    paths += [utilization_png(d, out_dir / "utilization.png"), cka_png(d, out_dir / "cka.png"),
              layers_png(d, out_dir / "layers.png")]
    if d.get("compare"):
        paths.append(compare_png(d, out_dir / "compare.png"))
    return paths
