"""The experiments' statistics: summaries over seeds, contrasts paired by seed, Holm's correction and
power. Pure numpy / scipy on numbers (no runs, no files, no plotting, no markdown).

Every interval is a two-sided 95% Student t interval (ALPHA); every "smallest detectable difference"
is stated at POWER for a paired t-test. A contrast is judged by its paired interval when it is an
experiment's pre-declared primary one, else by its Holm-adjusted p-value (`holm`).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from mmoe_ds.errors import ExperimentError

ALPHA = 0.05  # two-sided level of every interval and test
POWER = 0.8  # the power at which the smallest detectable difference is stated


def summarize(values: Sequence[float]) -> dict:
    """{"mean", "ci95" (half-width of the 95% t interval; None for one seed), "n", "values"}."""
    from mmoe_ds.analysis.metrics import mean_ci95

    vals = [float(v) for v in values]
    if not vals:
        raise ExperimentError("summarize: no values.")
    if len(vals) == 1 or any(np.isnan(vals)):
        return {"mean": float(np.mean(vals)), "ci95": None, "n": len(vals), "values": vals}
    s = mean_ci95(vals)
    return {"mean": s.mean, "ci95": s.half_width, "n": s.n, "values": vals}


def paired_t(diffs: Sequence[float]) -> dict:
    """Paired t statistics of per-seed differences: {"p" (two-sided), "sd", "mdd"}; mdd is the smallest
    true mean difference a two-sided paired t-test at ALPHA detects with POWER at this n and the
    observed SD: (t_{1-α/2, n-1} + t_{POWER, n-1}) · sd / √n (None below 2 seeds)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    n = d.size
    if n < 2 or not np.all(np.isfinite(d)):
        return {"p": None, "sd": None, "mdd": None}
    sd = float(d.std(ddof=1))
    t_a, t_b = stats.t.ppf(1 - ALPHA / 2, n - 1), stats.t.ppf(POWER, n - 1)
    if sd == 0:
        p = 1.0 if d.mean() == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(d.mean()) / (sd / np.sqrt(n)), n - 1))
    return {"p": p, "sd": sd, "mdd": float((t_a + t_b) * sd / np.sqrt(n))}


def welch_half_width(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Half-width of the unpaired (Welch) 95% interval of mean(a) - mean(b): what the same seeds would
    give without pairing, shown beside the paired one (pairing pays when it is much smaller)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 2 or b.size < 2:
        return None
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = np.sqrt(va + vb)
    if se == 0:
        return 0.0
    dof = se ** 4 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    return float(stats.t.ppf(1 - ALPHA / 2, dof) * se)


def contrast(name: str, metric: str, a_label: str, a: Mapping[int, float], b_label: str, b: Mapping[int, float],
             higher_is: str = "better", chance: float | None = None, primary: bool = False,
             target_half_width: float | None = None) -> dict:
    """A comparison paired by seed: per-seed differences a[s] - b[s], summarized with a 95% CI.

    Args:
        name: what is compared, said in the docs.
        metric: the metric's name.
        a_label, b_label: the two arms; a, b: {seed: value}; both arms must have the same seeds.
        higher_is: "better", "worse" or "neutral" (how the docs phrase a difference).
        chance: the metric's chance level (quality readouts): the docs say "cannot tell" when an arm
            is not above it.
        primary: the experiment's one pre-declared contrast (judged by its CI; the others are judged
            after Holm's correction, `holm`).
        target_half_width: for the primary contrast, the half-width its seeds were chosen to reach.
    """
    if set(a) != set(b):
        raise ExperimentError(f"contrast {name}: seeds {sorted(a)} vs {sorted(b)}; pair them by seed.")
    seeds = sorted(a)
    va, vb = [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]
    diffs = [x - y for x, y in zip(va, vb)]
    return {"name": name, "metric": metric, "a": a_label, "b": b_label, "higher_is": higher_is, "seeds": seeds,
            "a_summary": summarize(va), "b_summary": summarize(vb), "diff": summarize(diffs),
            "test": paired_t(diffs), "unpaired_ci95": welch_half_width(va, vb), "chance": chance,
            "primary": primary, "target_half_width": target_half_width}


def holm(contrasts: list[dict]) -> list[dict]:
    """Holm's step-down adjustment of the paired-t p-values of the non-primary contrasts (in place,
    as test["p_holm"]); the primary contrast keeps its own level. Returns `contrasts`."""
    rest = [c for c in contrasts if not c.get("primary") and c["test"]["p"] is not None]
    order = sorted(rest, key=lambda c: c["test"]["p"])
    running = 0.0
    for i, c in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * c["test"]["p"]))
        c["test"]["p_holm"] = running
    return contrasts


def by_seed(seeds: Sequence[int], values: Sequence[float]) -> dict[int, float]:
    """{seed: value} from two parallel sequences."""
    if len(seeds) != len(values):
        raise ExperimentError(f"by_seed: {len(seeds)} seeds for {len(values)} values.")
    return {int(s): float(v) for s, v in zip(seeds, values)}


def chance_of(final: Mapping[str, float], vocab: int | None) -> dict[str, float]:
    """The chance level of each quality readout of a final evaluation record, as chance_<metric>:
    caption ranking: 1 / classes (the evaluator's caption_rank_chance); retrieval R@1: 1 / candidates;
    caption loss: ln V and text perplexity: V (a uniform guess over the V tokens; skipped when `vocab`
    is None)."""
    out = {}
    if "caption_rank_chance" in final:
        out["chance_caption_rank_acc"] = float(final["caption_rank_chance"])
    if final.get("retrieval_candidates"):
        out["chance_retrieval_r1"] = 1.0 / float(final["retrieval_candidates"])
    if vocab is not None:
        out["chance_caption_loss"], out["chance_text_ppl"] = float(np.log(vocab)), float(vocab)
    return out
