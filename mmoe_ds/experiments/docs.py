"""docs/experiments.md, generated from the experiments' results files — never edited by hand.

    python -m mmoe_ds.experiments docs [--out runs/experiments] [--doc docs/experiments.md]

Every number in the document is read from a results.json; every sentence that depends on a
number is generated from it (a paired difference whose 95% CI excludes 0 is called a
difference, one whose CI overlaps 0 is called "no evidence of a difference", one seed gives no
interval and no conclusion). The same renderer writes each experiment's results.md.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from mmoe_ds.io.atomic import atomic_write_text

from .runner import PROTOCOL

# Order and folder names of the experiments (E4 is the Gaussian toy, mmoe_ds.experiments.toy).
EXPERIMENTS = (("e1", "e1_matched"), ("e2", "e2_convergence"), ("e3", "e3_function"), ("e4", "e4_toy"),
               ("e5", "e5_transfer"), ("e6", "e6_audit"))


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


ALPHA = 0.05
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
            return (f"{interval}: cannot tell — {' and '.join(low)} {'is' if len(low) == 1 else 'are'} not above chance "
                    f"({fmt(chance)}) on this readout.{target_says}")
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


def render_power(contrasts: list[dict]) -> list[str]:
    """The power table: per contrast, the seeds, the paired and unpaired 95% half-widths and the smallest
    difference a paired t-test at 5% detects with 80% power at that n (the observed SD of the differences)."""
    rows = [c for c in contrasts if (c.get("test") or {}).get("mdd") is not None]
    if not rows:
        return []
    lines = ["**Power: the smallest difference each contrast could detect with the seeds used**", "",
             "| contrast | metric | seeds | paired 95% half-width | unpaired half-width | smallest detectable "
             "difference (80% power) |", "|---|---|---|---|---|---|"]
    for c in rows:
        name = ("**primary** " if c.get("primary") else "") + c["name"]
        lines.append(f"| {name} | {c['metric']} | {c['diff']['n']} | {fmt(c['diff']['ci95'])} | "
                     f"{fmt(c.get('unpaired_ci95'))} | {fmt(c['test']['mdd'])} |")
    return lines + ["", "Pairing pays when the paired half-width is well under the unpaired one: the same seed gives "
                        "every arm the same initialization of every shared tensor and the same batches.", ""]


def render_table(table: dict) -> list[str]:
    """Markdown lines of a results table: rows × columns of mean ± 95% CI (with the chance level of a
    quality readout beside it when the row carries one)."""
    cols = table["columns"]
    lines = [f"**{table['title']}**", "", "| " + " | ".join([table.get("row_header", "")] + [h for _, h in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for row in table["rows"]:
        chance = row.get("chance") or {}
        cells = [fmt_summary(row["cells"].get(k)) + (f" (chance {fmt(chance[k])})" if chance.get(k) is not None
                                                     and row["cells"].get(k) else "") for k, _ in cols]
        lines.append("| " + " | ".join([row["label"]] + cells) + " |")
    if table.get("note"):
        lines += ["", table["note"]]
    return lines + [""]


def render_matched(rows: list[dict]) -> list[str]:
    """E1's per-seed check that every matched run ends closer to its target than a uniform router."""
    if not rows:
        return []
    lines = ["**Matched runs against their targets, per seed**", "",
             "| cell | seed | target's TV between modalities | run's TV to target | uniform router's TV to target | "
             "closer than uniform? |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['seed']} | {fmt(r['target_tv'])} | {fmt(r['target_gap'])} | "
                     f"{fmt(r['uniform_gap'])} | {'yes' if r['closer_than_uniform'] else '**no**'} |")
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


def render_toy(results: dict, image_prefix: str = "") -> str:
    """E4's section: the toy's own results.md (mmoe_ds.experiments.toy generates it from its numbers),
    its headings one level down and its image links made relative to the document."""
    md = Path(results["_dir"]) / "results.md"
    if not md.exists():
        return f"## E4\n\n{results.get('headline', 'see ' + str(Path(results['_dir']) / 'results.json'))}\n"
    text = md.read_text()
    text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", text, flags=re.M)
    text = re.sub(r"\]\((?!https?:|/)([^)]+\.png)\)", lambda m: f"]({image_prefix}{m.group(1)})", text)
    return text.rstrip() + "\n"


def load_results(out: Path) -> dict[str, dict]:
    """experiment id -> results dict, for the experiments whose results.json exists under `out`."""
    found = {}
    for exp_id, folder in EXPERIMENTS:
        path = out / folder / "results.json"
        if path.exists():
            results = json.loads(path.read_text())
            results["_dir"] = str(path.parent)
            found[exp_id] = results
    return found


def headline(results: dict) -> str:
    """The primary contrast's verdict (else the first contrast's: the experiment's main question), or its
    first finding."""
    if results.get("contrasts"):
        return verdict(next((c for c in results["contrasts"] if c.get("primary")), results["contrasts"][0]))
    if results.get("findings"):
        return results["findings"][0]
    return "no conclusion recorded"


def render_document(out: Path, doc: Path) -> str:
    """The whole docs/experiments.md text from the results under `out` (image paths relative to `doc`)."""
    found = load_results(out)
    lines = ["# Experiments: is modality-aware routing more than regularization?", "",
             "<!-- Generated by `python -m mmoe_ds.experiments docs` from runs/experiments/*/results.json. "
             "Do not edit by hand: rerun the command. -->", "",
             "## What the results show and do not show at this scale", "", *summary_lines(found), "",
             "The review in the issue asks whether the gains of modality-aware routing are structural or "
             "\"regularization in disguise\". Each experiment below is one command; every table is the mean ± "
             "95% confidence interval (Student t) over seeds; every sentence comparing arms is generated from a "
             "difference paired by seed with its own interval: each experiment's pre-declared primary contrast is "
             "judged by its CI, every other contrast after Holm's correction, and a quality readout not above "
             "chance gives \"cannot tell\". Each experiment ends with its power table.", "",
             "## Answers at this scale", ""]
    for exp_id, folder in EXPERIMENTS:
        if exp_id in found:
            r = found[exp_id]
            line = render_toy_headline(r) if exp_id == "e4" else headline(r)
            scale = f"{r['scale']['name']} scale" if "scale" in r else "CPU toy"
            n = len(r["seeds"])
            stale = " — previous protocol, not rerun" if exp_id != "e4" and r.get("protocol", 1) < PROTOCOL else ""
            lines.append(f"- **{exp_id.upper()}** ({scale}, {n} seed{'s' if n != 1 else ''}{stale}): {line}")
        else:
            lines.append(f"- **{exp_id.upper()}**: not run yet (`python -m mmoe_ds.experiments {exp_id}`).")
    lines.append("")
    for exp_id, folder in EXPERIMENTS:
        if exp_id not in found:
            lines += [f"## {exp_id.upper()}", "", f"Not run yet: `python -m mmoe_ds.experiments {exp_id} --seeds 0,1,2`.",
                      ""]
            continue
        prefix = os.path.relpath(out / folder, doc.parent).replace(os.sep, "/") + "/"
        r = found[exp_id]
        lines.append(render_toy(r, prefix) if exp_id == "e4" else render_experiment(r, prefix))
    return "\n".join(lines).rstrip() + "\n"


def _ms(s: dict | None) -> str:
    return "n/a" if s is None else fmt_summary(s)


def summary_lines(found: dict[str, dict]) -> list[str]:
    """What the results show and do not show at this scale, with their numbers: the opening of
    docs/experiments.md and the README's experiments section (both generated from the results)."""
    e1 = found.get("e1")
    if not e1 or "key" not in e1:
        return ["E1 has not been run with the current experiment code: run `python -m mmoe_ds.experiments e1`."]
    k, scale = e1["key"], e1["scale"]
    p = k["primary"]
    d = p["diff"]
    lines = [f"At the `{scale['name']}` scale ({scale['steps']} steps of a small model; the primary contrast over "
             f"{d['n']} seeds, the other E1 cells over {len(e1.get('arm_seeds', e1['seeds']))}):"]
    says = (f"- **Does the aware router specialize?** Routing TV between the modalities (0–1, last 20% of "
            f"training, over the {len(e1.get('arm_seeds', e1['seeds']))} seeds every cell has): aware {_ms(k.get('aware_tv'))}, agnostic {_ms(k.get('agnostic_tv'))}; with the per-modality "
            f"balance loss the old recipes used: aware {_ms(k.get('aware_pmb_tv'))}, agnostic "
            f"{_ms(k.get('agnostic_pmb_tv'))}.")
    if k.get("aware_probe_mi_bits"):
        says += (f" On the held-out probe set I(M;E) = {_ms(k.get('aware_probe_mi_bits'))} bits for the aware router "
                 f"without it, {_ms(k.get('aware_pmb_probe_mi_bits'))} with it (agnostic "
                 f"{_ms(k.get('agnostic_probe_mi_bits'))}); E[m]'s share of the aware router's logit variance "
                 f"{_ms(k.get('aware_logit_share'))} without, {_ms(k.get('aware_pmb_logit_share'))} with.")
    lines.append(says)
    closer, total = k["matched_closer_than_uniform"]
    lines.append(f"- **Does the matched loss match?** {closer} of {total} matched runs end closer to their per-layer "
                 "target than a uniform router would be (per seed in E1's matched table).")
    lines.append(f"- **The regularization question (E1's pre-declared primary contrast):** {verdict(p)}")
    sweep = [c for c in e1.get("contrasts", []) if "size" in c]
    if sweep:
        lines.append("- **Size sweep** (caption loss, aware minus agnostic + matched loss): " + "; ".join(
            f"size {c['size']}: {fmt(c['diff']['mean'])}" + (f" ± {fmt(c['diff']['ci95'])}" if c["diff"].get("ci95")
                                                             is not None else " (1 seed)") for c in sweep) + ".")
    cov = [c for c in e1.get("contrasts", []) if c["name"].startswith("Covariance-regime data")]
    if cov:
        lines.append("- **Covariance-regime data** (modalities that differ only in covariance shape): "
                     + " ".join(verdict(c) for c in cov[:2]))
    fresh = [e for e in ("e2", "e3", "e5", "e6") if e in found and found[e].get("protocol", 1) >= PROTOCOL]
    stale = [e.upper() for e in ("e2", "e3", "e5", "e6") if e in found and e not in fresh]
    others = [f"{e.upper()} over {len(found[e]['seeds'])} seed{'s' if len(found[e]['seeds']) != 1 else ''}"
              for e in fresh]
    tail = (f" {', '.join(stale)} {'was' if len(stale) == 1 else 'were'} not rerun with the current protocol (compute): "
            f"{'its section holds' if len(stale) == 1 else 'their sections hold'} the previous recipes' numbers, for "
            "reference only.") if stale else ""
    lines.append("- **What this does not show:** anything about real model sizes or training lengths — every arm is "
                 "under-trained, and the sizes span only what a 2-core CPU trains."
                 + (f" The other experiments ({', '.join(others)}) have fewer seeds and say \"cannot tell\" or \"no "
                    "evidence\" with the smallest difference they could have detected (their power tables)."
                    if others else "") + tail)
    return lines


README_START, README_END = "<!-- experiments-summary:start -->", "<!-- experiments-summary:end -->"


def update_readme(readme: Path, lines: list[str]) -> bool:
    """Replace the README's generated block (between README_START and README_END) with `lines`;
    False when the README has no such block."""
    if not readme.exists():
        return False
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    block = "\n".join([README_START, "<!-- generated by `python -m mmoe_ds.experiments docs` from "
                        "runs/experiments/*/results.json -->", *lines, README_END])
    atomic_write_text(readme, head + block + tail)
    return True


def render_toy_headline(results: dict) -> str:
    """E4's answer: the toy's own generated headline."""
    return results.get("headline", "see its section")


def write_document(out: str | os.PathLike = "runs/experiments", doc: str | os.PathLike = "docs/experiments.md",
                   readme: str | os.PathLike | None = None) -> Path:
    """Regenerate `doc` from the results under `out` (and the generated block of `readme`, when given).
    Returns the document's path."""
    out, doc = Path(out), Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, render_document(out, doc))
    if readme is not None:
        update_readme(Path(readme), summary_lines(load_results(out)))
    return doc
