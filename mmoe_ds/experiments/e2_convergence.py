"""E2, convergence: is the aware router only a convergence accelerator? Does the agnostic router,
trained longer, converge to the aware router's routing *pattern*?

Both routers train for 10× the scale's steps in one run each (same seed, same initialization of every
shared tensor, same batches), evaluated every 1×. At N = 1, 2, 5, 10 we take each run's routing
pattern — per MoE layer, p(expert | modality) over the routes of the training windows just before
N× — align the agnostic run's experts to the aware run's (Hungarian matching on the usage profiles:
expert labels are arbitrary) and report the distance between the patterns (mean TV over modalities
and layers after alignment): against the aware run at the same N (both trained longer) and against
the aware run's finished 1× run (E1's). A curve that falls towards 0 says the agnostic router
converges to the aware pattern; a flat one says it does not, within 10×.

Pre-declared primary contrast: the pattern distance to the aware run at the same step, at 10× minus
at 1× (paired by seed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import e1_matched
from .measure import TRAINING_ROUTING_CAVEAT, counts_of, routing_summary
from .render import render_folder
from .runner import ExperimentError, Run, Runner, RunSpec, mode_recipe, seeds_for, write_results
from .stats import contrast, holm, summarize

NAME = "e2_convergence"
MULTIPLES = (1, 2, 5, 10)
LONG = max(MULTIPLES)


def long_spec(router: str, seed: int, steps: int) -> RunSpec:
    """`router` trained for LONG × `steps`, evaluated (and checkpointed) every `steps`."""
    return RunSpec(mode_recipe(e1_matched.ROUTER_RECIPE[router]), seed,
                   {"train": {"steps": LONG * steps, "eval_every": steps, "checkpoint_every": steps}},
                   label=f"{router}, {LONG}x steps")


def window(run: Run, step: int, width: int) -> list[dict]:
    """The training records logged in (step - width, step]."""
    records = [r for r in run.train_records if step - width < r["step"] <= step]
    if not records:
        raise ExperimentError(f"{run.dir}/metrics.jsonl: no training record before step {step}.")
    return records


def pattern(records: list[dict]) -> list[np.ndarray]:
    """Per MoE layer, [modality, expert] p(e | m) of the routes chosen in `records`."""
    return [c / np.maximum(c.sum(1, keepdims=True), 1) for c in counts_of(records)]


def align(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`other`'s experts (columns of [M, E]) permuted to best match `reference` (Hungarian, least total L1
    between the experts' usage profiles over modalities)."""
    from scipy.optimize import linear_sum_assignment

    cost = np.abs(reference[:, :, None] - other[:, None, :]).sum(0)  # [E_ref, E_other]
    rows, cols = linear_sum_assignment(cost)
    return other[:, cols[np.argsort(rows)]]


def pattern_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over layers and modalities of TV(a's p(e|m), b's p(e|m) after aligning b's experts to a's)."""
    if len(a) != len(b):
        raise ValueError(f"patterns of {len(a)} and {len(b)} MoE layers.")
    return float(np.mean([0.5 * np.abs(x - align(x, y)).sum(1).mean() for x, y in zip(a, b)]))


def eval_at(run: Run, step: int) -> dict[str, float]:
    evals = [r for r in run.evals if r["step"] == step]
    if not evals:
        raise ExperimentError(f"{run.dir}/metrics.jsonl: no evaluation at step {step} (see its launch.log).")
    return {k: float(evals[0][k]) for k in ("caption_rank_acc", "caption_loss") if k in evals[0]}


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """Train (or reuse) the long runs and E1's aware runs; write results.json, then results.md and
    e2_convergence.png from it."""
    since = runner.tally()
    seeds = seeds_for(runner, "e2", seeds)
    steps = runner.scale.steps
    width = max(1, int(round(0.2 * steps)))
    specs = [long_spec(r, s, steps) for r in ("aware", "agnostic") for s in seeds] + \
            [e1_matched.spec(e1_matched.AWARE, s) for s in seeds]
    runs = runner.run_all(specs)
    n = len(seeds)
    aware_long, agn_long, aware_1x = (dict(zip(seeds, runs[i * n:(i + 1) * n])) for i in range(3))
    ref_1x = {s: pattern(window(aware_1x[s], steps, width)) for s in seeds}
    curves: dict[str, dict[int, dict[int, float]]] = {k: {N: {} for N in MULTIPLES} for k in
                                                      ("dist_same_step", "dist_aware_1x", "dist_aware_self",
                                                       "tv_agnostic", "tv_aware", "loss_agnostic", "loss_aware")}
    for s in seeds:
        for N in MULTIPLES:
            ag = window(agn_long[s], N * steps, width)
            aw = window(aware_long[s], N * steps, width)
            curves["dist_same_step"][N][s] = pattern_distance(pattern(aw), pattern(ag))
            curves["dist_aware_1x"][N][s] = pattern_distance(ref_1x[s], pattern(ag))
            curves["dist_aware_self"][N][s] = pattern_distance(ref_1x[s], pattern(aw))
            curves["tv_agnostic"][N][s] = routing_summary(ag)["tv"]
            curves["tv_aware"][N][s] = routing_summary(aw)["tv"]
            curves["loss_agnostic"][N][s] = eval_at(agn_long[s], N * steps)["caption_loss"]
            curves["loss_aware"][N][s] = eval_at(aware_long[s], N * steps)["caption_loss"]

    columns = [["dist_same_step", "pattern distance, agnostic vs aware at the same step"],
               ["dist_aware_1x", "pattern distance, agnostic vs aware 1× (E1's run)"],
               ["dist_aware_self", "pattern distance, aware vs its own 1× run"],
               ["tv_agnostic", "routing TV, agnostic"], ["tv_aware", "routing TV, aware"],
               ["loss_agnostic", "caption loss, agnostic"], ["loss_aware", "caption loss, aware"]]
    rows = [{"label": f"{N}× ({N * steps} steps)", "cells": {k: summarize([curves[k][N][s] for s in seeds])
                                                           for k, _ in columns}} for N in MULTIPLES]
    contrasts = [
        contrast(f"Does the agnostic routing pattern approach the aware one? Distance at {LONG}× minus at 1×",
                 "pattern distance (TV after alignment)", f"{LONG}×", curves["dist_same_step"][LONG], "1×",
                 curves["dist_same_step"][1], higher_is="neutral", primary=True),
        contrast(f"Routing specialization after {LONG}× steps, agnostic vs aware", "routing TV", f"agnostic {LONG}×",
                 curves["tv_agnostic"][LONG], f"aware {LONG}×", curves["tv_aware"][LONG], higher_is="neutral"),
        contrast("Does the aware router keep specializing with more steps?", "routing TV", f"aware {LONG}×",
                 curves["tv_aware"][LONG], "aware 1×", curves["tv_aware"][1], higher_is="neutral"),
        contrast(f"Quality after {LONG}× steps, aware vs agnostic", "caption loss", f"aware {LONG}×",
                 curves["loss_aware"][LONG], f"agnostic {LONG}×", curves["loss_agnostic"][LONG], higher_is="worse"),
    ]
    holm(contrasts)
    d1 = summarize(list(curves["dist_same_step"][1].values()))
    d10 = summarize(list(curves["dist_same_step"][LONG].values()))
    findings = [f"Pattern distance between the agnostic and the aware routing at the same step: {d1['mean']:.3f} "
                "at 1×, "
                + ", ".join(f"{summarize(list(curves['dist_same_step'][N].values()))['mean']:.3f} at {N}×"
                            for N in MULTIPLES[1:]) + f" (0: the same routing up to expert labels; {d10['mean']:.3f} "
                f"at {LONG}×)."]

    results = {
        **runner.header(since, "e2", NAME, "convergence — does the agnostic routing pattern approach the aware one?",
                        seeds),
        "multiples": list(MULTIPLES),
        "tables": [{"title": f"Both routers trained {LONG}× longer, measured at N× (mean ± 95% CI over seeds)",
                    "row_header": "N", "columns": columns, "rows": rows,
                    "note": f"Routing over the training windows of the last {width} steps before each point; pattern "
                            "distance: mean TV of p(e|m) over modalities and MoE layers after Hungarian alignment of "
                            "expert labels."}],
        "curves": {k: {str(N): {str(s): v for s, v in by.items()} for N, by in c.items()} for k, c in curves.items()},
        "contrasts": contrasts, "findings": findings,
        "plots": [{"file": "e2_convergence.png", "caption": "E2: pattern distances, routing TV and caption loss "
                                                            "against training steps (bands: 95% CI over seeds)"}],
        "caveats": [f"Each long run's learning-rate schedule spans all {LONG}× steps, so its N× point is not a "
                    "finished N× run (E1's aware run is the finished 1× reference).",
                    "Aligning experts by their usage profiles makes any two patterns look closer than unaligned ones; "
                    "the aware run against its own 1× run shows how far a pattern moves by training alone.",
                    "Patterns are per modality only; per-class usage profiles are not measured here.",
                    TRAINING_ROUTING_CAVEAT],
    }
    write_results(out, results)
    render_folder(out)
    return results
