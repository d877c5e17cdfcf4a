"""E3, expert function: the analysis (mmoe_ds.analysis.analyze) of every router design in
recipes/modes on the same held-out probe set (the test split).

Per design and MoE layer: routing TV and NMI between the modalities, the linear probe's held-out
accuracy at reading the modality from the router's input (can an agnostic linear router see the
modality at all?), and E×E debiased linear CKA between the experts' outputs (all probe tokens,
image only, text only) and between their weights. Low off-diagonal CKA = experts compute
different functions. The plain agnostic and modality-bias runs are E1's (reused).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmoe_ds.io.atomic import atomic_write_text

from .measure import run_metrics
from .render import render_folder
from .runner import Run, Runner, RunSpec, mode_recipe, seeds_for, write_results
from .stats import by_seed, contrast, holm, summarize

NAME = "e3_function"
METRICS = (("caption_rank_acc", "caption ranking acc"), ("tv", "probe TV"), ("nmi", "probe NMI"),
           ("probe_acc", "modality probe acc"), ("cka_all", "expert CKA, all"), ("cka_image", "expert CKA, image"),
           ("cka_text", "expert CKA, text"), ("cka_weights", "weight CKA"))
PROBE = {"tiny": (64, 100), "cpu": (512, 1000), "gpu": (512, 1000)}  # scale -> (n_probe samples, n_perm)


def expand_router(router: dict, num_experts: int) -> dict:
    """Router overrides that carry a 4-expert design's pools / matched target to `num_experts` experts
    (each expert becomes a block of num_experts/4 experts). {} when nothing needs changing."""
    over: dict = {}
    pools, target = router.get("pools"), router.get("matched_utilization_target")
    base = len(next(iter(target.values()))) if target else 4
    if num_experts == base or (not pools and not target):
        return over
    if num_experts % base:
        raise ValueError(f"cannot carry a {base}-expert design to {num_experts} experts; use a multiple of {base}.")
    block = num_experts // base
    if pools:
        over["pools"] = {m: [e * block + j for e in ids for j in range(block)] for m, ids in pools.items()}
    if target:
        over["matched_utilization_target"] = {m: [p / block for p in dist for _ in range(block)]
                                              for m, dist in target.items()}
    return over


def design_spec(runner: Runner, design: str, seed: int) -> RunSpec:
    path = mode_recipe(design)
    experts = runner.scale.overrides.get("model", {}).get("num_local_experts")
    router = runner.base_recipe(path)["model"]["router"]
    over = expand_router(router, experts) if experts else {}
    return RunSpec(path, seed, {"model": {"router": over}} if over else {}, label=design)


def _offdiag(matrix) -> float:
    m = np.asarray(matrix, dtype=float)
    mask = ~np.eye(m.shape[0], dtype=bool)
    vals = m[mask]
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


def analysis_of(run: Run, scale_name: str) -> dict:
    """analyze() of a finished run on its test split, cached in <run>/analysis.json."""
    path = run.dir / "analysis.json"
    n_probe, n_perm = PROBE[scale_name]
    if path.exists():
        cached = json.loads(path.read_text())
        if cached.get("settings", {}).get("n_probe") == n_probe:
            return cached
    from mmoe_ds.analysis.analyze import analyze

    result = analyze(str(run.dir), n_probe=n_probe, n_perm=n_perm).to_dict()
    atomic_write_text(path, json.dumps(result) + "\n")
    return result


def analysis_metrics(a: dict) -> dict[str, float]:
    """Layer means of the analysis' TV, NMI, probe accuracy and off-diagonal CKAs (+ per-layer probe/TV)."""
    layers = a["layers"]
    out = {"tv": float(np.mean([l["tv"] for l in layers])), "nmi": float(np.mean([l["nmi"] for l in layers])),
           "probe_acc": float(np.mean([l["probe_acc"] for l in layers])),
           "mi_null_p_max": float(max(l["mi_null_p"] for l in layers))}
    for kind in ("all", "image", "text", "weights"):
        out[f"cka_{kind}"] = float(np.nanmean([_offdiag(l["cka"][kind]) for l in layers]))
    for i, l in enumerate(layers):
        out[f"probe_acc_L{i}"], out[f"tv_L{i}"] = float(l["probe_acc"]), float(l["tv"])
    return out


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """Train (or reuse) every design × seed, analyze each run; write results.json (with the first seed's CKA
    matrices), then results.md, e3_cka.png and e3_probe.png from it."""
    since = runner.tally()

    seeds = seeds_for(runner, "e3", seeds)
    names = runner.modes()
    keys = [(d, s) for d in names for s in seeds]
    runs = runner.run_all([design_spec(runner, d, s) for d, s in keys])
    analyses, metrics = {}, {}
    for key, r in zip(keys, runs):
        runner.log(f"analyze {key[0]} seed {key[1]}")
        analyses[key] = analysis_of(r, runner.scale.name)
        metrics[key] = {**run_metrics(r), **analysis_metrics(analyses[key])}

    def col(design: str, key: str) -> list[float]:
        return [metrics[(design, s)][key] for s in seeds]

    rows = [{"label": d, "cells": {k: summarize(col(d, k)) for k, _ in METRICS},
             "chance": {"caption_rank_acc": metrics[(d, seeds[0])].get("chance_caption_rank_acc")}} for d in names]
    n_layers = len(analyses[keys[0]]["layers"])
    layer_ids = [l["layer"] for l in analyses[keys[0]]["layers"]]
    probe_rows = [{"label": d, "cells": {f"probe_acc_L{i}": summarize(col(d, f"probe_acc_L{i}"))
                                         for i in range(n_layers)}
                   | {f"tv_L{i}": summarize(col(d, f"tv_L{i}")) for i in range(n_layers)}} for d in names]
    probe_cols = [[f"probe_acc_L{i}", f"probe acc, layer {layer_ids[i]}"] for i in range(n_layers)] + \
                 [[f"tv_L{i}", f"TV, layer {layer_ids[i]}"] for i in range(n_layers)]
    contrasts = []
    if {"agnostic", "modality_bias"} <= set(names):
        contrasts += [
            contrast("Aware vs agnostic router: how alike the experts compute", "mean off-diagonal expert CKA",
                     "modality_bias", by_seed(seeds, col("modality_bias", "cka_all")), "agnostic",
                     by_seed(seeds, col("agnostic", "cka_all")), higher_is="neutral", primary=True),
            contrast("Aware vs agnostic router on the probe set", "routing TV", "modality_bias",
                     by_seed(seeds, col("modality_bias", "tv")), "agnostic", by_seed(seeds, col("agnostic", "tv")),
                     higher_is="neutral"),
        ]
    if {"agnostic_matched_utilization", "modality_bias"} <= set(names):
        contrasts.append(contrast("Loss-only specialization (hand-set target) vs the aware router", "routing TV",
                                  "agnostic_matched_utilization",
                                  by_seed(seeds, col("agnostic_matched_utilization", "tv")),
                                  "modality_bias", by_seed(seeds, col("modality_bias", "tv")), higher_is="neutral"))
    holm(contrasts)
    findings = []
    if "agnostic" in names:
        p = summarize(col("agnostic", "probe_acc"))
        findings.append(f"A linear probe reads the modality from the agnostic router's input with held-out accuracy "
                        f"{p['mean']:.3f} (layer mean over seeds): the information is there for a linear router.")

    n_probe, n_perm = PROBE[runner.scale.name]
    results = {
        **runner.header(since, "e3", NAME, "expert function — CKA and modality probes for every router design", seeds),
        "designs": names, "probe": {"n_probe": n_probe, "n_perm": n_perm}, "layers": layer_ids,
        "cka": {"seed": seeds[0], "all": {d: [layer["cka"]["all"] for layer in analyses[(d, seeds[0])]["layers"]]
                                          for d in names}},
        "tables": [
            {"title": "Per design: quality, routing on the probe set, probe accuracy and expert similarity (layer "
                      "means; mean ± 95% CI over seeds)", "row_header": "design", "columns": [list(m) for m in METRICS],
             "rows": rows,
             "note": "Expert CKA: mean off-diagonal debiased linear CKA between the experts' outputs (1 = the experts "
                     "compute the same function up to rotation and scale); weight CKA: between their weight "
                     "matrices."},
            {"title": "Per MoE layer: modality probe accuracy and routing TV", "row_header": "design",
             "columns": probe_cols, "rows": probe_rows}],
        "contrasts": contrasts, "findings": findings,
        "plots": [{"file": "e3_cka.png", "caption": f"E3: expert × expert CKA of expert outputs on the probe set, seed "
                                               f"{seeds[0]}, per design (rows) and MoE layer (columns)"},
                  {"file": "e3_probe.png", "caption": "E3: held-out accuracy of a linear probe reading the modality "
                                                      "from each MoE layer's router input, and routing TV (whiskers: "
                                                      "95% CIs)"}],
        "caveats": [f"Probe set: {n_probe} test samples; CKA on every expert's outputs for all probe tokens (each "
                    "expert is run on every probe token, routed to it or not).",
                    "Experts that are similar by CKA can still differ in what they do for the loss; "
                    "CKA measures representational similarity only.",
                    "Every design here keeps the modality embedding (no design runs without it), and image tokens "
                    "always sit at positions 1..P, so the position embedding tells the modality too. Probe accuracy "
                    "1.0 means a linear router COULD separate the modalities, not that it does (see TV/NMI)."],
    }
    write_results(out, results)
    render_folder(out)
    return results
