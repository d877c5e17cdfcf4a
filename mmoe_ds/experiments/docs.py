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

from mmoe_ds.atomic import atomic_write_text

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


def verdict(c: dict) -> str:
    """One sentence about a paired contrast, generated from its numbers."""
    d = c["diff"]
    head = f"{c['name']} — {c['metric']}, {c['a']} minus {c['b']}: {fmt(d['mean'])}"
    if d.get("ci95") is None:
        return f"{head} ({d['n']} seed: no interval, no conclusion)."
    lo, hi = d["mean"] - d["ci95"], d["mean"] + d["ci95"]
    interval = f"{head} ± {fmt(d['ci95'])} (95% CI over {d['n']} seeds, [{fmt(lo)}, {fmt(hi)}])"
    if lo <= 0 <= hi:
        return f"{interval}: the CI overlaps 0 → no evidence of a difference at this scale."
    direction = "higher" if d["mean"] > 0 else "lower"
    judgement = {"better": "better" if d["mean"] > 0 else "worse", "worse": "worse" if d["mean"] > 0 else "better",
                 "neutral": None}[c.get("higher_is", "neutral")]
    tail = f", i.e. {c['a']} is {judgement}" if judgement else ""
    return f"{interval}: {c['a']} is {direction} than {c['b']}{tail} (CI excludes 0)."


def render_table(table: dict) -> list[str]:
    """Markdown lines of a results table: rows × columns of mean ± 95% CI."""
    cols = table["columns"]
    lines = [f"**{table['title']}**", "", "| " + " | ".join([table.get("row_header", "")] + [h for _, h in cols]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for row in table["rows"]:
        lines.append("| " + " | ".join([row["label"]] + [fmt_summary(row["cells"].get(k)) for k, _ in cols]) + " |")
    if table.get("note"):
        lines += ["", table["note"]]
    return lines + [""]


def render_experiment(results: dict, image_prefix: str = "") -> str:
    """The markdown section of one experiment (also its results.md with image_prefix="")."""
    s = results["scale"]
    n_runs = results.get("runs_launched", 0) + results.get("runs_reused", 0)
    lines = [f"## {results['experiment'].upper()}: {results['title']}", "",
             "```bash", results["command"], "```", "",
             f"Scale `{s['name']}`: {s['description']} Seeds: {', '.join(map(str, results['seeds']))}; "
             f"{s['steps']} steps per run; {n_runs} runs, {fmt(results.get('run_minutes', 0))} min of training "
             f"wall time summed over runs ({s.get('parallel', 1)} at a time); this invocation trained "
             f"{results.get('runs_launched', 0)} and reused {results.get('runs_reused', 0)} in "
             f"{fmt(results.get('seconds', 0) / 60)} min.", ""]
    for table in results.get("tables", []):
        lines += render_table(table)
    for plot in results.get("plots", []):
        lines += [f"![{plot['caption']}]({image_prefix}{plot['file']})", "", f"*{plot['caption']}*", ""]
    says = [verdict(c) for c in results.get("contrasts", [])] + list(results.get("findings", []))
    if says:
        lines += ["**What this says**", ""] + [f"- {x}" for x in says] + [""]
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
    """The first contrast's verdict (the experiment's main question), or its first finding."""
    if results.get("contrasts"):
        return verdict(results["contrasts"][0])
    if results.get("findings"):
        return results["findings"][0]
    return "no conclusion recorded"


def render_document(out: Path, doc: Path) -> str:
    """The whole docs/experiments.md text from the results under `out` (image paths relative to `doc`)."""
    found = load_results(out)
    lines = ["# Experiments: is modality-aware routing more than regularization?", "",
             "<!-- Generated by `python -m mmoe_ds.experiments docs` from runs/experiments/*/results.json. "
             "Do not edit by hand: rerun the command. -->", "",
             "The review in the issue asks whether the gains of modality-aware routing are structural or "
             "\"regularization in disguise\". Each experiment below is one command; every table is the mean ± "
             "95% confidence interval (Student t) over seeds, and every sentence about a difference is a paired "
             "per-seed difference with its own interval.", "",
             "## Answers at this scale", ""]
    for exp_id, folder in EXPERIMENTS:
        if exp_id in found:
            r = found[exp_id]
            line = render_toy_headline(r) if exp_id == "e4" else headline(r)
            scale = f"{r['scale']['name']} scale" if "scale" in r else "CPU toy"
            n = len(r["seeds"])
            lines.append(f"- **{exp_id.upper()}** ({scale}, {n} seed{'s' if n != 1 else ''}): {line}")
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


def render_toy_headline(results: dict) -> str:
    """E4's answer: the toy's own generated headline."""
    return results.get("headline", "see its section")


def write_document(out: str | os.PathLike = "runs/experiments", doc: str | os.PathLike = "docs/experiments.md") -> Path:
    """Regenerate `doc` from the results under `out`. Returns the document's path."""
    out, doc = Path(out), Path(doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, render_document(out, doc))
    return doc
