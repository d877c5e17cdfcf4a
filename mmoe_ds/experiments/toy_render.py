"""E4's rendering, from its results dict (what results.json holds) alone: results.md (the setup, the
ceilings, the per-cell table, the separation sweep's tables, the findings and caveats the results
carry) and the two figures. The simulation and the sentences generated from its numbers are in
`toy`.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from mmoe_ds.io.atomic import atomic_write_bytes, atomic_write_text

FIGURE = "tv_vs_ceiling.png"
SEPARATION_FIGURE = "params_vs_d.png"


def results_table(results: dict) -> str:
    """Markdown: the setup, the ceilings, and one row per cell with TV and MSE as mean ± 95% CI."""
    c, cfg = results["ceiling"], results["config"]
    measured = ", ".join(f"{v:.3f} at d={d}" for d, v in c["e2_measured_axis_halfspace_by_dim"].items())
    lines = [
        f"E4 Gaussian toy: per-modality SwiGLU teacher, one MoE layer, top-{cfg['top_k']} dropless, "
        f"{cfg['steps']} Adam steps (lr {cfg['lr']}), seeds {results['seeds']}, {results['seconds']:.1f} s on CPU. "
        "TV = routing total variation of the first-choice expert between the modalities (held out).",
        "",
        f"Agnostic routers have a bias (W·x + b). Linear ceiling (covariance regime, E=2; docs/theory.md): best "
        f"half-space {c['e2_analytic_affine_halfspace']:.3f} analytic ({measured} measured on {cfg['test_tokens']} "
        f"samples); always <= 1/2; a router without bias would be pinned at 0 by symmetry. E=4: no ceiling <= 1/2; "
        f"a bias-free linear router already reaches {c['e4_linear_lower_bound']:.3f} (lower bound).",
        "",
        "| regime | d | E | router | TV (mean ± 95% CI) | MSE (mean ± 95% CI) |",
        "|---|---|---|---|---|---|"]
    for cell in results["cells"].values():
        lines.append(f"| {cell['regime']} | {cell['dim']} | {cell['num_experts']} | {cell['router']} | "
                     f"{fmt_tv(cell['tv'])} | {fmt_tv(cell['mse'])} |")
    return "\n".join(lines) + "\n"


def results_markdown(results: dict) -> str:
    """results.md: the command, the table, the figure, and the generated findings and caveats."""
    lines = ["# E4: Gaussian toy — can a router that never sees the modality route by modality?", "",
             "```bash", results.get("command", "python -m mmoe_ds.experiments.toy"), "```", "",
             results_table(results), f"![routing TV against the ceiling]({FIGURE})", ""]
    if (results.get("separation") or {}).get("dims"):
        lines += [separation_table(results["separation"]), f"![router parameters against d]({SEPARATION_FIGURE})", ""]
    lines += ["**What this says**", ""] + [f"- {x}" for x in results.get("findings", [])]
    lines += ["", "**What it does not say**", ""]
    lines += [f"- {x}" for x in results.get("caveats", [])]
    return "\n".join(lines) + "\n"


def _smallest(row: dict, key: str, fam: str, sizes: str) -> str:
    name = row[key][fam]
    if name is None:
        return f"none ({sizes})"
    return f"{name.removeprefix('agnostic_')} ({row['routers'][name]['params']} p)"


def separation_table(sep: dict) -> str:
    """Markdown: the parameter-count summary per d, then every router of the sweep."""
    dims = sep["dims"]
    any_row = next(iter(dims.values()))
    ranks = "r <= " + str(max([int(n.removeprefix("agnostic_rank")) for n in any_row["routers"] if "rank" in n] or [0]))
    widths = "h <= " + str(max([int(n.removeprefix("agnostic_mlp")) for n in any_row["routers"] if "mlp" in n] or [0]))
    lines = ["**Separation (covariance regime, E=2): the smallest agnostic router that reaches the aware router**", "",
             f"Reaches = {sep['criterion']}. *Task*: trained inside the MoE layer from the task's gradient, like the "
             "aware router. *Class*: the same feature map and one logit trained as a modality classifier (told the "
             "modality): what the function class can do. p = router parameters (counted on the module). Bounds "
             "(docs/theory.md): an affine router's TV <= the best half-space TV; any router blind to the modality, "
             "of any size, <= TV(P0, P1).", "",
             "| d | aware: p, TV, MSE | bound: any blind router | affine: p, task TV (ceiling) | rank-r quadratic: "
             "task / class | MLP width h: task / class | full quadratic: p, task TV / class TV |",
             "|---|---|---|---|---|---|---|"]
    for d, row in dims.items():
        r = row["routers"]
        aware, affine, quad = r["aware"], r["agnostic"], r["agnostic_quadratic"]
        lines.append(
            f"| {d} | {aware['params']}, {fmt_tv(aware['tv'])}, {fmt_tv(aware['mse'])} | "
            f"{row['bound_any_agnostic']:.3f} | "
            f"{affine['params']}, {fmt_tv(affine['tv'])} ({row['bound_affine']:.3f}) | "
            f"{_smallest(row, 'smallest', 'rank', ranks)} / {_smallest(row, 'smallest_capacity', 'rank', ranks)} | "
            f"{_smallest(row, 'smallest', 'mlp', widths)} / {_smallest(row, 'smallest_capacity', 'mlp', widths)} | "
            f"{quad['params']}, {fmt_tv(quad['tv'])} / {fmt_tv(quad['capacity_tv'])} |")
    lines += ["", "| d | router | p | task TV | task MSE | class TV | reaches (task / class) |",
              "|---|---|---|---|---|---|---|"]
    for d, row in dims.items():
        for name, r in row["routers"].items():
            cap = fmt_tv(r["capacity_tv"]) if "capacity_tv" in r else "1 (sees m)"
            lines.append(f"| {d} | {name} | {r['params']} | {fmt_tv(r['tv'])} | {fmt_tv(r['mse'])} | {cap} | "
                         f"{'yes' if r['reaches'] else 'no'} / {'yes' if r['capacity_reaches'] else 'no'} |")
    return "\n".join(lines) + "\n"


def fmt_tv(summary: dict) -> str:
    """A `mean_ci95` summary at 3 decimals: mean ± half-width, or the mean and "(1 seed, no interval)"."""
    if summary["ci95"] is None:
        return f"{summary['mean']:.3f} (1 seed, no interval)"
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def tv_figure_png(results: dict) -> bytes:
    """PNG bytes: measured TV per router (mean, 95% CI bars) for every (d, E), one panel per regime,
    with the covariance regime's linear bounds drawn over the E = 2 and E = 4 groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(results["cells"].values())
    regimes = list(dict.fromkeys(c["regime"] for c in cells))
    routers = list(dict.fromkeys(c["router"] for c in cells))
    groups = list(dict.fromkeys((c["dim"], c["num_experts"]) for c in cells))
    by_key = {(c["regime"], c["dim"], c["num_experts"], c["router"]): c for c in cells}
    width = 0.8 / len(routers)
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.2 * len(regimes), 4.2), squeeze=False)
    for ax, regime in zip(axes[0], regimes):
        for r, router in enumerate(routers):
            xs, means, errs = [], [], []
            for g, (dim, e) in enumerate(groups):
                cell = by_key.get((regime, dim, e, router))
                if cell:
                    xs.append(g + (r - (len(routers) - 1) / 2) * width)
                    means.append(cell["tv"]["mean"])
                    errs.append(cell["tv"]["ci95"] or 0.0)
            ax.bar(xs, means, width, yerr=errs, capsize=2, label=router)
        if regime == "covariance":
            _draw_bounds(ax, groups, results["ceiling"])
        ax.set_title(f"{regime} regime")
        ax.set_xticks(range(len(groups)), [f"d={d}, E={e}" for d, e in groups])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("routing TV between modalities")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"E4 Gaussian toy: held-out routing TV, mean and 95% CI over seeds {results['seeds']}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _draw_bounds(ax, groups: list[tuple[int, int]], ceiling: dict) -> None:
    """The covariance regime's linear bounds as segments over each (d, E) group, labelled once."""
    bounds = {2: [(ceiling["e2_analytic_affine_halfspace"], "k", "--", "linear ceiling (E=2)"),
                  (ceiling["e2_upper_bound"], "grey", ":", "any half-space <= 1/2 (E=2)")],
              4: [(ceiling["e4_linear_lower_bound"], "tab:red", "-.", "a bias-free linear router reaches (E=4)")]}
    labelled = set()
    for g, (_, e) in enumerate(groups):
        for value, color, style, label in bounds.get(e, []):
            ax.hlines(value, g - 0.45, g + 0.45, colors=color, linestyles=style,
                      label=None if label in labelled else label)
            labelled.add(label)


def separation_figure_png(results: dict) -> bytes:
    """PNG bytes: router parameters against d — the aware router, the affine router (never reaches), and
    per agnostic family the smallest size that reaches the aware router (task-trained: filled; class: open)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = results["separation"]["dims"]
    ds = [int(d) for d in dims]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(ds, [dims[str(d)]["routers"]["aware"]["params"] for d in ds], "k-o", label="aware (W·x + E[m])")
    ax.plot(ds, [dims[str(d)]["routers"]["agnostic"]["params"] for d in ds], "k:", label="affine (never can: <= 0.242)")
    for fam, color, label in (("rank", "tab:blue", "rank-r quadratic"), ("mlp", "tab:orange", "MLP width h"),
                              ("quadratic", "tab:green", "full quadratic")):
        for key, style, how in (("smallest", "-s", "task-trained"), ("smallest_capacity", "--o", "class, told m")):
            pts = [(d, dims[str(d)]["routers"][dims[str(d)][key][fam]]["params"]) for d in ds if dims[str(d)][key][fam]]
            if pts:
                ax.plot(*zip(*pts), style, color=color, mfc=color if key == "smallest" else "white",
                        label=f"{label}: smallest reaching ({how})")
    for d in ds:  # where no blind router of the sweep reaches the aware one, say why it cannot
        row = dims[str(d)]
        if not any(row["smallest_capacity"].values()):
            ax.annotate(f"d={d}: none reaches;\nany blind router <= TV(P0,P1) = {row['bound_any_agnostic']:.3f}",
                        (d, row["routers"]["aware"]["params"]), xytext=(0, 40), textcoords="offset points",
                        fontsize=7, ha="left", arrowprops={"arrowstyle": "->", "lw": 0.5})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ds, [str(d) for d in ds])
    ax.set_xlabel("token dimension d")
    ax.set_ylabel("router parameters")
    ax.set_title(f"E4 separation (covariance regime, E=2), seeds {results['seeds']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_results(results: dict, out: Path) -> None:
    """results.json, results.md and tv_vs_ceiling.png in `out` (created if missing), each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    atomic_write_bytes(out / FIGURE, tv_figure_png(results))
    if (results.get("separation") or {}).get("dims"):
        atomic_write_bytes(out / SEPARATION_FIGURE, separation_figure_png(results))
