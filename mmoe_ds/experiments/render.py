"""Markdown of one experiment from its results dict: the tables (mean ± 95% CI), the per-seed matched
check, the sentences that compare arms (each generated from a paired contrast's numbers) and the power
table. `render_folder` writes an experiment's results.md and figures (`plots`) from its results.json
alone, so both regenerate without training; `docs` assembles the document from the same functions.

A paired difference whose 95% CI excludes 0 is called a difference (after Holm's correction unless it
is the experiment's pre-declared primary contrast), one whose CI overlaps 0 "no evidence of a
difference" with the smallest difference the seeds could detect, a quality readout whose arms are not
above chance "cannot tell", and one seed gives no interval and no conclusion.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from mmoe_ds.io.atomic import atomic_write_text

from . import plots
from .runner import PROTOCOL
from .stats import ALPHA


def fmt(v: float | None) -> str:
    """A number with precision that fits its size (3 decimals below 10, 1 below 100, none above)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3f}"


def fmt_summary(s: dict | None) -> str:
    """mean ± 95% CI half-width, or the mean and "(1 seed)" when there is no interval."""
    if s is None:
        return "—"
    if s.get("ci95") is None:
        return f"{fmt(s['mean'])} (n={s['n']}, no CI)"
    return f"{fmt(s['mean'])} ± {fmt(s['ci95'])}"


STALE = ("**Not rerun with the current experiment protocol** (issue 17: no per-modality balance loss in the recipes, "
         "E[m] ~ N(0, 1) from its own generator, the same initialization for every arm of a seed, Holm's correction "
         "and power tables): these numbers come from the previous recipes (per-modality balance loss on, E[m] "
         "zero-initialised, different initializations per arm) and are kept for reference only; rerun the command "
         "below to replace them.")


def _above_chance(summary: dict, chance: float, higher_is: str) -> bool:
    """Whether an arm's 95% interval lies on the good side of the chance level (a single seed: its value)."""
    half = summary.get("ci95") or 0.0
    if higher_is == "worse":
        return summary["mean"] + half < chance
    return summary["mean"] - half > chance


def verdict(c: dict) -> str:
    """One sentence about a paired contrast, generated from its numbers.

    The pre-declared primary contrast is judged by its 95% CI; every other one by its Holm-adjusted
    paired-t p-value (`test.p_holm`). A quality readout whose arms are not above chance gives
    "cannot tell", never "no difference"; "no evidence" comes with the smallest difference the
    seeds could have detected."""
    d, test = c["diff"], c.get("test") or {}
    tag = "Primary (pre-declared): " if c.get("primary") else ""
    head = f"{tag}{c['name']} — {c['metric']}, {c['a']} minus {c['b']}: {fmt(d['mean'])}"
    if d.get("ci95") is None:
        return f"{head} ({d['n']} seed: no interval, no conclusion)."
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    p_holm = test.get("p_holm")
    extra = f"; Holm-adjusted p = {p_holm:.3f}" if p_holm is not None and not c.get("primary") else ""
    interval = f"{head} ± {fmt(d['ci95'])} (95% CI over {d['n']} seeds, [{fmt(lo)}, {fmt(hi)}]{extra})"
    target = c.get("target_half_width")
    target_says = "" if target is None else (
        f" Half-width {fmt(d['ci95'])} against the stated target {fmt(target)}: "
        f"{'met' if d['ci95'] <= target else 'NOT met'}.")
    chance = c.get("chance")
    if chance is not None:
        low = [x for x, s in ((c["a"], c["a_summary"]), (c["b"], c["b_summary"]))
               if not _above_chance(s, chance, c.get("higher_is", "better"))]
        if low:
            return (f"{interval}: cannot tell — {' and '.join(low)} {'is' if len(low) == 1 else 'are'} not above "
                    f"chance ({fmt(chance)}) on this readout.{target_says}")
    excludes = not (lo <= 0 <= hi)
    significant = excludes if (c.get("primary") or p_holm is None) else p_holm < ALPHA
    if not significant:
        mdd = test.get("mdd")
        detectable = f" (smallest difference detectable with {d['n']} seeds at 80% power: {fmt(mdd)})" if mdd else ""
        why = "the CI overlaps 0" if not excludes else "the CI excludes 0 but not after Holm's correction"
        return f"{interval}: {why} → no evidence of a difference at this scale{detectable}.{target_says}"
    direction = "higher" if d["mean"] > 0 else "lower"
    judgement = {"better": "better" if d["mean"] > 0 else "worse", "worse": "worse" if d["mean"] > 0 else "better",
                 "neutral": None}[c.get("higher_is", "neutral")]
    tail = f", i.e. {c['a']} is {judgement}" if judgement else ""
    basis = "CI excludes 0" if (c.get("primary") or p_holm is None) else "CI excludes 0, and after Holm's correction"
    return f"{interval}: {c['a']} is {direction} than {c['b']}{tail} ({basis}).{target_says}"


def markdown_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines of a bold title and a table (header, separator, one line per row of cells)."""
    return ([f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cells) + " |" for cells in rows])


def render_power(contrasts: list[dict]) -> list[str]:
    """The power table: per contrast, the seeds, the paired and unpaired 95% half-widths and the smallest
    difference a paired t-test at 5% detects with 80% power at that n (the observed SD of the differences)."""
    rows = [c for c in contrasts if (c.get("test") or {}).get("mdd") is not None]
    if not rows:
        return []
    lines = markdown_table(
        "Power: the smallest difference each contrast could detect with the seeds used",
        ["contrast", "metric", "seeds", "paired 95% half-width", "unpaired half-width",
         "smallest detectable difference (80% power)"],
        [[("**primary** " if c.get("primary") else "") + c["name"], c["metric"], str(c["diff"]["n"]),
          fmt(c["diff"]["ci95"]), fmt(c.get("unpaired_ci95")), fmt(c["test"]["mdd"])] for c in rows])
    return lines + ["", "Pairing pays when the paired half-width is well under the unpaired one: the same seed gives "
                        "every arm the same initialization of every shared tensor and the same batches.", ""]


def render_table(table: dict) -> list[str]:
    """Markdown lines of a results table: rows × columns of mean ± 95% CI (with the chance level of a
    quality readout beside it when the row carries one)."""
    cols = table["columns"]

    def cells(row: dict) -> list[str]:
        chance = row.get("chance") or {}
        return [row["label"]] + [fmt_summary(row["cells"].get(k)) + (
            f" (chance {fmt(chance[k])})" if chance.get(k) is not None and row["cells"].get(k) else "")
            for k, _ in cols]

    lines = markdown_table(table["title"], [table.get("row_header", "")] + [h for _, h in cols],
                           [cells(row) for row in table["rows"]])
    if table.get("note"):
        lines += ["", table["note"]]
    return lines + [""]


def render_matched(rows: list[dict]) -> list[str]:
    """E1's per-seed check that every matched run ends closer to its target than a uniform router."""
    if not rows:
        return []
    lines = markdown_table(
        "Matched runs against their targets, per seed",
        ["cell", "seed", "target's TV between modalities", "run's TV to target", "uniform router's TV to target",
         "closer than uniform?"],
        [[r["cell"], str(r["seed"]), fmt(r["target_tv"]), fmt(r["target_gap"]), fmt(r["uniform_gap"]),
          "yes" if r["closer_than_uniform"] else "**no**"] for r in rows])
    return lines + [""]


def render_experiment(results: dict, image_prefix: str = "") -> str:
    """The markdown section of one experiment (also its results.md with image_prefix="")."""
    s = results["scale"]
    n_runs = results.get("runs_launched", 0) + results.get("runs_reused", 0)
    lines = [f"## {results['experiment'].upper()}: {results['title']}", ""]
    if results.get("protocol", 1) < PROTOCOL:
        lines += [STALE, ""]
    lines += ["```bash", results["command"], "```", "",
             f"Scale `{s['name']}`: {s['description']} Seeds: {', '.join(map(str, results['seeds']))}; "
             f"{s['steps']} steps per run; {n_runs} runs, {fmt(results.get('run_minutes', 0))} min of training "
             f"wall time summed over runs ({s.get('parallel', 1)} at a time); this invocation trained "
             f"{results.get('runs_launched', 0)} and reused {results.get('runs_reused', 0)} in "
             f"{fmt(results.get('seconds', 0) / 60)} min.", ""]
    for table in results.get("tables", []):
        lines += render_table(table)
    lines += render_matched(results.get("matched", []))
    for plot in results.get("plots", []):
        lines += [f"![{plot['caption']}]({image_prefix}{plot['file']})", "", f"*{plot['caption']}*", ""]
    says = [verdict(c) for c in results.get("contrasts", [])] + list(results.get("findings", []))
    if says:
        lines += ["**What this says**", ""] + [f"- {x}" for x in says] + [""]
    lines += render_power(results.get("contrasts", []))
    if results.get("caveats"):
        lines += ["**What it does not say**", ""] + [f"- {x}" for x in results["caveats"]] + [""]
    return "\n".join(lines) + "\n"


def render_folder(folder: str | Path) -> dict:
    """Write `folder`/results.md and the experiment's figures from `folder`/results.json; returns the results."""
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    plots.draw(results, folder)
    atomic_write_text(folder / "results.md", render_experiment(results))
    return results
