"""E6, capacity and bias audit: the agnostic and the aware router trained under flipped batch
mixes — image-heavy (a quarter image+caption pairs, the rest images alone) and text-heavy (a
quarter pairs, the rest text alone) — next to the default mix (E1's runs, reused).

Per modality, from the routes of the last 20% of training: the share of its routes dropped by
capacity, its effective experts exp H(E|m), its share of the expert compute actually spent (kept
routes: every route costs one expert FFN), and the router's mean per-token entropy (lower = more
confident); and the evaluation (caption ranking accuracy, caption loss, text perplexity).
"""
from __future__ import annotations

from pathlib import Path

from . import e1_matched
from .measure import QUALITY as QUALITY_READOUTS
from .measure import TRAINING_ROUTING_CAVEAT, run_metrics
from .render import render_folder
from .runner import Runner, RunSpec, seeds_for, write_results
from .stats import by_seed, contrast, holm, summarize

NAME = "e6_audit"
ROUTERS = ("agnostic", "aware")
MIXES = ("default", "image_heavy", "text_heavy")
AUDIT = (("drop_image", "image drop rate"), ("drop_text", "text drop rate"), ("eff_image", "image eff. experts"),
         ("eff_text", "text eff. experts"), ("share_image", "image compute share"),
         ("share_text", "text compute share"),
         ("entropy_image", "image router entropy"), ("entropy_text", "text router entropy"))
QUALITY = (("caption_rank_acc", "caption ranking acc"), ("caption_loss", "caption loss"), ("text_ppl", "text ppl"))


def mixes(batch: int) -> dict[str, dict[str, int] | None]:
    """The batch mixes for a micro batch of `batch` samples (None: the recipe's own)."""
    if batch < 4:
        raise ValueError(f"a batch mix needs at least 4 samples per micro batch, got {batch}.")
    pairs = batch // 4
    return {"default": None, "image_heavy": {"image_text": pairs, "image": batch - pairs},
            "text_heavy": {"image_text": pairs, "text": batch - pairs}}


def spec(router: str, mix: str, seed: int, composition: dict | None) -> RunSpec:
    base = e1_matched.spec(e1_matched.Cell(router), seed)
    if composition is None:
        return base
    return RunSpec(base.base, seed, {"data": {"composition": composition}}, label=f"{router}, {mix}")


def run(runner: Runner, seeds: list[int], out: Path) -> dict:
    """Train (or reuse) router × mix × seed; write results.json, then results.md and e6_audit.png from it."""
    since = runner.tally()
    seeds = seeds_for(runner, "e6", seeds)
    default = runner.recipe(e1_matched.spec(e1_matched.AGNOSTIC, seeds[0]))["data"]["composition"]
    compositions = mixes(sum(default.values()))
    keys = [(r, m, s) for r in ROUTERS for m in MIXES for s in seeds]
    runs = runner.run_all([spec(r, m, s, compositions[m]) for r, m, s in keys])
    metrics = {k: run_metrics(run) for k, run in zip(keys, runs)}

    def col(router: str, mix: str, key: str) -> list[float]:
        return [metrics[(router, mix, s)][key] for s in seeds]

    def seeded(router: str, mix: str, key: str) -> dict[int, float]:
        return by_seed(seeds, col(router, mix, key))

    def label(router: str, mix: str) -> str:
        return f"{router}, {mix.replace('_', '-')}"

    def rows(metric_list) -> list[dict]:
        return [{"label": label(r, m), "cells": {k: summarize(col(r, m, k)) for k, _ in metric_list},
                 "chance": {k: metrics[(r, m, seeds[0])].get(f"chance_{k}") for k, _ in metric_list
                            if k in QUALITY_READOUTS}}
                for r in ROUTERS for m in MIXES]

    contrasts = [
        contrast("Aware vs agnostic, image-heavy mix", "text drop rate", label("aware", "image_heavy"),
                 seeded("aware", "image_heavy", "drop_text"), label("agnostic", "image_heavy"),
                 seeded("agnostic", "image_heavy", "drop_text"), higher_is="worse", primary=True),
        contrast("Aware vs agnostic, image-heavy mix", "image drop rate", label("aware", "image_heavy"),
                 seeded("aware", "image_heavy", "drop_image"), label("agnostic", "image_heavy"),
                 seeded("agnostic", "image_heavy", "drop_image"), higher_is="worse"),
        contrast("Aware vs agnostic, text-heavy mix", "image drop rate", label("aware", "text_heavy"),
                 seeded("aware", "text_heavy", "drop_image"), label("agnostic", "text_heavy"),
                 seeded("agnostic", "text_heavy", "drop_image"), higher_is="worse"),
    ]
    for r in ROUTERS:
        th, ih = label(r, "text_heavy"), label(r, "image_heavy")
        contrasts += [
            contrast(f"Flipping the mix ({r})", "image drop rate", th, seeded(r, "text_heavy", "drop_image"), ih,
                     seeded(r, "image_heavy", "drop_image"), higher_is="worse"),
            contrast(f"Flipping the mix ({r})", "text drop rate", th, seeded(r, "text_heavy", "drop_text"), ih,
                     seeded(r, "image_heavy", "drop_text"), higher_is="worse"),
            contrast(f"Flipping the mix ({r})", "caption ranking accuracy", th,
                     seeded(r, "text_heavy", "caption_rank_acc"), ih, seeded(r, "image_heavy", "caption_rank_acc"),
                     chance=metrics[(r, "text_heavy", seeds[0])].get("chance_caption_rank_acc")),
            contrast(f"Flipping the mix ({r})", "text perplexity", th, seeded(r, "text_heavy", "text_ppl"), ih,
                     seeded(r, "image_heavy", "text_ppl"), higher_is="worse",
                     chance=metrics[(r, "text_heavy", seeds[0])].get("chance_text_ppl")),
        ]
    holm(contrasts)

    results = {
        **runner.header(since, "e6", NAME, "capacity and bias audit under flipped batch mixes", seeds),
        "compositions": {m: c or default for m, c in compositions.items()},
        "tables": [
            {"title": "Per-modality capacity audit (last 20% of training; mean ± 95% CI)", "row_header": "router, mix",
             "columns": [list(m) for m in AUDIT], "rows": rows(AUDIT),
             "note": "Drop rate: routes dropped by capacity / routes chosen. Compute share: the modality's kept routes "
                     "/ all kept routes (each route is one expert FFN). Entropy in nats (lower = more confident)."},
            {"title": "Quality per router and mix (final evaluation; mean ± 95% CI)", "row_header": "router, mix",
             "columns": [list(m) for m in QUALITY], "rows": rows(QUALITY)}],
        "contrasts": contrasts,
        "plots": [{"file": "e6_audit.png", "caption": "E6: per-modality drop rate and the image share of expert "
                                                      "compute per router and batch mix (whiskers: 95% CIs)"}],
        "caveats": ["The image-heavy mix has no text-only samples and the text-heavy mix no image-only ones, and both "
                    "have a quarter of the default's image+caption pairs: quality under a flipped mix mostly measures "
                    "what the model was trained on.",
                    "The mixes change what the model learns from as well as the capacity pressure: a quality change "
                    "is not a capacity effect alone.",
                    "Measured on training batches of a small model; capacity factor and top-k are the recipe's "
                    "(image top-1, text top-2), which already give text twice the routes per token.",
                    TRAINING_ROUTING_CAVEAT],
    }
    write_results(out, results)
    render_folder(out)
    return results
