"""E1, the matched comparison: is the aware router's advantage the modality information, or the
per-modality utilization it ends up with ("regularization in disguise")?

Cells (modality embedding on; the same seed gives every cell the same initialization of every
shared tensor and the same batches; the cells differ in exactly the named thing):
  aware                              W·x + E[m], global load balance only (the recipes' default)
  agnostic                           W·x, global load balance only
  aware + per-modality balance       + the per-modality balance loss (each modality spread over all experts)
  agnostic + per-modality balance    + the same loss
  agnostic + matched loss            W·x, plus a loss pulling each modality's routed fractions to the
                                     aware run's (same seed), per MoE layer
  aware + matched loss               the same loss on the aware router

The matched loss (mmoe_ds.moe.losses.matched_utilization) is the total variation between each
modality's routed fractions and the target, the same quantity the "TV to target" column measures,
and its target is the aware run's measured routing of the last 20% of training, one per layer.

Pre-declared primary contrast: caption loss, aware minus agnostic + matched loss (the review's
regularization ablation), judged by its paired 95% CI; its seeds are chosen for a half-width of at
most TARGET_HALF_WIDTH. Every other contrast is judged after Holm's correction.

Beside the embedded data: a size sweep of the primary contrast (the scale's `sizes`), and the primary
cells on the covariance-regime dataset (when the scale prepares one: modalities that differ only in
covariance shape, where a blind linear router provably cannot separate them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .measure import QUALITY, TRAINING_ROUTING_CAVEAT, routing_counts, run_metrics
from .render import render_folder
from .runner import ExperimentError, Run, Runner, RunSpec, mode_recipe, seeds_for, write_results
from .stats import contrast, holm, summarize

NAME = "e1_matched"
ROUTER_RECIPE = {"agnostic": "agnostic", "aware": "modality_bias"}
PER_MODALITY_BALANCE = 0.01  # the per-modality balance arms' coefficient (the old recipes' value)
TARGET_HALF_WIDTH = 0.02  # the primary contrast's stated target: 95% CI half-width in caption loss (nats)
PRIMARY_METRIC = "caption_loss"
METRICS = (("caption_loss", "caption loss"), ("caption_rank_acc", "caption ranking acc"), ("text_ppl", "text ppl"),
           ("tv", "routing TV (0-1)"), ("nmi", "NMI"), ("target_gap", "TV to target"),
           ("uniform_gap", "uniform router's TV to target"))
CELL_TABLE_NOTE = (
    "Routing TV and NMI (Miller–Madow I(M;E)/H(M)) are over the routes chosen in the last 20% of training, averaged "
    "over MoE layers; TV to target: how far the matched runs ended from their per-layer targets, measured the same "
    "way; the uniform router's TV to target is the bar they must beat.")
PROBE_METRICS = (("probe_tv", "probe TV"), ("probe_mi_bits", "I(M;E), bits"), ("probe_nmi", "NMI"),
                 ("logit_share", "E[m] share of logit variance"))


@dataclass(frozen=True)
class Cell:
    """One arm: router, balance loss, matched loss."""
    router: str  # aware | agnostic
    per_modality_balance: bool = False
    matched: bool = False

    @property
    def label(self) -> str:
        return self.router + (" + per-modality balance" if self.per_modality_balance else "") + \
            (" + matched loss" if self.matched else "")


AWARE, AGNOSTIC = Cell("aware"), Cell("agnostic")
AWARE_PMB, AGNOSTIC_PMB = Cell("aware", True), Cell("agnostic", True)
AGNOSTIC_MATCHED, AWARE_MATCHED = Cell("agnostic", matched=True), Cell("aware", matched=True)
CELLS = (AWARE, AGNOSTIC, AWARE_PMB, AGNOSTIC_PMB, AGNOSTIC_MATCHED, AWARE_MATCHED)
PRIMARY = (AWARE, AGNOSTIC_MATCHED)


def matched_coef(runner: Runner) -> float:
    """The matched-utilization loss coefficient of recipes/modes/agnostic_matched_utilization.json."""
    raw = runner.base_recipe(mode_recipe("agnostic_matched_utilization"))
    return float(raw["model"]["router"]["matched_utilization_coef"])


def derive_matched_target(counts_per_layer: list[np.ndarray], modalities=("image", "text")) -> dict[str, list]:
    """The matched-utilization target from a run's measured routing, one per MoE layer.

    Args:
        counts_per_layer: per MoE layer, [modality, expert] route counts (rows in `modalities` order).
        modalities: the row names.
    Returns:
        {modality: [[p(e | m) for each expert] for each MoE layer]}, rounded to 6 decimals, each summing to 1.
    """
    if not counts_per_layer:
        raise ValueError("counts_per_layer: no MoE layer.")
    target: dict[str, list] = {m: [] for m in modalities}
    for c in counts_per_layer:
        c = np.asarray(c, dtype=float)
        if c.ndim != 2 or (c.sum(1) <= 0).any():
            raise ValueError("counts_per_layer: each layer needs [modality, expert] counts with routes for every "
                             "modality.")
        for i, m in enumerate(modalities):
            p = np.round(c[i] / c[i].sum(), 6)
            p[int(np.argmax(p))] += 1.0 - p.sum()  # absorb rounding so the sum is 1
            target[m].append([float(v) for v in p])
    return target


def _tv(p, q) -> float:
    return float(0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def target_gap(run: Run, target: dict[str, list]) -> float:
    """Mean over MoE layers and modalities of TV(achieved p(e | m), the layer's target): how well the
    matched loss was met (routes chosen in the last 20% of training, as the target was measured)."""
    gaps = [_tv(c[i] / max(c[i].sum(), 1), target[m][layer]) for layer, c in enumerate(routing_counts(run))
            for i, m in enumerate(("image", "text"))]
    return float(np.mean(gaps))


def uniform_gap(target: dict[str, list]) -> float:
    """The same distance for a router that spreads every modality uniformly over the experts: the
    bar a matched run must beat to have matched anything."""
    return float(np.mean([_tv(np.full(len(p), 1.0 / len(p)), p) for layers in target.values() for p in layers]))


def target_tv(target: dict[str, list]) -> float:
    """The routing TV between the modalities that a target asks for (mean over layers)."""
    return float(np.mean([_tv(a, b) for a, b in zip(target["image"], target["text"])]))


def spec(cell: Cell, seed: int, target: dict | None = None, coef: float = 0.0, model: dict | None = None,
         dataset: str = "embedded", tag: str = "") -> RunSpec:
    """The run of one cell. The plain cells override nothing, so other experiments asking for the plain
    routing recipe get the same run. `model`: size overrides (the size sweep); `dataset`: which data."""
    over: dict = dict(model or {})
    router: dict = {}
    if cell.per_modality_balance:
        router["modality_load_balance_coef"] = PER_MODALITY_BALANCE
    if cell.matched:
        if target is None:
            raise ExperimentError(f"{cell.label}: a matched cell needs the aware run's target.")
        router.update(matched_utilization_coef=coef, matched_utilization_target=target)
    if router:
        over["router"] = router
    return RunSpec(mode_recipe(ROUTER_RECIPE[cell.router]), seed, {"model": over} if over else {}, dataset=dataset,
                   label=f"{cell.label}{', ' + tag if tag else ''}")


def train_groups(runner: Runner, groups: dict, coef: float) -> dict:
    """Train several groups of cells at once: {name: ({cell: seeds}, model overrides, dataset, tag)}.
    Phase 1 trains every group's aware runs (their routing is the matched cells' targets, same seed and
    group) and plain cells together, phase 2 every matched cell: as many runs at a time as the scale allows.
    Returns {name: ({(cell, seed): Run}, {seed: target})}."""
    phase1, plan = [], {}
    for name, (cells, model, dataset, tag) in groups.items():
        need_aware = sorted({s for c, ss in cells.items() for s in ss if c.matched} | set(cells.get(AWARE, [])))
        keys = [(AWARE, s) for s in need_aware] + [(c, s) for c, ss in cells.items() if not c.matched and c != AWARE
                                                   for s in ss]
        plan[name] = keys
        phase1 += [((name, k), spec(k[0], k[1], model=model, dataset=dataset, tag=tag)) for k in keys]
    done = {name: {} for name in groups}
    for (name, key), r in zip([k for k, _ in phase1], runner.run_all([sp for _, sp in phase1])):
        done[name][key] = r
    targets = {name: {s: derive_matched_target(routing_counts(r)) for (c, s), r in done[name].items() if c == AWARE}
               for name in groups}
    phase2 = [((name, (c, s)), spec(c, s, targets[name][s], coef, model=model, dataset=dataset, tag=tag))
              for name, (cells, model, dataset, tag) in groups.items() for c, ss in cells.items() if c.matched
              for s in ss]
    for (name, key), r in zip([k for k, _ in phase2], runner.run_all([sp for _, sp in phase2])):
        done[name][key] = r
    return {name: ({k: v for k, v in done[name].items() if k[1] in groups[name][0].get(k[0], [])}, targets[name])
            for name in groups}


def cell_metrics(run: Run, cell: Cell, target: dict) -> dict:
    m = run_metrics(run)
    if cell.matched:
        m.update(target_gap=target_gap(run, target), uniform_gap=uniform_gap(target), target_tv=target_tv(target))
    return m


def probe_metrics(run: Run, scale_name: str) -> dict[str, float]:
    """Routing on the held-out probe set (E3's cached analysis): TV, Miller–Madow I(M;E) in bits, NMI,
    and for the aware router the E[m] share of the logit variance (layer means)."""
    from .e3_function import analysis_of

    layers = analysis_of(run, scale_name)["layers"]
    out = {"probe_tv": float(np.mean([l["tv"] for l in layers])),
           "probe_mi_bits": float(np.mean([l["mi_bits"] for l in layers])),
           "probe_nmi": float(np.mean([l["nmi"] for l in layers]))}
    shares = [l["logit_var_share_modality"] for l in layers if l.get("logit_var_share_modality") is not None]
    if shares:
        out["logit_share"] = float(np.mean(shares))
    return out


def _common(per_run: dict, a: str, b: str, key: str) -> tuple[dict, dict]:
    """{seed: value} of `key` for cells a and b on the seeds both ran (contrasts pair by seed)."""
    both = sorted(set(per_run[a]) & set(per_run[b]))
    return ({s: per_run[a][s]["metrics"][key] for s in both}, {s: per_run[b][s]["metrics"][key] for s in both})


def quality_contrast(name: str, metric: str, a: str, b: str, per_run: dict, primary: bool = False) -> dict:
    """A paired contrast of a quality readout between two cells (labels), with its chance level."""
    higher, metric_name = QUALITY[metric]
    va, vb = _common(per_run, a, b, metric)
    chance = next(iter(per_run[a].values()))["metrics"].get(f"chance_{metric}")
    return contrast(name, metric_name, a, va, b, vb, higher_is=higher, chance=chance, primary=primary,
                    target_half_width=TARGET_HALF_WIDTH if primary else None)


def routing_contrast(name: str, metric: str, key: str, a: str, b: str, per_run: dict) -> dict:
    va, vb = _common(per_run, a, b, key)
    return contrast(name, metric, a, va, b, vb, higher_is="neutral")


def record(per_run: dict, got: dict, targets: dict, runner: Runner, suffix: str = "") -> None:
    """per_run[cell label + suffix][seed] = {"dir", "metrics"} for each finished run."""
    for (cell, s), r in sorted(got.items(), key=lambda kv: (CELLS.index(kv[0][0]), kv[0][1])):
        per_run.setdefault(cell.label + suffix, {})[s] = {"dir": str(r.dir.relative_to(runner.out)),
                                                          "metrics": cell_metrics(r, cell, targets.get(s))}


def cell_table(title: str, per_run: dict, labels: list[str], metrics, note: str = "") -> dict:
    """A results table: one row per cell, mean ± CI over that cell's seeds, with the chance levels."""
    rows = []
    for label in labels:
        runs = per_run[label]
        first = next(iter(runs.values()))["metrics"]
        rows.append({"label": f"{label} (n={len(runs)})",
                     "cells": {k: summarize([v["metrics"][k] for v in runs.values()])
                               for k, _ in metrics if k in first},
                     "chance": {k: first[f"chance_{k}"] for k, _ in metrics if f"chance_{k}" in first}})
    return {"title": title, "row_header": "cell", "columns": [list(m) for m in metrics], "rows": rows,
            **({"note": note} if note else {})}


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """Train every cell (the primary pair over `seeds`, the other cells over the scale's "arms" share),
    the size sweep and the covariance data; write results.json to `out`, and results.md / e1_matched.png from it."""
    since = runner.tally()
    coef = matched_coef(runner)
    arm_seeds = seeds_for(runner, "arms", seeds)
    sweep_seeds = seeds_for(runner, "sweep", seeds)
    groups = {"main": ({c: (seeds if c in PRIMARY else arm_seeds) for c in CELLS}, None, "embedded", "")}
    for size, model in runner.scale.sizes.items():
        if model:
            groups[f"size {size}"] = ({c: sweep_seeds for c in PRIMARY}, model, "embedded", f"size {size}")
    cov_cells = (AWARE, AGNOSTIC, AGNOSTIC_MATCHED)
    if "covariance" in runner.scale.prepare:
        cov_seeds = seeds_for(runner, "covariance", seeds)
        groups["covariance"] = ({c: cov_seeds for c in cov_cells}, None, "covariance", "covariance data")
    trained = train_groups(runner, groups, coef)
    done, targets = trained["main"]
    per_run: dict[str, dict[int, dict]] = {}
    record(per_run, done, targets, runner)
    probe_seeds = seeds_for(runner, "probe", arm_seeds)
    for cell in (AWARE, AWARE_PMB, AGNOSTIC):
        for s in probe_seeds:
            runner.log(f"probe analysis {cell.label} seed {s}")
            per_run[cell.label][s]["metrics"].update(probe_metrics(done[(cell, s)], runner.scale.name))
    L = {c: c.label for c in CELLS}
    matched_rows = [{"cell": L[c], "seed": s, **{k: per_run[L[c]][s]["metrics"][k] for k in
                                                 ("target_tv", "target_gap", "uniform_gap")},
                     "closer_than_uniform": per_run[L[c]][s]["metrics"]["target_gap"]
                     < per_run[L[c]][s]["metrics"]["uniform_gap"]}
                    for c in (AGNOSTIC_MATCHED, AWARE_MATCHED) for s in sorted(per_run[L[c]])]

    contrasts = [
        quality_contrast("Aware router vs agnostic router given the aware run's routing as a loss",
                         "caption_loss", L[AWARE], L[AGNOSTIC_MATCHED], per_run, primary=True),
        quality_contrast("Same pair, caption ranking", "caption_rank_acc", L[AWARE], L[AGNOSTIC_MATCHED], per_run),
        routing_contrast("Same pair, routing specialization", "routing TV", "tv", L[AWARE], L[AGNOSTIC_MATCHED],
                         per_run),
        quality_contrast("Aware vs agnostic (global balance only)", "caption_loss", L[AWARE], L[AGNOSTIC], per_run),
        routing_contrast("Aware vs agnostic (global balance only)", "routing TV", "tv", L[AWARE], L[AGNOSTIC], per_run),
        routing_contrast("What the per-modality balance loss does to the aware router", "routing TV", "tv",
                         L[AWARE_PMB], L[AWARE], per_run),
        routing_contrast("What the per-modality balance loss does to the agnostic router", "routing TV", "tv",
                         L[AGNOSTIC_PMB], L[AGNOSTIC], per_run),
        quality_contrast("What the per-modality balance loss does to the aware router", "caption_loss", L[AWARE_PMB],
                         L[AWARE], per_run),
        quality_contrast("Aware vs agnostic, both with the per-modality balance loss (the old recipes)",
                         "caption_loss", L[AWARE_PMB], L[AGNOSTIC_PMB], per_run),
        quality_contrast("Does seeing the modality help beyond the matched loss?", "caption_loss", L[AWARE_MATCHED],
                         L[AGNOSTIC_MATCHED], per_run),
        quality_contrast("Does the matched loss itself help the agnostic router?", "caption_loss", L[AGNOSTIC_MATCHED],
                         L[AGNOSTIC], per_run),
    ]
    has_probe = "probe_mi_bits" in per_run[L[AWARE]][probe_seeds[0]]["metrics"]
    if has_probe:
        probed = {label: {s: per_run[label][s] for s in probe_seeds} for label in (L[AWARE_PMB], L[AWARE])}
        contrasts.append(routing_contrast("Per-modality balance loss, aware router, on the probe set", "I(M;E) bits",
                                          "probe_mi_bits", L[AWARE_PMB], L[AWARE], probed))

    # -- the size sweep and the covariance-regime data: the primary contrast ------------------------
    extra_tables, sweep = [], []
    base_model = runner.scale.overrides.get("model", {})
    for size, model in runner.scale.sizes.items():
        suffix = f" [size {size}]"
        if model:
            got, tg = trained[f"size {size}"]
        else:  # the scale's own size: E1's runs
            got, tg = {k: v for k, v in done.items() if k[0] in PRIMARY and k[1] in sweep_seeds}, targets
        record(per_run, got, tg, runner, suffix)
        c = quality_contrast(f"Size sweep, size {size} ({_size_words(dict(base_model, **model))}): aware vs agnostic "
                             "+ matched loss", "caption_loss", L[AWARE] + suffix, L[AGNOSTIC_MATCHED] + suffix, per_run)
        c["size"], c["size_words"] = size, _size_words(dict(base_model, **model))
        sweep.append(c)
        contrasts.append(c)
    if sweep:
        extra_tables.append({"title": "Size sweep of the primary contrast (caption loss; seeds "
                                      f"{', '.join(map(str, sweep_seeds))})", "row_header": "size",
                             "columns": [["aware", "aware"], ["matched", "agnostic + matched loss"],
                                         ["diff", "aware minus agnostic + matched (paired)"]],
                             "rows": [{"label": f"{c['size']} ({c['size_words']})",
                                       "cells": {"aware": c["a_summary"], "matched": c["b_summary"], "diff": c["diff"]}}
                                      for c in sweep]})
    if "covariance" in groups:
        suffix = " [covariance data]"
        got, tg = trained["covariance"]
        record(per_run, got, tg, runner, suffix)
        contrasts += [quality_contrast("Covariance-regime data: aware vs agnostic + matched loss", "caption_loss",
                                       L[AWARE] + suffix, L[AGNOSTIC_MATCHED] + suffix, per_run),
                      routing_contrast("Covariance-regime data: aware vs agnostic", "routing TV", "tv",
                                       L[AWARE] + suffix, L[AGNOSTIC] + suffix, per_run),
                      quality_contrast("Covariance-regime data: aware vs agnostic", "caption_loss", L[AWARE] + suffix,
                                       L[AGNOSTIC] + suffix, per_run)]
        extra_tables.append(cell_table(f"Covariance-regime data (seeds {', '.join(map(str, cov_seeds))})", per_run,
                                       [L[c] + suffix for c in (AWARE, AGNOSTIC, AGNOSTIC_MATCHED)], METRICS[:6]))
    holm(contrasts)

    closer = sum(r["closer_than_uniform"] for r in matched_rows)
    tvs = [r["target_tv"] for r in matched_rows]
    key = {"primary": contrasts[0], "matched_closer_than_uniform": [closer, len(matched_rows)]}
    named = ((AWARE, "aware"), (AWARE_PMB, "aware_pmb"), (AGNOSTIC, "agnostic"), (AGNOSTIC_PMB, "agnostic_pmb"))
    for cell, name in named:
        ms = per_run[L[cell]]
        key[f"{name}_tv"] = summarize([ms[s]["metrics"]["tv"] for s in arm_seeds])
        for k in ("probe_tv", "probe_mi_bits", "logit_share"):
            if k in ms[arm_seeds[0]]["metrics"]:
                key[f"{name}_{k}"] = summarize([ms[s]["metrics"][k] for s in probe_seeds])
    findings = [f"The matched targets ask for a routing TV of {min(tvs):.3f}–{max(tvs):.3f} between the modalities "
                f"(the aware runs' own, per layer); {closer} of {len(matched_rows)} matched runs end closer to their "
                "target than a uniform router would be (per seed in the matched table)."]

    results = {
        **runner.header(since, "e1", NAME, "the matched comparison (regularization in disguise?)", seeds),
        "matched_utilization_coef": coef, "per_modality_balance_coef": PER_MODALITY_BALANCE,
        "target_half_width": TARGET_HALF_WIDTH, "arm_seeds": arm_seeds, "probe_seeds": probe_seeds, "key": key,
        "targets": {f"seed {s}": t for s, t in targets.items()},
        "tables": [cell_table("Final evaluation and routing per cell (mean ± 95% CI over the cell's seeds)", per_run,
                              [L[c] for c in CELLS], METRICS, CELL_TABLE_NOTE),
                   cell_table(f"Routing on the held-out probe set (seeds {', '.join(map(str, probe_seeds))}; layer "
                              "means)", {k: {s: v for s, v in per_run[k].items() if s in probe_seeds}
                                         for k in (L[AWARE], L[AWARE_PMB], L[AGNOSTIC])},
                              [L[AWARE], L[AWARE_PMB], L[AGNOSTIC]], PROBE_METRICS,
                              "E[m] share of logit variance: the variance across experts of E[m] over that of W·x + "
                              "E[m] (mmoe_ds.analysis.routing.logit_variance_split), on the probe tokens."),
                   *extra_tables],
        "matched": matched_rows,
        "contrasts": contrasts, "findings": findings,
        "plots": [{"file": "e1_matched.png", "caption": "E1: caption loss and routing TV per cell; bars are means, "
                                                        "whiskers 95% CIs, dots seeds"}],
        "caveats": [f"{runner.scale.steps} steps of a small model: every arm is under-trained, and a difference that "
                    "is not there at this size may appear at a real one (and the other way round); the size sweep "
                    "shows the trend over the sizes that fit a CPU, not beyond.",
                    TRAINING_ROUTING_CAVEAT,
                    "The aware router's defaults (E[m] ~ N(0, 1), router.modality_bias_init_std; no per-modality "
                    "balance loss; no router learning-rate multiplier) were chosen on a one-seed pilot at this scale "
                    "that is not part of these results; the per-modality balance cells show what the old recipes' "
                    "loss does. With E[m] random at the start, the aware router's specialization is partly set at "
                    "initialization: the matched cells ask whether a loss can give the agnostic router the same.",
                    "Every cell keeps the modality embedding, and image tokens always sit at positions 1..P, so the "
                    "agnostic router's input carries the modality either way (E3's probe reads it); the cells test "
                    "an explicit modality channel in the router, not whether the representation carries the modality."],
        "runs": {label: {str(s): v for s, v in by_s.items()} for label, by_s in per_run.items()},
    }
    write_results(out, results)
    render_folder(out)
    return results


def _size_words(model: dict) -> str:
    """'128 wide, 4 layers, 4 experts' from a model override (the demo model's values where absent)."""
    return (f"{model.get('hidden_size', 128)} wide, {model.get('num_hidden_layers', 4)} layers, "
            f"{model.get('num_local_experts', 4)} experts")
