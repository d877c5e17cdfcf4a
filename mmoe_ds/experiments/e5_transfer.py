"""E5, cross-dataset transfer of routing: does the routing learnt on dataset A (the embedded
dataset) carry over to dataset B (Noto Color Emoji captioned with Unicode names, encoded with A's
tokenizer)?

A is E1's aware run (reused), exported with `mmoe-ds export`. Zero shot, the export is analysed
on A's and on B's test split (mmoe_ds.analysis.analyze): per MoE layer, the drift of each
modality's expert distribution p(e | m) from A to B (total variation and Jensen–Shannon), the
routing TV between the modalities on each, and the retention of I(M;E) (on B / on A). Then the
export is fine-tuned on B (`train.init_from`) with the router trainable, frozen
(`train.freeze`) or re-initialised (`train.reinit`), and each fine-tuned model is analysed on B:
quality, and how far its routing moved from the zero-shot routing on B.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmoe_ds.io.atomic import atomic_write_text
from mmoe_ds.moe.config import MODALITIES

from . import e1_matched
from .measure import chance_levels
from .render import render_folder
from .runner import Runner, RunSpec, mode_recipe, seeds_for, write_results
from .stats import by_seed, contrast, holm, summarize

NAME = "e5_transfer"
ROUTER_PATTERN = "*.deepspeed_moe.gate.*"
VARIANTS = {"trainable": {}, "frozen": {"freeze": [ROUTER_PATTERN]}, "reinit": {"reinit": [ROUTER_PATTERN]}}
PROBE = {"tiny": (64, 100), "cpu": (512, 1000), "gpu": (512, 1000)}
# Image->caption retrieval on B after fine-tuning: the emoji names are distinct captions (chance 1/candidates).
RETRIEVAL_CANDIDATES = {"tiny": 0, "cpu": 100, "gpu": 100}


def js_bits(p, q) -> float:
    """Jensen–Shannon divergence in bits (0..1) between two distributions over the same experts."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def tv(p, q) -> float:
    return float(0.5 * np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def drift(a: dict, b: dict) -> dict[str, float]:
    """Per-layer and mean drift of p(e | m) between two analyses of the same model (a: before/on A, b: after/on B).

    Returns tv_{m}, js_{m} (layer means), tv_{m}_L{i}, and mi_a, mi_b (layer means of the Miller–Madow I(M;E)
    in bits), mi_change = mi_b - mi_a, retention = mi_b / mi_a (NaN when mi_a <= 0), and tv_a / tv_b (routing
    TV image vs text).
    """
    out: dict[str, float] = {}
    for m in MODALITIES:
        tvs, jss = [], []
        for i, (la, lb) in enumerate(zip(a["layers"], b["layers"])):
            pa, pb = la["per_modality"][m]["utilization"], lb["per_modality"][m]["utilization"]
            tvs.append(tv(pa, pb))
            jss.append(js_bits(pa, pb))
            out[f"tv_{m}_L{i}"] = tvs[-1]
        out[f"tv_{m}"], out[f"js_{m}"] = float(np.mean(tvs)), float(np.mean(jss))
    out["mi_a"] = float(np.mean([l["mi_bits"] for l in a["layers"]]))
    out["mi_b"] = float(np.mean([l["mi_bits"] for l in b["layers"]]))
    out["mi_change"] = out["mi_b"] - out["mi_a"]
    out["retention"] = out["mi_b"] / out["mi_a"] if out["mi_a"] > 0 else float("nan")
    out["tv_a"] = float(np.mean([l["tv"] for l in a["layers"]]))
    out["tv_b"] = float(np.mean([l["tv"] for l in b["layers"]]))
    return out


MI_FLOOR_BITS = 0.05  # below this I(M;E) on A, a ratio "retained on B" is noise over noise


def retention_sentence(mi_a: list[float], mi_b: list[float]) -> str:
    """How much of A's I(M;E) survives on B, said from the numbers (a ratio only when A has some to retain)."""
    a, b = float(np.mean(mi_a)), float(np.mean(mi_b))
    if a < MI_FLOOR_BITS:
        return (f"On A the routing carries almost no modality information (I(M;E) = {a:.3f} bits, below "
                f"{MI_FLOOR_BITS} bits), so retention is not meaningful; on B it is {b:.3f} bits.")
    return f"Zero shot, the A model keeps {b / a:.2f} of its I(M;E) on B ({b:.3f} of {a:.3f} bits, means over seeds)."


def cached_analysis(cache: Path, source: Path, data_dir: Path, scale_name: str) -> dict:
    """analyze(source, data_dir) cached in `cache` (a JSON file)."""
    n_probe, n_perm = PROBE[scale_name]
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("settings", {}).get("n_probe") == n_probe and cached.get("data_dir") == str(data_dir):
            return cached
    from mmoe_ds.analysis.analyze import analyze

    result = analyze(str(source), data_dir=str(data_dir), n_probe=n_probe, n_perm=n_perm).to_dict()
    atomic_write_text(cache, json.dumps(result) + "\n")
    return result


def finetune_spec(runner: Runner, export: Path, seed: int, variant: str) -> RunSpec:
    """Fine-tuning of an export on the emoji dataset: image+caption pairs only, router per `variant`."""
    steps = max(1, int(round(runner.scale.steps * runner.scale.finetune_fraction)))
    batch = sum(runner.recipe(e1_matched.spec(e1_matched.AWARE, seed))["data"]["composition"].values())
    train = {"init_from": str(export.resolve()), "steps": steps, "eval_every": steps, "checkpoint_every": steps,
             **VARIANTS[variant]}
    data = {"composition": {"image_text": batch}, "retrieval_candidates": RETRIEVAL_CANDIDATES[runner.scale.name]}
    return RunSpec(mode_recipe("modality_bias"), seed, {"data": data, "train": train},
                   dataset="emoji", label=f"fine-tune on emoji, router {variant}")


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """A runs (reused), exports, zero-shot analyses, fine-tunes; write results.json, then results.md and
    e5_transfer.png from it."""
    since = runner.tally()
    seeds = seeds_for(runner, "e5", seeds)
    data_a, data_b = runner.dataset("embedded").resolve(), runner.dataset("emoji").resolve()
    a_runs = runner.run_all([e1_matched.spec(e1_matched.AWARE, s) for s in seeds])
    exports = {s: runner.export(r) for s, r in zip(seeds, a_runs)}
    zero = {}
    for s, r in zip(seeds, a_runs):
        runner.log(f"zero-shot analysis, seed {s}")
        on_a = cached_analysis(r.dir / "analysis_on_A.json", exports[s], data_a, runner.scale.name)
        on_b = cached_analysis(r.dir / "analysis_on_B.json", exports[s], data_b, runner.scale.name)
        zero[s] = {"on_a": on_a, "on_b": on_b, "drift": drift(on_a, on_b)}
    keys = [(v, s) for v in VARIANTS for s in seeds]
    ft_runs = runner.run_all([finetune_spec(runner, exports[s], s, v) for v, s in keys])
    ft = {}
    for (v, s), r in zip(keys, ft_runs):
        runner.log(f"analysis after fine-tuning ({v}), seed {s}")
        after = cached_analysis(r.dir / "analysis_on_B.json", runner.export(r), data_b, runner.scale.name)
        change = drift(zero[s]["on_b"], after)
        final = r.final_eval()
        ft[(v, s)] = {"caption_loss": float(final["caption_loss"]), **chance_levels(r),
                      **({"retrieval_r1": float(final["retrieval_r1"])} if "retrieval_r1" in final else {}),
                      "change_image": change["tv_image"], "change_text": change["tv_text"], "tv_b": change["tv_b"],
                      "mi_b": change["mi_b"], "mi_change": change["mi_change"]}

    def zcol(key: str) -> list[float]:
        return [zero[s]["drift"][key] for s in seeds]

    def fcol(v: str, key: str) -> list[float]:
        return [ft[(v, s)][key] for s in seeds]

    layer_ids = [l["layer"] for l in zero[seeds[0]]["on_a"]["layers"]]
    zero_cols = [["tv_a", "TV on A"], ["tv_b", "TV on B"], ["tv_image", "drift image (TV)"],
                 ["tv_text", "drift text (TV)"], ["js_image", "drift image (JS bits)"],
                 ["js_text", "drift text (JS bits)"],
                 ["mi_a", "I(M;E) on A, bits"], ["mi_b", "I(M;E) on B, bits"], ["mi_change", "I(M;E) B − A, bits"]]
    zero_rows = [{"label": "layer mean", "cells": {k: summarize(zcol(k)) for k, _ in zero_cols}}]
    zero_rows += [{"label": f"layer {layer}", "cells": {f"tv_{m}": summarize(zcol(f"tv_{m}_L{i}")) for m in MODALITIES}}
                  for i, layer in enumerate(layer_ids)]
    ft_cols = [["caption_loss", "caption loss on B"]] + \
              ([["retrieval_r1", "retrieval R@1 on B"]] if "retrieval_r1" in ft[keys[0]] else []) + \
              [["change_image", "routing change image (TV)"], ["change_text", "routing change text (TV)"],
               ["tv_b", "TV on B"], ["mi_b", "I(M;E) on B, bits"], ["mi_change", "I(M;E) change vs zero-shot on B"]]
    ft_rows = [{"label": f"router {v}", "cells": {k: summarize(fcol(v, k)) for k, _ in ft_cols},
                "chance": {k: ft[(v, seeds[0])].get(f"chance_{k}") for k in ("caption_loss", "retrieval_r1")}}
               for v in VARIANTS]
    def Z(key: str) -> dict[int, float]:
        return by_seed(seeds, zcol(key))

    def F(v: str, key: str) -> dict[int, float]:
        return by_seed(seeds, fcol(v, key))

    loss_chance = ft[keys[0]].get("chance_caption_loss")
    contrasts = [
        contrast("Zero-shot transfer: routing specialization on B vs on A", "routing TV", "on B (emoji)", Z("tv_b"),
                 "on A (embedded)", Z("tv_a"), higher_is="neutral", primary=True),
        contrast("Fine-tuning on B: router frozen vs trainable", "caption loss", "frozen", F("frozen", "caption_loss"),
                 "trainable", F("trainable", "caption_loss"), higher_is="worse", chance=loss_chance),
        contrast("Fine-tuning on B: router re-initialised vs trainable", "caption loss", "reinit",
                 F("reinit", "caption_loss"), "trainable", F("trainable", "caption_loss"), higher_is="worse",
                 chance=loss_chance),
        contrast("Fine-tuning on B: how far a trainable router moves vs a re-initialised one", "routing change, image",
                 "trainable", F("trainable", "change_image"), "reinit", F("reinit", "change_image"),
                 higher_is="neutral"),
    ]
    holm(contrasts)
    findings = [retention_sentence(zcol("mi_a"), zcol("mi_b")),
                f"Zero shot, the mean drift of p(e | image) from A to B is {np.mean(zcol('tv_image')):.3f} TV, of "
                f"p(e | text) {np.mean(zcol('tv_text')):.3f} TV (0: the same experts, 1: disjoint experts)."]

    steps = max(1, int(round(runner.scale.steps * runner.scale.finetune_fraction)))
    results = {
        **runner.header(since, "e5", NAME, "cross-dataset transfer of routing (embedded → emoji)", seeds),
        "finetune_steps": steps, "router_pattern": ROUTER_PATTERN,
        "tables": [
            {"title": "Zero shot: the A model's routing on A's and on B's test split (mean ± 95% CI over seeds)",
             "row_header": "", "columns": zero_cols, "rows": zero_rows},
            {"title": f"Fine-tuned on B for {steps} steps (mean ± 95% CI over seeds)", "row_header": "variant",
             "columns": ft_cols, "rows": ft_rows,
             "note": "Routing change: TV between p(e|m) on B after fine-tuning and the zero-shot p(e|m) on B, layer "
                     "mean."}],
        "contrasts": contrasts, "findings": findings,
        "plots": [{"file": "e5_transfer.png", "caption": "E5: zero-shot drift of each modality's expert distribution "
                                                         "from A to B per MoE layer, and the routing change after "
                                                         "fine-tuning per variant"}],
        "caveats": ["B's images are encoded with A's processor (gray, 28 px): emoji lose their colour, so part of the "
                    "drift is the encoding, not the content.",
                    "A frozen router keeps its weights (the trainer leaves them out of the optimizer), not its "
                    "routing: the hidden states entering it change with the rest of the model, so its routing moves.",
                    "A re-initialised router starts from the model's fresh initialisation; its routing change is "
                    "measured against the zero-shot routing it no longer has.",
                    "The zero-shot quality of A on B is not measured here (only routing); fine-tuned quality is B's "
                    "validation caption loss."],
    }
    write_results(out, results)
    render_folder(out)
    return results
