"""E2, convergence: is the aware router only a convergence accelerator?

The agnostic router trains for 10× the aware run's steps in one run, evaluated every 1× (the
review: "train a standard MoE for 5× or 10× longer ... does it converge to the same routing
pattern?"). At each multiple: routing TV and NMI (the routes of the training windows just before
that step) and the evaluation. The aware run is E1's (same recipe, reused). We report the first
multiple at which the agnostic router's mean reaches the aware run's mean, or "not within 10×".
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import e1_matched
from .runner import (TRAINING_ROUTING_CAVEAT, ExperimentError, Run, RunSpec, Runner, contrast, mode_recipe, new_figure,
                     routing_summary, run_metrics, save_figure, summarize, write_results)

NAME = "e2_convergence"
MULTIPLES = tuple(range(1, 11))
REPORTED = (1, 5, 10)
METRICS = (("caption_rank_acc", "caption ranking acc"), ("caption_loss", "caption loss"), ("tv", "routing TV (0-1)"),
           ("nmi", "NMI"))
MATCHED = (("tv", "routing TV"), ("nmi", "NMI"), ("caption_rank_acc", "caption ranking accuracy"))


def long_spec(seed: int, steps: int) -> RunSpec:
    """The agnostic router trained for 10 × `steps`, evaluated (and checkpointed) every `steps`."""
    return RunSpec(mode_recipe("agnostic"), seed,
                   {"train": {"steps": 10 * steps, "eval_every": steps, "checkpoint_every": steps}},
                   label="agnostic, 10x steps")


def metrics_at(run: Run, step: int, window: int) -> dict[str, float]:
    """Evaluation at `step` and the routing of the training windows logged in (step - window, step]."""
    records = [r for r in run.train_records if step - window < r["step"] <= step]
    evals = [r for r in run.evals if r["step"] == step]
    if not records or not evals:
        raise ExperimentError(f"{run.dir}/metrics.jsonl: no training record or evaluation at step {step} (an "
                              f"evaluation error? see its launch.log).")
    out = {k: float(evals[0][k]) for k in ("caption_rank_acc", "caption_loss", "text_ppl") if k in evals[0]}
    out.update(routing_summary(records))
    return out


def first_match(curve: dict[int, float], target: float) -> int | None:
    """The first multiple k (ascending) whose value reaches `target` (>=), or None."""
    for k in sorted(curve):
        if curve[k] >= target:
            return k
    return None


def match_sentence(label: str, curve: dict[int, float], target: float, steps: int) -> str:
    """'agnostic reaches the aware run's mean X (v) at k× = n steps' or 'not within 10×', from the numbers."""
    k = first_match(curve, target)
    if k is not None:
        return (f"{label}: the agnostic router's mean reaches the aware run's mean ({target:.3f}) at {k}× "
                f"= {k * steps} steps ({curve[k]:.3f}).")
    best = max(curve, key=curve.get)
    return (f"{label}: not within {max(curve)}× — the agnostic router's best mean is {curve[best]:.3f} at {best}×, "
            f"the aware run's {target:.3f}.")


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """Train (or reuse) the aware runs and the long agnostic runs; write results and e2_convergence.png."""
    since = runner.tally()
    steps = runner.scale.steps
    window = max(1, int(round(0.2 * steps)))
    aware_specs = [e1_matched.spec("aware", True, s) for s in seeds]
    short_specs = [e1_matched.spec("agnostic", True, s) for s in seeds]
    long_specs = [long_spec(s, steps) for s in seeds]
    runs = runner.run_all(aware_specs + short_specs + long_specs)
    n = len(seeds)
    aware, short, long = runs[:n], runs[n:2 * n], runs[2 * n:]
    aware_m = [run_metrics(r) for r in aware]
    short_m = [run_metrics(r) for r in short]
    long_m = {k: [metrics_at(r, k * steps, window) for r in long] for k in MULTIPLES}

    def col(ms: list[dict], key: str) -> list[float]:
        return [m[key] for m in ms]

    rows = [{"label": f"aware ({steps} steps)", "cells": {k: summarize(col(aware_m, k)) for k, _ in METRICS}},
            {"label": f"agnostic, its own {steps}-step schedule (E1's run)",
             "cells": {k: summarize(col(short_m, k)) for k, _ in METRICS}}]
    rows += [{"label": f"agnostic at {k}× ({k * steps} of {10 * steps} steps)",
              "cells": {key: summarize(col(long_m[k], key)) for key, _ in METRICS}} for k in REPORTED]
    curves = {key: {k: summarize(col(long_m[k], key)) for k in MULTIPLES} for key, _ in METRICS}
    findings = [match_sentence(label, {k: curves[key][k]["mean"] for k in MULTIPLES},
                               summarize(col(aware_m, key))["mean"], steps) for key, label in MATCHED]
    contrasts = [
        contrast("Agnostic at 10× vs aware at 1×", "routing TV", "agnostic 10×", col(long_m[10], "tv"), "aware",
                 col(aware_m, "tv"), higher_is="neutral"),
        contrast("Agnostic at 10× vs aware at 1×", "NMI", "agnostic 10×", col(long_m[10], "nmi"), "aware",
                 col(aware_m, "nmi"), higher_is="neutral"),
        contrast("Agnostic at 10× vs aware at 1×", "caption ranking accuracy", "agnostic 10×",
                 col(long_m[10], "caption_rank_acc"), "aware", col(aware_m, "caption_rank_acc")),
        contrast("Same number of steps", "routing TV", "agnostic 1× (own schedule)", col(short_m, "tv"), "aware",
                 col(aware_m, "tv"), higher_is="neutral"),
    ]

    fig, axes = new_figure(3, width=4.0)
    x = np.array(MULTIPLES) * steps
    for ax, (key, label) in zip(axes[0], (("tv", "routing TV"), ("nmi", "NMI"), ("caption_rank_acc", "caption ranking acc"))):
        mean = np.array([curves[key][k]["mean"] for k in MULTIPLES])
        ci = np.array([curves[key][k]["ci95"] or 0.0 for k in MULTIPLES])
        ax.plot(x, mean, "o-", color="#4c72b0", label="agnostic (one 10× run)")
        ax.fill_between(x, mean - ci, mean + ci, color="#4c72b0", alpha=0.2)
        a = summarize(col(aware_m, key))
        ax.axhline(a["mean"], color="#c44e52", label=f"aware at {steps} steps")
        if a["ci95"]:
            ax.axhspan(a["mean"] - a["ci95"], a["mean"] + a["ci95"], color="#c44e52", alpha=0.15)
        ax.set_xlabel("agnostic training steps", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    plot = save_figure(fig, out / "e2_convergence.png")

    results = {
        **runner.header(since, "e2", NAME, "convergence — does the agnostic router catch up with more steps?", seeds),
        "tables": [{"title": "Aware run vs the agnostic router at 1×, 5×, 10× its steps (mean ± 95% CI)",
                    "row_header": "run", "columns": [list(m) for m in METRICS], "rows": rows,
                    "note": f"Routing measured over the training windows of the last {window} steps before each point."}],
        "curves": curves, "contrasts": contrasts, "findings": findings,
        "plots": [{"file": plot, "caption": "E2: the agnostic router's routing TV, NMI and accuracy against training "
                                            "steps (band: 95% CI over seeds) and the aware run's level (red)"}],
        "caveats": ["One long run is evaluated at each multiple: its learning-rate schedule spans all 10× steps, so "
                    "its 1× point is not a finished 1× run (E1's agnostic run is, and is shown).",
                    "Accuracy at 5× and 10× is compared with a 1× aware run: more steps help any router; the "
                    "routing measures (TV, NMI) are the question here.",
                    f"The aware run has {steps} steps only; whether it keeps changing with more steps is not measured.",
                    TRAINING_ROUTING_CAVEAT],
    }
    from .docs import render_experiment

    write_results(out, results, render_experiment(results))
    return results
