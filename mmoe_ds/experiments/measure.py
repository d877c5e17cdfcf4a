"""What a finished run measured, read from its files: the final evaluation with each quality
readout's chance level, and the routing of its last training windows (per-modality route counts,
TV, NMI, drop rates, compute shares, router entropy). The statistics over seeds are in `stats`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mmoe_ds.errors import ExperimentError
from mmoe_ds.moe.config import MODALITIES

from .runner import Run
from .stats import chance_of

# Said by every experiment that reads routing from metrics.jsonl (the trainer's per-window statistics).
TRAINING_ROUTING_CAVEAT = (
    "Routing is measured on training batches (the trainer's logged statistics), not on a held-out probe set, and "
    "there padding positions are routed and counted as text tokens (E3, E5 and `mmoe-ds analyze` measure on the "
    "test split without padding).")

# Quality readouts: metric -> (higher is, name); their chance levels are run_metrics' chance_<metric>.
QUALITY = {"caption_loss": ("worse", "caption loss"), "caption_rank_acc": ("better", "caption ranking accuracy"),
           "retrieval_r1": ("better", "retrieval R@1"), "text_ppl": ("worse", "text perplexity")}


def routing_counts(run: Run, last_fraction: float = 0.2, key: str = "routed_per_expert") -> list[np.ndarray]:
    """Per MoE layer, the [modality, expert] route counts summed over the last `last_fraction` of the
    logged training windows (at least one) — the routing the run ended with, as trained."""
    records = run.train_records
    if not records:
        raise ExperimentError(f"{run.dir}/metrics.jsonl: no training records.")
    tail = records[-max(1, int(round(len(records) * last_fraction))):]
    return counts_of(tail, key)


def counts_of(records: Sequence[dict], key: str = "routed_per_expert") -> list[np.ndarray]:
    """Per MoE layer, [modality, expert] sums of `key` over training records' routing."""
    layers = len(records[0]["routing"])
    return [np.array([[sum(r["routing"][layer][m][key][e] for r in records)
                       for e in range(len(records[0]["routing"][layer][m][key]))] for m in MODALITIES], dtype=float)
            for layer in range(layers)]


def routing_summary(records: Sequence[dict]) -> dict[str, float]:
    """Routing measures of training records (one window or several), averaged over MoE layers.

    Returns: tv (0..1) and nmi (Miller-Madow I(M;E)/H(M)) of the routes chosen; per modality m:
    drop_{m} (share of m's routes dropped by capacity), eff_{m} (effective experts exp H(E|m)),
    share_{m} (m's share of the expert compute actually spent, i.e. of kept routes), entropy_{m}
    (mean per-token router entropy, nats: lower = more confident); and tv_L{i} / nmi_L{i} per layer.
    """
    from mmoe_ds.analysis.metrics import effective_experts, nmi, total_variation

    routed, kept = counts_of(records, "routed_per_expert"), counts_of(records, "kept_per_expert")
    out: dict[str, float] = {}
    tvs, nmis = [], []
    for i, (r, k) in enumerate(zip(routed, kept)):
        p = r / np.maximum(r.sum(1, keepdims=True), 1)
        tvs.append(total_variation(p[0], p[1]) if (r.sum(1) > 0).all() else float("nan"))
        nmis.append(nmi(r, miller_madow=True) if (r.sum(1) > 0).all() else float("nan"))
        out[f"tv_L{i}"], out[f"nmi_L{i}"] = tvs[-1], nmis[-1]
    out["tv"], out["nmi"] = float(np.mean(tvs)), float(np.mean(nmis))
    total_kept = sum(k.sum() for k in kept)
    for j, m in enumerate(MODALITIES):
        r_m = sum(r[j].sum() for r in routed)
        k_m = sum(k[j].sum() for k in kept)
        out[f"drop_{m}"] = float(1 - k_m / r_m) if r_m else float("nan")
        out[f"share_{m}"] = float(k_m / total_kept) if total_kept else float("nan")
        out[f"eff_{m}"] = float(np.mean([effective_experts(r[j] / r[j].sum()) for r in routed if r[j].sum() > 0]))
        tokens = sum(rec["routing"][layer][m]["tokens"] for rec in records for layer in range(len(routed)))
        ent = sum(rec["routing"][layer][m]["entropy"] * rec["routing"][layer][m]["tokens"]
                  for rec in records for layer in range(len(routed)))
        out[f"entropy_{m}"] = float(ent / tokens) if tokens else float("nan")
    return out


def run_metrics(run: Run, last_fraction: float = 0.2) -> dict[str, float]:
    """Final evaluation (caption_rank_acc, caption_loss, text_ppl, retrieval_r1 when measured) and the
    routing summary of the last `last_fraction` of training windows."""
    records = run.train_records
    tail = records[-max(1, int(round(len(records) * last_fraction))):]
    final = run.final_eval()
    out = {k: float(final[k]) for k in ("caption_rank_acc", "caption_loss", "text_ppl", "retrieval_r1") if k in final}
    out.update(chance_levels(run))
    out.update(routing_summary(tail))
    return out


def vocab_size(data_dir: str | os.PathLike) -> int:
    """Tokens of a prepared dataset's tokenizer (its processor/tokenizer.json: vocabulary + added tokens)."""
    tok = json.loads((Path(data_dir) / "processor" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    return len(vocab) + sum(1 for t in tok.get("added_tokens", []) if t["content"] not in vocab)


def chance_levels(run: Run) -> dict[str, float]:
    """The chance level of each quality readout of `run`'s final evaluation (`stats.chance_of`), the
    vocabulary read from the run's dataset (its processor/tokenizer.json) when it is there."""
    data_dir = run.recipe.get("data", {}).get("dir")
    has_vocab = data_dir and (Path(data_dir) / "processor" / "tokenizer.json").exists()
    return chance_of(run.final_eval(), vocab_size(data_dir) if has_vocab else None)
